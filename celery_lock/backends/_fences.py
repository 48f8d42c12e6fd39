"""The lock directory's two auxiliary files: ``.fences`` (fences of removed lock files) and
``.guard`` (serialises the removal of entries that are not lock files).

``.fences`` holds 256 slots of 8 bytes, one per first byte of a lock file name: the highest
fence of every lock file that was removed (by the cleaner, or by a manager evicting an old free
file), so a re-created file continues its key's fences instead of starting again.

Both are opened like lock files (``O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK``, relative to the
directory descriptor) and refused unless they are a regular file with exactly one link: a
planted FIFO must not block us, and a planted hard link must never be written through (issue
14 item 8: the linked file used to grow). A refused file is a backend error naming the path;
nothing removes or repairs it behind the operator's back, since whatever stands there was put
there by somebody with write access to a private directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from typing import Final

from celery_lock.backends._filerecord import FENCE_LIMIT
from celery_lock.backends._lockdir import OPEN_CREATE, OPEN_READ, unlock_close
from celery_lock.errors import LockBackendUnavailable

__all__ = ["FENCES", "GUARD", "guard", "last", "open_aux", "record"]

FENCES: Final = ".fences"
GUARD: Final = ".guard"

#: ``flock(fd, operation, name)``: the manager's bounded flock (raises when busy too long).
Flock = Callable[[int, int, str], None]


def open_aux(dir_fd: int, directory: str, name: str, flags: int) -> int:
    """Open ``name`` (``.fences`` or ``.guard``) in the directory open as ``dir_fd``.

    :raises FileNotFoundError: when it does not exist and ``flags`` has no ``O_CREAT``.
    :raises LockBackendUnavailable: when it is not a regular file with one link.
    """
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_nlink != 1:
        problem = f"is a file with {st.st_nlink} links (refused: it would be written through)"
    else:
        return fd
    os.close(fd)
    path = os.path.join(directory, name)
    raise LockBackendUnavailable(f"{path} {problem}", backend="file", path=path)


def _slot(name: str) -> int:
    return int(name[:2], 16) * 8


def _value(raw: bytes) -> int:
    last = int.from_bytes(raw, "big") if len(raw) == 8 else 0
    return last if last < FENCE_LIMIT else 0  # garbage: the clock term keeps fences sane


def last(dir_fd: int, directory: str, name: str, flock: Flock) -> int:
    """The highest fence of a removed lock file of ``name``'s slot (0 when none)."""
    try:
        fd = open_aux(dir_fd, directory, FENCES, OPEN_READ)
    except FileNotFoundError:
        return 0
    try:
        flock(fd, fcntl.LOCK_SH, FENCES)
        return _value(os.pread(fd, 8, _slot(name)))
    finally:
        unlock_close(fd)


def record(dir_fd: int, directory: str, name: str, fence: int | None, flock: Flock) -> None:
    """Keep ``fence`` as the slot's high-water mark before ``name``'s file is removed."""
    if not fence or fence >= FENCE_LIMIT:
        return
    fd = open_aux(dir_fd, directory, FENCES, OPEN_CREATE)
    try:
        flock(fd, fcntl.LOCK_EX, FENCES)
        slot = _slot(name)
        # Garbage reads as 0, so it is overwritten, never kept as a ceiling.
        if fence > _value(os.pread(fd, 8, slot)):
            os.pwrite(fd, fence.to_bytes(8, "big"), slot)
    finally:
        unlock_close(fd)


@contextlib.contextmanager
def guard(dir_fd: int, directory: str, flock: Flock) -> Iterator[None]:
    """Hold the directory's ``.guard`` exclusively for the ``with`` body."""
    fd = open_aux(dir_fd, directory, GUARD, OPEN_CREATE)
    try:
        flock(fd, fcntl.LOCK_EX, GUARD)
        yield
    finally:
        unlock_close(fd)
