"""Local lock files: one JSON record per key, changed in place under the file's flock.

The lease rules live here (who holds a key, when a lock is stale, how fences go on); the
pieces they stand on are one module each: the record format (``_filerecord``), the directory
checks (``_lockdir``), opening, reading and removing entries under their flock (``_lockfiles``),
the ``.fences`` and ``.guard`` files (``_fences``), change notification (``_notify``) and the
in-process line of QUEUE waiters (``_waitline``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import time as _time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from celery_lock import _fork, _identity
from celery_lock._base import LockManager, Waiter
from celery_lock._types import CleanReport, Lease, LockInfo
from celery_lock.backends import _filejobs, _filerecord, _lockdir, _lockfiles
from celery_lock.backends._filejobs import LINE, RESERVED, Turn, Veto
from celery_lock.backends._filerecord import FENCE_LIMIT, MAX_BYTES, file_name, is_time
from celery_lock.backends._lockdir import OPEN_CREATE, OPEN_WRITE, unlock_close
from celery_lock.backends._lockfiles import Entry, Foreign, LockFiles, is_stale
from celery_lock.backends._notify import NotifyWaiter, Watches
from celery_lock.backends._waitline import Lines
from celery_lock.errors import LockBackendUnavailable, LockError

__all__ = ["FileLockManager"]

#: Files a manager leaves in place after releasing them (the most recently released ones: a key
#: taken again soon costs no directory change). Older free files are removed, so keys used once
#: (a task's arguments) do not pile up between two cleaner runs. Not Final: tests shorten it.
_KEEP_FREE = 256
#: CLOCK_BOOTTIME where the platform has it (Linux); elsewhere leases are judged on the wall
#: clock only and records carry no ``bt_expires``.
_BOOTTIME: Final[int | None] = getattr(_time, "CLOCK_BOOTTIME", None)
#: Records a manager remembers having written, by token, so that the release of an unchanged
#: record compares bytes instead of parsing JSON (~4 µs of a ~27 µs cycle: bench_locks put the
#: cycle at 2.5-3.4x filelock's without it, too close to the 2.5x floor). Bounded: leases
#: never released (lost, leaked) must not grow it; a forgotten lease is released by parsing.
#: Not Final: tests shorten it.
_WRITTEN_CACHE = 4096


def _boottime() -> float | None:
    return None if _BOOTTIME is None else _time.clock_gettime(_BOOTTIME)


def _close_all(watches: Watches, dir_fd: int) -> None:
    watches.close()
    _lockdir.close_quietly(dir_fd)


class FileLockManager(LockManager):
    """Lock files in a private local directory: excludes processes **on one host** only.

    One file per key, named ``sha256(key)[:40].lock`` (the raw key never reaches a path). A file
    holds one JSON record: a holder's metadata (token, fence, expiry, host, pid, task), or, once
    released, only the key's last fence. The 256 files a manager freed last stay (taking such a
    key again changes no directory); it removes older free ones as it goes, so keys used once do
    not pile up, and :meth:`clean` removes free and stale files.

    Every read and change of a lock file happens under ``flock`` on that file (shared to read,
    exclusive to change) and a change is one ``pwrite`` of the whole record, so no reader that
    takes the flock (every one of ours) sees half a record. The flock is held for microseconds,
    never for the lease: a holder does not keep a descriptor open, and a holder that died is
    found by its metadata. A remover holds the exclusive flock while it unlinks; whoever opened
    the old file sees a link count of 0 after its own flock and opens the name again.

    A lock is stale when its lease expired (CLOCK_BOOTTIME when written on this host and boot,
    else the wall clock), when its holder is provably dead (same host, boot and pid namespace;
    pid gone, recycled or a zombie: a SIGKILLed worker's lock is free at once), or when it is
    unreadable and unchanged for 2 s. The next acquirer overwrites a stale record; the fence goes
    on from the old record's (or from ``.fences``, where removed files leave their fences), and
    never below the wall clock in µs.

    QUEUE waiters of one key in one manager wait in line: only the first contends for the file,
    and it wakes when the file is written (a release: inotify on Linux, else a release in this
    process or polling); a holder that dies or expires writes nothing, so it also polls, with a
    delay growing from ``poll_min`` to ``poll_max``.

    Works wherever ``fcntl.flock`` exists. Linux adds CLOCK_BOOTTIME (leases immune to
    wall-clock steps), proof of death through procfs, inotify wake-ups and network file system
    detection; elsewhere leases follow the wall clock, dead holders are freed by expiry and
    waiters poll. The directory should be on a local file system; a network one gets a WARNING,
    since neither flock nor proof of death works across hosts. Each manager keeps one descriptor
    for the directory and up to four idle inotify instances; every operation opens and closes
    its own.

    :param directory: the lock folder itself; None means ``celery_lock-<euid>`` under
        :func:`tempfile.gettempdir` (``TMPDIR`` is honoured). Created ``0700`` when missing; an
        existing one must be a real directory owned by us and not group/world-writable.
    :param default_ttl: lease seconds when ``acquire(ttl=None)``.
    :raises LockError: when the directory cannot be created or fails a check (naming it).
    """

    backend = "file"
    poll_min = 0.002
    poll_max = 0.05

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, *, default_ttl: float = 300.0
    ) -> None:
        super().__init__(default_ttl=default_ttl)
        if directory is None:
            directory = _lockdir.default_directory()
        self._path = os.path.abspath(os.fspath(directory))
        #: The directory's entries and the flock protocol over them.
        self._files = LockFiles(self._path, self._log)
        self._watches = Watches(self._files.dir_fd)
        weakref.finalize(self, _close_all, self._watches, self._files.dir_fd)
        #: QUEUE waiters of this manager, by key (see _waitline).
        self._lines = Lines()
        #: Names of files this manager freed, oldest first (see _KEEP_FREE).
        self._freed: dict[str, None] = {}
        #: token -> (record bytes as last written by this manager, that record).
        self._written: dict[str, tuple[bytes, dict[str, Any]]] = {}
        _lockdir.warn_if_network(self._path, self._log)

    @property
    def directory(self) -> Path:
        """The lock directory."""
        return Path(self._path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(directory={self._path!r})"

    def _waiter(self, key: str) -> Waiter:
        return NotifyWaiter(self._watches, file_name(key), self._lines.wake(key))

    def _wait_and_acquire(
        self,
        key: str,
        ttl: float,
        token: str,
        task_id: str | None,
        task_name: str | None,
        deadline: float,
    ) -> Lease | None:
        started = _time.monotonic()
        lease = self._lines.wait(
            key,
            deadline,
            attempt=lambda: self._try_acquire(key, ttl, token, task_id, task_name),
            waiter=lambda: self._waiter(key),
            poll=(self.poll_min, self.poll_max),
        )
        waited_ms = (_time.monotonic() - started) * 1000
        if lease is None:
            self._log.info(
                "gave up waiting for lock %s after %.0f ms",
                key,
                waited_ms,
                extra={"lock_key": key, "backend": self.backend, "wait_ms": round(waited_ms, 3)},
            )
        elif self._log.isEnabledFor(logging.DEBUG):
            self._debug_acquired(lease, waited_ms)
        return lease

    # ------------------------------------------------------------------ hooks

    def _try_acquire(
        self,
        key: str,
        ttl: float,
        token: str,
        task_id: str | None,
        task_name: str | None,
        veto: Veto | None = None,
    ) -> Lease | None:
        """See :meth:`LockManager._try_acquire`.

        :param veto: ``veto(lock_name)`` is asked once the lock file exists, under its flock,
            before a grant writes the record: True keeps the key from being granted (the
            hybrid's test for a Redis lease of this host, see ``_hostlocks``).
        """
        name = file_name(key)
        try:
            for _ in range(_lockfiles.REOPEN_TRIES):
                opened = self._files.open_locked(name, OPEN_CREATE, fcntl.LOCK_EX)
                if isinstance(opened, Foreign):
                    if not self._files.make_room(name, opened, key, _time.time()):
                        return None
                    continue
                assert opened is not None  # O_CREAT: never None
                fd, st = opened
                try:
                    got = self._acquire_locked(
                        fd, st, name, key, ttl, token, task_id, task_name, veto
                    )
                finally:
                    unlock_close(fd)
                if type(got) is Turn:
                    self._hand_off(*got)  # the dead holder's waiters go first
                    return None
                return got  # type: ignore[return-value]
            raise OSError(  # noqa: TRY301 - mapped to LockBackendUnavailable just below
                errno.EAGAIN, "something keeps reappearing under the lock name", name
            )
        except LockError:
            raise
        except OSError as exc:
            raise self._unavailable(exc, key) from exc

    def _release(self, lease: Lease) -> bool:
        key = lease.key
        name = file_name(key)
        turn = None
        try:
            opened = self._files.open_locked(name, OPEN_WRITE)
            if opened is None or isinstance(opened, Foreign):
                return False  # no lock file (or not one we could have written): not ours
            fd, st = opened
            try:
                meta, data = self._owned_record(fd, st, lease)
                if meta is None:
                    return False
                alive = _filerecord.remaining(meta, _time.time(), _boottime()) > 0
                # Our record goes even when it expired (nobody took it over, or the token would
                # differ); only a lease that was still valid reports success. Somebody queued
                # behind us ("w"): the key goes to the first waiter instead.
                old = (data, st.st_size)
                if LINE in meta:
                    turn = _filejobs.succeed(self, fd, name, key, meta["fence"], old)
                if turn is None:
                    _filerecord.write(fd, _filerecord.free(meta["fence"]), *old)
            finally:
                unlock_close(fd)
        except LockError:
            raise
        except OSError as exc:
            raise self._unavailable(exc, key) from exc
        self._after_release(key, name, turn)
        return alive

    def _owned_record(
        self, fd: int, st: os.stat_result, lease: Lease
    ) -> tuple[dict[str, Any] | None, bytes]:
        """The record in ``fd`` (flocked) if it is ``lease``'s (else None), and its bytes."""
        written = self._written.pop(lease.token, None)
        data = _filerecord.read(fd, st.st_size)
        if written is not None and data == written[0]:
            return written[1], data  # exactly what we wrote: ours, unchanged
        meta = _filerecord.parse(data)
        if type(meta) is not dict or meta["token"] != lease.token:
            return None, data
        return meta, data

    def _after_release(self, key: str, name: str, turn: Turn | None) -> None:
        """A holder of ``key`` ended (no flock held now): wake our waiters, hand the key to
        the waiter whose turn it is, or remember the file as free."""
        self._lines.released(key)
        if turn is None:
            self._freed_now(name)
        else:
            self._hand_off(*turn)

    # The job API (waiter line, done markers, reservations) lives in _filejobs.
    _claim = _filejobs.claim
    _finish = _filejobs.finish
    _remove_waiter = _filejobs.remove_waiter
    _waiting = _filejobs.waiting
    _quiet = _filejobs.quiet
    _mark_done = _filejobs.mark_done_alone

    @staticmethod
    def _boottime() -> float | None:
        return _boottime()

    def _extend(self, lease: Lease, ttl: float) -> Lease | None:
        key = lease.key
        try:
            opened = self._files.open_locked(file_name(key), OPEN_WRITE)
            if opened is None or isinstance(opened, Foreign):
                return None
            fd, st = opened
            try:
                data = _filerecord.read(fd, st.st_size)
                meta = _filerecord.parse(data)
                if type(meta) is not dict or meta["token"] != lease.token:
                    return None
                now, now_bt = _time.time(), _boottime()
                if _filerecord.remaining(meta, now, now_bt) <= 0:
                    return None
                meta.update(ttl=ttl, expires=now + ttl)
                if now_bt is None:
                    meta.pop("bt_expires", None)
                else:
                    meta["bt_expires"] = now_bt + ttl
                content = _filerecord.write(fd, _filerecord.encode(meta), data, st.st_size)
                self._remember(lease.token, content, meta)
            finally:
                unlock_close(fd)
        except LockError:
            raise
        except OSError as exc:
            raise self._unavailable(exc, key) from exc
        return dataclasses.replace(lease, ttl=ttl, expires_at=now + ttl)

    def _inspect(self, key: str) -> LockInfo | None:
        try:
            entry = self._files.read(file_name(key))
        except OSError as exc:
            raise self._unavailable(exc, key) from exc
        if entry is None or self._stale_reason(entry) is not None:
            return None
        return self._info(entry, key)

    def _iter_locks(self) -> Iterator[LockInfo]:
        try:
            names = self._files.names()
        except OSError as exc:
            raise self._unavailable(exc, None) from exc
        for name in names:
            if not _filerecord.LOCK_NAME.match(name):
                continue
            try:
                entry = self._files.read(name)
            except (OSError, LockError):
                continue  # vanished, unreadable or busy right now: not a lock we can describe
            if entry is None or entry.meta is None or self._stale_reason(entry) is not None:
                continue
            yield self._info(entry, entry.meta["key"])

    def _break(
        self, key: str, *, task_id: str | None, token_prefix: str | None, only_if_dead: bool
    ) -> bool:
        # A condition on the holder (task id, token, death) can only hold for a readable record.
        conditional = task_id is not None or token_prefix is not None or only_if_dead
        name = file_name(key)
        turn = None
        try:
            opened = self._files.open_locked(name, OPEN_WRITE)
            if opened is None:
                return False
            if isinstance(opened, Foreign):
                # Not a lock file: no task id to match, no death to prove; a stale one is the
                # cleaner's job. Only an unconditional break takes a fresh one away.
                if conditional or is_stale(opened.st, _time.time()):
                    return False
                if not self._files.unlink_foreign(name, opened):
                    return False
                meta = None
                reason = "broken on request (unreadable)"
            else:
                fd, st = opened
                try:
                    entry = self._files.entry(fd, st, name)
                    meta = entry.meta
                    if meta is None:
                        if entry.problem is None:
                            return False  # free: nothing to break
                        if conditional or self._stale_reason(entry):
                            return False
                        fence = self._files.last_fence(name)
                        reason = "broken on request (unreadable)"
                    else:
                        if _filerecord.remaining(meta, _time.time(), _boottime()) <= 0:
                            return False  # expired: no lock to break (as on Redis)
                        if task_id is not None and meta.get("task_id") != task_id:
                            return False
                        if token_prefix is not None and not meta["token"].startswith(token_prefix):
                            return False
                        if only_if_dead and not _identity.holder_is_dead(meta):
                            return False
                        fence = meta["fence"]
                        reason = "holder process is gone" if only_if_dead else "broken on request"
                        if LINE in meta:
                            old = (_filerecord.read(fd, st.st_size), st.st_size)
                            turn = _filejobs.succeed(self, fd, name, key, fence, old)
                    if turn is None:
                        _filerecord.write(fd, _filerecord.free(fence), b"", st.st_size)
                finally:
                    unlock_close(fd)
        except LockError:
            raise
        except OSError as exc:
            raise self._unavailable(exc, key) from exc
        self._log.info(
            "broke lock %s (%s)",
            key,
            reason,
            extra={"lock_key": key, "backend": "file", "fence": meta and meta["fence"]},
        )
        self._after_release(key, name, turn)
        return True

    def clean(self, *, dry_run: bool = False) -> CleanReport:
        """Remove stale lock files (expired, dead holder, unreadable for 2 s) and free ones.

        Each file is judged and removed under its exclusive flock, so the lock judged is the
        lock removed and a lock taken or extended meanwhile is never touched. Free files
        (released locks) are removed too, but they are not locks: the report does not count
        them. Their fences are kept in ``.fences``.

        :param dry_run: count what would be removed, delete nothing.
        """
        return _filejobs.clean(self, _time.time(), dry_run=dry_run)

    # ------------------------------------------------------------------ internals

    def _acquire_locked(
        self,
        fd: int,
        st: os.stat_result,
        name: str,
        key: str,
        ttl: float,
        token: str,
        task_id: str | None,
        task_name: str | None,
        veto: Veto | None = None,
    ) -> Lease | Turn | None:
        size = st.st_size
        data = _filerecord.read(fd, size)
        now, now_bt = _time.time(), _boottime()
        reason = None
        line = False
        if not size:
            last = self._files.last_fence(name)  # a new file (or one whose creator died at once)
        else:
            record = _filerecord.parse(data) if data else None
            if type(record) is int:
                last = record
            elif record is None:
                problem = f"larger than {MAX_BYTES} bytes" if size > MAX_BYTES else None
                entry = Entry(name, None, None, st, problem or "not valid lock metadata")
                reason = self._stale_reason(entry, now)
                if reason is None:
                    return None
                last = self._files.last_fence(name)
            else:
                meta: dict[str, Any] = record  # type: ignore[assignment]
                if meta["token"] == token:
                    left = _filerecord.remaining(meta, now, now_bt)
                    if left > 0:
                        # A retry of an attempt that succeeded (the caller lost our reply).
                        held_ttl, acquired = meta.get("ttl"), meta.get("acquired")
                        return Lease(
                            key=key,
                            token=token,
                            fence=meta["fence"],
                            backend=self.backend,
                            ttl=float(held_ttl) if is_time(held_ttl) else ttl,
                            expires_at=now + left,
                            acquired_at=float(acquired) if is_time(acquired) else now,
                        )
                reason = self._stale_reason(Entry(name, meta, meta["fence"], st, None), now, now_bt)
                if reason is None:
                    return None
                last = meta["fence"]
                if LINE in meta:
                    if reason != "expired":
                        # A dead holder ends like a release: its waiters go first.
                        turn = _filejobs.succeed(self, fd, name, key, last, (data, size))
                        if turn is not None:
                            return turn
                    else:
                        line = True  # the line only matters at the next release
        if veto is not None and veto(name):
            return None
        old = (data, size)
        return self._grant(fd, old, key, last, token, ttl, task_id, task_name, reason, line)

    def _grant(
        self,
        fd: int,
        old: tuple[bytes, int],
        key: str,
        last: int,
        token: str,
        ttl: float,
        task_id: str | None,
        task_name: str | None,
        reason: str | None,
        line: bool = False,
        *,
        job: bool = False,
    ) -> Lease:
        """Write our holder record over ``old`` (flocked, judged takeable) and return the lease.

        :param line: somebody waits in the key's line (the record gets the ``w`` flag).
        :param job: a claim: the lease carries ``task_id``.
        """
        now, now_bt = _time.time(), _boottime()
        if last >= FENCE_LIMIT:
            last = 0  # garbage; the clock term keeps the fence sane
        # max(last + 1, clock): strictly increasing per key while its file or .fences lives, and
        # still increasing after both are lost, unless the wall clock also went back.
        fence = max(last + 1, _time.time_ns() // 1000)
        mine = self._holder_record(key, token, fence, now, now_bt, ttl, task_id, task_name)
        if line:
            mine[LINE] = 1
        self._remember(token, _filerecord.write(fd, _filerecord.encode(mine), *old), mine)
        if reason is not None:
            self._log.info(
                "broke stale lock %s (%s)",
                key,
                reason,
                extra={"lock_key": key, "backend": "file", "fence": fence},
            )
        task = task_id if job else None
        return Lease(key, token, fence, "file", ttl, now + ttl, now, _fork.pid(), task)

    def _remember(self, token: str, content: bytes, record: dict[str, Any]) -> None:
        written = self._written
        if len(written) >= _WRITTEN_CACHE:
            # Another thread may evict or add at the same time: losing an entry only costs a
            # parse on release.
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                del written[next(iter(written))]
        written[token] = (content, record)

    def _holder_record(
        self,
        key: str,
        token: str,
        fence: int,
        now: float,
        now_bt: float | None,
        ttl: float,
        task_id: str | None,
        task_name: str | None,
    ) -> dict[str, Any]:
        """The record a grant writes (this process as the holder)."""
        return _filerecord.holder(
            key,
            token=token,
            fence=fence,
            now=now,
            now_bt=now_bt,
            ttl=ttl,
            task_id=task_id,
            task_name=task_name,
        )

    def _stale_reason(
        self, entry: Entry, now: float | None = None, now_bt: float | None = None
    ) -> str | None:
        """Why ``entry`` may be replaced or removed, or None while it is a live lock."""
        if now is None:
            now = _time.time()
        meta = entry.meta
        if meta is None:  # callers never pass a free file's entry: that is no lock at all
            problem = entry.problem or "unknown"
            self._files.warn_corrupt(entry.name, entry.st, problem)
            if is_stale(entry.st, now):
                return f"unreadable for more than {_lockfiles.CORRUPT_GRACE:.0f} s: {problem}"
            return None
        if now_bt is None:
            now_bt = _boottime()
        if _filerecord.remaining(meta, now, now_bt) <= 0:
            return "expired"
        if _identity.holder_is_dead(meta):
            return "holder process is gone"
        return None

    def _info(self, entry: Entry, key: str) -> LockInfo:
        meta = entry.meta
        if meta is None:
            return LockInfo(key, None, None, self.backend, None, None, None, None, None, None)
        now = _time.time()
        acquired = meta.get("acquired")
        opt = _filerecord.opt
        return LockInfo(
            key=key,
            token_prefix=None if meta.get(RESERVED) is True else meta["token"][:8],
            fence=meta["fence"],
            backend=self.backend,
            host=opt(meta, "host", str),
            pid=opt(meta, "pid", int),
            task_id=opt(meta, "task_id", str),
            task_name=opt(meta, "task_name", str),
            acquired_at=float(acquired) if is_time(acquired) else None,
            expires_at=now + _filerecord.remaining(meta, now, _boottime()),
        )

    def _freed_now(self, name: str) -> None:
        """Note that ``name`` was just freed; remove the file freed longest ago beyond
        _KEEP_FREE, if it is still free (best effort: otherwise the cleaner's job)."""
        freed = self._freed
        freed.pop(name, None)
        freed[name] = None
        if len(freed) <= _KEEP_FREE:
            return
        try:
            oldest = next(iter(freed))
            del freed[oldest]
        except (StopIteration, KeyError, RuntimeError):  # another thread got there first
            return
        try:
            self._files.remove_if_free(oldest)
        except (OSError, LockError) as exc:
            if self._log.isEnabledFor(logging.DEBUG):
                self._log.debug(
                    "could not remove free lock file %s: %s", oldest, exc, extra={"backend": "file"}
                )

    def _unavailable(self, exc: OSError, key: str | None) -> LockBackendUnavailable:
        return LockBackendUnavailable(
            f"lock directory {self._path} failed"
            + ("" if key is None else f" for key {key!r:.80}")
            + f": {exc}",
            key=key,
            backend=self.backend,
            path=self._path,
        )
