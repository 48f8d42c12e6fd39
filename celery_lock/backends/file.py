"""Local lock files: one atomically published JSON file per key in a private directory (Linux)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import stat
import tempfile
import threading
import time as _time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeGuard

from celery_lock import _identity
from celery_lock._base import LockManager
from celery_lock._types import CleanReport, Lease, LockInfo
from celery_lock.errors import LockBackendUnavailable, LockError

__all__ = ["FileLockManager"]

#: Hex characters of sha256(key) in a lock file name (160 bits: collisions are not a concern).
_NAME_HEX: Final = 40
_LOCK_NAME: Final = re.compile(r"[0-9a-f]{40}\.lock\Z")
_TMP_NAME: Final = re.compile(r"\.tmp\.([0-9a-f]{2})[0-9a-f]{38}\.lock\.")
_TMP_PREFIX: Final = ".tmp."
_GUARD_PREFIX: Final = ".guard."
#: Reads are capped (a planted multi-GB file must not be slurped); what we write always fits.
_MAX_BYTES: Final = 64 * 1024
#: Metadata longer than this is rewritten with the free-text fields cut to _FIELD_CAP characters.
_META_LIMIT: Final = 48 * 1024
_FIELD_CAP: Final = 1024
#: Unreadable, corrupt or foreign entries count as held this long after their last change
#: (filelock's grace, tox-dev/filelock#532, #551): long enough for any writer we do not know of.
_CORRUPT_GRACE: Final = 2.0
#: Temp files older than this are leftovers of a crashed writer (a live one needs microseconds).
_TMP_MAX_AGE: Final = 60.0
#: Longest wait for a bucket guard: a process SIGSTOPped inside the few-µs critical section must
#: not wedge everybody for ever. Not Final: tests shorten it.
_GUARD_TIMEOUT = 5.0
#: A stored fence at or above this cannot come from the µs clock for 140,000 years: it is garbage.
_FENCE_LIMIT: Final = 1 << 62
#: Directory on these file systems: flock does not exclude across client caches and
#: proof-of-death is host-local, so we warn (tox-dev/filelock CI, realiti4/claude-swap#372).
_NETWORK_FS: Final = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "davfs",
        "fuse.sshfs",
        "fuse.glusterfs",
        "fuse.cephfs",
        "fuse.ceph",
        "fuse.s3fs",
        "fuse.rclone",
        "fuse.gcsfuse",
        "fuse.davfs2",
    }
)
#: Tried in order; tests point this at a fake table.
_MOUNT_TABLES: tuple[str, ...] = ("/proc/self/mountinfo", "/proc/mounts")

_OPEN_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under a lock name must not block (tox-dev/filelock#549);
# O_NOFOLLOW: a planted symlink is never followed (tox-dev/filelock#461, #548).
_OPEN_READ: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_OPEN_TEMP: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_UNNAMED: Final = getattr(os, "O_TMPFILE", 0) | os.O_WRONLY | os.O_CLOEXEC
_OPEN_GUARD: Final = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_LOCK_NB: Final = fcntl.LOCK_EX | fcntl.LOCK_NB

#: json.loads minus its encoding detection (we always write UTF-8, in fact ASCII).
_decode = json.JSONDecoder().decode
#: Guards the module's small shared state and each manager's fork reset. Recreated in a forked
#: child: another thread may have held it at the moment of the fork.
_module_lock = threading.Lock()
_warned_network: set[str] = set()


def _reset_module_lock() -> None:
    global _module_lock  # noqa: PLW0603 - replaced, never shared with the parent's state
    _module_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_module_lock)


def _file_name(key: str) -> str:
    """The lock file name of ``key``: a hash, so no key can name a path (``../``, ``/``, NUL)."""
    # surrogatepass: keys decoded with surrogateescape (odd file names, argv) must hash too.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:_NAME_HEX] + ".lock"


def _is_time(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _opt(meta: dict[str, Any], name: str, kind: type) -> Any:
    value = meta.get(name)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _parse(data: bytes) -> dict[str, Any] | None:
    """The metadata in ``data``, or None when it is not a lock file we could have written."""
    try:
        meta = _decode(data.decode("utf-8"))
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than the stack
        return None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("key"), str)
        or not isinstance(meta.get("token"), str)
        or not meta["token"]
        or type(meta.get("fence")) is not int
        or not _is_time(meta.get("expires"))
        or not (meta.get("bt_expires") is None or _is_time(meta["bt_expires"]))
    ):
        return None
    return meta


def _remaining(meta: dict[str, Any], now: float, now_bt: float) -> float:
    """Seconds left on the lease described by ``meta``.

    Written on this host and boot: CLOCK_BOOTTIME, which wall-clock steps (NTP, an operator)
    cannot move and which keeps counting through suspend. Otherwise only the wall clock is
    comparable between writer and reader.
    """
    bt_expires = meta.get("bt_expires")
    if bt_expires is not None and _identity.current().same_host(meta):
        return float(bt_expires - now_bt)
    return float(meta["expires"] - now)


def _unescape_mount(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _fs_type(path: str, table: str) -> str | None:
    """File-system type of the mount holding ``path``, from a mountinfo or /proc/mounts text.

    The longest mount point that is a prefix of ``path`` wins; among equal ones the last line
    (the mount on top).
    """
    best = -1
    kind = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 7 and fields[0].isdigit() and "-" in fields[6:]:
            # mountinfo: id parent major:minor root MOUNT_POINT options [optional...] - TYPE ...
            sep = fields.index("-", 6)
            if sep + 1 >= len(fields):
                continue
            point, fstype = fields[4], fields[sep + 1]
        elif len(fields) >= 3:
            point, fstype = fields[1], fields[2]  # /proc/mounts: device MOUNT_POINT TYPE ...
        else:
            continue
        point = _unescape_mount(point)
        under = point in ("/", path) or path.startswith(point.rstrip("/") + "/")
        if under and len(point) >= best:
            best, kind = len(point), fstype
    return kind


def _network_fs_type(path: str) -> str | None:
    """The type of the network file system ``path`` is on, or None (local or unknown)."""
    for table_path in _MOUNT_TABLES:
        try:
            with open(table_path, encoding="utf-8", errors="surrogateescape") as fh:
                table = fh.read()
        except OSError:
            continue
        kind = _fs_type(os.path.realpath(path), table)
        if kind is not None and (kind in _NETWORK_FS or kind.startswith("nfs")):
            return kind
        return None
    return None


def _open_directory(path: str) -> int:
    """Create (0700) or verify the lock directory and return an O_DIRECTORY fd on it.

    :raises LockError: naming the path and the problem; an existing directory is never
        chmod-ed into shape (it may be someone else's on purpose).
    """
    created = False
    try:
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)  # parents: ordinary modes
            try:
                os.mkdir(path, 0o700)
                created = True
            except FileExistsError:
                pass  # a concurrent creator won; verified below like any existing directory
        except FileExistsError:
            pass
        st = os.lstat(path)
    except OSError as exc:
        raise LockError(f"cannot create lock directory {path}: {exc}", path=path) from exc
    euid = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link (refused: it could point anywhere)"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "exists and is not a directory"
    elif st.st_uid != euid:
        problem = f"is owned by uid {st.st_uid}, not by this process's uid {euid}"
    elif mode & 0o022:
        problem = f"is group- or world-writable (mode {mode:04o}); use a private directory (0700)"
    elif not created and mode & 0o700 != 0o700:
        problem = f"is not readable, writable and searchable by its owner (mode {mode:04o})"
    if problem is not None:
        raise LockError(f"lock directory {path} {problem}", path=path)
    try:
        # O_NOFOLLOW + the inode check close the window between lstat and open (a directory
        # swapped for a symlink or another directory in between is refused).
        fd = os.open(path, _OPEN_DIR)
    except OSError as exc:
        raise LockError(f"cannot open lock directory {path}: {exc}", path=path) from exc
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise LockError(f"lock directory {path} was replaced while being opened", path=path)
    if created and mode != 0o700:
        # Ours, just made: mkdir's mode went through the umask, which may have removed owner
        # bits. Never done to a directory we did not create.
        os.fchmod(fd, 0o700)
    return fd


class _Fds:
    """The descriptors of one manager, closed by a finalizer (so it must not refer to it)."""

    __slots__ = ("dir_fd", "guards")

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd
        self.guards: dict[str, int] = {}

    def close_guards(self) -> None:
        for fd in self.guards.values():
            with contextlib.suppress(OSError):  # gone either way
                os.close(fd)
        self.guards.clear()

    def close(self) -> None:
        self.close_guards()
        with contextlib.suppress(OSError):
            os.close(self.dir_fd)


class _Entry(NamedTuple):
    """What was found under a lock name: parsed metadata, or None with the ``problem``."""

    meta: dict[str, Any] | None
    ino: int
    mtime_ns: int
    problem: str | None


def _same(first: _Entry, second: _Entry) -> bool:
    """True when two reads of one name saw the same lock."""
    if first.meta is not None and second.meta is not None:
        return bool(first.meta["token"] == second.meta["token"])
    return (first.meta, first.ino, first.mtime_ns) == (second.meta, second.ino, second.mtime_ns)


class _Guard:
    """Holds one bucket guard for a ``with`` block: the in-process lock, then the flock."""

    __slots__ = ("_bucket", "_fd", "_lock", "_manager")

    def __init__(self, manager: FileLockManager, bucket: str) -> None:
        self._manager = manager
        self._bucket = bucket

    def __enter__(self) -> int:
        self._lock, self._fd = self._manager._lock_bucket(self._bucket)
        return self._fd

    def __exit__(self, *exc_info: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()


class FileLockManager(LockManager):
    """Lock files in a private local directory: excludes processes **on one host** only.

    One file per key, named ``sha256(key)[:40].lock`` (the raw key never reaches a path) and
    holding the holder metadata as one JSON object. Every file is written to a private temp file
    and published with ``link`` (create if absent) or ``rename`` (replace a stale lock), so a
    reader sees a whole lock or none. Every change of an existing lock file (break, extend,
    release, clean) and every fence update happens under the key's *bucket guard*: a
    ``threading.Lock`` (flock does not exclude threads sharing one open file description) plus an
    exclusive ``flock`` on ``.guard.<2 hex>`` (256 buckets, never deleted; they also keep the last
    fence of their bucket, so fences survive the lock file's deletion).

    A lock is stale when its lease expired (CLOCK_BOOTTIME when written on this host and boot,
    else the wall clock), when its holder is provably dead (same host, boot and pid namespace;
    pid gone, recycled or a zombie: a SIGKILLed worker's lock is free at once), or when it is
    unreadable and unchanged for 2 s. Stale locks are replaced by the next acquirer or removed by
    :meth:`clean`.

    Linux only (procfs for proof of death and mount detection, ``flock``, ``CLOCK_BOOTTIME``).
    The directory should be on a local file system; a network one gets a WARNING, since neither
    flock nor proof of death works across hosts. Each manager keeps one descriptor for the
    directory and up to 256 for guards (opened as buckets are used).

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
            directory = os.path.join(tempfile.gettempdir(), f"celery_lock-{os.geteuid()}")
        self._path = os.path.abspath(os.fspath(directory))
        self._fds = _Fds(_open_directory(self._path))
        weakref.finalize(self, self._fds.close)
        self._dir_fd = self._fds.dir_fd
        self._pid = os.getpid()
        self._bucket_locks = {f"{i:02x}": threading.Lock() for i in range(256)}
        self._warned_corrupt: set[tuple[str, int, int]] = set()
        #: Whether O_TMPFILE works in this directory (ext4, xfs, btrfs, tmpfs do; some do not).
        self._tmpfile = hasattr(os, "O_TMPFILE")
        self._warn_if_network()

    @property
    def directory(self) -> Path:
        """The lock directory."""
        return Path(self._path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(directory={self._path!r})"

    # ------------------------------------------------------------------ hooks

    def _try_acquire(
        self, key: str, ttl: float, token: str, task_id: str | None, task_name: str | None
    ) -> Lease | None:
        name = _file_name(key)
        try:
            with _Guard(self, name[:2]) as guard_fd:
                return self._acquire_guarded(key, name, guard_fd, ttl, token, task_id, task_name)
        except LockError:
            raise
        except OSError as exc:
            raise self._unavailable(exc, key) from exc

    def _release(self, lease: Lease) -> bool:
        name = _file_name(lease.key)
        try:
            with _Guard(self, name[:2]):
                entry = self._read(name)
                if entry is None or entry.meta is None or entry.meta["token"] != lease.token:
                    return False
                alive = (
                    _remaining(entry.meta, _time.time(), _time.clock_gettime(_time.CLOCK_BOOTTIME))
                    > 0
                )
                # Our own file goes even when it expired (nobody took it over, or the token
                # would differ); only a lease that was still valid reports success.
                os.unlink(name, dir_fd=self._dir_fd)
                return alive
        except LockError:
            raise
        except OSError as exc:
            raise self._unavailable(exc, lease.key) from exc

    def _extend(self, lease: Lease, ttl: float) -> Lease | None:
        name = _file_name(lease.key)
        try:
            with _Guard(self, name[:2]):
                entry = self._read(name)
                if entry is None or entry.meta is None or entry.meta["token"] != lease.token:
                    return None
                now = _time.time()
                now_bt = _time.clock_gettime(_time.CLOCK_BOOTTIME)
                if _remaining(entry.meta, now, now_bt) <= 0:
                    return None
                meta = dict(entry.meta, ttl=ttl, expires=now + ttl, bt_expires=now_bt + ttl)
                self._publish(name, json.dumps(meta, separators=(",", ":")).encode(), replace=True)
        except LockError:
            raise
        except OSError as exc:
            raise self._unavailable(exc, lease.key) from exc
        return dataclasses.replace(lease, ttl=ttl, expires_at=now + ttl)

    def _inspect(self, key: str) -> LockInfo | None:
        try:
            entry = self._read(_file_name(key))
        except OSError as exc:
            raise self._unavailable(exc, key) from exc
        if entry is None or self._stale_reason(entry) is not None:
            return None
        return self._info(entry, key)

    def _iter_locks(self) -> Iterator[LockInfo]:
        try:
            names = self._list()
        except OSError as exc:
            raise self._unavailable(exc, None) from exc
        for name in names:
            if not _LOCK_NAME.match(name):
                continue
            try:
                entry = self._read(name)
            except OSError:
                continue  # vanished or unreadable right now: not a lock we can describe
            if entry is None or entry.meta is None or self._stale_reason(entry) is not None:
                continue
            yield self._info(entry, entry.meta["key"])

    def _break(self, key: str, *, task_id: str | None, only_if_dead: bool) -> bool:
        name = _file_name(key)
        try:
            with _Guard(self, name[:2]):
                # Read and delete under the guard: the token judged is the token deleted.
                entry = self._read(name)
                if entry is None:
                    return False
                meta = entry.meta
                if meta is None:
                    # A fresh unreadable file (a stale one is no lock: the cleaner's job) can
                    # match no task id and proves no death; only an unconditional break takes it.
                    if task_id is not None or only_if_dead or self._stale_reason(entry):
                        return False
                    reason = "broken on request (unreadable)"
                else:
                    now = _time.time()
                    if _remaining(meta, now, _time.clock_gettime(_time.CLOCK_BOOTTIME)) <= 0:
                        return False  # expired: no lock to break (as on Redis)
                    if task_id is not None and meta.get("task_id") != task_id:
                        return False
                    if only_if_dead and not _identity.holder_is_dead(meta):
                        return False
                    reason = "holder process is gone" if only_if_dead else "broken on request"
                os.unlink(name, dir_fd=self._dir_fd)
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
        return True

    def clean(self, *, dry_run: bool = False) -> CleanReport:
        """Remove stale lock files (expired, dead holder, unreadable for 2 s) and temp files older
        than 60 s.

        Each lock judged stale is re-read under its bucket guard and removed only if it is
        still the same lock (same token; for an unreadable file the same inode and mtime) and
        still stale, so a lock re-acquired or extended in the meantime is never deleted.

        :param dry_run: count what would be removed, delete nothing.
        """
        report = CleanReport()
        try:
            names = self._list()
        except OSError as exc:
            self._log.warning(
                "cannot list lock directory %s: %s", self._path, exc, extra={"backend": "file"}
            )
            report.errors += 1
            return report
        for name in names:
            try:
                if _LOCK_NAME.match(name):
                    self._clean_lock(name, report, dry_run=dry_run)
                elif (match := _TMP_NAME.match(name)) is not None and not dry_run:
                    self._clean_temp(name, match.group(1))
            except (OSError, LockError) as exc:
                report.errors += 1
                self._log.warning(
                    "could not clean %s in %s: %s",
                    name,
                    self._path,
                    exc,
                    extra={"backend": "file"},
                )
        return report

    # --------------------------------------------------------------- internals

    def _acquire_guarded(
        self,
        key: str,
        name: str,
        guard_fd: int,
        ttl: float,
        token: str,
        task_id: str | None,
        task_name: str | None,
    ) -> Lease | None:
        now = _time.time()
        now_bt = _time.clock_gettime(_time.CLOCK_BOOTTIME)
        # Look first, so a held lock costs one open + read and no temp file (the contended
        # path). access() rather than open(): no exception to build on the uncontended path.
        entry = None
        if os.access(name, os.F_OK, dir_fd=self._dir_fd, follow_symlinks=False):
            entry = self._read(name)
        reason = None
        if entry is not None:
            meta = entry.meta
            if meta is not None and meta["token"] == token:
                left = _remaining(meta, now, now_bt)
                if left > 0:
                    # A retry of an attempt that succeeded (the caller lost our reply): ours.
                    held_ttl, acquired = meta.get("ttl"), meta.get("acquired")
                    return Lease(
                        key=key,
                        token=token,
                        fence=meta["fence"],
                        backend=self.backend,
                        ttl=float(held_ttl) if _is_time(held_ttl) else ttl,
                        expires_at=now + left,
                        acquired_at=float(acquired) if _is_time(acquired) else now,
                    )
            reason = self._stale_reason(entry, now, now_bt)
            if reason is None:
                return None
        raw = os.pread(guard_fd, 8, 0)
        last = int.from_bytes(raw, "big") if len(raw) == 8 else 0
        if last >= _FENCE_LIMIT:
            last = 0  # garbage in the guard file; the clock term keeps the fence sane
        # max(last + 1, clock): strictly increasing per bucket (so per key) while the guard file
        # lives, and still increasing after it is lost, unless the wall clock also went back.
        fence = max(last + 1, _time.time_ns() // 1000)
        content = self._content(key, now, now_bt, ttl, token, fence, task_id, task_name)
        if reason is None:
            # link() is create-if-absent: EEXIST can only come from a writer outside the guard
            # protocol (everything of ours that creates holds this guard); that is not ours.
            if not self._publish(name, content, replace=False):
                return None
        else:
            try:
                self._publish(name, content, replace=True)
            except IsADirectoryError:
                self._log.warning(
                    "cannot break the stale lock %s for %s: a directory is in its place",
                    os.path.join(self._path, name),
                    key,
                    extra={"lock_key": key, "backend": "file"},
                )
                return None
            self._log.info(
                "broke stale lock %s (%s)",
                key,
                reason,
                extra={"lock_key": key, "backend": "file", "fence": fence},
            )
        # Recorded only once the lock is ours: a failed attempt must not consume fences.
        os.pwrite(guard_fd, fence.to_bytes(8, "big"), 0)
        return Lease(
            key=key,
            token=token,
            fence=fence,
            backend=self.backend,
            ttl=ttl,
            expires_at=now + ttl,
            acquired_at=now,
        )

    def _content(
        self,
        key: str,
        now: float,
        now_bt: float,
        ttl: float,
        token: str,
        fence: int,
        task_id: str | None,
        task_name: str | None,
    ) -> bytes:
        meta = self._meta(key, now, ttl, task_id, task_name)
        if len(meta) > _META_LIMIT:
            # A key of 64 Ki escaped characters (or a huge task name) would not fit under the
            # read cap, and an over-long file counts as corrupt. Keep the lock valid; describe
            # it with shortened text instead.
            meta = (
                self._meta(
                    key[:_FIELD_CAP],
                    now,
                    ttl,
                    task_id and task_id[:_FIELD_CAP],
                    task_name and task_name[:_FIELD_CAP],
                )[:-1]
                + ',"truncated":true}'
            )
        return (
            f'{meta[:-1]},"token":{json.dumps(token)},"fence":{fence},'
            f'"expires":{now + ttl!r},"bt_expires":{now_bt + ttl!r}}}'
        ).encode("ascii")

    def _publish(self, name: str, content: bytes, *, replace: bool) -> bool:
        """Write ``content`` to a private temp file and move it to ``name`` in one step.

        ``replace=False`` links (fails if ``name`` exists: returns False); ``replace=True``
        renames over whatever is there. No fsync: a lock does not outlive a crash of the host.
        """
        dfd = self._dir_fd
        if not replace and self._tmpfile:
            published = self._publish_unnamed(name, content)
            if published is not None:
                return published
        # Only the holder of this bucket's guard writes temp files for ``name``, so one name per
        # process is private enough (the pid only matters where flock does not exclude: on a
        # network file system). A name that repeats also keeps the kernel's dentry cache from
        # filling with millions of dead one-off names.
        temp = f"{_TMP_PREFIX}{name}.{os.getpid()}"
        try:
            fd = os.open(temp, _OPEN_TEMP, 0o600, dir_fd=dfd)
        except FileExistsError:
            # Left by a crashed writer with our pid (recycled); we hold the guard: nobody is
            # using it.
            os.unlink(temp, dir_fd=dfd)
            fd = os.open(temp, _OPEN_TEMP, 0o600, dir_fd=dfd)
        pending = True  # the temp file still exists under its own name
        try:
            try:
                written = os.write(fd, content)
            finally:
                os.close(fd)
            if written != len(content):
                raise OSError(errno.ENOSPC, "short write of a lock file", temp)
            if replace:
                os.replace(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                pending = False
                return True
            try:
                os.link(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            except FileExistsError:
                return False
            return True
        finally:
            if pending:
                os.unlink(temp, dir_fd=dfd)

    def _publish_unnamed(self, name: str, content: bytes) -> bool | None:
        """Create-if-absent through an unnamed O_TMPFILE inode linked into place.

        One directory change instead of three (create temp, link, unlink temp): the directory
        operations are what a lock cycle costs on a journaling file system. Returns None when
        the file system does not support O_TMPFILE (then the named-temp path is used).
        """
        try:
            fd = os.open(".", _OPEN_UNNAMED, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                self._tmpfile = False
                return None
            raise
        try:
            written = os.write(fd, content)
            if written != len(content):
                raise OSError(errno.ENOSPC, "short write of a lock file", name)
            try:
                # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N names the unnamed inode; the
                # content is complete before the name appears (atomic publication).
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=self._dir_fd)
            except FileExistsError:
                return False
            except FileNotFoundError:  # no /proc: fall back for good
                self._tmpfile = False
                return None
            return True
        finally:
            os.close(fd)

    def _read(self, name: str) -> _Entry | None:
        """What is under ``name`` now, or None when nothing is; never blocks, never follows."""
        try:
            fd = os.open(name, _OPEN_READ, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            # ELOOP: a symlink; ENXIO: a socket; EACCES: unreadable. Judge it by its lstat age.
            try:
                st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            return self._corrupt(name, st, f"cannot be opened: {exc.strerror}")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return self._corrupt(name, st, "not a regular file")
            if st.st_size > _MAX_BYTES:
                return self._corrupt(name, st, f"larger than {_MAX_BYTES} bytes")
            data = os.read(fd, st.st_size + 1)
        finally:
            os.close(fd)
        meta = _parse(data)
        if meta is None:
            return self._corrupt(name, st, "not valid lock metadata")
        return _Entry(meta, st.st_ino, st.st_mtime_ns, None)

    def _corrupt(self, name: str, st: os.stat_result, problem: str) -> _Entry:
        marker = (name, st.st_ino, st.st_mtime_ns)
        if marker not in self._warned_corrupt:
            if len(self._warned_corrupt) >= 1024:
                self._warned_corrupt.clear()  # bounded memory; a repeat warning is harmless
            self._warned_corrupt.add(marker)
            self._log.warning(
                "unreadable lock file %s (%s): held for %.0f s after its last change, then stale",
                os.path.join(self._path, name),
                problem,
                _CORRUPT_GRACE,
                extra={"backend": "file"},
            )
        return _Entry(None, st.st_ino, st.st_mtime_ns, problem)

    def _stale_reason(
        self, entry: _Entry, now: float | None = None, now_bt: float | None = None
    ) -> str | None:
        """Why ``entry`` may be replaced or removed, or None while it is a live lock."""
        if now is None:
            now = _time.time()
        meta = entry.meta
        if meta is None:
            # abs(): an mtime far in the future (the wall clock was stepped back) must not keep
            # a corrupt file "fresh" for hours.
            if abs(now - entry.mtime_ns / 1e9) > _CORRUPT_GRACE:
                return f"unreadable for more than {_CORRUPT_GRACE:.0f} s: {entry.problem}"
            return None
        if now_bt is None:
            now_bt = _time.clock_gettime(_time.CLOCK_BOOTTIME)
        if _remaining(meta, now, now_bt) <= 0:
            return "expired"
        if _identity.holder_is_dead(meta):
            return "holder process is gone"
        return None

    def _info(self, entry: _Entry, key: str) -> LockInfo:
        meta = entry.meta
        if meta is None:
            return LockInfo(key, None, None, self.backend, None, None, None, None, None, None)
        now = _time.time()
        expires = now + _remaining(meta, now, _time.clock_gettime(_time.CLOCK_BOOTTIME))
        acquired = meta.get("acquired")
        return LockInfo(
            key=key,
            token_prefix=meta["token"][:8],
            fence=meta["fence"],
            backend=self.backend,
            host=_opt(meta, "host", str),
            pid=_opt(meta, "pid", int),
            task_id=_opt(meta, "task_id", str),
            task_name=_opt(meta, "task_name", str),
            acquired_at=float(acquired) if _is_time(acquired) else None,
            expires_at=expires,
        )

    def _clean_lock(self, name: str, report: CleanReport, *, dry_run: bool) -> None:
        entry = self._read(name)
        if entry is None:
            return  # released between the listing and now
        report.scanned += 1
        if self._stale_reason(entry) is None:  # cheap first look, without the guard
            report.kept += 1
            return
        if dry_run:
            report.removed += 1
            return
        with _Guard(self, name[:2]):
            again = self._read(name)
            # Still the lock we judged (same token; same inode and mtime for an unreadable
            # file) and still stale (an extend keeps the token but makes it live again): only
            # then is it deleted. A lock re-acquired since the first look is never touched.
            reason = None
            if again is not None and _same(entry, again):
                reason = self._stale_reason(again)
            if reason is None:
                report.kept += 1
                return
            os.unlink(name, dir_fd=self._dir_fd)
        report.removed += 1
        meta = entry.meta or {}
        self._log.info(
            "removed stale lock %s (%s)",
            meta.get("key", name),
            reason,
            extra={"lock_key": meta.get("key"), "backend": "file", "fence": meta.get("fence")},
        )

    def _clean_temp(self, name: str, bucket: str) -> None:
        try:
            st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # published or dropped by its writer since the listing: the usual case
        if _time.time() - st.st_mtime <= _TMP_MAX_AGE:
            return
        # Under the guard: a writer paused between creating and publishing its temp holds it.
        with _Guard(self, bucket):
            try:
                os.unlink(name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                return  # another cleaner was faster
        self._log.info("removed leftover temp file %s", name, extra={"backend": "file"})

    def _list(self) -> list[str]:
        # A private descriptor per scan: listdir(fd) works on a dup, which shares the file
        # offset with the original, so two threads (or a forked child) scanning through one
        # descriptor would skip each other's entries.
        fd = os.open(".", _OPEN_DIR, dir_fd=self._dir_fd)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def _lock_bucket(self, bucket: str) -> tuple[threading.Lock, int]:
        """Take bucket ``bucket``'s guard; return the thread lock and guard fd to release."""
        if self._pid != os.getpid():
            self._after_fork()
        deadline = _time.monotonic() + _GUARD_TIMEOUT
        lock = self._bucket_locks[bucket]
        if not lock.acquire(timeout=_GUARD_TIMEOUT):
            raise self._guard_timeout(bucket)
        try:
            fd = self._fds.guards.get(bucket)
            if fd is None:
                fd = self._open_guard(bucket)
            try:
                fcntl.flock(fd, _LOCK_NB)
            except BlockingIOError:
                self._wait_flock(fd, bucket, deadline)
        except BaseException:
            lock.release()
            raise
        return lock, fd

    def _wait_flock(self, fd: int, bucket: str, deadline: float) -> None:
        # Never a blocking flock: bounded, with tiny growing sleeps (the holder needs
        # microseconds unless it was stopped or sits on a slow network file system).
        delay = 0.0001
        while True:
            left = deadline - _time.monotonic()
            if left <= 0:
                raise self._guard_timeout(bucket)
            _time.sleep(min(delay, left))
            delay = min(delay * 2, 0.005)
            try:
                fcntl.flock(fd, _LOCK_NB)
            except BlockingIOError:
                continue
            return

    def _open_guard(self, bucket: str) -> int:
        name = _GUARD_PREFIX + bucket
        fd = os.open(name, _OPEN_GUARD, 0o600, dir_fd=self._dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            path = os.path.join(self._path, name)
            raise LockBackendUnavailable(
                f"lock guard {path} is not a regular file", backend=self.backend, path=path
            )
        self._fds.guards[bucket] = fd
        return fd

    def _after_fork(self) -> None:
        # A child shares the parent's open file descriptions, so flock on an inherited guard fd
        # would "succeed" while the parent holds it: reopen every guard. The thread locks may
        # have been held by parent threads that do not exist here: make new ones.
        with _module_lock:
            if self._pid == os.getpid():
                return
            self._fds.close_guards()
            self._bucket_locks = {f"{i:02x}": threading.Lock() for i in range(256)}
            self._pid = os.getpid()

    def _guard_timeout(self, bucket: str) -> LockBackendUnavailable:
        path = os.path.join(self._path, _GUARD_PREFIX + bucket)
        return LockBackendUnavailable(
            f"lock guard {path} stayed busy for {_GUARD_TIMEOUT} s "
            "(a process stopped inside a lock operation?)",
            backend=self.backend,
            path=path,
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

    def _warn_if_network(self) -> None:
        kind = _network_fs_type(self._path)
        if kind is None:
            return
        with _module_lock:
            if self._path in _warned_network:
                return
            _warned_network.add(self._path)
        self._log.warning(
            "lock directory %s is on a network file system (%s): file locks exclude only "
            "processes on one host, and dead holders are detected only on that host; use a "
            "local directory",
            self._path,
            kind,
            extra={"backend": "file"},
        )
