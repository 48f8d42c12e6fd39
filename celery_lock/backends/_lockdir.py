"""The lock directory: where it is, creating and verifying it, listing it, and telling whether
it sits on a network file system (where flock and proof of death are host-local).

Everything is opened relative to one verified directory descriptor with ``O_NOFOLLOW |
O_CLOEXEC``; nothing here is Linux-only except the mount tables, which are simply absent
elsewhere (then no warning is given).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
import tempfile
import threading
from typing import Final

from celery_lock import _fork
from celery_lock.errors import LockError

__all__ = [
    "MOUNT_TABLES",
    "OPEN_CREATE",
    "OPEN_DIR",
    "OPEN_READ",
    "OPEN_WRITE",
    "close_quietly",
    "default_directory",
    "fs_type",
    "list_names",
    "may_exist",
    "network_fs_type",
    "open_directory",
    "unlock_close",
    "warn_if_network",
]

OPEN_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under a lock name must not block (tox-dev/filelock#549);
# O_NOFOLLOW: a planted symlink is never followed (tox-dev/filelock#461, #548).
OPEN_READ: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
OPEN_WRITE: Final = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
OPEN_CREATE: Final = OPEN_WRITE | os.O_CREAT

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
#: Tried in order (Linux procfs; absent elsewhere); tests point this at a fake table.
MOUNT_TABLES: tuple[str, ...] = ("/proc/self/mountinfo", "/proc/mounts")

#: Directories already warned about, so that every manager on one directory does not repeat it.
_warned: set[str] = set()
_warned_lock = threading.Lock()


@_fork.in_child
def _reset_warned_lock() -> None:
    # Another thread may have held it at the moment of the fork: the child's copy would stay
    # locked for ever.
    global _warned_lock  # noqa: PLW0603 - replaced, never shared with the parent's state
    _warned_lock = threading.Lock()


def default_directory() -> str:
    """``celery_lock-<euid>`` under :func:`tempfile.gettempdir` (``TMPDIR`` is honoured)."""
    return os.path.join(tempfile.gettempdir(), f"celery_lock-{os.geteuid()}")


def open_directory(path: str) -> int:
    """Create (0700) or verify the lock directory and return an ``O_DIRECTORY`` fd on it.

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
        fd = os.open(path, OPEN_DIR)
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


def list_names(dir_fd: int) -> list[str]:
    """The names in the directory open as ``dir_fd``."""
    # A private descriptor per scan: listdir(fd) works on a dup, which shares the file offset
    # with the original, so two threads (or a forked child) scanning through one descriptor
    # would skip each other's entries.
    fd = os.open(".", OPEN_DIR, dir_fd=dir_fd)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


#: faccessat with AT_SYMLINK_NOFOLLOW relative to a directory descriptor (Linux, the BSDs).
_ACCESS_AT: Final = os.access in os.supports_dir_fd and os.access in os.supports_follow_symlinks


def may_exist(dir_fd: int, name: str) -> bool:
    """False when nothing is under ``name`` (one system call, no exception): a caller that
    finds most names absent (the hybrid asks about every key Redis holds) skips an ``open``
    that would raise. True where that cannot be asked: open it to know.

    ``os.access`` also answers False when the directory cannot be read at all (it keeps no
    errno); the hybrid's answer is the same then, since an unusable directory leaves the key to
    Redis alone either way.
    """
    if not _ACCESS_AT:
        return True
    return os.access(name, os.F_OK, dir_fd=dir_fd, follow_symlinks=False)


def unlock_close(fd: int) -> None:
    """Drop our flock on ``fd`` and close it."""
    # Unlock explicitly: a child forked meanwhile shares the open file description, and its copy
    # would keep the flock alive after our close.
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _unescape_mount(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def fs_type(path: str, table: str) -> str | None:
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


def network_fs_type(path: str) -> str | None:
    """The type of the network file system ``path`` is on, or None (local or unknown)."""
    for table_path in MOUNT_TABLES:
        try:
            with open(table_path, encoding="utf-8", errors="surrogateescape") as fh:
                table = fh.read()
        except OSError:
            continue
        kind = fs_type(os.path.realpath(path), table)
        if kind is not None and (kind in _NETWORK_FS or kind.startswith("nfs")):
            return kind
        return None
    return None


def warn_if_network(path: str, log: logging.Logger) -> None:
    """Log one WARNING per directory that is on a network file system."""
    kind = network_fs_type(path)
    if kind is None:
        return
    with _warned_lock:
        if path in _warned:
            return
        _warned.add(path)
    log.warning(
        "lock directory %s is on a network file system (%s): file locks exclude only "
        "processes on one host, and dead holders are detected only on that host; use a "
        "local directory",
        path,
        kind,
        extra={"backend": "file"},
    )
