"""HybridLockManager: Redis first, file fallback, one log line per transition, leases routed."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from celery_lock import (
    FileLockManager,
    HybridLockManager,
    LockBackendUnavailable,
    LockCleaner,
    LockMode,
    RedisLockManager,
)
from celery_lock.backends import _hostlocks
from celery_lock.backends._filerecord import file_name
from tests._contention import run_contention
from tests._redis_server import RedisServer
from tests._workers import wait_for


@pytest.fixture(params=["marks", "shadow"])
def parts(request: pytest.FixtureRequest, fake_redis, lock_dir: Path):  # type: ignore[no-untyped-def]
    """Every hybrid test runs with same-host byte marks and with shadow lock files (what
    platforms without open file description locks get)."""
    if request.param == "shadow":
        request.getfixturevalue("monkeypatch").setattr(_hostlocks, "_SUPPORTED", False)
    redis = RedisLockManager(fake_redis, default_ttl=30)
    file = FileLockManager(lock_dir, default_ttl=20)
    return fake_redis.fake_server, redis, file


@pytest.fixture
def marked_parts(fake_redis, lock_dir: Path):  # type: ignore[no-untyped-def]
    redis = RedisLockManager(fake_redis, default_ttl=30)
    file = FileLockManager(lock_dir, default_ttl=20)
    return fake_redis.fake_server, redis, file


def count_calls(monkeypatch: pytest.MonkeyPatch, manager: object, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(manager, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(manager, name, wrapper)
    return calls


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "celery_lock.hybrid" and r.levelno == level]


def test_needs_at_least_one_backend() -> None:
    with pytest.raises(ValueError, match="needs a redis manager, a file manager, or both"):
        HybridLockManager(None, None)


def test_redis_first_then_files_then_redis_again(
    parts, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_lock")
    server, redis, file = parts
    transitions: list[tuple[str, object]] = []
    hybrid = HybridLockManager(
        redis, file, retry_interval=0.3, on_transition=lambda s, e: transitions.append((s, e))
    )
    up = hybrid.acquire("a")
    assert up is not None and up.backend == "redis" and up.ttl == 30.0
    assert not hybrid.using_fallback

    server.connected = False
    redis_calls = count_calls(monkeypatch, redis, "_try_acquire")
    down = hybrid.acquire("b")
    assert down is not None and down.backend == "file"
    assert down.ttl == 20.0  # ttl=None: the granting manager's default
    assert hybrid.using_fallback
    for i in range(20):  # circuit open: Redis is not touched
        lease = hybrid.acquire(f"c{i}")
        assert lease is not None and lease.backend == "file"
        assert hybrid.release(lease)
    assert len(redis_calls) == 1
    (warning,) = records(caplog, logging.WARNING)
    assert "only processes on this host" in warning.getMessage()
    assert str(file.directory) in warning.getMessage()

    # Probes run in the background, never on a caller's path: callers keep using files.
    probes = count_calls(monkeypatch, redis, "_inspect")
    wait_for(lambda: len(probes) >= 2, timeout=5, what="two background probes")
    assert hybrid.acquire("d").backend == "file"  # type: ignore[union-attr]
    assert len(redis_calls) == 1
    wait_for(
        lambda: any("probe failed" in r.getMessage() for r in records(caplog, logging.DEBUG)),
        what="the failed probe's DEBUG line",
    )
    assert len(records(caplog, logging.WARNING)) == 1

    server.connected = True
    wait_for(lambda: not hybrid.using_fallback, timeout=5, what="the probe to close the circuit")
    back = hybrid.acquire("e")
    assert back is not None and back.backend == "redis"
    assert len(records(caplog, logging.INFO)) == 1
    assert [s for s, _ in transitions] == ["down", "up"]
    assert isinstance(transitions[0][1], LockBackendUnavailable)

    # Leases go back to the backend that granted them.
    assert hybrid.release(down) is True
    assert not file.is_locked("b")
    assert hybrid.release(up) is True
    assert not redis.is_locked("a")


def test_file_held_key_is_not_granted_from_redis_after_recovery(parts) -> None:
    server, redis, file = parts
    hybrid = HybridLockManager(redis, file, retry_interval=0.05)
    server.connected = False
    held = hybrid.acquire("job")
    assert held is not None and held.backend == "file"
    server.connected = True
    wait_for(lambda: not hybrid.using_fallback, timeout=5, what="recovery")
    assert hybrid.acquire("job") is None  # still held in files
    assert hybrid.is_locked("job")
    assert hybrid.inspect("job").backend == "file"  # type: ignore[union-attr]
    assert hybrid.release(held)
    lease = hybrid.acquire("job")
    assert lease is not None and lease.backend == "redis"


def test_reads_use_files_while_circuit_open(parts, monkeypatch: pytest.MonkeyPatch) -> None:
    server, redis, file = parts
    hybrid = HybridLockManager(redis, file, retry_interval=60)
    server.connected = False
    lease = hybrid.acquire("k")
    assert lease is not None
    inspects = count_calls(monkeypatch, redis, "_inspect")
    assert hybrid.is_locked("k")
    info = hybrid.inspect("k")
    assert info is not None and info.backend == "file"
    assert [i.key for i in hybrid.iter_locks()] == ["k"]
    assert inspects == []
    assert hybrid.break_lock("k") is True
    assert not hybrid.is_locked("k")


def test_fail_closed_without_file(parts) -> None:
    server, redis, _file = parts
    hybrid = HybridLockManager(redis, None, retry_interval=60)
    server.connected = False
    with pytest.raises(LockBackendUnavailable):
        hybrid.acquire("k")
    with pytest.raises(LockBackendUnavailable), hybrid.lock("k"):
        pass
    with pytest.raises(LockBackendUnavailable):  # circuit open: still fails closed
        hybrid.acquire("k", mode=LockMode.QUEUE, timeout=0.1)


def test_file_only(lock_dir: Path) -> None:
    hybrid = HybridLockManager(None, FileLockManager(lock_dir))
    assert hybrid.using_fallback
    with hybrid.lock("k") as lease:
        assert lease.backend == "file"
        assert hybrid.acquire("k") is None


def test_redis_lease_release_and_extend_during_outage(parts) -> None:
    server, redis, file = parts
    hybrid = HybridLockManager(redis, file, retry_interval=60)
    lease = hybrid.acquire("k")
    assert lease is not None and lease.backend == "redis"
    server.connected = False
    with pytest.raises(LockBackendUnavailable):  # not "lost": the renewer retries
        hybrid.extend(lease)
    assert hybrid.release(lease) is False  # cannot be confirmed; no exception
    server.connected = True
    assert redis.is_locked("k")  # it ends with its TTL


def test_queue_wait_and_lease_type_checks(parts) -> None:
    _server, redis, file = parts
    hybrid = HybridLockManager(redis, file)
    held = hybrid.acquire("q")
    assert held is not None
    assert hybrid.acquire("q", mode="queue", timeout=0.05) is None
    only_redis = HybridLockManager(redis, None)
    file_lease = file.acquire("x")
    assert file_lease is not None
    with pytest.raises(ValueError, match="does not have"):
        only_redis.release(file_lease)
    with pytest.raises(TypeError):
        hybrid.release("x")  # type: ignore[arg-type]


def test_cleaner_over_hybrid_counts_an_unreachable_store(parts) -> None:
    server, redis, file = parts
    hybrid = HybridLockManager(redis, file, retry_interval=60)
    assert hybrid.acquire("k") is not None
    report = LockCleaner(hybrid).clean(dry_run=True)
    # Entries are counted per store: the Redis lock, and its shadow lock file where the
    # same-host mark is not a byte lock.
    entries = 2 if hybrid._marks is _hostlocks.NO_MARKS else 1
    assert (report.scanned, report.removed, report.errors) == (entries, 0, 0)
    server.connected = False
    report = LockCleaner([hybrid, redis]).clean()
    assert report.errors >= 1


def test_cleaner_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        LockCleaner([object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one"):
        LockCleaner([])


@pytest.mark.redis
def test_real_redis_stopped_and_restarted(
    own_redis_server: RedisServer, lock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_lock")
    hybrid = HybridLockManager(
        RedisLockManager.from_url(own_redis_server.url),
        FileLockManager(lock_dir),
        retry_interval=0.5,
    )
    lease = hybrid.acquire("warm")
    assert lease is not None and lease.backend == "redis"
    own_redis_server.stop()

    started = time.monotonic()
    first = hybrid.acquire("k0")
    decided = time.monotonic() - started
    assert first is not None and first.backend == "file"
    assert decided <= 0.25, f"first call after the outage took {decided:.3f} s"

    started = time.monotonic()
    for i in range(200):
        lease = hybrid.acquire(f"k{i + 1}")
        assert lease is not None and lease.backend == "file"
        assert hybrid.release(lease)
    per_cycle = (time.monotonic() - started) / 200
    assert per_cycle < 0.01, f"{per_cycle * 1e3:.2f} ms per cycle: Redis is being retried"
    assert len(records(caplog, logging.WARNING)) == 1

    own_redis_server.start()
    deadline = time.monotonic() + 5
    backend = "file"
    while backend == "file" and time.monotonic() < deadline:
        lease = hybrid.acquire("after")
        assert lease is not None
        backend = lease.backend
        hybrid.release(lease)
        time.sleep(0.05)
    assert backend == "redis"
    assert len(records(caplog, logging.INFO)) == 1


@pytest.mark.redis
@pytest.mark.slow
def test_hybrid_contention_six_processes(redis_server: RedisServer, tmp_path: Path) -> None:
    result = run_contention(
        "tests.factories:hybrid_manager",
        {"url": redis_server.url_db(10), "directory": str(tmp_path / "locks")},
        workdir=tmp_path / "work",
    )
    assert result.errors == []
    assert result.overlaps == 0
    assert result.acquired == result.final_count == 900
    assert result.fences_increasing
    assert set(result.backends) == {"redis"}


def _files_keep_redis_out(
    hybrid: HybridLockManager, on_files: HybridLockManager, redis: RedisLockManager
) -> None:
    """A key held in files on this host is not granted from Redis, nor asked of Redis."""
    held = on_files.acquire("k")
    assert held is not None
    assert hybrid.acquire("k") is None
    assert not redis.is_locked("k")
    assert on_files.release(held)


def test_redis_lease_marks_the_key_on_this_host_without_a_file(marked_parts) -> None:
    """While serving from Redis the hybrid marks each lease on this host (a shared byte lock of
    .hostlocks), so a same-host process that sees Redis as down (a file-only view of the same
    folder) stays out, and vice versa; no lock file is written for it."""
    _server, redis, file = marked_parts
    hybrid = HybridLockManager(redis, file, retry_interval=60)
    on_files = HybridLockManager(None, FileLockManager(file.directory))
    lease = hybrid.acquire("k", ttl=5)
    assert lease is not None and lease.backend == "redis"
    assert sorted(p.name for p in Path(file.directory).iterdir()) == [".hostlocks"]
    assert on_files.acquire("k") is None
    assert on_files.claim("k", task_id="other", ttl=5).outcome == "held"
    renewed = hybrid.extend(lease, ttl=60)
    assert renewed is not None
    assert hybrid.release(renewed)
    assert not file.is_locked("k") and not redis.is_locked("k")
    _files_keep_redis_out(hybrid, on_files, redis)
    # A free lock file left behind does not stop the mark from standing alone.
    again = hybrid.claim("k", task_id="t1", ttl=5).lease
    assert again is not None and again.backend == "redis" and not file.is_locked("k")
    assert on_files.claim("k", task_id="t2", ttl=5).outcome == "held"
    assert hybrid.finish(again, done_ttl=60, mark=True)
    assert on_files.claim("k", task_id="t2", ttl=5).lease is not None


def test_without_byte_locks_a_redis_lease_holds_a_shadow_file_lock(
    marked_parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where byte locks of open file descriptions do not exist (not Linux), the hybrid holds a
    same-token file lock beside each Redis lease instead, with the same effect."""
    monkeypatch.setattr(_hostlocks, "_SUPPORTED", False)
    _server, redis, file = marked_parts
    hybrid = HybridLockManager(redis, file, retry_interval=60)
    on_files = HybridLockManager(None, FileLockManager(file.directory))
    lease = hybrid.acquire("k", ttl=5)
    assert lease is not None and lease.backend == "redis"
    shadow = file.inspect("k")
    assert shadow is not None and shadow.token_prefix == lease.token[:8]
    assert on_files.acquire("k") is None
    assert [i.backend for i in hybrid.iter_locks()] == ["redis"]  # the shadow is not listed
    renewed = hybrid.extend(lease, ttl=60)
    assert renewed is not None
    assert file.inspect("k").expires_at > lease.expires_at + 30  # type: ignore[union-attr]
    assert hybrid.release(renewed)
    assert not file.is_locked("k") and not redis.is_locked("k")
    _files_keep_redis_out(hybrid, on_files, redis)


def test_a_job_finished_in_files_is_found_by_a_redis_claim(parts) -> None:
    """A job that finished in files during an outage is not run again by its redelivery once
    Redis is back: the claim finds the done marker in files (and takes the shadow path)."""
    server, redis, file = parts
    hybrid = HybridLockManager(redis, file, retry_interval=60)
    lease = hybrid.claim("k", task_id="t1", ttl=30).lease
    assert lease is not None and lease.backend == "redis"
    server.connected = False
    assert hybrid.finish(lease, done_ttl=600, mark=True) is False  # Redis cannot record it
    server.connected = True
    fresh = HybridLockManager(redis, file, retry_interval=60)  # its circuit is closed
    assert fresh.claim("k", task_id="t1", ttl=30).outcome == "finished"
    assert len(list(Path(file.directory).glob("*.done"))) == 1


def test_a_job_finished_on_redis_leaves_no_done_file(parts) -> None:
    """Redis keeps a finished job's marker; the shadow writes one only when Redis could not.
    A file per finished job, kept for done_ttl, piled up in the lock directory of a busy host
    (tens of thousands of files per hour) and cost every task a create and a rename."""
    server, redis, file = parts
    hybrid = HybridLockManager(redis, file, retry_interval=60)
    for i in range(5):
        claim = hybrid.claim(f"k{i}", task_id=f"t{i}", ttl=30)
        assert claim.lease is not None and claim.lease.backend == "redis"
        assert hybrid.finish(claim.lease, done_ttl=600, mark=True)
    assert list(Path(file.directory).glob("*.done")) == []
    assert hybrid.claim("k0", task_id="t0", ttl=30).outcome == "finished"  # Redis remembers
    lease = hybrid.claim("k9", task_id="t9", ttl=30).lease
    assert lease is not None
    server.connected = False
    assert hybrid.finish(lease, done_ttl=600, mark=True) is False  # not confirmed by Redis
    assert len(list(Path(file.directory).glob("*.done"))) == 1
    assert hybrid.using_fallback
    assert hybrid.claim("k9", task_id="t9", ttl=30).outcome == "finished"  # known in files


def test_busy_redis_drops_the_shadow(parts) -> None:
    _server, redis, file = parts
    other = redis.acquire("k")  # held in Redis by another host (no shadow here)
    assert other is not None
    hybrid = HybridLockManager(redis, file, retry_interval=60)
    assert hybrid.acquire("k") is None
    assert not file.is_locked("k")


def test_unusable_folder_still_grants_from_redis(parts, monkeypatch: pytest.MonkeyPatch) -> None:
    _server, redis, file = parts
    hybrid = HybridLockManager(redis, file, retry_interval=60)

    def broken(*args: object) -> None:
        raise LockBackendUnavailable("disk full", backend="file")

    monkeypatch.setattr(file, "_try_acquire", broken)
    monkeypatch.setattr(file, "_release", broken)
    lease = hybrid.acquire("k")
    assert lease is not None and lease.backend == "redis"
    assert hybrid.release(lease) is True  # the shadow's release failure is not the caller's


def test_open_circuit_keeps_redis_leases_off_the_callers_path(
    parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the circuit is open, extending a Redis lease fails at once and releasing it is
    left to the background probe, which releases it by token once Redis answers (so the key
    is not held until its TTL after the outage)."""
    server, redis, file = parts
    hybrid = HybridLockManager(redis, file, retry_interval=0.1)
    lease = hybrid.acquire("k", ttl=30)
    assert lease is not None and lease.backend == "redis"
    server.connected = False
    assert hybrid.acquire("other") is not None  # opens the circuit
    assert hybrid.using_fallback
    extends = count_calls(monkeypatch, redis, "_extend")
    releases = count_calls(monkeypatch, redis, "_release")
    with pytest.raises(LockBackendUnavailable):
        hybrid.extend(lease)
    assert hybrid.release(lease) is False  # not confirmed now
    assert (extends, releases) == ([], [])  # Redis was not touched by either
    assert not file.is_locked("k")  # the shadow is released at once
    server.connected = True
    wait_for(lambda: not hybrid.using_fallback, timeout=5, what="recovery")
    assert releases == [1]  # by the probe, before the circuit closed
    assert not redis.is_locked("k")


def test_redis_failing_under_a_shadow_falls_back_to_it_unless_the_key_is_marked(
    marked_parts,
) -> None:
    """A key whose lock file is not free (here a lapsed file lease) takes the shadow path. If
    Redis then fails, the shadow becomes the fallback lease, with the file manager's default
    ttl when none was given, unless a Redis lease of this host marks the key."""
    server, redis, file = marked_parts
    server.connected = False
    byte = _hostlocks.offset(file_name("k"))

    def fresh() -> HybridLockManager:
        lapsed = file.acquire("k", ttl=0.05)
        assert lapsed is not None
        time.sleep(0.1)
        return HybridLockManager(redis, file, retry_interval=60)  # its circuit is closed

    hybrid = fresh()
    table = hybrid._marks
    assert isinstance(table, _hostlocks.HostLocks)
    table.hold("elsewhere", byte)
    try:
        assert hybrid.acquire("k") is None
        assert fresh().claim("k", task_id="t1", ttl=5).outcome == "held"
    finally:
        table.drop("elsewhere")
    lease = fresh().acquire("k")
    assert lease is not None and lease.backend == "file" and lease.ttl == file.default_ttl
    assert file.release(lease)
    claim = fresh().claim("k", task_id="t2")
    assert claim.lease is not None and claim.lease.backend == "file"
