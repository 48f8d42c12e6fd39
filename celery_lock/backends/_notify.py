"""Change notification for QUEUE waiters: an inotify watch on the lock directory (Linux), or
polling where there is none.

Why a ctypes binding of our own and not the ``inotify_simple`` package: we need two libc calls
(``inotify_init1``, ``inotify_add_watch``) and one question about the events read ("does any
name our file, or did the queue overflow?"). ``inotify_simple`` 2.0.1 is itself a ctypes
binding of the same calls, so it would bring no compiled code, no other platform and no speed,
only a dependency for every install (behind a ``sys_platform == "linux"`` marker) and a second
code path where it is absent. Its ``INotify`` is a ``FileIO`` that closes its descriptor when
collected, which is wrong for us in two places: the instance pool below exists because closing
an inotify descriptor waits for an RCU grace period (milliseconds, whatever the binding), and a
forked child must *not* close descriptor numbers it inherited blindly, since the child may have
reused them (billiard closes inherited descriptors and opens new ones). Our binding keeps raw
descriptors whose lifetime we decide. It is loaded on first use, never at import, and only on
Linux; anywhere else, or when the kernel refuses an instance (``fs.inotify.max_user_instances``),
waiters poll.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import struct
import sys
import threading
import time as _time
from typing import Any, Final

from celery_lock import _fork
from celery_lock._base import Waiter
from celery_lock.backends._lockdir import close_quietly

__all__ = ["NotifyWaiter", "Watches"]

#: inotify event bits (linux/inotify.h): a file written, created, deleted or moved in.
_IN_MODIFY: Final = 0x002
_IN_MOVED_TO: Final = 0x080
_IN_CREATE: Final = 0x100
_IN_DELETE: Final = 0x200
_IN_Q_OVERFLOW: Final = 0x4000
_IN_WATCH: Final = _IN_MODIFY | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_IN_EVENT: Final = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
_READ_SIZE: Final = 64 * 1024

#: libc's (inotify_init1, inotify_add_watch) once loaded, None where there are none; tests
#: replace it. _UNLOADED until the first waiter needs it.
_UNLOADED: Final[Any] = object()
inotify: Any = _UNLOADED


def _load() -> tuple[Any, Any] | None:
    """libc's ``inotify_init1`` and ``inotify_add_watch``, or None where there are none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes  # noqa: PLC0415 - only where inotify can exist, and only when needed

        # dlopen(NULL): the symbols already in the process (libc among them); no
        # find_library, which runs ldconfig in a subprocess.
        libc = ctypes.CDLL(None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (ImportError, OSError, AttributeError):
        return None
    init.argtypes, init.restype = [ctypes.c_int], ctypes.c_int
    add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add.restype = ctypes.c_int
    return init, add


def _binding() -> tuple[Any, Any] | None:
    global inotify  # noqa: PLW0603 - loaded once per process, on first use
    if inotify is _UNLOADED:
        # No lock: two threads loading at once get equal results, and a lock here would be one
        # more mutex a fork could catch held.
        inotify = _load()
    return inotify  # type: ignore[no-any-return]


class Watches:
    """A manager's idle inotify instances, each watching its lock directory.

    Closing an inotify descriptor waits for an RCU grace period (milliseconds), so instances
    are kept for the next QUEUE wait instead; one taken again is drained first. A forked child
    starts with none of its own: an instance shared with the parent would split its events.
    """

    __slots__ = ("dir_fd", "generation", "idle")

    #: Idle instances kept per manager (the kernel allows 128 per user by default).
    KEEP: Final = 4

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd
        self.idle: list[int] = []
        #: _fork.generation() of the process the idle instances belong to.
        self.generation = _fork.generation()

    def take(self) -> int:
        """An armed instance with no pending events, or -1 (no inotify: poll)."""
        if self.generation != _fork.generation():
            self._forget_parents()
        try:
            fd = self.idle.pop()
        except IndexError:
            return self._new()
        with contextlib.suppress(OSError):
            while os.read(fd, _READ_SIZE):  # events from before this wait: not a wake-up
                pass
        return fd

    def give(self, fd: int) -> None:
        """Return an instance taken from :meth:`take` (kept, or closed beyond KEEP)."""
        if self.generation == _fork.generation() and len(self.idle) < self.KEEP:
            self.idle.append(fd)
        else:
            close_quietly(fd)

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for fd in idle:
            close_quietly(fd)

    def _forget_parents(self) -> None:
        stale, self.idle, self.generation = self.idle, [], _fork.generation()
        for fd in stale:  # the parent's instances stay open in the parent
            # Only our copy of an inotify instance: a child that closed its inherited
            # descriptors may have reused the number for something else. (Instances exist only
            # on Linux, where /proc/self/fd names them.)
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                    os.close(fd)

    def _new(self) -> int:
        binding = _binding()
        if binding is None:
            return -1
        init, add = binding
        fd = int(init(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            return -1  # EMFILE (fs.inotify.max_user_instances), ENOSYS: poll
        # The directory we verified and hold open, not a path that could be swapped meanwhile.
        if add(fd, f"/proc/self/fd/{self.dir_fd}".encode(), _IN_WATCH) < 0:
            close_quietly(fd)
            return -1
        return fd


class NotifyWaiter(Waiter):
    """Wakes a QUEUE waiter when its lock file is written (a release, most likely), through an
    inotify watch on the lock directory; otherwise waits on ``wake`` (set by a release in this
    process) or, without one, sleeps.

    Armed at construction, before the next attempt, so a release between that attempt and the
    wait still wakes us. A holder that dies or expires writes nothing: the caller's growing poll
    delay (``poll_max``) bounds the wait for those.
    """

    def __init__(self, watches: Watches, name: str, wake: threading.Event | None = None) -> None:
        self._watches = watches
        self._name = name.encode()
        self._wake = wake
        self._fd = watches.take()
        self._poller: select.poll | None = None
        if self._fd >= 0:
            # poll, not select: select() refuses descriptors above 1023, which a worker with
            # many connections reaches.
            self._poller = select.poll()
            self._poller.register(self._fd, select.POLLIN)
        if wake is not None:
            wake.clear()

    def wait(self, seconds: float) -> bool:
        fd, poller = self._fd, self._poller
        if fd < 0 or poller is None:
            wake = self._wake
            if wake is None:
                return super().wait(seconds)
            if wake.wait(seconds):
                wake.clear()  # before the caller's next attempt, which sees this release
                return True
            return False
        deadline = _time.monotonic() + seconds
        while True:
            remaining = deadline - _time.monotonic()
            if remaining <= 0:
                return False
            if not poller.poll(max(1, math.ceil(remaining * 1000))):
                return False
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                continue
            if self._mentions_us(data):
                return True

    def _mentions_us(self, data: bytes) -> bool:
        offset = 0
        while offset + _IN_EVENT.size <= len(data):
            _wd, mask, _cookie, length = _IN_EVENT.unpack_from(data, offset)
            offset += _IN_EVENT.size
            if mask & _IN_Q_OVERFLOW or data[offset : offset + length].rstrip(b"\0") == self._name:
                return True  # overflow: events were lost, ours perhaps among them
            offset += length
        return False

    def close(self) -> None:
        if self._fd >= 0:
            self._poller = None
            self._watches.give(self._fd)
            self._fd = -1
