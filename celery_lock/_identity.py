"""Who holds a lock: host, boot, pid namespace, pid and process start time.

The holder metadata written into every lock lets a contender on the same host prove that the
holder is dead (so its lock can be broken at once instead of after the TTL). Death is only ever
*proved*, never guessed: a lock from another host, another boot or a pid namespace we cannot see
into is left to its TTL.

The proof reads Linux's procfs. Elsewhere (macOS, the BSDs) nothing here fails: the boot id, pid
namespace and start time are None, :func:`holder_is_dead` never proves a death, and locks end by
expiry. Nothing at import time touches procfs.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Mapping
from typing import Any

from celery_lock import _fork

__all__ = ["Identity", "current", "holder_is_dead"]

#: Where procfs is mounted (tests point it elsewhere to play a system without one).
_PROC = "/proc"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    return _read(f"{_PROC}/sys/kernel/random/boot_id")


def _pid_ns() -> str | None:
    try:
        return os.readlink(f"{_PROC}/self/ns/pid")
    except OSError:
        return None


def process_start(pid: int) -> tuple[int, str] | None:
    """Return ``(start_ticks, state)`` of ``pid`` from procfs, or None when it does not exist.

    Field 22 of ``/proc/<pid>/stat`` is the start time in clock ticks since boot; with the boot id
    it names one process uniquely even after the pid is recycled.
    """
    raw = _read(f"{_PROC}/{pid}/stat")
    if raw is None:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    tail = raw[raw.rfind(")") + 2 :].split()
    try:
        return int(tail[19]), tail[0]
    except (IndexError, ValueError):
        return None


class Identity:
    """This process's identity; recomputed after fork (the pid changes)."""

    __slots__ = ("boot_id", "fields", "host", "pid", "pid_ns", "start")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.boot_id = _boot_id()
        self.pid_ns = _pid_ns()
        found = process_start(self.pid)
        self.start = found[0] if found else None
        #: The fields every lock's holder metadata records about its holder, in the names the
        #: metadata uses. Built once (locks are written on the hot path); read-only.
        self.fields: Mapping[str, object] = {
            "host": self.host,
            "pid": self.pid,
            "start": self.start,
            "boot": self.boot_id,
            "pidns": self.pid_ns,
        }

    def same_host(self, meta: dict[str, Any]) -> bool:
        """True when ``meta`` was written on this host in this boot."""
        return (
            meta.get("host") == self.host
            and self.boot_id is not None
            and meta.get("boot") == self.boot_id
        )


_lock = threading.Lock()
_current: Identity | None = None


def current() -> Identity:
    """This process's :class:`Identity` (cached; a forked child gets its own)."""
    global _current  # noqa: PLW0603 - one per process by design
    ident = _current
    if ident is None or ident.pid != _fork.pid():
        with _lock:
            ident = _current
            if ident is None or ident.pid != _fork.pid():
                ident = _current = Identity()
    return ident


def holder_is_dead(meta: dict[str, Any]) -> bool:
    """True only when the holder described by ``meta`` is provably gone.

    Proof needs the same host, the same boot and the same pid namespace, and then either no
    process with that pid, a process whose start time differs (pid recycled) or a zombie.
    Without a readable procfs (not Linux) nothing is ever proved: the answer is False.
    """
    me = current()
    # Without procfs our boot id and pid namespace are None: nothing matches, nothing is proved.
    if not me.same_host(meta) or meta.get("pidns") != me.pid_ns or me.pid_ns is None:
        return False
    pid = meta.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if pid == me.pid:
        # Our own process is alive by definition; a lease of ours is never "dead".
        return False
    found = process_start(pid)
    if found is None:
        try:
            os.kill(pid, 0)
        except OSError as exc:
            return exc.errno == errno.ESRCH
        return False  # exists but /proc unreadable: cannot prove anything
    start, state = found
    if state in ("Z", "X"):
        return True  # killed, not yet reaped: it will never release
    recorded = meta.get("start")
    return isinstance(recorded, int) and recorded != start
