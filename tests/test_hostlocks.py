"""Same-host marks of Redis leases (``_hostlocks``): seen across processes, dropped by the kernel
when the holder dies, and never unlocked by a forked child on its parent's behalf."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from celery_lock import FileLockManager, HybridLockManager
from celery_lock.backends import _hostlocks
from celery_lock.backends._filerecord import file_name

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="open file description locks are Linux-only"
)


def _table(file: FileLockManager) -> _hostlocks.HostLocks:
    table = _hostlocks.for_directory(file._files.dir_fd)
    assert table is not None
    return table


def _in_child(body: object) -> int:
    """Fork, run ``body()`` in the child, return its exit status (0: it returned True)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            code = 0 if body() else 1  # type: ignore[operator]
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_mark_in_another_process_keeps_files_out_until_that_process_dies(
    lock_dir: Path,
) -> None:
    file = FileLockManager(lock_dir)
    on_files = HybridLockManager(None, file)
    byte = _hostlocks.offset(file_name("k"))
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: hold the mark of a Redis lease, then wait
        try:
            _table(FileLockManager(lock_dir)).hold("child-token", byte)
            os.write(ready_w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        assert on_files.acquire("k") is None
        assert on_files.claim("k", task_id="t", ttl=5).outcome == "held"
        assert on_files.acquire("other") is not None  # only that key's byte
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        lease = on_files.acquire("k")  # the kernel dropped the dead process's byte at once
        assert lease is not None and lease.backend == "file"
        assert on_files.release(lease)
    finally:
        os.close(ready_r)
        os.close(ready_w)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def test_a_forked_child_never_unlocks_its_parents_byte(lock_dir: Path) -> None:
    """A child shares its parent's open file description: ending an inherited lease there
    must not unlock the byte the parent's lease still holds."""
    file = FileLockManager(lock_dir)
    table = _table(file)
    byte = _hostlocks.offset(file_name("k"))
    table.hold("parent-token", byte)
    try:

        def child_ends_the_parents_lease() -> bool:
            # Unknown to the child's table: nothing is unlocked, and it "may have a shadow".
            return _table(file).drop("parent-token")

        assert _in_child(child_ends_the_parents_lease) == 0
        # A process that never held anything still sees the parent's byte.
        assert _in_child(lambda: _table(FileLockManager(lock_dir)).held(byte)) == 0
    finally:
        assert table.drop("parent-token") is False
    assert _in_child(lambda: not _table(FileLockManager(lock_dir)).held(byte)) == 0


def test_bytes_are_counted_per_lease(lock_dir: Path) -> None:
    """Two leases on one byte (keys whose hashes share 60 bits, or one key held by two
    managers' leases of one process): the byte stays locked until the last one ends."""
    table = _table(FileLockManager(lock_dir))
    table.hold("a", 7)
    table.hold("b", 7)
    table.drop("a")
    assert _in_child(lambda: _table(FileLockManager(lock_dir)).held(7)) == 0
    table.drop("b")
    assert _in_child(lambda: not _table(FileLockManager(lock_dir)).held(7)) == 0
    assert table.drop("b") is True  # unknown token: nothing to unlock, "may have a shadow"


def test_a_retry_with_the_same_token_holds_the_byte_once(lock_dir: Path) -> None:
    table = _table(FileLockManager(lock_dir))
    table.hold("t", 9)
    table.hold("t", 9)  # the same attempt again: not a second lease
    assert table.drop("t") is False
    assert _in_child(lambda: not _table(FileLockManager(lock_dir)).held(9)) == 0


@pytest.mark.parametrize("planted", ["symlink", "directory", "fifo"])
def test_a_planted_hostlocks_entry_falls_back_to_shadow_files(lock_dir: Path, planted: str) -> None:
    """Something not a regular file under .hostlocks (never followed, never used): no byte
    marks for that directory, and the hybrid keeps a shadow lock file beside each lease."""
    file = FileLockManager(lock_dir)
    path = lock_dir / _hostlocks.NAME
    if planted == "symlink":
        path.symlink_to(lock_dir / "elsewhere")
    elif planted == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    assert _hostlocks.for_directory(file._files.dir_fd) is None
    hybrid = HybridLockManager(None, file)
    assert hybrid._marks is _hostlocks.NO_MARKS
    assert not (lock_dir / "elsewhere").exists()


def test_a_table_knows_when_its_directory_is_gone(tmp_path: Path) -> None:
    """A removed directory's table is not handed out for a new directory that got the same
    inode number."""
    gone = tmp_path / "gone"
    file = FileLockManager(gone)
    table = _table(file)
    assert table.linked()
    (gone / _hostlocks.NAME).unlink()
    gone.rmdir()
    assert not table.linked()


def test_an_unanswerable_test_counts_as_held(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the byte cannot be tested, a grant from files backs out rather than risk a double
    grant."""
    table = _table(FileLockManager(lock_dir))

    def broken(*args: object) -> bytes:
        raise OSError("simulated failure")

    monkeypatch.setattr(_hostlocks.fcntl, "fcntl", broken)
    assert table.held(12345) is True
    assert table.mark("token", file_name("k")) is False  # the hybrid then takes a shadow lock file
