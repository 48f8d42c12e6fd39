"""The entries of one lock directory, each opened, read and removed under its own flock.

This is the file backend's flock protocol; the lease rules on top of it (who holds a key,
what is stale) are :class:`~celery_lock.backends.file.FileLockManager`'s. Every entry is opened
relative to the verified directory descriptor with ``O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK``, and
only a regular file with one link counts as a lock file: anything else under a lock name (a
symlink, FIFO, socket, directory, an unreadable or hard-linked file) is *foreign*. A foreign
entry is never read or written through; it counts as held for :data:`CORRUPT_GRACE` after its
last change and is then unlinked under the directory's ``.guard``. A lock file is removed only
under its own exclusive flock, after its fence went to ``.fences``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from celery_lock._types import CleanReport
from celery_lock.backends import _fences, _filerecord, _lockdir
from celery_lock.backends._lockdir import OPEN_READ, unlock_close
from celery_lock.errors import LockBackendUnavailable, LockError

__all__ = ["CORRUPT_GRACE", "Entry", "Foreign", "LockFiles"]

#: Unreadable, corrupt or foreign entries count as held this long after their last change
#: (filelock's grace, tox-dev/filelock#532, #551): long enough for any writer we do not know of.
CORRUPT_GRACE: Final = 2.0
#: Longest wait for a lock file's flock: a process SIGSTOPped inside the few-µs critical section
#: must not wedge everybody for ever. Not Final: tests shorten it.
BUSY_TIMEOUT = 5.0
#: Attempts to open a name whose file a cleaner keeps removing between our open and our flock.
REOPEN_TRIES: Final = 100
#: Errors of open() that mean "not a lock file": ELOOP a symlink, EISDIR a directory, ENXIO
#: (Linux) or EOPNOTSUPP (BSD, macOS) a socket, EACCES/EPERM unreadable.
_NOT_A_LOCK_FILE: Final = frozenset(
    {errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EOPNOTSUPP, errno.EACCES, errno.EPERM}
)


class Foreign(NamedTuple):
    """Something under a lock name that is not a lock file we can open: its ``lstat`` and the
    problem."""

    st: os.stat_result
    problem: str


class Entry(NamedTuple):
    """What a lock file holds: ``meta`` of a holder, or the ``fence`` of a free file, or (both
    None) a ``problem``."""

    name: str
    meta: dict[str, Any] | None
    fence: int | None
    st: os.stat_result
    problem: str | None


#: ``judge(entry)``: why a lock may be removed, or None while it is live (the manager's rules).
Judge = Callable[[Entry], "str | None"]
#: ``hand_on(fd, entry)``: a stale lock is about to go; True when the manager gave the key to a
#: waiter instead (it rewrote the record under our flock: the file stays).
HandOn = Callable[[int, Entry], bool]


def is_stale(st: os.stat_result, now: float) -> bool:
    """True when an unreadable entry last changed more than the grace ago."""
    # abs(): an mtime far in the future (the wall clock was stepped back) must not keep a
    # corrupt entry "fresh" for hours.
    return abs(now - st.st_mtime_ns / 1e9) > CORRUPT_GRACE


class LockFiles:
    """The lock files of one verified directory (see the module docstring).

    :param path: absolute path of the directory, created or verified by
        :func:`~celery_lock.backends._lockdir.open_directory`.
    :param log: where warnings about odd entries and removals go.
    """

    def __init__(self, path: str, log: logging.Logger) -> None:
        self.path = path
        self.dir_fd = _lockdir.open_directory(path)
        self._log = log
        #: (name, inode, mtime) of unreadable entries already warned about (bounded).
        self.warned_corrupt: set[tuple[str, int, int]] = set()

    # ---------------------------------------------------------------- opening

    def open_locked(
        self, name: str, flags: int, operation: int = fcntl.LOCK_EX, *, wait: bool = True
    ) -> tuple[int, os.stat_result] | Foreign | None:
        """Open ``name`` and flock it (``operation``); return the fd and its fstat.

        Returns None when nothing is under the name (only without O_CREAT), and a
        :class:`Foreign` for an entry that is not a lock file. A file unlinked while we waited
        for its flock (by a cleaner) is dropped and the name opened again.

        :param wait: False raises :exc:`BlockingIOError` at once when the flock is taken.
        """
        for _ in range(REOPEN_TRIES):
            try:
                fd = os.open(name, flags, 0o600, dir_fd=self.dir_fd)
            except FileNotFoundError:
                if flags & os.O_CREAT:
                    raise  # the directory itself is gone
                return None
            except OSError as exc:
                if exc.errno not in _NOT_A_LOCK_FILE:
                    raise
                foreign = self.lstat_foreign(name, f"cannot be opened: {exc.strerror}")
                if foreign is None:
                    continue  # gone meanwhile: look again
                return foreign
            try:
                if wait:
                    self.flock(fd, operation, name)
                else:
                    fcntl.flock(fd, operation | fcntl.LOCK_NB)
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            links = st.st_nlink
            if links == 1 and stat.S_ISREG(st.st_mode):
                return fd, st
            unlock_close(fd)
            if links:
                # A second hard link would have us write lock records through it into some
                # other file (a planted link to /etc/shadow, say): never a lock file of ours.
                problem = "not a regular file" if links == 1 else f"a file with {links} links"
                return Foreign(st, problem)
        raise OSError(errno.EAGAIN, "the lock file kept being removed while we opened it", name)

    def flock(self, fd: int, operation: int, name: str) -> None:
        """Take ``flock(operation)`` on ``fd`` (the file ``name``), waiting a bounded time."""
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            self.wait_flock(fd, operation, name)

    def wait_flock(self, fd: int, operation: int, name: str) -> None:
        # Never a blocking flock: bounded, with tiny growing sleeps (the holder needs
        # microseconds unless it was stopped or sits on a slow network file system).
        deadline = time.monotonic() + BUSY_TIMEOUT
        delay = 0.0001
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                path = os.path.join(self.path, name)
                raise LockBackendUnavailable(
                    f"lock file {path} stayed busy for {BUSY_TIMEOUT} s "
                    "(a process stopped inside a lock operation?)",
                    backend="file",
                    path=path,
                )
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.005)
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            return

    # ---------------------------------------------------------------- reading

    def entry(self, fd: int, st: os.stat_result, name: str) -> Entry:
        """Decode the record of ``name``, open as ``fd`` and flocked by us."""
        size = st.st_size
        if size > _filerecord.MAX_BYTES:
            return Entry(name, None, None, st, f"larger than {_filerecord.MAX_BYTES} bytes")
        record = _filerecord.parse(os.pread(fd, size, 0)) if size else 0
        if record is None:
            return Entry(name, None, None, st, "not valid lock metadata")
        if type(record) is int:
            return Entry(name, None, record, st, None)
        meta: dict[str, Any] = record  # type: ignore[assignment]
        return Entry(name, meta, meta["fence"], st, None)

    def read(self, name: str) -> Entry | None:
        """The lock under ``name`` now (under a shared flock), or None when it is free or
        absent; a foreign entry comes back as an entry with its problem. Never follows."""
        opened = self.open_locked(name, OPEN_READ, fcntl.LOCK_SH)
        if opened is None:
            return None
        if isinstance(opened, Foreign):
            return Entry(name, None, None, opened.st, opened.problem)
        fd, st = opened
        try:
            entry = self.entry(fd, st, name)
        finally:
            unlock_close(fd)
        if entry.meta is None and entry.problem is None:
            return None
        return entry

    def names(self) -> list[str]:
        return _lockdir.list_names(self.dir_fd)

    # ----------------------------------------------------------------- fences

    def last_fence(self, name: str) -> int:
        return _fences.last(self.dir_fd, self.path, name, self.flock)

    def record_fence(self, name: str, fence: int | None) -> None:
        _fences.record(self.dir_fd, self.path, name, fence, self.flock)

    # -------------------------------------------------------- foreign entries

    def lstat_foreign(self, name: str, problem: str) -> Foreign | None:
        try:
            st = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return Foreign(st, problem)

    def warn_corrupt(self, name: str, st: os.stat_result, problem: str) -> None:
        """One WARNING per unreadable entry (and change of it)."""
        marker = (name, st.st_ino, st.st_mtime_ns)
        if marker in self.warned_corrupt:
            return
        if len(self.warned_corrupt) >= 1024:
            self.warned_corrupt.clear()  # bounded memory; a repeat warning is harmless
        self.warned_corrupt.add(marker)
        self._log.warning(
            "unreadable lock file %s (%s): held for %.0f s after its last change, then stale",
            os.path.join(self.path, name),
            problem,
            CORRUPT_GRACE,
            extra={"backend": "file"},
        )

    def make_room(self, name: str, foreign: Foreign, key: str, now: float) -> bool:
        """Make room for a lock file where a foreign entry stands; True when the name should be
        tried again, False while the entry counts as held (or cannot be removed)."""
        self.warn_corrupt(name, foreign.st, foreign.problem)
        if not is_stale(foreign.st, now):
            return False
        if stat.S_ISDIR(foreign.st.st_mode):
            self._log.warning(
                "cannot break the stale lock %s for %s: a directory is in its place",
                os.path.join(self.path, name),
                key,
                extra={"lock_key": key, "backend": "file"},
            )
            return False
        if self.unlink_foreign(name, foreign):
            self._log.info(
                "broke stale lock %s (unreadable for more than %.0f s: %s)",
                key,
                CORRUPT_GRACE,
                foreign.problem,
                extra={"lock_key": key, "backend": "file"},
            )
        return True

    def unlink_foreign(self, name: str, foreign: Foreign) -> bool:
        """Unlink ``name`` if it is still the entry ``foreign`` describes.

        Under the directory's ``.guard``: two processes that judged the same entry must not
        both unlink, or the second would remove the lock file the first created in its place.
        Lock files themselves are only ever removed under their own flock.
        """
        with _fences.guard(self.dir_fd, self.path, self.flock):
            try:
                st = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            before = foreign.st
            same = (st.st_dev, st.st_ino, st.st_mtime_ns) == (
                before.st_dev,
                before.st_ino,
                before.st_mtime_ns,
            )
            if not same or stat.S_ISDIR(st.st_mode):
                return False
            os.unlink(name, dir_fd=self.dir_fd)
            return True

    # ---------------------------------------------------------------- removal

    def remove_if_free(self, name: str) -> None:
        """Remove ``name`` if it is a free lock file nobody has open under a flock right now."""
        try:
            opened = self.open_locked(name, OPEN_READ, fcntl.LOCK_EX, wait=False)
        except BlockingIOError:
            return  # in use this very moment: not idle
        if opened is None or isinstance(opened, Foreign):
            return  # gone, or not a lock file: nothing of ours to remove
        fd, st = opened
        try:
            entry = self.entry(fd, st, name)
            if entry.meta is None and entry.problem is None:  # still free
                self._remove(name, entry.fence)
        finally:
            unlock_close(fd)

    def _remove(self, name: str, fence: int | None) -> None:
        # Called under the file's exclusive flock: the record judged is the record removed.
        # Whoever opened this file meanwhile finds it unlinked after its own flock and opens the
        # name again; the fence it finds there comes from .fences.
        self.record_fence(name, fence)
        os.unlink(name, dir_fd=self.dir_fd)

    def clean(
        self, judge: Judge, now: float, *, dry_run: bool, hand_on: HandOn | None = None
    ) -> CleanReport:
        """Remove free lock files, lock files ``judge`` finds stale, and foreign entries older
        than the grace; count them (free files are no locks: not counted)."""
        report = CleanReport()
        try:
            names = self.names()
        except OSError as exc:
            self._log.warning(
                "cannot list lock directory %s: %s", self.path, exc, extra={"backend": "file"}
            )
            report.errors += 1
            return report
        for name in names:
            if not _filerecord.LOCK_NAME.match(name):
                continue
            try:
                self._clean_one(name, judge, now, report, dry_run=dry_run, hand_on=hand_on)
            except (OSError, LockError) as exc:
                report.errors += 1
                self._log.warning(
                    "could not clean %s in %s: %s", name, self.path, exc, extra={"backend": "file"}
                )
        return report

    def _clean_one(
        self,
        name: str,
        judge: Judge,
        now: float,
        report: CleanReport,
        *,
        dry_run: bool,
        hand_on: HandOn | None = None,
    ) -> None:
        # Writable when a stale lock may be handed on (its record is rewritten in place).
        flags = OPEN_READ if dry_run or hand_on is None else _lockdir.OPEN_WRITE
        opened = self.open_locked(name, flags, fcntl.LOCK_SH if dry_run else fcntl.LOCK_EX)
        if opened is None:
            return  # removed between the listing and now
        if isinstance(opened, Foreign):
            report.scanned += 1
            if not is_stale(opened.st, now):
                report.kept += 1
                return
            if stat.S_ISDIR(opened.st.st_mode):
                # Counted and logged as an error by clean(): it blocks its key for good.
                raise IsADirectoryError(errno.EISDIR, "a directory stands in place of a lock file")
            if not dry_run and not self.unlink_foreign(name, opened):
                report.kept += 1  # replaced since we looked: judged again next pass
                return
            report.removed += 1
            if not dry_run:
                self._log.info(
                    "removed stale lock file %s (%s)",
                    name,
                    opened.problem,
                    extra={"backend": "file"},
                )
            return
        fd, st = opened
        try:
            entry = self.entry(fd, st, name)
            free = entry.meta is None and entry.problem is None
            if not free:
                report.scanned += 1
                reason = judge(entry)
                if reason is None:
                    report.kept += 1
                    return
                if dry_run:
                    report.removed += 1
                    return
            elif dry_run:
                return
            if free or hand_on is None or not hand_on(fd, entry):
                self._remove(name, entry.fence)
        finally:
            unlock_close(fd)
        if free:
            return
        report.removed += 1
        meta = entry.meta or {}
        self._log.info(
            "removed stale lock %s (%s)",
            meta.get("key", name),
            reason,
            extra={"lock_key": meta.get("key"), "backend": "file", "fence": meta.get("fence")},
        )
