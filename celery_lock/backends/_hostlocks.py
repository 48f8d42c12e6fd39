"""Same-host marks of Redis leases: one shared byte-range lock per key on ``.hostlocks``.

While a hybrid manager serves a key from Redis, another process on this host may see Redis as
down (each process notices an outage, and its end, on its own schedule) and take the key from
lock files. So each Redis lease of a hybrid with a file fallback holds a *shared* open file
description lock (``F_OFD_SETLK``) on one byte of ``<lock dir>/.hostlocks``, at an offset from
the key's hash, for as long as the lease lasts in this process:

* a grant from files checks for such a byte (``F_OFD_GETLK``) once its lock file exists and
  before it writes its record, and backs out when it finds one;
* a Redis grant takes its byte first and then reads the key's lock file: absent or free, Redis
  alone decides; otherwise the hybrid falls back to a full shadow lock file.

Each side writes, then checks, so of two that race at least one sees the other. A byte costs
two ``fcntl`` calls per lease, where a shadow lock file costs about seventeen system calls and
a file per key. The kernel drops the bytes of a process that dies; a Redis lease that expired
while its process lives keeps its byte until the process ends it (the renewer would have kept a
shadow alive just as long).

Open file description locks do not conflict within one description, so each process opens the
file once per directory and keeps its own count per byte; a forked child drops the parent's
description and opens its own. Linux only (3.15+, 64-bit); elsewhere :func:`for_directory`
returns None and the hybrid keeps a shadow lock file beside each Redis lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import struct
import sys
import threading
import weakref
from typing import Final

from celery_lock import _fork
from celery_lock.backends._lockdir import OPEN_CREATE, close_quietly

__all__ = ["NAME", "NO_MARKS", "HostLocks", "Marks", "for_directory", "offset"]

_log = logging.getLogger("celery_lock.hybrid")

#: The file whose bytes are locked (never written: only its byte ranges matter).
NAME: Final = ".hostlocks"
#: ``struct flock`` of 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK: Final = struct.Struct("hhqqi4x")
_SETLK: Final[int] = getattr(fcntl, "F_OFD_SETLK", 0)
_GETLK: Final[int] = getattr(fcntl, "F_OFD_GETLK", 0)
_SUPPORTED: Final = (
    sys.platform.startswith("linux")
    and _SETLK > 0
    and _GETLK > 0
    and sys.maxsize > 2**32
    and _FLOCK.size == 32
)

#: One table per lock directory (device, inode) in this process, while a manager uses it.
_tables: weakref.WeakValueDictionary[tuple[int, int], HostLocks] = weakref.WeakValueDictionary()
_tables_lock = threading.Lock()


def offset(lock_name: str) -> int:
    """The byte of a key, from its lock file name (``sha256(key)`` in hex): 60 bits of hash."""
    return int(lock_name[:15], 16)


class Marks:
    """What a hybrid asks of the same-host marks; this base is "none here" (no byte locks of
    open file descriptions: every Redis lease keeps a shadow lock file and nothing vetoes)."""

    def mark(self, token: str, lock_name: str) -> bool:  # noqa: ARG002 - the interface
        """Mark the Redis lease ``token`` of the key whose lock file is ``lock_name`` (granted
        or about to be asked for); False when it is not marked (the hybrid then takes a shadow
        lock file)."""
        return False

    def drop(self, token: str) -> bool:  # noqa: ARG002 - the interface
        """The lease ``token`` ended; returns whether it may hold a shadow lock file."""
        return True

    def add_shadow(self, token: str) -> None:
        """The lease ``token`` also holds a shadow lock file."""

    def has_shadow(self, token: str) -> bool:  # noqa: ARG002 - the interface
        """False only for a lease known to hold no shadow lock file."""
        return True

    def held_name(self, lock_name: str) -> bool:  # noqa: ARG002 - the interface
        """True while a Redis lease on this host holds the key of the lock file ``lock_name``
        (also the veto of grants from files)."""
        return False


#: The marks where there are none.
NO_MARKS: Final = Marks()


def for_directory(dir_fd: int) -> HostLocks | None:
    """The table of the verified lock directory ``dir_fd``; None where byte locks of open file
    descriptions do not exist or the file cannot be used (then shadow lock files are used)."""
    if not _SUPPORTED:
        return None
    try:
        st = os.fstat(dir_fd)
    except OSError:
        return None
    ident = (st.st_dev, st.st_ino)
    with _tables_lock:
        table = _tables.get(ident)
        if table is not None and not table.linked():
            # A directory that was removed, its inode number now reused by ours.
            del _tables[ident]
            table = None
        if table is None:
            table = HostLocks(dir_fd)
            if not table.usable():
                return None
            _tables[ident] = table
    return table


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        close_quietly(fd)


@_fork.in_child
def _forget_after_fork() -> None:
    global _tables_lock  # noqa: PLW0603 - a parent thread may have held it at the fork
    _tables_lock = threading.Lock()
    for table in _tables.values():
        table.after_fork()


class HostLocks(Marks):
    """The Redis leases of this process in one lock directory, each holding a shared byte.

    Leases are known by token, so any manager of this process on the directory can end one;
    bytes are counted, so two leases whose keys share a byte (one chance in 2**60) share it.
    """

    def __init__(self, dir_fd: int) -> None:
        #: Our own copy: the manager that opened the directory may be collected first.
        self._dir_fd = os.dup(dir_fd)
        self._mutex = threading.Lock()
        self._fd: int | None = None
        #: What the finalizer closes: the directory and the file, once opened.
        self._fds: list[int] = [self._dir_fd]
        weakref.finalize(self, _close_all, self._fds)
        #: byte -> leases of this process that hold it
        self._held: dict[int, int] = {}
        #: token -> byte of each Redis lease of this process
        self._leases: dict[str, int] = {}
        #: tokens of those leases that also hold a shadow lock file
        self._shadowed: set[str] = set()

    def usable(self) -> bool:
        """Open the file and try one lock and one test on it."""
        try:
            with self._mutex:
                fd = self._open()
                fcntl.fcntl(fd, _SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 1, 0))
                fcntl.fcntl(fd, _SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 1, 0))
                fcntl.fcntl(fd, _GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
        except OSError:
            return False
        return True

    def linked(self) -> bool:
        """False once the directory was removed."""
        try:
            return os.fstat(self._dir_fd).st_nlink > 0
        except OSError:
            return False

    def _open(self) -> int:
        fd = self._fd
        if fd is None:
            fd = os.open(NAME, OPEN_CREATE, 0o600, dir_fd=self._dir_fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                os.close(fd)
                raise OSError(f"{NAME} is not a regular file with one link")
            self._fd = fd
            self._fds.append(fd)
        return fd

    def mark(self, token: str, lock_name: str) -> bool:
        try:
            self.hold(token, offset(lock_name))
        except OSError as exc:
            _log.debug("same-host mark for %s failed: %s", lock_name, exc)
            return False
        return True

    def held_name(self, lock_name: str) -> bool:
        return self.held(offset(lock_name))

    def hold(self, token: str, byte: int) -> None:
        """Take ``byte`` for the Redis lease ``token`` (granted or about to be asked for).

        :raises OSError: when the lock cannot be taken (the caller uses a shadow file instead).
        """
        with self._mutex:
            if self._leases.get(token) == byte:
                return  # a retry with the same token holds it already
            count = self._held.get(byte, 0)
            if not count:
                lock = _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0)
                fcntl.fcntl(self._open(), _SETLK, lock)
            self._held[byte] = count + 1
            self._leases[token] = byte

    def add_shadow(self, token: str) -> None:
        if token in self._leases:
            self._shadowed.add(token)

    def has_shadow(self, token: str) -> bool:
        return token not in self._leases or token in self._shadowed

    def drop(self, token: str) -> bool:
        """The lease ``token`` ended: let go of its byte (the last lease on it unlocks it).

        :returns: whether the lease may have a shadow lock file (True for a lease this
            process does not know: one taken before a fork, or by a manager without bytes).
        """
        with self._mutex:
            byte = self._leases.pop(token, None)
            if byte is None:
                return True
            shadowed = token in self._shadowed
            self._shadowed.discard(token)
            count = self._held.get(byte, 0)
            if count > 1:
                self._held[byte] = count - 1
            elif count:
                del self._held[byte]
                fd = self._fd
                if fd is not None:
                    unlock = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, byte, 1, 0)
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(fd, _SETLK, unlock)
        return shadowed

    def held(self, byte: int) -> bool:
        """True while a Redis lease on this host (this process or another) holds ``byte``;
        True also when the test itself fails (a grant from files then backs out)."""
        with self._mutex:
            if self._held.get(byte):
                return True
            test = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
            try:
                answer = fcntl.fcntl(self._open(), _GETLK, test)
            except OSError:
                return True
        return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)

    def after_fork(self) -> None:
        """In a forked child: the parent's description and leases are not ours."""
        self._mutex = threading.Lock()
        self._held = {}
        self._leases = {}
        self._shadowed = set()
        fd, self._fd = self._fd, None
        if fd is not None:
            # The parent keeps its own descriptor: its locks live on until it closes that.
            self._fds.remove(fd)
            close_quietly(fd)
