"""The file backend's job API: a key's waiter line and done markers (files of :mod:`._jobstate`)
and the reservation a release leaves in the lock file for the waiter whose turn it is.

Protocol. The state files of a key are changed only under the exclusive flock of the key's lock
file, the one lock of the key, so a claim decides on the lock, the line and the done marker in
one step; they are replaced atomically, so ``waiting()`` reads the line without a flock.

A reservation is a lock record (``"reserved": true``) whose holder is the waiter's task id, with
no pid (it is never "dead") and an expiry of ``reserve_ttl``: plain ``acquire()``,
``inspect()`` and ``iter_locks()`` see it as a held lock without knowing about jobs. A holder or
reservation record carries ``"w": 1`` once somebody queued behind it: only then does a release
read the state file, so the uncontended acquire/release cycle costs nothing extra; a claim pays
one ``stat`` (the done marker).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import stat
import time as _time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from celery_lock._types import Claim, CleanReport, Lease
from celery_lock.backends import _filerecord
from celery_lock.backends._filerecord import file_name
from celery_lock.backends._jobstate import (
    DONE_NAME,
    JOBS_NAME,
    TMP_NAME,
    State,
    done_name,
    done_until,
    is_done,
    load,
    mark_done,
    read,
    state_name,
    store,
)
from celery_lock.backends._lockdir import (
    OPEN_CREATE,
    OPEN_WRITE,
    list_names,
    may_exist,
    unlock_close,
)
from celery_lock.backends._lockfiles import CORRUPT_GRACE, REOPEN_TRIES, Entry, Foreign
from celery_lock.errors import LockError

if TYPE_CHECKING:
    from celery_lock.backends.file import FileLockManager

__all__ = [
    "LINE",
    "RESERVED",
    "Turn",
    "Veto",
    "claim",
    "clean",
    "finish",
    "mark_done_alone",
    "quiet",
    "remove_waiter",
    "succeed",
]

_log = logging.getLogger("celery_lock.file")

#: ``veto(lock_name)``: True keeps a grant from files from writing its record (the hybrid's
#: test for a Redis lease of this host, see ``_hostlocks``).
Veto = Callable[[str], bool]

#: Flag in a holder's or reservation's record: somebody queued behind it.
LINE: Final = "w"
#: Flag of a reservation record.
RESERVED: Final = "reserved"


class Turn(NamedTuple):
    """A waiter whose turn came: call ``manager._hand_off(*turn)`` once the flock is gone."""

    key: str
    task_id: str
    payload: bytes


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
    veto: Veto | None = None,
    *,
    waits: bool = False,  # noqa: ARG001 - files keep no coalescing markers
) -> Claim:
    """``FileLockManager._claim`` (see :meth:`LockManager.claim`; ``veto`` as in
    ``FileLockManager._try_acquire``)."""
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
                done = is_done(files.dir_fd, name, key, task_id, _time.time())
                return Claim("finished" if done else "held")
            assert opened is not None  # O_CREAT: never None
            fd, st = opened
            try:
                result, turn = _claim_locked(
                    manager,
                    fd,
                    st,
                    name,
                    key,
                    ttl,
                    token,
                    task_id,
                    task_name,
                    waiter,
                    done_ttl,
                    veto,
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
    veto: Veto | None,
) -> tuple[Claim, Turn | None]:
    files, size = manager._files, st.st_size
    data = _filerecord.read(fd, size)
    now, now_bt = _time.time(), manager._boottime()
    if is_done(files.dir_fd, name, key, task_id, now):
        return Claim("finished"), None
    record = _filerecord.parse(data) if data else 0
    meta: dict[str, Any] | None = record if type(record) is dict else None
    # Only a flagged record has a line behind it: an uncontended claim reads no line file.
    state = load(files.dir_fd, state_name(name), key, now) if meta and LINE in meta else None
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
            state = load(files.dir_fd, state_name(name), key, now) or State(key)
        state.line[task_id] = waiter
        state.line_expires = now + done_ttl
        store(files.dir_fd, state_name(name), state)
        if not meta.get(LINE):
            _filerecord.write(fd, _filerecord.encode({**meta, LINE: 1}), data, size)
        return Claim("queued", None, holder), turn
    if veto is not None and veto(name):
        return Claim("held"), turn
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


def finish(
    manager: FileLockManager, lease: Lease, done_ttl: float, mark: bool, *, if_line: bool = False
) -> bool:
    """``FileLockManager._finish``: release as ``_release``; mark the job done; hand off.

    :param if_line: mark the job done also when somebody waits in the key's line (the hybrid's
        shadow of a job Redis marked: a same-host claim that finds the key held in files, say
        reserved for the next waiter, learns from the files alone that this job finished).
    """
    key, task_id = lease.key, lease.task_id
    assert task_id is not None  # LockManager.finish releases a lease without one
    name = file_name(key)
    files = manager._files
    turn = None
    try:
        opened = files.open_locked(name, OPEN_WRITE)
        if opened is None or isinstance(opened, Foreign):
            return False
        fd, st = opened
        try:
            meta, data = manager._owned_record(fd, st, lease)
            if meta is None:
                return False
            now = _time.time()
            alive = _filerecord.remaining(meta, now, manager._boottime()) > 0
            state = load(files.dir_fd, state_name(name), key, now) if LINE in meta else None
            # Copies of this job in the line are done too: they leave it.
            dropped = state is not None and state.drop(task_id)
            if dropped or mark or (if_line and state is not None):
                mark_done(files.dir_fd, name, key, task_id, now + done_ttl)
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


def quiet(manager: FileLockManager, key: str, name: str, task_id: str | None = None) -> bool:
    """``FileLockManager._quiet``: True when ``key`` (lock file ``name``) has no lease in files
    (its lock file is absent or free, read under a shared flock) and ``task_id``, if given, no
    done marker. False also when the files cannot tell (the hybrid then takes the shadow path,
    which reports why).
    """
    files = manager._files
    dir_fd = files.dir_fd
    try:
        # may_exist first: for a key Redis holds the files usually have nothing, and an open
        # that raises FileNotFoundError costs more than the question.
        if may_exist(dir_fd, name) and files.read(name) is not None:
            return False
        if task_id is None or not may_exist(dir_fd, done_name(name, task_id)):
            return True
        return not is_done(dir_fd, name, key, task_id, _time.time())
    except (OSError, LockError):
        return False


def mark_done_alone(manager: FileLockManager, key: str, task_id: str, done_ttl: float) -> None:
    """``FileLockManager._mark_done``: mark ``task_id`` of ``key`` finished in files, under the
    key's lock file's flock (a Redis lease without a shadow whose finish Redis did not record).
    """
    name = file_name(key)
    files = manager._files
    try:
        opened = files.open_locked(name, OPEN_CREATE, fcntl.LOCK_EX)
        if opened is None or isinstance(opened, Foreign):
            return
        try:
            mark_done(files.dir_fd, name, key, task_id, _time.time() + done_ttl)
        finally:
            unlock_close(opened[0])
    except OSError as exc:
        raise manager._unavailable(exc, key) from exc


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
    """``FileLockManager.clean``: the lock files (a stale holder with waiters is handed on,
    not removed), then the state files: expired lines and done markers, unusable state files
    older than the grace and temp files of a writer that died (not counted: no locks)."""
    turns: list[Turn] = []

    def hand_on(fd: int, entry: Entry) -> bool:
        meta = entry.meta
        if meta is None or LINE not in meta:
            return False
        old = (_filerecord.read(fd, entry.st.st_size), entry.st.st_size)
        turn = succeed(manager, fd, entry.name, meta["key"], meta["fence"], old)
        if turn is not None:
            turns.append(turn)
        return turn is not None

    files = manager._files
    report = files.clean(manager._stale_reason, now, dry_run=dry_run, hand_on=hand_on)
    try:
        names = list_names(files.dir_fd)
    except OSError:
        names = []
        report.errors += 1
    for name in names:
        try:
            if TMP_NAME.match(name):
                st = os.stat(name, dir_fd=files.dir_fd, follow_symlinks=False)
                if abs(now - st.st_mtime) > CORRUPT_GRACE and not dry_run:
                    os.unlink(name, dir_fd=files.dir_fd)
            elif (JOBS_NAME.match(name) or DONE_NAME.match(name)) and not dry_run:
                _clean_state(manager, name, now)
        except FileNotFoundError:
            continue
        except (OSError, LockError) as exc:
            report.errors += 1
            _log.warning("could not clean %s: %s", name, exc, extra={"backend": "file"})
    for turn in turns:  # after every flock is gone
        manager._hand_off(*turn)
    return report


def _clean_state(manager: FileLockManager, name: str, now: float) -> None:
    files = manager._files
    lock_name = name[:40] + ".lock"
    opened = files.open_locked(lock_name, OPEN_CREATE, fcntl.LOCK_EX)
    if isinstance(opened, Foreign) or opened is None:
        return
    fd, st = opened
    try:
        got = read(files.dir_fd, name, None) if name.endswith(".jobs") else None
        until = done_until(files.dir_fd, name, None, None) if got is None else None
        if isinstance(until, float) and until <= now:
            os.unlink(name, dir_fd=files.dir_fd)
        elif isinstance(got, str) or isinstance(until, str):
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
