"""QUEUE waiters of one key inside one process wait in line: one of them contends at a time.

Without a line, every thread waiting for a key wakes on every release of it (inotify tells them
all), opens the lock file and queues on its flock, and all but one go back to sleep: 100 threads
x 100 cycles on one key took minutes (issue 14 item 6). In line, only the head of a key's line
(its *leader*) tries the lock file and watches for releases; the others sleep on their own
:class:`threading.Event` until the leader leaves (it got the lock, gave up, or failed), which
wakes exactly the next one. A waiter whose time runs out leaves from wherever it stands; only
the leader's leaving wakes anyone, so nobody loses a turn.

Lines are per manager: two managers on one directory in one process form two lines, whose
leaders meet on the flock as two processes would. Releases by other processes reach the leader
through the manager's notification (inotify or polling); a release in this process also sets
the line's ``wake`` event, which is what a polling leader (no inotify) waits on, so a hand-off
inside one process never waits for the poll delay.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from celery_lock import _fork
from celery_lock._base import Waiter

__all__ = ["Line", "Lines"]

_T = TypeVar("_T")


class Line:
    """The threads waiting for one key, in arrival order; the first is the leader."""

    __slots__ = ("tickets", "wake")

    def __init__(self) -> None:
        #: One event per waiting thread, set when that thread becomes the leader.
        self.tickets: collections.deque[threading.Event] = collections.deque()
        #: Set by a release of the key in this process; the polling leader waits on it.
        self.wake = threading.Event()


class Lines:
    """A manager's lines, by key; a line exists only while somebody stands in it."""

    __slots__ = ("_generation", "_lines", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: dict[str, Line] = {}
        self._generation = _fork.generation()

    def wait(
        self,
        key: str,
        deadline: float,
        *,
        attempt: Callable[[], _T | None],
        waiter: Callable[[], Waiter],
        poll: tuple[float, float],
    ) -> _T | None:
        """Wait in ``key``'s line until our turn, then ``attempt()`` until it returns something
        or ``deadline`` (monotonic) passes.

        :param waiter: makes the leader's :class:`Waiter` (armed at once, before the first
            attempt, so a release between an attempt and the wait still wakes it).
        :param poll: the first and the longest delay between attempts (a holder that dies or
            expires writes nothing, so the leader also polls).
        """
        line, ticket = self.join(key)
        try:
            if not ticket.wait(max(0.0, deadline - time.monotonic())):
                return None  # never got our turn
            return _contend(attempt, waiter(), deadline, poll)
        finally:
            self.leave(key, line, ticket)

    def join(self, key: str) -> tuple[Line, threading.Event]:
        """Stand in ``key``'s line; the returned ticket is set once we lead it."""
        ticket = threading.Event()
        self._check_fork()
        with self._lock:
            line = self._lines.get(key)
            if line is None:
                line = self._lines[key] = Line()
            line.tickets.append(ticket)
            if len(line.tickets) == 1:
                ticket.set()
        return line, ticket

    def leave(self, key: str, line: Line, ticket: threading.Event) -> None:
        """Leave the line (got the lock, gave up or failed); a leader hands the turn on."""
        with self._lock:
            tickets = line.tickets
            if tickets and tickets[0] is ticket:
                tickets.popleft()
                if tickets:
                    tickets[0].set()
            else:
                # Not (or no longer) the leader: leaving wakes nobody. ValueError: the line was
                # dropped by a fork reset while we stood in it.
                with contextlib.suppress(ValueError):
                    tickets.remove(ticket)
            if not tickets and self._lines.get(key) is line:
                del self._lines[key]

    def wake(self, key: str) -> threading.Event | None:
        """The ``wake`` event of ``key``'s line, if somebody waits for it."""
        line = self._lines.get(key)
        return None if line is None else line.wake

    def released(self, key: str) -> None:
        """``key`` was just freed by this process: wake its line's leader if it polls."""
        line = self._lines.get(key)  # a dict read: atomic, no lock on the release path
        if line is not None:
            line.wake.set()

    def _check_fork(self) -> None:
        if self._generation != _fork.generation():
            # A forked child inherits the lines of threads that do not exist in it; their
            # tickets would never leave, and our mutex may have been held at the fork.
            self._lock = threading.Lock()
            self._lines = {}
            self._generation = _fork.generation()


def _contend(
    attempt: Callable[[], _T | None], waiter: Waiter, deadline: float, poll: tuple[float, float]
) -> _T | None:
    """The leader's loop: try, wait for a change (or the poll delay), try again."""
    poll_min, poll_max = poll
    delay = poll_min
    try:
        while True:
            got = attempt()
            if got is not None:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Jittered, growing delay: leaders in other processes must not poll in lockstep;
            # a release cuts the wait short.
            if waiter.wait(min(remaining, delay * _fork.jitter())):
                delay = poll_min
            else:
                delay = min(delay * 1.6, poll_max)
    finally:
        waiter.close()
