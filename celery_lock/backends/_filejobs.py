"""The file backend's job state: a key's waiter line and done markers (``<digest>.jobs``) and
the reservation a release leaves in the lock file for the waiter whose turn it is.

Protocol. The state file of a key is changed only under the exclusive flock of the key's lock
file (the one lock of the key, so a claim decides on the lock and the line in one step), and
always by atomic replace: the whole new state goes to a private ``O_EXCL`` temp file that is
then renamed over the name. A reader without the flock (:func:`load` from ``waiting()``) sees
one whole state, never half of one, and a planted symlink or hard link under the name is
replaced, never written through. Reads use ``O_NOFOLLOW | O_NONBLOCK`` and accept only a
regular file with one link, under a size cap; anything else is ignored (WARNING) and replaced by
the next write.

A reservation is a lock record (``"reserved": true``) whose holder is the waiter's task id, with
no pid (it is never "dead") and an expiry of ``reserve_ttl``: plain ``acquire()``,
``inspect()`` and ``iter_locks()`` see it as a held lock without knowing about jobs. A holder or
reservation record carries ``"w": 1`` once somebody queued behind it: only then does a release
read the state file, so the uncontended acquire/release cycle costs nothing extra; a claim pays
one ``stat`` (the done marker).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import stat
import time as _time
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from celery_lock._types import Claim, CleanReport
from celery_lock.backends import _filerecord
from celery_lock.backends._filerecord import file_name
from celery_lock.backends._lockdir import OPEN_CREATE, OPEN_READ, list_names, unlock_close
from celery_lock.backends._lockfiles import CORRUPT_GRACE, REOPEN_TRIES, Entry, Foreign
from celery_lock.errors import LockError

if TYPE_CHECKING:
    from celery_lock.backends.file import FileLockManager

__all__ = ["LINE", "RESERVED", "State", "Turn", "claim", "clean", "finish", "load", "succeed"]

#: Flag in a holder's or reservation's record: somebody queued behind it.
LINE: Final = "w"
#: Flag of a reservation record.
RESERVED: Final = "reserved"
_JOBS_NAME: Final = re.compile(r"[0-9a-f]{40}\.jobs\Z")
_TMP_NAME: Final = re.compile(r"[0-9a-f]{40}\.jobs\.[0-9a-f]{16}\.tmp\Z")
#: Read cap: payloads are Celery messages (kilobytes); a planted huge file is not slurped.
MAX_STATE_BYTES: Final = 16 * 1024 * 1024
_TMP_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_log = logging.getLogger("celery_lock.file")
#: (name, inode, mtime) of state files already warned about (bounded).
_warned: set[tuple[str, int, int]] = set()


class Turn(NamedTuple):
    """A waiter whose turn came: call ``manager._hand_off(*turn)`` once the flock is gone."""

    key: str
    task_id: str
    payload: bytes


class State:
    """One key's job state: the line (task id -> payload, in order), when the line expires,
    and done markers (task id -> expiry, wall clock)."""

    __slots__ = ("changed", "done", "key", "line", "line_expires")

    def __init__(self, key: str) -> None:
        self.key = key
        self.line: dict[str, bytes] = {}  # a dict keeps order; re-setting keeps the position
        self.line_expires = 0.0
        self.done: dict[str, float] = {}
        self.changed = False

    def prune(self, now: float) -> None:
        if self.line and self.line_expires <= now:
            self.line.clear()
            self.changed = True
        for task_id in [t for t, expires in self.done.items() if expires <= now]:
            del self.done[task_id]
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
        return _encode({**body, "done": self.done}).encode("ascii")


def _decode(data: bytes, key: str | None) -> State | None:
    try:
        raw = json.loads(data.decode("utf-8"))
        if not isinstance(raw, dict) or not isinstance(raw.get("key"), str):
            return None
        if key is not None and raw["key"] != key:
            return None
        state = State(raw["key"])
        expires, line, done = raw.get("line_expires"), raw.get("line"), raw.get("done")
        if not _filerecord.is_time(expires) or not isinstance(line, list):
            return None
        if not isinstance(done, dict):
            return None
        state.line_expires = float(expires)
        for item in line:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
                return None
            state.line[item[0]] = base64.b64decode(item[1], validate=True)
        for task_id, when in done.items():
            if not _filerecord.is_time(when):
                return None
            state.done[task_id] = float(when)
    except (ValueError, TypeError, RecursionError, binascii.Error):
        return None
    return state


def state_name(lock_name: str) -> str:
    """The state file of the lock file ``lock_name`` (same digest)."""
    return lock_name[:-5] + ".jobs"


def _read(dir_fd: int, name: str, key: str | None) -> State | str | None:
    """The state under ``name``: None when absent, a problem (str) when unusable."""
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
        data = os.pread(fd, st.st_size, 0)
    finally:
        os.close(fd)
    state = _decode(data, key)
    return "not valid job state" if state is None else state


def load(dir_fd: int, name: str, key: str, now: float) -> State | None:
    """The live job state of ``key`` (file ``name``), or None when there is none or it is
    unusable (then logged once and left for the next write to replace)."""
    got = _read(dir_fd, name, key)
    if isinstance(got, str):
        _warn(dir_fd, name, got)
        return None
    if got is not None:
        got.prune(now)
    return got


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
    """Replace the state file ``name`` with ``state`` (removed when empty); under the lock
    file's exclusive flock."""
    if not state.line and not state.done:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return
    tmp = f"{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, _TMP_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        try:
            data = state.encode()
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write of a job state file", tmp)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def reservation(
    manager: FileLockManager, key: str, task_id: str, fence: int, line: bool
) -> dict[str, Any]:
    """The lock record that keeps ``key`` for the waiter ``task_id`` for ``reserve_ttl``."""
    record = _filerecord.holder(
        key,
        token="reserved-" + secrets.token_hex(8),
        fence=fence,
        now=_time.time(),
        now_bt=manager._boottime(),
        ttl=manager.reserve_ttl,
        task_id=task_id,
        task_name=None,
    )
    record.update(pid=None, start=None)
    record[RESERVED] = True
    if line:
        record[LINE] = 1
    return record


def succeed(
    manager: FileLockManager,
    fd: int,
    name: str,
    key: str,
    fence: int,
    old: tuple[bytes, int],
    state: State | None = None,
) -> Turn | None:
    """A holder of ``key`` (lock file ``name``, open as ``fd`` under our exclusive flock) has
    ended: reserve the key for the first waiter and return its :class:`Turn`; None (nothing
    written) when nobody waits."""
    if state is None:
        state = load(manager._files.dir_fd, state_name(name), key, _time.time())
        if state is None:
            return None
    popped = state.pop()
    if state.changed:
        store(manager._files.dir_fd, state_name(name), state)
    if popped is None:
        return None
    record = reservation(manager, key, popped[0], fence, bool(state.line))
    _filerecord.write(fd, _filerecord.encode(record), *old)
    return Turn(key, *popped)


# ------------------------------------------------------------------ the manager's hooks


def claim(
    manager: FileLockManager,
    key: str,
    ttl: float,
    token: str,
    task_id: str,
    task_name: str | None,
    waiter: bytes | None,
    done_ttl: float,
) -> Claim:
    """``FileLockManager._claim`` (see :meth:`LockManager.claim`)."""
    name = file_name(key)
    files = manager._files
    turn = None
    try:
        for _ in range(REOPEN_TRIES):
            opened = files.open_locked(name, OPEN_CREATE, fcntl.LOCK_EX)
            if isinstance(opened, Foreign):
                if files.make_room(name, opened, key, _time.time()):
                    continue
                # Not a lock file (for 2 s): no record to flag, so nobody queues behind it.
                state = load(files.dir_fd, state_name(name), key, _time.time())
                return Claim("finished" if state and task_id in state.done else "held")
            assert opened is not None  # O_CREAT: never None
            fd, st = opened
            try:
                result, turn = _claim_locked(
                    manager, fd, st, name, key, ttl, token, task_id, task_name, waiter, done_ttl
                )
            finally:
                unlock_close(fd)
            break
        else:
            raise OSError(  # noqa: TRY301 - mapped to LockBackendUnavailable just below
                errno.EAGAIN, "something keeps reappearing under the lock name", name
            )
    except LockError:
        raise
    except OSError as exc:
        raise manager._unavailable(exc, key) from exc
    if turn is not None:
        manager._hand_off(*turn)
    return result


def _claim_locked(
    manager: FileLockManager,
    fd: int,
    st: os.stat_result,
    name: str,
    key: str,
    ttl: float,
    token: str,
    task_id: str,
    task_name: str | None,
    waiter: bytes | None,
    done_ttl: float,
) -> tuple[Claim, Turn | None]:
    files, size = manager._files, st.st_size
    data = _filerecord.read(fd, size)
    now, now_bt = _time.time(), manager._boottime()
    state = load(files.dir_fd, state_name(name), key, now)
    if state is not None and task_id in state.done:
        return Claim("finished"), None
    record = _filerecord.parse(data) if data else 0
    meta: dict[str, Any] | None = record if type(record) is dict else None
    reason = holder = turn = None
    blocked = False
    if type(record) is int:
        last = record or files.last_fence(name)
    elif meta is None:
        entry = Entry(name, None, None, st, "not valid lock metadata")
        reason = manager._stale_reason(entry, now)
        blocked = reason is None
        last = files.last_fence(name)
    else:
        last = meta["fence"]
        holder = _filerecord.opt(meta, "task_id", str)
        mine = meta.get(RESERVED) is True and holder == task_id
        if not mine or _filerecord.remaining(meta, now, now_bt) <= 0:
            reason = manager._stale_reason(Entry(name, meta, last, st, None), now, now_bt)
            blocked = reason is None
        # A dead holder ends like a release: the line goes first (unless we are its head).
        dead = reason is not None and reason != "expired"
        if dead and meta.get(LINE) and state and next(iter(state.line), task_id) != task_id:
            turn = succeed(manager, fd, name, key, last, (data, size), state)
            if turn is not None:
                blocked, holder = True, turn.task_id
                data = _filerecord.read(fd, os.fstat(fd).st_size)
                meta = _filerecord.parse(data)  # type: ignore[assignment]
                size = len(data)
    if blocked:
        if waiter is None or meta is None:
            return Claim("held", None, holder), turn
        if state is None:
            state = State(key)
        state.line[task_id] = waiter
        state.line_expires = now + done_ttl
        store(files.dir_fd, state_name(name), state)
        if not meta.get(LINE):
            _filerecord.write(fd, _filerecord.encode({**meta, LINE: 1}), data, size)
        return Claim("queued", None, holder), turn
    line = False
    if state is not None:
        state.drop(task_id)
        line = bool(state.line)
        if state.changed:
            store(files.dir_fd, state_name(name), state)
    lease = manager._grant(
        fd, (data, size), key, last, token, ttl, task_id, task_name, reason, line=line, job=True
    )
    return Claim("granted", lease), None


def finish(manager: FileLockManager, lease: Any, done_ttl: float, mark: bool) -> bool:
    """``FileLockManager._finish``: release as ``_release``; mark the job done; hand off."""
    key, task_id = lease.key, lease.task_id
    name = file_name(key)
    files = manager._files
    turn = None
    try:
        opened = files.open_locked(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        if opened is None or isinstance(opened, Foreign):
            return False
        fd, st = opened
        try:
            meta, data = manager._owned_record(fd, st, lease)
            if meta is None:
                return False
            now = _time.time()
            alive = _filerecord.remaining(meta, now, manager._boottime()) > 0
            state = None
            if mark or meta.get(LINE):
                state = load(files.dir_fd, state_name(name), key, now) or State(key)
                # Copies of this job in the line are done too: they leave it.
                if state.drop(task_id) or mark:
                    state.done[task_id] = now + done_ttl
                    state.changed = True
            old = (data, st.st_size)
            if state is not None:
                turn = succeed(manager, fd, name, key, meta["fence"], old, state)
            if turn is None:
                _filerecord.write(fd, _filerecord.free(meta["fence"]), *old)
        finally:
            unlock_close(fd)
    except LockError:
        raise
    except OSError as exc:
        raise manager._unavailable(exc, key) from exc
    manager._after_release(key, name, turn)
    return alive


def remove_waiter(manager: FileLockManager, key: str, task_id: str) -> bool:
    """``FileLockManager._remove_waiter``: leave the line; give up a reservation."""
    name = file_name(key)
    files = manager._files
    turn = None
    try:
        opened = files.open_locked(name, OPEN_CREATE, fcntl.LOCK_EX)
        if isinstance(opened, Foreign):
            return False
        assert opened is not None
        fd, st = opened
        try:
            now, size = _time.time(), st.st_size
            state = load(files.dir_fd, state_name(name), key, now)
            removed = state is not None and state.drop(task_id)
            data = _filerecord.read(fd, size)
            meta = _filerecord.parse(data) if data else None
            if (
                type(meta) is dict
                and meta.get(RESERVED) is True
                and meta.get("task_id") == task_id
                and _filerecord.remaining(meta, now, manager._boottime()) > 0
            ):
                removed = True
                turn = succeed(manager, fd, name, key, meta["fence"], (data, size), state)
                if turn is None:
                    _filerecord.write(fd, _filerecord.free(meta["fence"]), data, size)
            elif state is not None and state.changed:
                store(files.dir_fd, state_name(name), state)
            if not size:
                files._remove(name, None)  # we created it just to take its flock
        finally:
            unlock_close(fd)
    except LockError:
        raise
    except OSError as exc:
        raise manager._unavailable(exc, key) from exc
    if turn is not None:
        manager._hand_off(*turn)
    return removed


def waiting(manager: FileLockManager, key: str) -> list[str]:
    """``FileLockManager._waiting``: the line, read without a flock (states are replaced
    whole)."""
    name = state_name(file_name(key))
    try:
        state = load(manager._files.dir_fd, name, key, _time.time())
    except OSError as exc:
        raise manager._unavailable(exc, key) from exc
    return [] if state is None else list(state.line)


def clean(manager: FileLockManager, now: float, *, dry_run: bool) -> CleanReport:
    """Drop expired lines and done markers, unusable state files older than the grace, and
    temp files left by a writer that died; counts only errors (state files are no locks)."""
    report = CleanReport()
    files = manager._files
    try:
        names = list_names(files.dir_fd)
    except OSError:
        report.errors += 1
        return report
    for name in names:
        try:
            if _TMP_NAME.match(name):
                st = os.stat(name, dir_fd=files.dir_fd, follow_symlinks=False)
                if abs(now - st.st_mtime) > CORRUPT_GRACE and not dry_run:
                    os.unlink(name, dir_fd=files.dir_fd)
            elif _JOBS_NAME.match(name) and not dry_run:
                _clean_state(manager, name, now)
        except FileNotFoundError:
            continue
        except (OSError, LockError) as exc:
            report.errors += 1
            _log.warning("could not clean %s: %s", name, exc, extra={"backend": "file"})
    return report


def _clean_state(manager: FileLockManager, name: str, now: float) -> None:
    files = manager._files
    lock_name = name[:-5] + ".lock"
    opened = files.open_locked(lock_name, OPEN_CREATE, fcntl.LOCK_EX)
    if isinstance(opened, Foreign) or opened is None:
        return
    fd, st = opened
    try:
        got = _read(files.dir_fd, name, None)
        if isinstance(got, str):
            entry = os.stat(name, dir_fd=files.dir_fd, follow_symlinks=False)
            if abs(now - entry.st_mtime) > CORRUPT_GRACE and not stat.S_ISDIR(entry.st_mode):
                os.unlink(name, dir_fd=files.dir_fd)
        elif got is not None:
            got.prune(now)
            if got.changed:
                store(files.dir_fd, name, got)
        if not st.st_size:
            files._remove(lock_name, None)  # we created it just to take its flock
    finally:
        unlock_close(fd)
