"""Fork handling in one place: a generation number that changes in every forked child, this
process's pid, and callbacks that reset per-process state there.

A process forked while another thread held one of our mutexes, a socket or an inotify instance
must not use the parent's copy: a mutex could stay locked for ever, a shared socket would mix two
conversations. Objects that must not cross a fork remember :func:`generation` when they are made
and compare it before use (cheaper than ``os.getpid()``, which is a system call); module state is
reset by a callback registered with :func:`in_child`. The jitter stream lives here too: it is
reseeded in every child.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import TypeVar

__all__ = ["generation", "in_child", "jitter", "pid", "random_hex"]

_F = TypeVar("_F", bound=Callable[[], None])

_generation = 0
_pid = os.getpid()
_callbacks: list[Callable[[], None]] = []


def generation() -> int:
    """A number that differs in a forked child from its parent's."""
    return _generation


def pid() -> int:
    """This process's pid, without the system call ``os.getpid()`` makes (about 0.5 us, several
    times per lock cycle); kept current by the fork hook, like :func:`generation`."""
    return _pid


def in_child(callback: _F) -> _F:
    """Call ``callback()`` in every child forked from now on (usable as a decorator)."""
    _callbacks.append(callback)
    return callback


#: Our own random stream for jitter and ids: the global one belongs to the application (a
#: seeded app, or hypothesis, must not see it move when a lock waits), reseeded in every forked
#: child so that worker processes do not wait in step.
_rng = random.Random()  # noqa: S311 - jitter and ids, not secrets


def jitter() -> float:
    """A factor in [0.5, 1.0] that spreads waits (one per call)."""
    return _rng.uniform(0.5, 1.0)


def random_hex() -> str:
    """64 bits of the same stream as 16 hex digits: an id that only has to differ from this
    process's other ids (not a secret: ``secrets`` costs a system call per id)."""
    return f"{_rng.getrandbits(64):016x}"


def _after_fork_in_child() -> None:
    global _generation, _pid  # noqa: PLW0603 - one counter per process by design
    _generation += 1
    _pid = os.getpid()
    _rng.seed()
    for callback in _callbacks:
        callback()


os.register_at_fork(after_in_child=_after_fork_in_child)
