"""The job state files of one key: its waiter line (``<digest>.jobs``) and one done marker per
finished task id (``<digest>.<sha256(task id)[:16]>.done``): their format, reading them without
trusting them, and replacing them atomically. The rules for using them are :mod:`._filejobs`'s.

Done markers are files of their own, not entries of the line's file: a key that runs thousands
of jobs an hour must not make every claim parse (and every finish rewrite) thousands of markers.

A state is read with ``O_NOFOLLOW | O_NONBLOCK``, accepted only as a regular file with one
link under a size cap and holding a well-formed state of the expected key; anything else is
ignored (one WARNING) and replaced by the next write. A write goes to a private ``O_EXCL`` temp
file renamed over the name, so a reader never sees half a state and a planted symlink or hard
link is replaced, never written through.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
from typing import Final

from celery_lock.backends import _filerecord
from celery_lock.backends._lockdir import OPEN_READ

__all__ = ["JOBS_NAME", "MAX_STATE_BYTES", "TMP_NAME", "State", "is_done", "load", "mark_done"]
__all__ += ["done_name", "read", "state_name", "store"]

JOBS_NAME: Final = re.compile(r"[0-9a-f]{40}\.jobs\Z")
DONE_NAME: Final = re.compile(r"[0-9a-f]{40}\.[0-9a-f]{16}\.done\Z")
TMP_NAME: Final = re.compile(r"[0-9a-f]{40}\.(jobs|[0-9a-f]{16}\.done)\.[0-9a-f]{16}\.tmp\Z")
#: Read cap: payloads are Celery messages (kilobytes); a planted huge file is not slurped.
MAX_STATE_BYTES: Final = 16 * 1024 * 1024
_TMP_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_log = logging.getLogger("celery_lock.file")
#: (name, inode, mtime) of state files already warned about (bounded).
_warned: set[tuple[str, int, int]] = set()


class State:
    """One key's waiter line (task id -> payload, in order) and when it expires."""

    __slots__ = ("changed", "key", "line", "line_expires")

    def __init__(self, key: str) -> None:
        self.key = key
        self.line: dict[str, bytes] = {}  # a dict keeps order; re-setting keeps the position
        self.line_expires = 0.0
        self.changed = False

    def prune(self, now: float) -> None:
        if self.line and self.line_expires <= now:
            self.line.clear()
            self.changed = True

    def drop(self, task_id: str) -> bool:
        if self.line.pop(task_id, None) is None:
            return False
        self.changed = True
        return True

    def pop(self) -> tuple[str, bytes] | None:
        for task_id in self.line:
            self.changed = True
            return task_id, self.line.pop(task_id)
        return None

    def encode(self) -> bytes:
        line = [[t, base64.b64encode(p).decode("ascii")] for t, p in self.line.items()]
        body = {"v": 1, "key": self.key, "line": line, "line_expires": self.line_expires}
        return _encode(body).encode("ascii")


def _decode(data: bytes, key: str | None) -> State | None:
    try:
        raw = json.loads(data.decode("utf-8"))
        if not isinstance(raw, dict) or not isinstance(raw.get("key"), str):
            return None
        if key is not None and raw["key"] != key:
            return None
        state = State(raw["key"])
        expires, line = raw.get("line_expires"), raw.get("line")
        if not _filerecord.is_time(expires) or not isinstance(line, list):
            return None
        state.line_expires = float(expires)
        for item in line:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
                return None
            state.line[item[0]] = base64.b64decode(item[1], validate=True)
    except (ValueError, TypeError, RecursionError, binascii.Error):
        return None
    return state


def state_name(lock_name: str) -> str:
    """The line file of the lock file ``lock_name`` (same digest)."""
    return lock_name[:-5] + ".jobs"


def done_name(lock_name: str, task_id: str) -> str:
    """The done marker of ``task_id`` for the key of the lock file ``lock_name``."""
    digest = hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{lock_name[:-5]}.{digest}.done"


def read_bytes(dir_fd: int, name: str) -> bytes | str | None:
    """The content of ``name``: None when absent, a problem (str) when it is no state file."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)  # the common case: none
        fd = os.open(name, OPEN_READ, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EOPNOTSUPP, errno.EACCES):
            return f"cannot be opened: {exc.strerror}"
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return "not a regular file with one link"
        if st.st_size > MAX_STATE_BYTES:
            return f"larger than {MAX_STATE_BYTES} bytes"
        return os.pread(fd, st.st_size, 0)
    finally:
        os.close(fd)


def read(dir_fd: int, name: str, key: str | None) -> State | str | None:
    """The line under ``name``: None when absent, a problem (str) when unusable."""
    data = read_bytes(dir_fd, name)
    if not isinstance(data, bytes):
        return data
    state = _decode(data, key)
    return "not valid job state" if state is None else state


def load(dir_fd: int, name: str, key: str, now: float) -> State | None:
    """The live line of ``key`` (file ``name``), or None when there is none or it is
    unusable (then logged once and left for the next write to replace)."""
    got = read(dir_fd, name, key)
    if isinstance(got, str):
        _warn(dir_fd, name, got)
        return None
    if got is not None:
        got.prune(now)
    return got


def done_until(dir_fd: int, name: str, key: str | None, task_id: str | None) -> float | str | None:
    """When the done marker ``name`` expires; None when absent, a problem (str) when unusable
    (or written for another key or task id)."""
    data = read_bytes(dir_fd, name)
    if not isinstance(data, bytes):
        return data
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return "not a valid done marker"
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("key"), str)
        or (key is not None and (raw["key"], raw.get("task_id")) != (key, task_id))
        or not _filerecord.is_time(raw.get("expires"))
    ):
        return "not a valid done marker"
    return float(raw["expires"])


def is_done(dir_fd: int, lock_name: str, key: str, task_id: str, now: float) -> bool:
    """True while ``task_id`` of ``key`` is marked finished (one ``stat`` when it is not)."""
    name = done_name(lock_name, task_id)
    until = done_until(dir_fd, name, key, task_id)
    if isinstance(until, str):
        _warn(dir_fd, name, until)
        return False
    return until is not None and until > now


def mark_done(dir_fd: int, lock_name: str, key: str, task_id: str, expires: float) -> None:
    """Mark ``task_id`` of ``key`` finished until ``expires``; under the lock file's flock."""
    body = {"v": 1, "key": key, "task_id": task_id, "expires": expires}
    _replace(dir_fd, done_name(lock_name, task_id), _encode(body).encode("ascii"))


def _warn(dir_fd: int, name: str, problem: str) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return
    marker = (name, st.st_ino, st.st_mtime_ns)
    if marker in _warned:
        return
    if len(_warned) >= 1024:
        _warned.clear()
    _warned.add(marker)
    _log.warning("ignored job state file %s (%s)", name, problem, extra={"backend": "file"})


def store(dir_fd: int, name: str, state: State) -> None:
    """Replace the line file ``name`` with ``state`` (removed when empty); under the lock
    file's exclusive flock."""
    if not state.line:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return
    _replace(dir_fd, name, state.encode())


def _replace(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f"{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, _TMP_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write of a job state file", tmp)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
