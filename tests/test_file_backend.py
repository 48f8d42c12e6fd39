"""FileLockManager in one process: directory checks, names, content, clocks, fences, cleaning."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from celery_lock import _identity
from celery_lock._types import CleanReport, Lease
from celery_lock.backends import _lockdir, _lockfiles
from celery_lock.backends import file as file_mod
from celery_lock.backends._filerecord import file_name
from celery_lock.backends._lockdir import fs_type
from celery_lock.backends.file import FileLockManager
from celery_lock.errors import LockBackendUnavailable, LockError
from tests._redis_server import skip_or_fail

LOCK_NAME = re.compile(r"[0-9a-f]{40}\.lock\Z")
HOUR = 3600.0


@pytest.fixture
def manager(lock_dir: Path) -> FileLockManager:
    return FileLockManager(lock_dir, default_ttl=30)


def lock_path(manager: FileLockManager, key: str) -> Path:
    return manager.directory / file_name(key)


def plant(manager: FileLockManager, key: str, *, age: float = 0.0, **overrides: Any) -> Path:
    """Write a well-formed lock file for ``key`` as a (by default live, same-host) holder."""
    me = _identity.current()
    now = time.time()
    boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    meta: dict[str, Any] = {
        "v": 1,
        "key": key,
        "host": me.host,
        "pid": me.pid,
        "start": me.start,
        "boot": me.boot_id,
        "pidns": me.pid_ns,
        "task_id": None,
        "task_name": None,
        "acquired": now,
        "ttl": 60.0,
        "token": "f" * 32,
        "fence": 1,
        "expires": now + 60,
        "bt_expires": boot + 60,
    }
    meta.update(overrides)
    return plant_raw(manager, key, json.dumps(meta).encode(), age=age)


def plant_raw(manager: FileLockManager, key: str, content: bytes, *, age: float = 0.0) -> Path:
    path = lock_path(manager, key)
    path.write_bytes(content)
    if age:
        set_age(path, age)
    return path


def on_disk(manager: FileLockManager, key: str) -> dict[str, Any] | None:
    """The holder record in ``key``'s lock file; None when the file is absent or free."""
    try:
        data = lock_path(manager, key).read_bytes()
    except FileNotFoundError:
        return None
    if not data:
        return None  # created, never written: free
    record = json.loads(data)
    assert isinstance(record, dict)
    return record if "token" in record else None


def set_age(path: Path, age: float) -> None:
    then = time.time() - age
    os.utime(path, (then, then), follow_symlinks=False)


def plant_stale_symlink(manager: FileLockManager, key: str) -> Path:
    """A dangling symlink under ``key``'s lock name, older than the 2 s grace."""
    path = lock_path(manager, key)
    path.symlink_to("/nonexistent")
    set_age(path, 10)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    return proc.pid


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def shift_wall_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Step the wall clock (time.time and time.time_ns) by ``seconds``; monotonic clocks stay."""
    real_time, real_ns = time.time, time.time_ns
    monkeypatch.setattr("celery_lock.backends.file._time.time", lambda: real_time() + seconds)
    monkeypatch.setattr(
        "celery_lock.backends.file._time.time_ns", lambda: real_ns() + int(seconds * 1e9)
    )


def wait_for_lease(
    manager: FileLockManager, key: str, *, limit: float = 3.0, **kwargs: Any
) -> Lease | None:
    """Try to acquire ``key`` until it works or ``limit`` seconds pass (bounded polling)."""
    deadline = time.monotonic() + limit
    for _ in range(10_000):
        lease = manager.acquire(key, **kwargs)
        if lease is not None or time.monotonic() > deadline:
            return lease
        time.sleep(0.005)
    return None


# ------------------------------------------------------------------------------- directory


def test_directory_is_created_private_with_private_files(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "locks"
    manager = FileLockManager(directory)
    assert manager.directory == directory
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    lease = manager.acquire("job")
    assert lease is not None
    files = list(directory.iterdir())
    assert {p.name for p in files} == {file_name("job")}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert repr(manager) == f"FileLockManager(directory={str(directory)!r})"


def test_created_directory_gets_owner_bits_despite_umask(lock_dir: Path) -> None:
    old = os.umask(0o277)
    try:
        FileLockManager(lock_dir)
    finally:
        os.umask(old)
    assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o700


def test_default_directory_honours_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    manager = FileLockManager()
    assert manager.directory == tmp_path / f"celery_lock-{os.geteuid()}"
    assert manager.acquire("x") is not None


def test_existing_private_directory_is_used_as_is(lock_dir: Path) -> None:
    lock_dir.mkdir(mode=0o755)
    lock_dir.chmod(0o755)  # readable by others is fine; writable is not
    FileLockManager(lock_dir)
    assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o755


def _symlink_to_private(lock_dir: Path) -> None:
    real = lock_dir.parent / "real"
    real.mkdir(mode=0o700)
    lock_dir.symlink_to(real)


def _group_writable(lock_dir: Path) -> None:
    lock_dir.mkdir()
    lock_dir.chmod(0o770)


def _world_writable(lock_dir: Path) -> None:
    lock_dir.mkdir()
    lock_dir.chmod(0o1703)


def _foreign_owner(lock_dir: Path) -> None:
    if os.geteuid() != 0:
        skip_or_fail("chown to another uid needs root")
    lock_dir.mkdir(mode=0o700)
    os.chown(lock_dir, 65534, 65534)


def _no_owner_access(lock_dir: Path) -> None:
    lock_dir.mkdir()
    lock_dir.chmod(0o500)


def _regular_file(lock_dir: Path) -> None:
    lock_dir.write_text("not a directory")


@pytest.mark.parametrize(
    ("prepare", "problem"),
    [
        (_symlink_to_private, "symbolic link"),
        (_group_writable, "group- or world-writable (mode 0770)"),
        (_world_writable, "group- or world-writable (mode 1703)"),
        (_foreign_owner, "owned by uid 65534"),
        (_no_owner_access, "not readable, writable and searchable"),
        (_regular_file, "not a directory"),
    ],
)
def test_unsafe_existing_directory_is_refused(lock_dir: Path, prepare: Any, problem: str) -> None:
    prepare(lock_dir)
    before = os.lstat(lock_dir)
    with pytest.raises(LockError) as info:
        FileLockManager(lock_dir)
    assert str(lock_dir) in str(info.value)
    assert problem in str(info.value)
    assert getattr(info.value, "path") == str(lock_dir)
    after = os.lstat(lock_dir)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)  # never "fixed"


def test_uncreatable_directory_is_a_lock_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(LockError, match="cannot create lock directory"):
        FileLockManager(tmp_path / "file" / "locks")


def test_concurrent_creator_of_the_directory_is_tolerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "parent" / "locks"
    real_makedirs = os.makedirs

    def makedirs_and_lose_the_race(name: str, *args: Any, **kwargs: Any) -> None:
        real_makedirs(name, *args, **kwargs)
        os.mkdir(directory, 0o700)  # another process creates the lock directory first

    monkeypatch.setattr(os, "makedirs", makedirs_and_lose_the_race)
    manager = FileLockManager(directory)
    assert manager.acquire("x") is not None


def test_directory_swapped_after_the_check_is_refused(
    lock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock_dir.mkdir(mode=0o700)
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: real_lstat(other))
    with pytest.raises(LockError, match="was replaced while being opened"):
        FileLockManager(lock_dir)


def test_symlink_planted_after_the_check_is_not_opened(
    lock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    lock_dir.symlink_to(real)
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: real_lstat(real))
    with pytest.raises(LockError, match="cannot open lock directory"):
        FileLockManager(lock_dir)


# --------------------------------------------------------------------------- network fs

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /proc rw,nosuid - proc proc rw
40 22 0:40 / /srv/shared rw,relatime shared:20 master:3 - nfs4 server:/export rw,vers=4.2
41 40 0:41 / /srv/shared/local rw - tmpfs tmpfs rw
42 22 0:42 / /mnt/with\\040space rw - cifs //host/share rw
43 22 0:43 / /mnt/over rw - ext4 /dev/vdb rw
44 22 0:44 / /mnt/over rw - fuse.sshfs user@host: rw
45 22 0:45 / /broken rw -
junk
"""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/", "ext4"),
        ("/home/user/x", "ext4"),
        ("/srv/shared", "nfs4"),
        ("/srv/shared/deep/dir", "nfs4"),
        ("/srv/sharedness", "ext4"),  # a prefix of the name is not a parent directory
        ("/srv/shared/local/locks", "tmpfs"),
        ("/mnt/with space/locks", "cifs"),
        ("/mnt/over/locks", "fuse.sshfs"),  # the later mount on the same point is on top
        ("/broken/x", "ext4"),  # a line without a type is skipped
    ],
)
def test_mountinfo_parser_finds_the_longest_mount_point(path: str, kind: str) -> None:
    assert fs_type(path, MOUNTINFO) == kind


def test_proc_mounts_format_is_understood() -> None:
    table = "/dev/vda / ext4 rw 0 0\nsrv:/e /data nfs rw 0 0\nshort line\n"
    assert fs_type("/data/locks", table) == "nfs"
    assert fs_type("/var/locks", table) == "ext4"
    assert fs_type("/x", "") is None


def _fake_mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, point: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 8:1 / / rw - ext4 /dev/vda rw\n"
        f"40 22 0:40 / {os.path.realpath(point)} rw shared:2 - {kind} srv:/x rw\n"
    )
    monkeypatch.setattr(_lockdir, "MOUNT_TABLES", (str(tmp_path / "missing"), str(table)))
    monkeypatch.setattr(_lockdir, "_warned", set())


@pytest.mark.parametrize("kind", ["nfs4", "nfs", "cifs", "fuse.sshfs", "9p", "ceph", "lustre"])
def test_network_directory_warns_once(
    lock_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    _fake_mounts(tmp_path, monkeypatch, kind, tmp_path)
    with caplog.at_level(logging.WARNING, logger="celery_lock.file"):
        FileLockManager(lock_dir)
        FileLockManager(lock_dir)
    warnings = [r for r in caplog.records if "network file system" in r.getMessage()]
    assert len(warnings) == 1
    assert kind in warnings[0].getMessage() and str(lock_dir) in warnings[0].getMessage()
    assert warnings[0].name == "celery_lock.file"


def test_local_directory_does_not_warn(
    lock_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _fake_mounts(tmp_path, monkeypatch, "xfs", tmp_path)
    with caplog.at_level(logging.WARNING, logger="celery_lock.file"):
        FileLockManager(lock_dir)
    monkeypatch.setattr(_lockdir, "MOUNT_TABLES", (str(tmp_path / "missing"),))
    with caplog.at_level(logging.WARNING, logger="celery_lock.file"):
        FileLockManager(lock_dir)  # no readable mount table: nothing to say
    assert caplog.records == []


# ----------------------------------------------------------------------------- names


HOSTILE_KEYS = [
    "../x",
    "/",
    "a/../../b",
    "../../../../etc/passwd",
    "x" * 10_000,
    "\u202eevil\u200f.lock",  # RTL override and RTL mark
    "caf\u00e9 \U0001f512 \u4e2d",
    "surrogate \udcff\udc80 escaped",
    "new\nline\ttab",
    ".guard.00",
    ".tmp.x",
]


def test_hostile_keys_never_leave_the_directory(manager: FileLockManager, tmp_path: Path) -> None:
    before = tree(tmp_path)
    leases = [manager.acquire(key) for key in HOSTILE_KEYS]
    assert all(lease is not None for lease in leases)
    new = tree(tmp_path) - before
    assert new
    for path in new:
        assert path.parent == manager.directory, path
        assert LOCK_NAME.match(path.name), path.name
    for key in HOSTILE_KEYS:
        info = manager.inspect(key)
        assert info is not None and info.key == key
    assert sorted(i.key for i in manager.iter_locks()) == sorted(HOSTILE_KEYS)
    for lease in leases:
        assert lease is not None and manager.release(lease)
    assert all(on_disk(manager, key) is None for key in HOSTILE_KEYS)
    assert manager.clean() == CleanReport()  # free files are not locks: removed, not counted
    assert {p.name for p in manager.directory.iterdir() if LOCK_NAME.match(p.name)} == set()


def test_bad_keys_are_refused_before_touching_anything(
    manager: FileLockManager, tmp_path: Path
) -> None:
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="NUL"):
        manager.acquire("a\x00b")
    with pytest.raises(ValueError, match="non-empty"):
        manager.acquire("")
    with pytest.raises(TypeError):
        manager.acquire(b"bytes")  # type: ignore[arg-type]
    assert tree(tmp_path) == before


def test_huge_metadata_is_shortened_but_the_lock_stays_valid(manager: FileLockManager) -> None:
    key = "\u200f" * 65536  # json-escaped: 6 bytes per character, far over the read cap
    lease = manager.acquire(key, task_name="t" * 100_000, task_id="i" * 100_000)
    assert lease is not None
    path = lock_path(manager, key)
    content = path.read_bytes()
    assert len(content) < 64 * 1024
    assert json.loads(content)["truncated"] is True
    set_age(path, 60)  # not "corrupt after 2 s": it parses
    assert manager.acquire(key) is None
    info = manager.inspect(key)
    assert info is not None and info.key == key and info.task_name == "t" * 1024
    (listed,) = manager.iter_locks()
    assert listed.key == "\u200f" * 1024
    assert manager.release(lease)


# ------------------------------------------------------------------ hostile lock entries


def test_planted_symlink_is_never_followed(manager: FileLockManager, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = lock_path(manager, "job")
    path.symlink_to(victim)
    assert manager.acquire("job") is None  # fresh: an unknown writer may be about to finish
    info = manager.inspect("job")
    assert info is not None and info.token_prefix is None and info.fence is None
    set_age(path, 10)
    lease = manager.acquire("job")
    assert lease is not None
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and json.loads(path.read_bytes())["token"] == lease.token
    assert manager.release(lease)
    assert victim.read_text() == "precious"


def test_fifo_in_place_of_a_lock_does_not_block(manager: FileLockManager) -> None:
    path = lock_path(manager, "job")
    os.mkfifo(path, 0o600)
    started = time.monotonic()
    assert manager.acquire("job") is None
    assert manager.is_locked("job")
    assert time.monotonic() - started < 1
    set_age(path, 10)
    lease = manager.acquire("job")
    assert lease is not None and stat.S_ISREG(path.lstat().st_mode)


def test_socket_in_place_of_a_lock_is_unreadable_then_stale(manager: FileLockManager) -> None:
    path = lock_path(manager, "job")
    os.mknod(path, stat.S_IFSOCK | 0o600)
    assert manager.acquire("job") is None
    set_age(path, 10)
    assert manager.acquire("job") is not None


def test_directory_in_place_of_a_lock_blocks_the_key_with_a_warning(
    manager: FileLockManager, caplog: pytest.LogCaptureFixture
) -> None:
    path = lock_path(manager, "job")
    path.mkdir()
    assert manager.acquire("job") is None
    set_age(path, 10)
    with caplog.at_level(logging.WARNING, logger="celery_lock.file"):
        assert manager.acquire("job") is None
    assert any("a directory is in its place" in r.getMessage() for r in caplog.records)
    report = manager.clean()
    assert (report.scanned, report.removed, report.errors) == (1, 0, 1)


def _valid_meta(**overrides: Any) -> bytes:
    now = time.time()
    meta = {"key": "job", "token": "t" * 32, "fence": 5, "expires": now + 60}
    meta.update(overrides)
    return json.dumps(meta).encode()


CORRUPT = {
    "half object": b'{"key": "job", "token": "abc", "fen',
    "garbage": b"\x00\x01 not json at all",
    "list": b"[1, 2, 3]",
    "string": b'"a lock"',
    "number": b"42",
    "invalid utf-8": b'{"key": "\xff\xfe"}',
    "deep nesting": b"[" * 50_000,
    "too large": b" " * (64 * 1024 + 1) + b"{}",
    "token not a string": _valid_meta(token=5),
    "empty token": _valid_meta(token=""),
    "fence is a bool": _valid_meta(fence=True),
    "fence is a float": _valid_meta(fence=1.5),
    "no expiry": _valid_meta(expires=None),
    "expiry not finite": _valid_meta().replace(b'"expires": ', b'"expires": NaN, "x": '),
    "boot expiry is text": _valid_meta(bt_expires="soon"),
    "key missing": _valid_meta(key=None),
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_lock_file_is_busy_while_fresh_and_stale_after_grace(
    manager: FileLockManager, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = plant_raw(manager, "job", content)
    with caplog.at_level(logging.WARNING, logger="celery_lock.file"):
        assert manager.acquire("job") is None
        assert manager.acquire("job") is None
        info = manager.inspect("job")
    assert info is not None and info.token_prefix is None and info.backend == "file"
    assert list(manager.iter_locks()) == []  # nothing to describe
    warned = [r for r in caplog.records if "unreadable lock file" in r.getMessage()]
    assert len(warned) == 1  # once per file, not per attempt
    set_age(path, 2.5)
    assert not manager.is_locked("job")
    lease = manager.acquire("job")
    assert lease is not None
    assert json.loads(path.read_bytes())["token"] == lease.token


def test_entry_vanishing_between_open_and_lstat_is_absent(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open
    calls: list[int] = []

    def open_symlink_that_then_vanishes(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == file_name("job"):
            calls.append(flags)
            if len(calls) == 1:  # a symlink, gone before lstat: the name is looked at again
                raise OSError(errno.ELOOP, "Too many levels of symbolic links")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_symlink_that_then_vanishes)
    assert manager._files.read(file_name("job")) is None
    assert len(calls) == 2


def test_an_empty_lock_file_is_free(manager: FileLockManager) -> None:
    # What O_CREAT leaves when its creator dies before the first write under the flock: every
    # writer of ours writes under the exclusive flock, so an empty file never hides a holder.
    plant_raw(manager, "job", b"")
    assert not manager.is_locked("job")
    lease = manager.acquire("job")
    assert lease is not None
    assert on_disk(manager, "job")["token"] == lease.token  # type: ignore[index]


def test_corrupt_warnings_are_remembered_in_bounded_memory(manager: FileLockManager) -> None:
    manager._files.warned_corrupt.update(("x", i, i) for i in range(1024))
    plant_raw(manager, "job", b"junk")
    assert manager.acquire("job") is None
    assert len(manager._files.warned_corrupt) == 1


def test_corrupt_file_with_future_mtime_is_stale(manager: FileLockManager) -> None:
    path = plant_raw(manager, "job", b"junk")
    set_age(path, -HOUR)  # written before the wall clock was stepped back
    assert manager.acquire("job") is not None


def test_valid_content_is_not_judged_by_mtime(manager: FileLockManager) -> None:
    plant(manager, "job", age=HOUR)
    assert manager.acquire("job") is None


# ------------------------------------------------------------------------ expiry, clocks


def test_short_ttl_expires_and_the_next_holder_gets_a_higher_fence(
    manager: FileLockManager, caplog: pytest.LogCaptureFixture
) -> None:
    first = manager.acquire("job", ttl=0.05)
    assert first is not None
    assert manager.acquire("job") is None
    with caplog.at_level(logging.INFO, logger="celery_lock.file"):
        second = wait_for_lease(manager, "job")
    assert second is not None and second.fence > first.fence
    assert any("broke stale lock" in r.getMessage() for r in caplog.records)
    record = next(r for r in caplog.records if "broke stale lock" in r.getMessage())
    assert "expired" in record.getMessage()
    fields = (getattr(record, "lock_key"), getattr(record, "backend"), getattr(record, "fence"))
    assert fields == ("job", "file", second.fence)


def test_wall_clock_jump_forward_does_not_expire_a_same_host_lease(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = manager.acquire("job", ttl=60)
    assert lease is not None
    shift_wall_clock(monkeypatch, 3 * HOUR)
    assert manager.acquire("job") is None
    assert manager.is_locked("job")
    assert len(list(manager.iter_locks())) == 1
    assert manager.clean().removed == 0
    renewed = manager.extend(lease)
    assert renewed is not None
    assert manager.release(renewed)


def test_wall_clock_jump_back_does_not_extend_a_same_host_lease(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = manager.acquire("job", ttl=0.2)
    assert lease is not None
    shift_wall_clock(monkeypatch, -3 * HOUR)
    started = time.monotonic()
    successor = wait_for_lease(manager, "job")
    assert successor is not None
    assert 0.1 < time.monotonic() - started < 2.5
    assert successor.fence > lease.fence
    assert manager.extend(lease) is None
    assert not manager.release(lease)
    assert manager.release(successor)


@pytest.mark.parametrize(
    "overrides",
    [
        # bt_expires=0 would say "expired" if it were (wrongly) compared off this host or boot;
        # the wall clock says 60 s left, and a dead pid proves nothing there.
        {"host": "elsewhere", "bt_expires": 0.0, "pid": "dead"},
        {"boot": "another-boot", "bt_expires": 0.0, "pid": "dead"},
        # Same host without a boot-clock expiry (an older writer): the wall clock decides.
        {"bt_expires": None},
    ],
    ids=["other host", "other boot", "no boot expiry"],
)
def test_lock_from_another_host_or_boot_expires_by_wall_clock(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any]
) -> None:
    if overrides.get("pid") == "dead":
        overrides = {**overrides, "pid": dead_pid()}
    plant(manager, "job", **overrides)
    assert manager.acquire("job") is None
    shift_wall_clock(monkeypatch, 2 * HOUR)
    assert manager.acquire("job") is not None


# ----------------------------------------------------------------------------- fences


def test_fences_increase_across_leases_even_after_the_file_is_deleted(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    fences = []
    for _ in range(20):
        lease = manager.acquire("job")
        assert lease is not None
        fences.append(lease.fence)
        assert manager.release(lease)
        assert json.loads(lock_path(manager, "job").read_bytes()) == {"v": 1, "fence": lease.fence}
    assert fences[0] >= time.time_ns() // 1000 - 60_000_000  # seeded from the clock
    assert manager.clean() == CleanReport()
    assert not lock_path(manager, "job").exists()
    # The cleaner kept the fence in .fences: even with the wall clock an hour back, the
    # re-created file goes on from it.
    shift_wall_clock(monkeypatch, -HOUR)
    for _ in range(3):
        lease = manager.acquire("job")
        assert lease is not None and manager.release(lease)
        fences.append(lease.fence)
    assert all(a < b for a, b in zip(fences, fences[1:]))


def test_fences_increase_with_the_wall_clock_stepped_back(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = manager.acquire("job")
    assert first is not None and manager.release(first)
    shift_wall_clock(monkeypatch, -5 * HOUR)
    second = manager.acquire("job")
    assert second is not None and manager.release(second)
    third = manager.acquire("job")
    assert third is not None
    assert first.fence < second.fence < third.fence
    assert second.fence == first.fence + 1


def test_fences_survive_a_new_manager_and_are_shared_by_the_bucket(lock_dir: Path) -> None:
    first = FileLockManager(lock_dir).acquire("job")
    assert first is not None
    other = FileLockManager(lock_dir)
    assert other.release(first)
    second = other.acquire("job")
    assert second is not None and second.fence > first.fence


@pytest.mark.parametrize(
    "where", ["fences file", "free record"], ids=["garbage in .fences", "huge free fence"]
)
def test_garbage_fences_do_not_wedge_fences(manager: FileLockManager, where: str) -> None:
    if where == "fences file":
        (manager.directory / ".fences").write_bytes(b"\xff" * 8 * 256)
    else:
        plant_raw(manager, "job", b'{"v":1,"fence":%d}' % (1 << 63))
    lease = manager.acquire("job")
    assert lease is not None
    assert 0 < lease.fence < 1 << 62


def test_a_failed_attempt_does_not_consume_a_fence(manager: FileLockManager) -> None:
    lease = manager.acquire("job")
    assert lease is not None
    stored = lock_path(manager, "job").read_bytes()
    assert manager.acquire("job") is None
    assert lock_path(manager, "job").read_bytes() == stored


# ------------------------------------------------------------------------ ownership


def test_acquire_is_idempotent_for_the_same_token(manager: FileLockManager) -> None:
    lease = manager._try_acquire("job", 30.0, "a" * 32, "task-1", "tasks.job")
    assert lease is not None
    path = lock_path(manager, "job")
    before = path.stat()
    again = manager._try_acquire("job", 30.0, "a" * 32, "task-1", "tasks.job")
    assert again is not None
    assert (again.token, again.fence, again.acquired_at) == (
        lease.token,
        lease.fence,
        lease.acquired_at,
    )
    assert abs(again.expires_at - lease.expires_at) < 0.5
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert manager._try_acquire("job", 30.0, "b" * 32, None, None) is None


def test_same_token_after_expiry_gets_a_new_grant(manager: FileLockManager) -> None:
    lease = manager._try_acquire("job", 0.01, "a" * 32, None, None)
    assert lease is not None
    time.sleep(0.03)
    again = manager._try_acquire("job", 30.0, "a" * 32, None, None)
    assert again is not None and again.fence > lease.fence and again.ttl == 30.0


def test_foreign_lease_cannot_release_or_extend(manager: FileLockManager) -> None:
    lease = manager.acquire("job", task_id="t1")
    assert lease is not None
    path = lock_path(manager, "job")
    before = (path.read_bytes(), path.stat().st_ino)
    forged = Lease("job", "0" * 32, lease.fence, "file", 30.0, lease.expires_at)
    assert manager.release(forged) is False
    assert manager.extend(forged) is None
    assert (path.read_bytes(), path.stat().st_ino) == before
    assert manager.release(lease)
    assert manager.release(lease) is False  # already gone
    assert manager.extend(lease) is None


def test_expired_own_lease_release_is_false_but_frees_the_file(
    manager: FileLockManager,
) -> None:
    lease = manager.acquire("job", ttl=0.01)
    assert lease is not None
    time.sleep(0.03)
    path = lock_path(manager, "job")
    assert manager.extend(lease) is None
    assert path.exists()  # extend does not delete
    assert manager.release(lease) is False
    assert on_disk(manager, "job") is None  # freed all the same: nobody else held it


def test_old_lease_never_touches_the_new_holder(manager: FileLockManager) -> None:
    old = manager.acquire("job", ttl=0.01)
    assert old is not None
    time.sleep(0.03)
    new = manager.acquire("job", ttl=30)
    assert new is not None and new.fence > old.fence
    path = lock_path(manager, "job")
    before = (path.read_bytes(), path.stat().st_ino)
    assert manager.release(old) is False
    assert manager.extend(old) is None
    assert (path.read_bytes(), path.stat().st_ino) == before
    assert manager.release(new)


def test_extend_renews_the_lease_and_keeps_token_fence_and_start(
    manager: FileLockManager,
) -> None:
    lease = manager.acquire("job", ttl=0.2, task_id="t1", task_name="tasks.job")
    assert lease is not None
    path = lock_path(manager, "job")
    old_inode = path.stat().st_ino
    renewed = manager.extend(lease, ttl=60)
    assert renewed is not None
    assert (renewed.token, renewed.fence, renewed.acquired_at) == (
        lease.token,
        lease.fence,
        lease.acquired_at,
    )
    assert renewed.ttl == 60 and renewed.expires_at > lease.expires_at + 50
    meta = json.loads(path.read_bytes())
    assert (meta["ttl"], meta["token"], meta["fence"], meta["task_id"]) == (
        60,
        lease.token,
        lease.fence,
        "t1",
    )
    assert path.stat().st_ino == old_inode  # rewritten in place, under the file's flock
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    time.sleep(0.3)  # past the original ttl
    assert manager.acquire("job") is None
    assert manager.release(renewed)


def test_queue_mode_waits_for_the_release(manager: FileLockManager) -> None:
    lease = manager.acquire("job")
    assert lease is not None
    timer = threading.Timer(0.1, manager.release, (lease,))
    timer.start()
    started = time.monotonic()
    try:
        waited = manager.acquire("job", mode="queue", timeout=5)
    finally:
        timer.join(5)
    assert waited is not None and waited.fence > lease.fence
    assert 0.05 < time.monotonic() - started < 1.0
    assert manager.acquire("other-key-held-by-nobody", mode="queue", timeout=0) is not None
    assert manager.acquire("job", mode="queue", timeout=0.05) is None


def test_a_lease_works_through_another_manager_instance(lock_dir: Path) -> None:
    first, second = FileLockManager(lock_dir), FileLockManager(lock_dir)
    lease = first.acquire("job")
    assert lease is not None
    assert second.acquire("job") is None
    renewed = second.extend(lease, ttl=10)
    assert renewed is not None
    assert second.release(renewed)
    assert first.acquire("job") is not None


# -------------------------------------------------------------- inspect, iterate, break


def test_inspect_reports_the_holder(manager: FileLockManager) -> None:
    assert manager.inspect("job") is None
    lease = manager.acquire("job", ttl=40, task_id="t-1", task_name="tasks.job")
    assert lease is not None
    info = manager.inspect("job")
    assert info is not None
    me = _identity.current()
    assert info.key == "job" and info.backend == "file"
    assert info.token_prefix == lease.token[:8]
    assert info.fence == lease.fence
    assert (info.host, info.pid) == (me.host, me.pid)
    assert (info.task_id, info.task_name) == ("t-1", "tasks.job")
    assert info.acquired_at == pytest.approx(lease.acquired_at, abs=0.01)
    assert info.expires_at == pytest.approx(lease.expires_at, abs=0.5)


def test_inspect_tolerates_odd_optional_fields(manager: FileLockManager) -> None:
    plant(manager, "job", host=7, pid=True, task_id=["x"], acquired="yesterday")
    info = manager.inspect("job")
    assert info is not None
    assert (info.host, info.pid, info.task_id, info.acquired_at) == (None, None, None, None)


def test_iter_locks_lists_live_locks_only(manager: FileLockManager) -> None:
    live = manager.acquire("live")
    assert live is not None
    plant(manager, "expired", expires=time.time() - 1, bt_expires=0.0)
    plant(manager, "dead", pid=dead_pid())
    plant_raw(manager, "corrupt", b"junk")
    (manager.directory / "notes.txt").write_text("not a lock")
    (manager.directory / ("0" * 40 + ".lock.bak")).write_text("not a lock either")
    assert [info.key for info in manager.iter_locks()] == ["live"]


def test_iter_locks_skips_entries_it_cannot_read(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert manager.acquire("a") is not None

    def broken(name: str) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(manager._files, "read", broken)
    assert list(manager.iter_locks()) == []


def test_break_lock_rules(manager: FileLockManager, caplog: pytest.LogCaptureFixture) -> None:
    assert manager.break_lock("absent") is False
    lease = manager.acquire("job", task_id="t-1")
    assert lease is not None
    assert manager.break_lock("job", task_id="other") is False
    assert manager.break_lock("job", only_if_dead=True) is False  # we are alive
    with caplog.at_level(logging.INFO, logger="celery_lock.file"):
        assert manager.break_lock("job", task_id="t-1") is True
    assert on_disk(manager, "job") is None
    assert any("broke lock" in r.getMessage() for r in caplog.records)
    assert manager.release(lease) is False
    again = manager.acquire("job")
    assert again is not None and manager.break_lock("job")


def test_break_lock_of_a_dead_holder(manager: FileLockManager) -> None:
    plant(manager, "job", pid=dead_pid(), task_id="t-9")
    assert manager.break_lock("job", task_id="t-9", only_if_dead=True) is True
    assert on_disk(manager, "job") is None


def test_break_lock_leaves_expired_and_stale_files_to_the_cleaner(
    manager: FileLockManager,
) -> None:
    plant(manager, "expired", expires=time.time() - 1, bt_expires=0.0)
    assert manager.break_lock("expired") is False
    plant_raw(manager, "old-junk", b"junk", age=10)
    assert manager.break_lock("old-junk") is False
    assert lock_path(manager, "expired").exists() and lock_path(manager, "old-junk").exists()


def test_break_lock_of_a_fresh_unreadable_file(manager: FileLockManager) -> None:
    plant_raw(manager, "job", b"junk")
    assert manager.break_lock("job", task_id="t") is False
    assert manager.break_lock("job", only_if_dead=True) is False
    assert manager.break_lock("job") is True
    assert on_disk(manager, "job") is None
    assert manager.acquire("job") is not None


def test_dead_holder_is_replaced_at_once(
    manager: FileLockManager, caplog: pytest.LogCaptureFixture
) -> None:
    plant(manager, "job", pid=dead_pid(), fence=10)
    with caplog.at_level(logging.INFO, logger="celery_lock.file"):
        lease = manager.acquire("job")
    assert lease is not None
    assert any("holder process is gone" in r.getMessage() for r in caplog.records)


def test_live_holder_in_another_process_is_respected(manager: FileLockManager) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        found = _identity.process_start(proc.pid)
        assert found is not None
        plant(manager, "job", pid=proc.pid, start=found[0])
        assert manager.acquire("job") is None
        assert manager.break_lock("job", only_if_dead=True) is False
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert manager.acquire("job") is not None  # now it is provably gone


# ---------------------------------------------------------------------------- clean


def test_clean_removes_stale_locks_and_free_files_only(
    manager: FileLockManager, caplog: pytest.LogCaptureFixture
) -> None:
    live = manager.acquire("live")
    assert live is not None
    released = manager.acquire("released")
    assert released is not None and manager.release(released)
    plant(manager, "expired", expires=time.time() - 1, bt_expires=0.0)
    plant(manager, "dead", pid=dead_pid())
    plant_raw(manager, "old-junk", b"junk", age=10)
    plant_raw(manager, "fresh-junk", b"junk")
    notes = manager.directory / "notes.txt"
    notes.write_text("keep me")
    names = {p.name for p in manager.directory.iterdir()}

    dry = manager.clean(dry_run=True)
    assert (dry.scanned, dry.removed, dry.kept, dry.errors) == (5, 3, 2, 0)
    assert {p.name for p in manager.directory.iterdir()} == names

    with caplog.at_level(logging.INFO, logger="celery_lock.file"):
        report = manager.clean()
    assert (report.scanned, report.removed, report.kept, report.errors) == (5, 3, 2, 0)
    remaining = {p.name for p in manager.directory.iterdir()}
    for key in ("expired", "dead", "old-junk", "released"):
        assert file_name(key) not in remaining
    for key in ("live", "fresh-junk"):
        assert file_name(key) in remaining
    assert notes.exists()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("removed stale lock" in m for m in messages) == 3
    assert manager.release(live)
    assert manager.clean() == CleanReport(scanned=1, removed=0, kept=1, errors=0)
    # Removed files left their fences behind: re-created keys go on from them.
    again = manager.acquire("released")
    assert again is not None and again.fence > released.fence


def test_an_acquirer_waiting_on_a_file_the_cleaner_removes_locks_the_new_file(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cleaner, other = FileLockManager(lock_dir), FileLockManager(lock_dir)
    first = other.acquire("job")
    assert first is not None and other.release(first)  # a free file: the cleaner removes it
    real_record, real_wait = cleaner._files.record_fence, other._files.wait_flock
    waited: list[str] = []
    got: list[Lease | None] = []

    def wait_flock(*args: Any) -> None:
        waited.append(args[-1])
        real_wait(*args)

    def record_then_race(name: str, fence: int | None) -> None:
        # The cleaner holds the file's exclusive flock: an acquirer opens the same inode now
        # and blocks on its flock; once it gets it, the file is unlinked.
        thread = threading.Thread(target=lambda: got.append(other.acquire("job")))
        thread.start()
        deadline = time.monotonic() + 5
        while not waited and time.monotonic() < deadline:
            time.sleep(0.005)
        real_record(name, fence)
        threads.append(thread)

    threads: list[threading.Thread] = []
    monkeypatch.setattr(other._files, "wait_flock", wait_flock)
    monkeypatch.setattr(cleaner._files, "record_fence", record_then_race)
    assert cleaner.clean() == CleanReport()
    threads[0].join(10)
    assert waited == [file_name("job")]
    lease = got[0]
    assert lease is not None and lease.fence > first.fence
    # The lease stands in the file under the name, not in the unlinked one.
    assert on_disk(other, "job")["token"] == lease.token  # type: ignore[index]
    assert cleaner.acquire("job") is None


def test_clean_never_removes_a_foreign_entry_replaced_after_its_first_look(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = plant_stale_symlink(manager, "job")
    real_lstat = manager._files.lstat_foreign

    def lstat_then_replace(name: str, problem: str) -> Any:
        found = real_lstat(name, problem)
        fresh = path.with_name("replacement")
        fresh.symlink_to("/elsewhere")  # another inode, also old
        set_age(fresh, 10)
        fresh.replace(path)
        return found

    monkeypatch.setattr(manager._files, "lstat_foreign", lstat_then_replace)
    report = manager.clean()
    assert (report.removed, report.kept) == (0, 1)
    assert os.readlink(path) == "/elsewhere"


def test_clean_skips_a_lock_released_after_the_listing(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = manager.acquire("job")
    assert lease is not None
    real_list = manager._files.names

    def list_then_release() -> list[str]:
        names = real_list()
        assert manager.release(lease)
        return names

    monkeypatch.setattr(manager._files, "names", list_then_release)
    assert manager.clean() == CleanReport()


def test_clean_ignores_lock_files_that_vanish_under_it(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = manager.acquire("job")
    assert lease is not None and manager.release(lease)
    name = file_name("job")
    monkeypatch.setattr(manager._files, "names", lambda: [name, name, file_name("never")])
    assert manager.clean() == CleanReport()
    assert not lock_path(manager, "job").exists()


def test_clean_counts_an_unlistable_directory_as_an_error(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> list[str]:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(manager._files, "names", broken)
    assert manager.clean().errors == 1
    with pytest.raises(LockBackendUnavailable, match="I/O error"):
        list(manager.iter_locks())


# ---------------------------------------------------------------- guards and failures


def test_lock_file_busy_too_long_is_a_bounded_backend_error(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = manager.acquire("job")
    assert lease is not None
    monkeypatch.setattr(_lockfiles, "BUSY_TIMEOUT", 0.2)
    path = lock_path(manager, "job")
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process stopped inside its critical section
        for call in (
            lambda: manager.acquire("job"),
            lambda: manager.release(lease),
            lambda: manager.extend(lease),
            lambda: manager.break_lock("job"),
            lambda: manager.inspect("job"),
        ):
            started = time.monotonic()
            with pytest.raises(LockBackendUnavailable, match="stayed busy") as info:
                call()
            assert 0.15 < time.monotonic() - started < 2
            assert str(path) in str(info.value) and info.value.backend == "file"
    finally:
        os.close(fd)
    assert manager.release(lease)  # released: works again


def test_lock_file_busy_for_a_short_critical_section_is_waited_for(
    manager: FileLockManager,
) -> None:
    fd = os.open(lock_path(manager, "job"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    timer = threading.Timer(0.05, os.close, (fd,))
    timer.start()
    try:
        assert manager.acquire("job") is not None
    finally:
        timer.join(5)


def test_fences_file_that_is_not_a_regular_file_is_refused(manager: FileLockManager) -> None:
    os.mkfifo(manager.directory / ".fences", 0o600)
    with pytest.raises(LockBackendUnavailable, match="not a regular file"):
        manager.acquire("job")  # a new file: its fence starts from .fences
    assert not manager.is_locked("job")


def test_guard_file_that_is_not_a_regular_file_is_refused(manager: FileLockManager) -> None:
    path = plant_stale_symlink(manager, "job")
    os.mkfifo(manager.directory / ".guard", 0o600)
    with pytest.raises(LockBackendUnavailable, match="not a regular file"):
        manager.acquire("job")  # removing a foreign entry takes the guard
    assert path.is_symlink()


def test_a_hard_link_planted_at_fences_is_never_written_through(
    manager: FileLockManager, tmp_path: Path
) -> None:
    # Issue 14 item 8: the linked file grew from 7 to 32 bytes. .fences is refused like a lock
    # file with a second link: never read, never written, the operator told which path.
    first = manager.acquire("first")
    assert first is not None and manager.release(first)  # a free file: clean() removes it
    precious = tmp_path / "precious"
    precious.write_bytes(b"do not touch")
    os.link(precious, manager.directory / ".fences")
    report = manager.clean()  # would keep the fence of "first" in .fences, then remove it
    assert report.errors == 1
    assert lock_path(manager, "first").exists()  # not removed: its fence could not be kept
    with pytest.raises(LockBackendUnavailable, match=r"\.fences is a file with 2 links"):
        manager.acquire("job")  # a new file: its fence starts from .fences
    assert precious.read_bytes() == b"do not touch"
    assert not manager.is_locked("job")


def test_a_hard_link_planted_at_guard_is_refused(manager: FileLockManager, tmp_path: Path) -> None:
    path = plant_stale_symlink(manager, "job")
    precious = tmp_path / "precious"
    precious.write_bytes(b"do not touch")
    os.link(precious, manager.directory / ".guard")
    with pytest.raises(LockBackendUnavailable, match=r"\.guard is a file with 2 links"):
        manager.acquire("job")  # removing a foreign entry takes the guard
    assert path.is_symlink()
    assert precious.read_bytes() == b"do not touch"


def _fail_writes(monkeypatch: pytest.MonkeyPatch, *, short: bool, allowed: set[bytes]) -> None:
    """Make writes of holder records fail (or come out short), except those in ``allowed``."""
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if b'"token"' in data and data not in allowed:
            if short:
                return real_pwrite(fd, data[:10], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("short", [False, True], ids=["ENOSPC", "short write"])
def test_write_failure_is_a_backend_error_and_leaves_nothing_behind(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch, short: bool
) -> None:
    lease = manager.acquire("held", ttl=30)
    assert lease is not None
    record = lock_path(manager, "held").read_bytes()
    _fail_writes(monkeypatch, short=short, allowed={record})
    with pytest.raises(LockBackendUnavailable) as info:
        manager.acquire("job")
    assert isinstance(info.value.__cause__, OSError)
    assert str(manager.directory) in str(info.value) and "'job'" in str(info.value)
    with pytest.raises(LockBackendUnavailable):
        manager.extend(lease)
    monkeypatch.undo()
    # The failed writes were undone: "job" is free, "held" still holds its record.
    assert on_disk(manager, "job") is None
    assert lock_path(manager, "held").read_bytes() == record
    assert manager.release(lease)
    assert manager.acquire("job") is not None


def test_io_errors_of_every_operation_are_backend_errors(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = manager.acquire("job")
    assert lease is not None

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(manager._files, "open_locked", broken)
    for call in (
        lambda: manager.acquire("job"),
        lambda: manager.release(lease),
        lambda: manager.extend(lease),
        lambda: manager.inspect("job"),
        lambda: manager.break_lock("job"),
    ):
        with pytest.raises(LockBackendUnavailable, match="I/O error"):
            call()
    assert manager.clean().errors == 1


def test_lock_created_outside_the_protocol_wins_the_link(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    plant(manager, "job")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # the look misses it
    assert manager.acquire("job") is None
    assert [p for p in manager.directory.iterdir() if p.name.startswith(".tmp.")] == []


# ------------------------------------------------------------------ records, caches, foreign entries


@pytest.mark.parametrize(
    ("content", "free"),
    [
        (b'{"fence": 2305843009213693952}', True),  # a free record written by other code
        (b'{"v":1,"fence":2305843009213693952}' + b" " * 50, True),
        (b'{"v":1,"fence":12x}', False),
        (b'{"fence": -1}', False),
        (b'{"fence": "7"}', False),
    ],
    ids=["spaced free", "padded free", "bad digits", "negative", "string fence"],
)
def test_free_records_are_read_strictly(
    manager: FileLockManager, content: bytes, free: bool
) -> None:
    plant_raw(manager, "job", content, age=10)
    assert not manager.is_locked("job")  # free, or unreadable for longer than the grace
    lease = manager.acquire("job")
    assert lease is not None
    if free:
        assert lease.fence == (1 << 61) + 1  # went on from the stored fence
    else:
        assert lease.fence < 1 << 61  # unreadable: the fence starts from the clock


def test_release_works_for_leases_the_manager_no_longer_remembers(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ownership is the token in the file; the records a manager remembers having written
    # only spare a parse, and they are bounded.
    monkeypatch.setattr(file_mod, "_WRITTEN_CACHE", 2)
    leases = [manager.acquire(f"job{i}") for i in range(5)]
    assert len(manager._written) <= 2
    other = FileLockManager(manager.directory)  # remembers nothing at all
    assert other.release(leases[0])  # type: ignore[arg-type]
    for lease in leases[1:]:
        assert lease is not None and manager.release(lease)
    assert all(on_disk(manager, f"job{i}") is None for i in range(5))


def test_release_and_extend_of_a_lock_replaced_by_a_foreign_entry(
    manager: FileLockManager,
) -> None:
    lease = manager.acquire("job")
    assert lease is not None
    path = lock_path(manager, "job")
    path.unlink()
    assert manager.extend(lease) is None
    assert manager.release(lease) is False
    lease = manager.acquire("job")
    assert lease is not None
    path.unlink()
    path.symlink_to("/etc/passwd")
    assert manager.extend(lease) is None
    assert manager.release(lease) is False
    assert os.readlink(path) == "/etc/passwd"  # never followed, never written through


def test_break_lock_of_foreign_entries(manager: FileLockManager) -> None:
    path = lock_path(manager, "job")
    path.symlink_to("/nonexistent")
    assert manager.break_lock("job", task_id="t") is False  # no task id to match
    assert manager.break_lock("job", only_if_dead=True) is False  # no death to prove
    assert manager.break_lock("job") is True  # fresh, unconditional: removed
    assert not path.is_symlink()
    path.symlink_to("/nonexistent")
    set_age(path, 10)
    assert manager.break_lock("job") is False  # stale: no lock any more, the cleaner's job
    path.unlink()
    path.mkdir()
    assert manager.break_lock("job") is False  # a directory is never removed
    assert path.is_dir()


def test_acquire_replaces_stale_foreign_entries_and_logs_it(
    manager: FileLockManager, caplog: pytest.LogCaptureFixture
) -> None:
    path = lock_path(manager, "job")
    path.symlink_to("/etc/passwd")
    set_age(path, 10)
    with caplog.at_level(logging.INFO, logger="celery_lock.file"):
        lease = manager.acquire("job")
    assert lease is not None and not path.is_symlink()
    assert on_disk(manager, "job")["token"] == lease.token  # type: ignore[index]
    assert any("broke stale lock job (unreadable" in r.getMessage() for r in caplog.records)
    assert Path("/etc/passwd").read_bytes()[:1] != b"{"


def test_foreign_entry_removed_by_somebody_else_meanwhile(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = plant_stale_symlink(manager, "job")
    real_lstat = manager._files.lstat_foreign

    def lstat_then_vanish(name: str, problem: str) -> Any:
        found = real_lstat(name, problem)
        path.unlink(missing_ok=True)  # another process removed it before our guarded check
        return found

    monkeypatch.setattr(manager._files, "lstat_foreign", lstat_then_vanish)
    assert manager.acquire("job") is not None


def test_something_that_keeps_reappearing_is_a_bounded_backend_error(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = os.stat(manager.directory)
    monkeypatch.setattr(manager._files, "open_locked", lambda *a: _lockfiles.Foreign(st, "a FIFO"))
    monkeypatch.setattr(manager._files, "make_room", lambda *a: True)
    with pytest.raises(LockBackendUnavailable, match="keeps reappearing"):
        manager.acquire("job")


def test_clean_removes_stale_foreign_entries(
    manager: FileLockManager, caplog: pytest.LogCaptureFixture
) -> None:
    lock_path(manager, "link").symlink_to("/nonexistent")
    os.mkfifo(lock_path(manager, "fifo"), 0o600)
    lock_path(manager, "fresh").symlink_to("/nonexistent")
    for key in ("link", "fifo"):
        set_age(lock_path(manager, key), 10)
    assert manager.clean(dry_run=True) == CleanReport(scanned=3, removed=2, kept=1)
    assert lock_path(manager, "fifo").exists()
    with caplog.at_level(logging.INFO, logger="celery_lock.file"):
        assert manager.clean() == CleanReport(scanned=3, removed=2, kept=1)
    assert sum("removed stale lock file" in r.getMessage() for r in caplog.records) == 2
    assert {p.name for p in manager.directory.iterdir() if LOCK_NAME.match(p.name)} == {
        file_name("fresh")
    }


def test_lock_directory_removed_under_the_manager_is_a_backend_error(
    lock_dir: Path,
) -> None:
    manager = FileLockManager(lock_dir)
    os.rmdir(lock_dir)
    with pytest.raises(LockBackendUnavailable, match=str(lock_dir)):
        manager.acquire("job")


def test_unexpected_open_errors_are_backend_errors(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_descriptors(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", out_of_descriptors)
    with pytest.raises(LockBackendUnavailable, match="Too many open files"):
        manager.acquire("job")


@pytest.mark.parametrize("aux", [".fences", ".guard"])
def test_short_waits_on_the_auxiliary_files(manager: FileLockManager, aux: str) -> None:
    if aux == ".guard":  # the guard is taken to remove a stale foreign entry
        plant_stale_symlink(manager, "job")
    else:  # .fences is read for a new file and written by the cleaner
        lease = manager.acquire("other")
        assert lease is not None and manager.release(lease)
    fd = os.open(manager.directory / aux, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    timer = threading.Timer(0.05, os.close, (fd,))
    timer.start()
    try:
        lease = manager.acquire("job")
        assert lease is not None and manager.release(lease)
    finally:
        timer.join(5)
    if aux == ".fences":
        fd = os.open(manager.directory / aux, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        timer = threading.Timer(0.05, os.close, (fd,))
        timer.start()
        try:
            assert manager.clean() == CleanReport()  # records the fences of "job", "other"
        finally:
            timer.join(5)


def test_the_cleaner_never_lowers_a_kept_fence(manager: FileLockManager) -> None:
    lease = manager.acquire("job")
    assert lease is not None and manager.release(lease)
    high = 1 << 61
    (manager.directory / ".fences").write_bytes(high.to_bytes(8, "big") * 256)
    assert manager.clean() == CleanReport()  # removes "job", whose fence is lower
    assert (manager.directory / ".fences").read_bytes() == high.to_bytes(8, "big") * 256
    again = manager.acquire("job")
    assert again is not None and again.fence == high + 1


def test_break_lock_of_a_released_key_finds_nothing(manager: FileLockManager) -> None:
    lease = manager.acquire("job")
    assert lease is not None and manager.release(lease)
    assert manager.break_lock("job") is False


def test_a_hard_link_planted_as_a_lock_file_is_never_written_through(
    manager: FileLockManager, tmp_path: Path
) -> None:
    precious = tmp_path / "precious"
    precious.write_bytes(b"do not touch")
    os.link(precious, lock_path(manager, "job"))
    assert manager.acquire("job") is None  # fresh: counts as held for the grace
    set_age(lock_path(manager, "job"), 10)
    lease = manager.acquire("job")  # stale: our name is unlinked, the other file stays
    assert lease is not None
    assert precious.read_bytes() == b"do not touch"
    assert on_disk(manager, "job")["token"] == lease.token  # type: ignore[index]


def test_files_of_keys_used_once_do_not_pile_up(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_mod, "_KEEP_FREE", 5)
    fences = {}
    for i in range(50):
        lease = manager.acquire(f"job{i}")
        assert lease is not None and manager.release(lease)
        fences[i] = lease.fence
    names = {p.name for p in manager.directory.iterdir() if LOCK_NAME.match(p.name)}
    assert names == {file_name(f"job{i}") for i in range(45, 50)}  # the 5 freed last
    # A removed file's fence went to .fences, so the key goes on above it even with the wall
    # clock an hour back.
    shift_wall_clock(monkeypatch, -HOUR)
    again = manager.acquire("job0")
    assert again is not None and again.fence > fences[0]


def test_a_file_freed_long_ago_is_kept_while_somebody_uses_it(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_mod, "_KEEP_FREE", 1)
    mine, other = FileLockManager(lock_dir), FileLockManager(lock_dir)
    lease = mine.acquire("taken")
    assert lease is not None and mine.release(lease)
    taken = other.acquire("taken")  # held again, by somebody else
    assert taken is not None
    lease = mine.acquire("busy")
    assert lease is not None and mine.release(lease)  # evicts "taken": held, so it stays
    fd = os.open(lock_path(mine, "busy"), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # somebody is reading it right now
    try:
        lease = mine.acquire("third")
        assert lease is not None and mine.release(lease)  # evicts "busy": in use, so it stays
    finally:
        os.close(fd)
    assert on_disk(mine, "taken")["token"] == taken.token  # type: ignore[index]
    assert lock_path(mine, "busy").exists()
    assert other.release(taken)


def test_a_failed_removal_of_an_old_free_file_is_left_to_the_cleaner(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(file_mod, "_KEEP_FREE", 1)
    first, second = manager.acquire("first"), manager.acquire("second")
    assert first is not None and second is not None and manager.release(first)
    os.mkfifo(manager.directory / ".fences", 0o600)  # the fence cannot be kept: no removal
    with caplog.at_level(logging.DEBUG, logger="celery_lock.file"):
        assert manager.release(second)  # evicts "first"
    assert lock_path(manager, "first").exists()
    assert any("could not remove free lock file" in r.getMessage() for r in caplog.records)


def test_an_old_free_file_already_gone_or_odd_is_left_alone(
    manager: FileLockManager, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(file_mod, "_KEEP_FREE", 1)
    for key in ("gone", "linked"):
        lease = manager.acquire(key)
        assert lease is not None and manager.release(lease)
        if key == "gone":
            assert manager.clean() == CleanReport()  # the cleaner removed it first
    assert not lock_path(manager, "gone").exists()
    os.link(lock_path(manager, "linked"), tmp_path / "second-link")
    lease = manager.acquire("next")
    assert lease is not None and manager.release(lease)  # evicts "linked": two links, kept
    assert lock_path(manager, "linked").exists()


@pytest.mark.parametrize("access_at", [True, False], ids=["faccessat", "no-faccessat"])
def test_quiet_asks_the_directory_and_answers_like_a_full_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, access_at: bool
) -> None:
    """The hybrid's "no lease in files" question: absent names are answered by one access()
    (no open that raises); where access() cannot be asked relative to a directory without
    following links, every name is opened, with the same answers."""
    monkeypatch.setattr(_lockdir, "_ACCESS_AT", access_at and _lockdir._ACCESS_AT)
    manager = FileLockManager(tmp_path / "locks")
    dir_fd = manager._files.dir_fd
    name = file_name("k")
    assert _lockdir.may_exist(dir_fd, name) is (not _lockdir._ACCESS_AT)
    assert manager._quiet("k", name) and manager._quiet("k", name, "t1")
    lease = manager.acquire("k", ttl=30)
    assert lease is not None
    assert _lockdir.may_exist(dir_fd, name)
    assert not manager._quiet("k", name)  # held in files
    assert manager.release(lease)
    assert manager._quiet("k", name)  # the file stays, free
    manager._mark_done("k", "t1", 30.0)
    assert not manager._quiet("k", name, "t1")  # finished in files
    assert manager._quiet("k", name, "t2")
    os.symlink("/nonexistent/target", tmp_path / "locks" / "dangling.lock")
    assert _lockdir.may_exist(dir_fd, "dangling.lock")  # a link is something: never followed
