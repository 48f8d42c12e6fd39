"""The base class's contract, on an in-memory backend: checks, QUEUE loop, lock(), logging."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import random
import threading
import time
from pathlib import Path

import pytest

from celery_lock import FileLockManager, Lease, LockLost, LockMode, LockNotAcquired, _fork
from celery_lock.task import requeue_countdown
from tests._memory import MemoryLockManager


def test_acquire_release_roundtrip_and_lease_fields() -> None:
    m = MemoryLockManager(default_ttl=10)
    before = time.time()
    lease = m.acquire("k")
    assert lease is not None
    assert lease.key == "k" and lease.ttl == 10.0 and len(lease.token) == 32
    assert before + 10 <= lease.expires_at <= time.time() + 10
    assert lease.token not in repr(lease)  # the capability is never printed whole
    assert pickle.loads(pickle.dumps(lease)) == lease
    assert m.acquire("k") is None
    assert m.is_locked("k")
    assert m.release(lease) is True
    assert m.release(lease) is False
    assert not m.is_locked("k")


def test_bad_arguments() -> None:
    m = MemoryLockManager()
    with pytest.raises(TypeError):
        m.acquire(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        m.acquire("k", ttl=0)
    with pytest.raises(ValueError, match="lock mode"):
        m.acquire("k", mode="later")
    with pytest.raises(ValueError, match="timeout"):
        m.acquire("k", mode="queue", timeout=-1)
    with pytest.raises(ValueError, match="default_ttl"):
        MemoryLockManager(default_ttl=-5)
    with pytest.raises(TypeError, match="expected a Lease"):
        m.release("k")  # type: ignore[arg-type]
    foreign = Lease("k", "t" * 32, 1, "redis", 1.0, time.time() + 1)
    with pytest.raises(ValueError, match="granted by the 'redis' backend"):
        m.release(foreign)
    with pytest.raises(ValueError, match="ttl"):
        m.extend(Lease("k", "t" * 32, 1, "memory", 1.0, time.time() + 1), ttl=math_nan())
    assert m.calls == []  # nothing reached the store


def math_nan() -> float:
    return float("nan")


def test_timeout_ignored_in_execution_mode() -> None:
    m = MemoryLockManager()
    held = m.acquire("k")
    assert held is not None
    started = time.monotonic()
    assert m.acquire("k", mode=LockMode.EXECUTION, timeout=5) is None
    assert time.monotonic() - started < 0.5


def test_queue_waits_for_release_and_times_out() -> None:
    m = MemoryLockManager()
    held = m.acquire("k")
    assert held is not None
    started = time.monotonic()
    assert m.acquire("k", mode="queue", timeout=0.1) is None
    assert 0.1 <= time.monotonic() - started < 1.0
    threading.Timer(0.1, m.release, args=(held,)).start()
    lease = m.acquire("k", mode="queue", timeout=5)
    assert lease is not None and lease.fence > held.fence


def test_queue_timeout_none_waits_up_to_ttl() -> None:
    m = MemoryLockManager()
    assert m.acquire("k", ttl=0.2) is not None  # expires by itself after 0.2 s
    started = time.monotonic()
    lease = m.acquire("k", mode="queue", ttl=0.15)  # waits up to its own ttl (0.15 s)
    waited = time.monotonic() - started
    assert lease is None
    assert 0.15 <= waited < 1.0
    assert m.acquire("k", mode="queue", ttl=1) is not None  # 1 s wait covers the expiry


def test_extend_keeps_token_and_fence() -> None:
    m = MemoryLockManager()
    lease = m.acquire("k", ttl=1)
    assert lease is not None
    renewed = m.extend(lease, ttl=50)
    assert renewed is not None
    assert (renewed.token, renewed.fence, renewed.ttl) == (lease.token, lease.fence, 50.0)
    assert renewed.expires_at > lease.expires_at
    assert m.extend(renewed) is not None
    m.release(renewed)
    assert m.extend(renewed) is None


def test_lock_context_manager() -> None:
    m = MemoryLockManager()
    with m.lock("k") as lease:
        assert m.is_locked("k")
        with pytest.raises(LockNotAcquired) as info, m.lock("k"):
            pass
        assert info.value.key == "k"
        assert info.value.backend == "memory"
    assert not m.is_locked("k")
    assert lease.key == "k"


def test_lock_raises_lock_lost_only_when_body_succeeded() -> None:
    m = MemoryLockManager()
    with pytest.raises(LockLost), m.lock("k"):
        m.held.clear()  # someone broke our lock while the body ran
    with pytest.raises(KeyError), m.lock("k"):  # the body's own error wins
        m.held.clear()
        raise KeyError("body")


def test_lock_with_renewal_outlives_ttl() -> None:
    m = MemoryLockManager()
    with m.lock("k", ttl=0.3, renew=True) as lease:
        time.sleep(0.7)
        assert m.is_locked("k")
        assert m.inspect("k") is not None
    assert not m.is_locked("k")
    assert lease.fence == 1


def test_debug_logging_has_structured_fields(caplog_debug: pytest.LogCaptureFixture) -> None:
    m = MemoryLockManager()
    lease = m.acquire("k")
    assert lease is not None
    assert m.acquire("k") is None
    m.release(lease)
    records = [r for r in caplog_debug.records if r.name == "celery_lock.memory"]
    assert [r.levelno for r in records] == [logging.DEBUG] * 3
    assert all(r.lock_key == "k" and r.backend == "memory" for r in records)  # type: ignore[attr-defined]
    assert records[0].fence == 1  # type: ignore[attr-defined]
    assert hasattr(records[2], "hold_ms")


def test_queue_timeout_logs_info_with_wait_ms(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="celery_lock")
    m = MemoryLockManager()
    m.acquire("k")
    assert m.acquire("k", mode="queue", timeout=0.05) is None
    (record,) = [r for r in caplog.records if r.levelno == logging.INFO]
    assert record.lock_key == "k"  # type: ignore[attr-defined]
    assert record.wait_ms >= 50  # type: ignore[attr-defined]


def test_nothing_above_debug_on_the_hot_path(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_lock")
    m = MemoryLockManager()
    for _ in range(20):
        lease = m.acquire("k")
        assert lease is not None
        assert m.acquire("k") is None
        m.extend(lease)
        m.release(lease)
    assert all(r.levelno <= logging.DEBUG for r in caplog.records)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "abc",
        "proj.tasks.sync:{1}",
        'a"b',
        "back\\slash",
        "ü",
        "tab\t",
        "\u2028",
        "x" * 500,
    ],
)
def test_metadata_strings_are_exact_json(value: str | None) -> None:
    """Holder metadata is JSON built from a dict: any key, task id or task name comes back
    exactly, and the text is ASCII (a store may encode it any way)."""
    m = MemoryLockManager()
    text = m._meta(value or "k", 1.5, 30.0, value, value)
    assert text.isascii()
    meta = json.loads(text)
    assert (meta["key"], meta["task_id"], meta["task_name"]) == (value or "k", value, value)
    assert (meta["v"], meta["acquired"], meta["ttl"]) == (1, 1.5, 30.0)
    assert meta["pid"] == os.getpid()


def test_a_lease_of_another_process_is_never_released_or_extended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A lease acquired by another process (as a forked child sees its parent's) is refused
    before the store is touched; a lease that does not say who acquired it is allowed."""
    caplog.set_level(logging.DEBUG, logger="celery_lock")
    m = MemoryLockManager()
    lease = m.acquire("k")
    assert lease is not None and lease.pid == os.getpid()
    assert "pid" not in repr(lease)
    parents = dataclasses.replace(lease, pid=os.getpid() + 1)
    assert parents == lease  # the pid is not part of a lease's identity
    m.calls.clear()
    assert m.release(parents) is False
    assert m.extend(parents) is None
    assert m.calls == []
    assert m.is_locked("k")
    assert sum("belongs to process" in r.getMessage() for r in caplog.records) == 2
    anyone = dataclasses.replace(lease, pid=None)
    assert m.extend(anyone) is not None
    assert m.release(anyone) is True


def test_leases_record_the_acquiring_process_on_every_path() -> None:
    m = MemoryLockManager()
    first = m.acquire("k")
    assert first is not None and first.pid == os.getpid()
    threading.Timer(0.05, m.release, args=(first,)).start()
    waited = m.acquire("k", mode="queue", timeout=5)
    assert waited is not None and waited.pid == os.getpid()
    renewed = m.extend(waited)
    assert renewed is not None and renewed.pid == os.getpid()


def test_waiting_leaves_the_applications_random_stream_alone(tmp_path: Path) -> None:
    """Jitter comes from our own stream: a seeded application (or hypothesis, which fails a
    test whose strategies see the global stream move) is not disturbed by a waiting lock."""
    manager = FileLockManager(tmp_path / "locks")
    held = manager.acquire("k", ttl=30)
    assert held is not None
    random.seed(7)
    expected = [random.random() for _ in range(3)]
    random.seed(7)
    assert manager.acquire("k", mode=LockMode.QUEUE, timeout=0.1) is None  # jittered polls
    assert requeue_countdown(1.0, 2, 3600.0) > 0
    assert [random.random() for _ in range(3)] == expected
    assert manager.release(held)


def test_forked_children_do_not_jitter_in_step() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.write(write, repr(_fork.jitter()).encode())
        finally:
            os._exit(0)
    os.close(write)  # the child's end only: a child that wrote nothing reads as b""
    os.waitpid(pid, 0)
    data = os.read(read, 64)
    os.close(read)
    assert data, "the child could not draw a jitter factor"
    assert float(data) != _fork.jitter()


def test_the_cached_pid_is_the_childs_after_fork() -> None:
    """Leases record ``_fork.pid()`` (``os.getpid()`` is a system call): a forked child must
    see its own pid there, or it would take its parent's leases for its own."""
    assert _fork.pid() == os.getpid()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.write(write, f"{_fork.pid()} {os.getpid()}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    data = os.read(read, 64).split()
    os.close(read)
    assert [int(x) for x in data] == [pid, pid]
