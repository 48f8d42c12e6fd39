"""Local lock files: one JSON record per key, changed in place under the file's flock (Linux)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import select
import stat
import struct
import tempfile
import threading
import time as _time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeGuard

from celery_lock import _identity
from celery_lock._base import LockManager, Waiter
from celery_lock._types import CleanReport, Lease, LockInfo
from celery_lock.errors import LockBackendUnavailable, LockError

__all__ = ["FileLockManager"]

#: Hex characters of sha256(key) in a lock file name (160 bits: collisions are not a concern).
_NAME_HEX: Final = 40
_LOCK_NAME: Final = re.compile(r"[0-9a-f]{40}\.lock\Z")
#: 256 slots of 8 bytes (one per first byte of a lock file name): the highest fence of every lock
#: file the cleaner removed, so a re-created file continues its key's fences.
_FENCES: Final = ".fences"
#: Serialises the removal of entries that are not lock files (symlinks, FIFOs, unreadable files).
_GUARD: Final = ".guard"
#: Reads are capped (a planted multi-GB file must not be slurped); what we write always fits.
_MAX_BYTES: Final = 64 * 1024
#: Metadata longer than this is rewritten with the free-text fields cut to _FIELD_CAP characters.
_META_LIMIT: Final = 48 * 1024
_FIELD_CAP: Final = 1024
#: A record shorter than the file by at most this many bytes is padded with spaces (one write);
#: beyond it the file is truncated after the write.
_PAD_LIMIT: Final = 4096
#: Unreadable, corrupt or foreign entries count as held this long after their last change
#: (filelock's grace, tox-dev/filelock#532, #551): long enough for any writer we do not know of.
_CORRUPT_GRACE: Final = 2.0
#: Longest wait for a lock file's flock: a process SIGSTOPped inside the few-µs critical section
#: must not wedge everybody for ever. Not Final: tests shorten it.
_BUSY_TIMEOUT = 5.0
#: Attempts to open a name whose file a cleaner keeps removing between our open and our flock.
_REOPEN_TRIES: Final = 100
#: Leases whose written record a manager remembers (release compares bytes instead of parsing).
_HELD_CACHE: Final = 4096
#: Files a manager leaves in place after releasing them (the most recently released ones: a key
#: taken again soon costs no directory change). Older free files are removed, so keys used once
#: (a task's arguments) do not pile up between two cleaner runs.
_KEEP_FREE: Final = 256
#: File names a manager caches, for keys of up to _NAME_CACHE_KEY characters (longer ones are
#: hashed on every call: the cache must not hold megabytes of keys).
_NAME_CACHE: Final = 4096
_NAME_CACHE_KEY: Final = 256
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
_OPEN_WRITE: Final = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_OPEN_CREATE: Final = _OPEN_WRITE | os.O_CREAT
_BOOTTIME: Final = _time.CLOCK_BOOTTIME
#: How a free lock file (released, broken, or cleaned of a stale holder) starts.
_FREE_HEAD: Final = b'{"v":1,"fence":'

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


def _parse(data: bytes) -> dict[str, Any] | int | None:
    """What a lock file holds: a holder's metadata (dict), a free file's last fence (int), or
    None when ``data`` is nothing we could have written."""
    if data.startswith(_FREE_HEAD):  # the common free record, without the JSON decoder
        end = data.find(b"}", 15)
        digits = data[15:end]
        if end > 15 and digits.isdigit() and not data[end + 1 :].strip():
            return int(digits)
    try:
        meta = _decode(data.decode("utf-8"))
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than the stack
        return None
    if not isinstance(meta, dict):
        return None
    if "token" not in meta:
        fence = meta.get("fence")
        return fence if type(fence) is int and fence >= 0 else None
    if (
        not isinstance(meta.get("key"), str)
        or not isinstance(meta["token"], str)
        or not meta["token"]
        or type(meta.get("fence")) is not int
        or not _is_time(meta.get("expires"))
        or not (meta.get("bt_expires") is None or _is_time(meta["bt_expires"]))
    ):
        return None
    return meta


def _contents(fd: int, size: int) -> bytes:
    """The bytes of a lock file of ``size`` bytes, or none when it is empty or over the cap."""
    return os.pread(fd, size, 0) if 0 < size <= _MAX_BYTES else b""


def _free_record(fence: int) -> bytes:
    return b'{"v":1,"fence":%d}' % fence


def _unlock_close(fd: int) -> None:
    # Unlock explicitly: a child forked meanwhile shares the open file description, and its copy
    # would keep the flock alive after our close.
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _close_all(watches: _Watches, dir_fd: int) -> None:
    watches.close()
    _close_quietly(dir_fd)


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


class _Foreign(NamedTuple):
    """Something under a lock name that is not a lock file we can open (symlink, FIFO, socket,
    directory, unreadable file): its ``lstat`` and the problem."""

    st: os.stat_result
    problem: str


class _Entry(NamedTuple):
    """What a lock file holds: ``meta`` of a holder, or the ``fence`` of a free file, or (both
    None) a ``problem``."""

    name: str
    meta: dict[str, Any] | None
    fence: int | None
    st: os.stat_result
    problem: str | None


#: inotify event bits (linux/inotify.h): a file written, created, deleted or moved in.
_IN_MODIFY: Final = 0x002
_IN_MOVED_TO: Final = 0x080
_IN_CREATE: Final = 0x100
_IN_DELETE: Final = 0x200
_IN_Q_OVERFLOW: Final = 0x4000
_IN_WATCH: Final = _IN_MODIFY | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_IN_EVENT: Final = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


def _load_inotify() -> tuple[Any, Any] | None:
    """libc's ``inotify_init1`` and ``inotify_add_watch``, or None where there are none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    init.argtypes, init.restype = [ctypes.c_int], ctypes.c_int
    add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add.restype = ctypes.c_int
    return init, add


_inotify = _load_inotify()


class _Watches:
    """A manager's idle inotify instances, each watching its lock directory.

    Closing an inotify descriptor waits for an RCU grace period (milliseconds), so instances
    are kept for the next QUEUE wait instead; one taken again is drained first. A forked child
    starts with none of its own: an instance shared with the parent would split its events.
    """

    __slots__ = ("dir_fd", "idle", "pid")

    #: Idle instances kept per manager (the kernel allows 128 per user by default).
    KEEP: Final = 4

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd
        self.idle: list[int] = []
        self.pid = os.getpid()

    def take(self) -> int:
        """An armed instance with no pending events, or -1 (no inotify: poll)."""
        if self.pid != os.getpid():
            stale, self.idle, self.pid = self.idle, [], os.getpid()
            for fd in stale:  # the parent's instances stay open in the parent
                # Only our copy of an inotify instance: a child that closed its inherited
                # descriptors may have reused the number for something else.
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                        os.close(fd)
        try:
            fd = self.idle.pop()
        except IndexError:
            return self._new()
        with contextlib.suppress(OSError):
            while os.read(fd, 64 * 1024):  # events from before this wait: not a wake-up
                pass
        return fd

    def give(self, fd: int) -> None:
        if self.pid == os.getpid() and len(self.idle) < self.KEEP:
            self.idle.append(fd)
        else:
            _close_quietly(fd)

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for fd in idle:
            _close_quietly(fd)

    def _new(self) -> int:
        if _inotify is None:
            return -1
        init, add = _inotify
        fd = int(init(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            return -1  # EMFILE (fs.inotify.max_user_instances), ENOSYS: poll
        # The directory we verified and hold open, not a path that could be swapped meanwhile.
        if add(fd, f"/proc/self/fd/{self.dir_fd}".encode(), _IN_WATCH) < 0:
            _close_quietly(fd)
            return -1
        return fd


class _InotifyWaiter(Waiter):
    """Wakes a QUEUE waiter when its lock file is written (a release, most likely), through an
    inotify watch on the lock directory; sleeps when inotify is not available.

    Armed at construction, before the next attempt, so a release between that attempt and the
    wait still wakes us. A holder that dies or expires writes nothing: the caller's growing poll
    delay (``poll_max``) bounds the wait for those.
    """

    def __init__(self, watches: _Watches, name: str) -> None:
        self._watches = watches
        self._name = name.encode()
        self._fd = watches.take()

    def wait(self, seconds: float) -> bool:
        fd = self._fd
        if fd < 0:
            return super().wait(seconds)
        deadline = _time.monotonic() + seconds
        while True:
            remaining = deadline - _time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return False
            try:
                data = os.read(fd, 64 * 1024)
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
            self._watches.give(self._fd)
            self._fd = -1


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
    on from the old record's (or from ``.fences``, where the cleaner keeps the fences of the
    files it removes), and never below the wall clock in µs.

    QUEUE waiters sleep on an inotify watch of the directory and wake when their lock file is
    written (a release); a holder that dies or expires writes nothing, so they also poll, with a
    delay growing from ``poll_min`` to ``poll_max``.

    Linux only (procfs for proof of death and mount detection, ``flock``, ``CLOCK_BOOTTIME``,
    inotify).
    The directory should be on a local file system; a network one gets a WARNING, since neither
    flock nor proof of death works across hosts. Each manager keeps one descriptor for the
    directory and up to four idle inotify instances; every operation opens and closes its own.

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
        self._dir_fd = _open_directory(self._path)
        self._watches = _Watches(self._dir_fd)
        weakref.finalize(self, _close_all, self._watches, self._dir_fd)
        #: key -> file name, for keys up to _NAME_CACHE_KEY characters (bounded).
        self._names: dict[str, str] = {}
        #: token -> (record bytes as written, CLOCK_BOOTTIME expiry, fence), bounded.
        self._held: dict[str, tuple[bytes, float, int]] = {}
        #: Names of files this manager freed, oldest first (see _KEEP_FREE).
        self._freed: dict[str, None] = {}
        self._warned_corrupt: set[tuple[str, int, int]] = set()
        self._warn_if_network()

    @property
    def directory(self) -> Path:
        """The lock directory."""
        return Path(self._path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(directory={self._path!r})"

    def _waiter(self, key: str) -> Waiter:
        return _InotifyWaiter(self._watches, self._names.get(key) or self._name(key))

    # ------------------------------------------------------------------ hooks

    def _try_acquire(
        self, key: str, ttl: float, token: str, task_id: str | None, task_name: str | None
    ) -> Lease | None:
        name = self._names.get(key) or self._name(key)
        try:
            for _ in range(_REOPEN_TRIES):
                opened = self._open_locked(name, _OPEN_CREATE, fcntl.LOCK_EX)
                if isinstance(opened, _Foreign):
                    if not self._remove_foreign(name, opened, key):
                        return None
                    continue
                assert opened is not None  # O_CREAT: never None
                fd, st = opened
                try:
                    return self._acquire_locked(fd, st, name, key, ttl, token, task_id, task_name)
                finally:
                    _unlock_close(fd)
            raise OSError(  # noqa: TRY301 - mapped to LockBackendUnavailable just below
                errno.EAGAIN, "something keeps reappearing under the lock name", name
            )
        except LockError:
            raise
        except OSError as exc:
            raise self._unavailable(exc, key) from exc

    def _release(self, lease: Lease) -> bool:
        cached = self._held.pop(lease.token, None)
        key = lease.key
        name = self._names.get(key) or self._name(key)
        try:
            opened = self._open_locked(name, _OPEN_WRITE)
            if opened is None or isinstance(opened, _Foreign):
                return False  # no lock file (or not one we could have written): not ours
            fd, st = opened
            try:
                size = st.st_size
                data = _contents(fd, size)
                if cached is not None and data == cached[0]:
                    # Exactly the bytes we wrote: still ours, unchanged (the common case).
                    alive = cached[1] > _time.clock_gettime(_BOOTTIME)
                    fence = cached[2]
                else:
                    meta = _parse(data)
                    if type(meta) is not dict or meta["token"] != lease.token:
                        return False
                    now = _time.time()
                    alive = _remaining(meta, now, _time.clock_gettime(_BOOTTIME)) > 0
                    fence = meta["fence"]
                # Our record goes even when it expired (nobody took it over, or the token would
                # differ); only a lease that was still valid reports success.
                self._write(fd, _free_record(fence), data, size)
            finally:
                _unlock_close(fd)
        except LockError:
            raise
        except OSError as exc:
            raise self._unavailable(exc, key) from exc
        self._freed_now(name)
        return alive

    def _extend(self, lease: Lease, ttl: float) -> Lease | None:
        key = lease.key
        try:
            opened = self._open_locked(self._name(key), _OPEN_WRITE)
            if opened is None or isinstance(opened, _Foreign):
                return None
            fd, st = opened
            try:
                size = st.st_size
                data = _contents(fd, size)
                meta = _parse(data)
                if type(meta) is not dict or meta["token"] != lease.token:
                    return None
                now = _time.time()
                now_bt = _time.clock_gettime(_BOOTTIME)
                if _remaining(meta, now, now_bt) <= 0:
                    return None
                meta.update(ttl=ttl, expires=now + ttl, bt_expires=now_bt + ttl)
                content = json.dumps(meta, separators=(",", ":")).encode()
                self._remember(
                    lease.token, self._write(fd, content, data, size), now_bt + ttl, meta["fence"]
                )
            finally:
                _unlock_close(fd)
        except LockError:
            raise
        except OSError as exc:
            raise self._unavailable(exc, key) from exc
        return dataclasses.replace(lease, ttl=ttl, expires_at=now + ttl)

    def _inspect(self, key: str) -> LockInfo | None:
        try:
            entry = self._read(self._name(key))
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
        name = self._name(key)
        try:
            opened = self._open_locked(name, _OPEN_WRITE)
            if opened is None:
                return False
            if isinstance(opened, _Foreign):
                # Not a lock file: no task id to match, no death to prove; a stale one is the
                # cleaner's job. Only an unconditional break takes a fresh one away.
                if conditional or self._foreign_is_stale(opened):
                    return False
                if not self._unlink_foreign(name, opened):
                    return False
                meta = None
                reason = "broken on request (unreadable)"
            else:
                fd, st = opened
                try:
                    entry = self._entry(fd, st, name)
                    meta = entry.meta
                    if meta is None:
                        if entry.problem is None:
                            return False  # free: nothing to break
                        if conditional or self._stale_reason(entry):
                            return False
                        fence = self._last_fence(name)
                        reason = "broken on request (unreadable)"
                    else:
                        now = _time.time()
                        if _remaining(meta, now, _time.clock_gettime(_BOOTTIME)) <= 0:
                            return False  # expired: no lock to break (as on Redis)
                        if task_id is not None and meta.get("task_id") != task_id:
                            return False
                        if token_prefix is not None and not meta["token"].startswith(token_prefix):
                            return False
                        if only_if_dead and not _identity.holder_is_dead(meta):
                            return False
                        fence = meta["fence"]
                        reason = "holder process is gone" if only_if_dead else "broken on request"
                    self._write(fd, _free_record(fence), b"", st.st_size)
                finally:
                    _unlock_close(fd)
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
        self._freed_now(name)
        return True

    def clean(self, *, dry_run: bool = False) -> CleanReport:
        """Remove stale lock files (expired, dead holder, unreadable for 2 s) and free ones.

        Each file is judged and removed under its exclusive flock, so the lock judged is the
        lock removed and a lock taken or extended meanwhile is never touched. Free files
        (released locks) are removed too, but they are not locks: the report does not count
        them. Their fences are kept in ``.fences``.

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
            if not _LOCK_NAME.match(name):
                continue
            try:
                self._clean_lock(name, report, dry_run=dry_run)
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

    def _name(self, key: str) -> str:
        name = _file_name(key)
        if len(key) <= _NAME_CACHE_KEY:
            names = self._names
            if len(names) >= _NAME_CACHE:
                names.clear()  # bounded; hashing again is cheap
            names[key] = name
        return name

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
            self._remove_if_free(oldest)
        except (OSError, LockError) as exc:
            if self._log.isEnabledFor(logging.DEBUG):
                self._log.debug(
                    "could not remove free lock file %s: %s", oldest, exc, extra={"backend": "file"}
                )

    def _remove_if_free(self, name: str) -> None:
        try:
            fd = os.open(name, _OPEN_READ, dir_fd=self._dir_fd)
        except OSError:
            return  # gone, or not a lock file: nothing of ours to remove
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # in use this very moment: not idle
            st = os.fstat(fd)
            if st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
                return
            entry = self._entry(fd, st, name)
            if entry.meta is not None or entry.problem is not None:
                return  # taken again (or odd): not free
            # As in clean(): under the exclusive flock, fence kept; whoever opened the file
            # meanwhile sees it unlinked after its own flock and creates a new one.
            self._record_fence(name, entry.fence)
            os.unlink(name, dir_fd=self._dir_fd)
        finally:
            _unlock_close(fd)

    def _remember(self, token: str, written: bytes, bt_expires: float, fence: int) -> None:
        held = self._held
        if len(held) >= _HELD_CACHE:
            # Leases never released (lost, leaked) must not grow this for ever; a forgotten
            # lease only releases by parsing.
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                del held[next(iter(held))]
        held[token] = (written, bt_expires, fence)

    def _open_locked(
        self, name: str, flags: int, operation: int = fcntl.LOCK_EX
    ) -> tuple[int, os.stat_result] | _Foreign | None:
        """Open ``name`` and flock it (``operation``); return the fd and its fstat.

        Returns None when nothing is under the name (only without O_CREAT), and a
        :class:`_Foreign` for an entry that is not a lock file. A file unlinked while we waited
        for its flock (by a cleaner) is dropped and the name opened again.
        """
        dfd = self._dir_fd
        for _ in range(_REOPEN_TRIES):
            try:
                fd = os.open(name, flags, 0o600, dir_fd=dfd)
            except FileNotFoundError:
                if flags & os.O_CREAT:
                    raise  # the directory itself is gone
                return None
            except OSError as exc:
                if exc.errno not in (
                    errno.ELOOP,
                    errno.EISDIR,
                    errno.ENXIO,
                    errno.EACCES,
                    errno.EPERM,
                ):
                    raise
                # ELOOP: a symlink; EISDIR: a directory; ENXIO: a socket; EACCES: unreadable.
                foreign = self._lstat_foreign(name, f"cannot be opened: {exc.strerror}")
                if foreign is None:
                    continue  # gone meanwhile: look again
                return foreign
            try:
                self._flock(fd, operation, name)
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            links = st.st_nlink
            if links == 1 and stat.S_ISREG(st.st_mode):
                return fd, st
            _unlock_close(fd)
            if links:
                # A second hard link would have us write lock records through it into some
                # other file (a planted link to /etc/shadow, say): never a lock file of ours.
                problem = "not a regular file" if links == 1 else f"a file with {links} links"
                return _Foreign(st, problem)
        raise OSError(errno.EAGAIN, "the lock file kept being removed while we opened it", name)

    def _flock(self, fd: int, operation: int, name: str) -> None:
        """Take ``flock(operation)`` on ``fd`` (the file ``name``), waiting a bounded time."""
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            self._wait_flock(fd, operation, name)

    def _wait_flock(self, fd: int, operation: int, name: str) -> None:
        # Never a blocking flock: bounded, with tiny growing sleeps (the holder needs
        # microseconds unless it was stopped or sits on a slow network file system).
        deadline = _time.monotonic() + _BUSY_TIMEOUT
        delay = 0.0001
        while True:
            left = deadline - _time.monotonic()
            if left <= 0:
                path = os.path.join(self._path, name)
                raise LockBackendUnavailable(
                    f"lock file {path} stayed busy for {_BUSY_TIMEOUT} s "
                    "(a process stopped inside a lock operation?)",
                    backend=self.backend,
                    path=path,
                )
            _time.sleep(min(delay, left))
            delay = min(delay * 2, 0.005)
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            return

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
    ) -> Lease | None:
        size = st.st_size
        data = _contents(fd, size)
        now = _time.time()
        now_bt = _time.clock_gettime(_BOOTTIME)
        reason = None
        if not size:
            last = self._last_fence(name)  # a new file (or one whose creator died at once)
        else:
            record = _parse(data) if data else None
            if type(record) is int:
                last = record
            elif record is None:
                problem = f"larger than {_MAX_BYTES} bytes" if size > _MAX_BYTES else None
                entry = _Entry(name, None, None, st, problem or "not valid lock metadata")
                reason = self._stale_reason(entry, now)
                if reason is None:
                    return None
                last = self._last_fence(name)
            else:
                meta: dict[str, Any] = record  # type: ignore[assignment]
                if meta["token"] == token:
                    left = _remaining(meta, now, now_bt)
                    if left > 0:
                        # A retry of an attempt that succeeded (the caller lost our reply).
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
                reason = self._stale_reason(
                    _Entry(name, meta, meta["fence"], st, None), now, now_bt
                )
                if reason is None:
                    return None
                last = meta["fence"]
        if last >= _FENCE_LIMIT:
            last = 0  # garbage; the clock term keeps the fence sane
        # max(last + 1, clock): strictly increasing per key while its file or .fences lives, and
        # still increasing after both are lost, unless the wall clock also went back.
        fence = max(last + 1, _time.time_ns() // 1000)
        content = self._content(key, now, now_bt, ttl, token, fence, task_id, task_name)
        self._remember(token, self._write(fd, content, data, size), now_bt + ttl, fence)
        if reason is not None:
            self._log.info(
                "broke stale lock %s (%s)",
                key,
                reason,
                extra={"lock_key": key, "backend": "file", "fence": fence},
            )
        return Lease(key, token, fence, "file", ttl, now + ttl, now)

    def _write(self, fd: int, content: bytes, old: bytes, old_size: int) -> bytes:
        """Replace the record in ``fd`` (flocked by us) with ``content``; return what was written.

        One ``pwrite`` from offset 0, padded with spaces to the old length (JSON allows trailing
        white space), so the file never holds a mix of two records. On failure the old bytes are
        put back: an error path must not leave a lock held that nobody knows.
        """
        gap = old_size - len(content)
        if 0 < gap <= _PAD_LIMIT:
            content += b" " * gap
        try:
            written = os.pwrite(fd, content, 0)
            if written != len(content):
                raise OSError(errno.ENOSPC, "short write of a lock file")  # noqa: TRY301
            if gap > _PAD_LIMIT:
                os.ftruncate(fd, len(content))
        except BaseException:
            with contextlib.suppress(OSError):
                if old or not old_size:
                    os.pwrite(fd, old, 0)
                    os.ftruncate(fd, len(old))
            raise
        return content

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
            f'{meta[:-1]},"token":"{token}","fence":{fence},'
            f'"expires":{now + ttl!r},"bt_expires":{now_bt + ttl!r}}}'
        ).encode("ascii")

    def _entry(self, fd: int, st: os.stat_result, name: str) -> _Entry:
        """Decode the record of ``name``, open as ``fd`` and flocked by us."""
        size = st.st_size
        if size > _MAX_BYTES:
            return _Entry(name, None, None, st, f"larger than {_MAX_BYTES} bytes")
        record = _parse(os.pread(fd, size, 0)) if size else 0
        if record is None:
            return _Entry(name, None, None, st, "not valid lock metadata")
        if type(record) is int:
            return _Entry(name, None, record, st, None)
        meta: dict[str, Any] = record  # type: ignore[assignment]
        return _Entry(name, meta, meta["fence"], st, None)

    def _read(self, name: str) -> _Entry | None:
        """The lock under ``name`` now (under a shared flock), or None when it is free or
        absent; a foreign entry comes back as an entry with its problem. Never follows."""
        opened = self._open_locked(name, _OPEN_READ, fcntl.LOCK_SH)
        if opened is None:
            return None
        if isinstance(opened, _Foreign):
            return _Entry(name, None, None, opened.st, opened.problem)
        fd, st = opened
        try:
            entry = self._entry(fd, st, name)
        finally:
            _unlock_close(fd)
        if entry.meta is None and entry.problem is None:
            return None
        return entry

    def _lstat_foreign(self, name: str, problem: str) -> _Foreign | None:
        try:
            st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return _Foreign(st, problem)

    def _warn_corrupt(self, name: str, st: os.stat_result, problem: str) -> None:
        marker = (name, st.st_ino, st.st_mtime_ns)
        if marker in self._warned_corrupt:
            return
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

    def _foreign_is_stale(self, foreign: _Foreign) -> bool:
        # abs(): an mtime far in the future (the wall clock was stepped back) must not keep a
        # corrupt entry "fresh" for hours.
        return abs(_time.time() - foreign.st.st_mtime_ns / 1e9) > _CORRUPT_GRACE

    def _remove_foreign(self, name: str, foreign: _Foreign, key: str) -> bool:
        """Make room for a lock file where a foreign entry stands; True when the name should be
        tried again, False while the entry counts as held (or cannot be removed)."""
        self._warn_corrupt(name, foreign.st, foreign.problem)
        if not self._foreign_is_stale(foreign):
            return False
        if stat.S_ISDIR(foreign.st.st_mode):
            self._log.warning(
                "cannot break the stale lock %s for %s: a directory is in its place",
                os.path.join(self._path, name),
                key,
                extra={"lock_key": key, "backend": "file"},
            )
            return False
        if self._unlink_foreign(name, foreign):
            self._log.info(
                "broke stale lock %s (unreadable for more than %.0f s: %s)",
                key,
                _CORRUPT_GRACE,
                foreign.problem,
                extra={"lock_key": key, "backend": "file"},
            )
        return True

    def _unlink_foreign(self, name: str, foreign: _Foreign) -> bool:
        """Unlink ``name`` if it is still the entry ``foreign`` describes.

        Under the directory's ``.guard``: two processes that judged the same entry must not
        both unlink, or the second would remove the lock file the first created in its place.
        Lock files themselves are only ever removed under their own flock.
        """
        fd = self._open_aux(_GUARD, _OPEN_CREATE)
        try:
            self._flock(fd, fcntl.LOCK_EX, _GUARD)
            try:
                st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            before = foreign.st
            if (st.st_dev, st.st_ino, st.st_mtime_ns) != (
                before.st_dev,
                before.st_ino,
                before.st_mtime_ns,
            ):
                return False
            if stat.S_ISDIR(st.st_mode):
                return False
            os.unlink(name, dir_fd=self._dir_fd)
            return True
        finally:
            _unlock_close(fd)

    def _open_aux(self, name: str, flags: int) -> int:
        """Open ``.fences`` or ``.guard``; a planted non-file is a backend error."""
        fd = os.open(name, flags, 0o600, dir_fd=self._dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            path = os.path.join(self._path, name)
            raise LockBackendUnavailable(
                f"{path} is not a regular file", backend=self.backend, path=path
            )
        return fd

    def _last_fence(self, name: str) -> int:
        """The highest fence of a removed lock file of ``name``'s slot (0 when none)."""
        try:
            fd = self._open_aux(_FENCES, _OPEN_READ)
        except FileNotFoundError:
            return 0
        try:
            self._flock(fd, fcntl.LOCK_SH, _FENCES)
            raw = os.pread(fd, 8, int(name[:2], 16) * 8)
        finally:
            _unlock_close(fd)
        last = int.from_bytes(raw, "big") if len(raw) == 8 else 0
        return last if last < _FENCE_LIMIT else 0

    def _record_fence(self, name: str, fence: int | None) -> None:
        """Keep ``fence`` as the slot's high-water mark before ``name``'s file is removed."""
        if not fence or fence >= _FENCE_LIMIT:
            return
        fd = self._open_aux(_FENCES, _OPEN_CREATE)
        try:
            self._flock(fd, fcntl.LOCK_EX, _FENCES)
            slot = int(name[:2], 16) * 8
            raw = os.pread(fd, 8, slot)
            last = int.from_bytes(raw, "big") if len(raw) == 8 else 0
            if last >= _FENCE_LIMIT or fence > last:
                os.pwrite(fd, fence.to_bytes(8, "big"), slot)
        finally:
            _unlock_close(fd)

    def _stale_reason(
        self, entry: _Entry, now: float | None = None, now_bt: float | None = None
    ) -> str | None:
        """Why ``entry`` may be replaced or removed, or None while it is a live lock."""
        if now is None:
            now = _time.time()
        meta = entry.meta
        if meta is None:  # callers never pass a free file's entry: that is no lock at all
            problem = entry.problem or "unknown"
            self._warn_corrupt(entry.name, entry.st, problem)
            # abs(): an mtime far in the future (the wall clock was stepped back) must not keep
            # a corrupt file "fresh" for hours.
            if abs(now - entry.st.st_mtime_ns / 1e9) > _CORRUPT_GRACE:
                return f"unreadable for more than {_CORRUPT_GRACE:.0f} s: {problem}"
            return None
        if now_bt is None:
            now_bt = _time.clock_gettime(_BOOTTIME)
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
        expires = now + _remaining(meta, now, _time.clock_gettime(_BOOTTIME))
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
        opened = self._open_locked(name, _OPEN_READ, fcntl.LOCK_SH if dry_run else fcntl.LOCK_EX)
        if opened is None:
            return  # removed between the listing and now
        if isinstance(opened, _Foreign):
            report.scanned += 1
            if not self._foreign_is_stale(opened):
                report.kept += 1
                return
            if stat.S_ISDIR(opened.st.st_mode):
                # Counted and logged as an error by clean(): it blocks its key for good.
                raise IsADirectoryError(errno.EISDIR, "a directory stands in place of a lock file")
            if not dry_run and not self._unlink_foreign(name, opened):
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
            entry = self._entry(fd, st, name)
            free = entry.meta is None and entry.problem is None
            if not free:
                report.scanned += 1
                reason = self._stale_reason(entry)
                if reason is None:
                    report.kept += 1
                    return
                if dry_run:
                    report.removed += 1
                    return
            elif dry_run:
                return
            # Under our exclusive flock: the record judged is the record removed. Whoever
            # opened this file meanwhile finds it unlinked after its own flock and starts over.
            self._record_fence(name, entry.fence)
            os.unlink(name, dir_fd=self._dir_fd)
        finally:
            _unlock_close(fd)
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

    def _list(self) -> list[str]:
        # A private descriptor per scan: listdir(fd) works on a dup, which shares the file
        # offset with the original, so two threads (or a forked child) scanning through one
        # descriptor would skip each other's entries.
        fd = os.open(".", _OPEN_DIR, dir_fd=self._dir_fd)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

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
