"""Scenario 4: Redis misbehaves under the lock layer (own redis-server per test, loopback only).

Outages (stop / SIGKILL and restart) under hybrids in threads and processes; a lock connection
killed mid-hold; a server stall long enough that a reply is lost; LOADING / READONLY /
MASTERDOWN / CLUSTERDOWN / NOAUTH answers; memory full. Nothing may crash, no two holders of one
backend may overlap, and a lost reply must never turn our own lock into "busy".

How replies are lost: ``CLIENT PAUSE`` holds a command back, but Redis drops the command of a
paused client that hung up, so the command never runs; ``DEBUG SLEEP`` freezes the whole server
while the command is already in its socket buffer, so it *does* run after the client timed out,
and only its reply is lost. Both are exercised.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, ReadOnlyError
from redis.retry import Retry

from celery_lock import (
    FileLockManager,
    HybridLockManager,
    LockBackendUnavailable,
    LockConfigurationError,
    LockMode,
    RedisLockManager,
    get_renewer,
)
from celery_lock.backends.redis import is_connection_error
from tests._redis_server import RedisServer
from tests.reliability._fakeresp import FakeRespServer
from tests.reliability._harness import UP, counting_logs, hybrid_manager, poll_until, redis_outage

pytestmark = [pytest.mark.reliability, pytest.mark.redis]

RETRY_INTERVAL = 0.5


def evalsha_calls(admin: redis.Redis) -> int:
    """EVALSHA commands the server has executed so far."""
    return int(admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.fixture
def admin(own_redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = own_redis_server.client(socket_timeout=10)
    yield client
    client.close()


def make(kind: str, server: RedisServer, tmp_path: Path, socket_timeout: float = 1.0) -> Any:
    if kind == "redis":
        return RedisLockManager.from_url(server.url, socket_timeout=socket_timeout)
    return hybrid_manager(
        server.url, str(tmp_path / "locks"), RETRY_INTERVAL, socket_timeout=socket_timeout
    )


def stall_server(server: RedisServer, admin: redis.Redis, seconds: float) -> threading.Thread:
    """Freeze the whole server for ``seconds`` (DEBUG SLEEP from a thread); returns once the
    server is asleep (a probe PING with a 20 ms timeout goes unanswered)."""
    thread = threading.Thread(
        target=admin.execute_command, args=("DEBUG", "SLEEP", str(seconds)), daemon=True
    )
    thread.start()
    probe = server.client(socket_timeout=0.02)
    try:

        def asleep() -> bool:
            try:
                probe.ping()
            except (redis.TimeoutError, redis.ConnectionError):  # the handshake may time out
                return True
            return False

        assert poll_until(asleep, timeout=seconds / 4, interval=0.002)[0], "server never slept"
    finally:
        probe.close()
    return thread


# ------------------------------------------------------------------------------- outages


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_hybrid_rides_out_redis_outages(
    own_redis_server: RedisServer, tmp_path: Path, how: str
) -> None:
    """Two outages (graceful stop, or SIGKILL) while 3 threads of this process and 2 other
    processes (one hybrid each) keep taking 3 keys: no acquire/release ever raises, every
    hybrid logs exactly one WARNING and one INFO per outage, files serve within a second of the
    outage and Redis again within retry_interval + 1 s of the restart, and no two holders of
    the same backend are ever in a critical section together (a lost update is only possible
    where a cross-backend overlap was seen: see the report for those)."""
    facts = redis_outage(
        own_redis_server,
        tmp_path / "work",
        threads=3,
        processes=2,
        outages=2,
        retry_interval=RETRY_INTERVAL,
        kill=how == "kill",
    )
    stats = facts.stats
    assert stats.errors == []
    # Exactly one WARNING and one INFO per outage, in the single-threaded hybrids of the other
    # processes and in the 3-thread hybrid of this one (an answer in flight across the
    # transition must not flap the circuit).
    logged = (facts.warnings, facts.infos)
    assert facts.warnings["children"] == facts.infos["children"] == 2 * 2, logged
    assert facts.warnings["main"] == facts.infos["main"] == 2, logged
    assert len(facts.fallback_after) == 2 and max(facts.fallback_after) < 1.0
    assert len(facts.recoveries) == 2 and max(facts.recoveries) < RETRY_INTERVAL + 1.0
    assert stats.backends["file"] > 0 and stats.backends["redis"] > 0
    same_backend = [o for o in stats.overlaps if o[0] == o[1]]
    assert same_backend == []
    assert facts.lost <= len(stats.overlaps)


def test_file_held_key_is_not_granted_from_redis_by_a_recovered_process(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two processes' hybrids on one host (two instances here): one still on files holds the
    key; the other, whose circuit is closed again, must not grant the key from Redis."""
    lagging = hybrid_manager(own_redis_server.url, str(tmp_path / "locks"), 30.0)
    recovered = hybrid_manager(own_redis_server.url, str(tmp_path / "locks"), 30.0)
    lagging._went_down(LockBackendUnavailable("simulated outage", backend="redis"))
    held = lagging.acquire("k", ttl=30)
    assert held is not None and held.backend == "file"
    assert recovered.acquire("k", ttl=30) is None
    assert lagging.release(held)
    granted = recovered.acquire("k", ttl=30)
    assert granted is not None and granted.backend == "redis"


def test_file_grant_between_check_and_redis_grant_is_not_a_double_grant(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    """The race behind the ('file', 'redis') overlaps of the outage run, made deterministic: a
    lagging process (circuit still open) tries the file lock right before the recovered one's
    Redis grant; exactly one of them may hold the key (the recovered one marks the key on this
    host before it asks Redis: a byte lock of .hostlocks, or a same-token shadow file lock where
    there are none; the lagging one's grant from files checks it after it wrote)."""
    lagging = hybrid_manager(own_redis_server.url, str(tmp_path / "locks"), 30.0)
    recovered = hybrid_manager(own_redis_server.url, str(tmp_path / "locks"), 30.0)
    lagging._went_down(LockBackendUnavailable("simulated outage", backend="redis"))
    assert recovered.redis is not None
    redis_try = recovered.redis._try_acquire
    taken: list[Any] = []

    def interleaved(*args: Any) -> Any:
        taken.append(lagging.acquire("k", ttl=30))
        return redis_try(*args)

    recovered.redis._try_acquire = interleaved  # type: ignore[method-assign]
    granted = recovered.acquire("k", ttl=30)
    assert len(taken) == 1
    holders = [lease for lease in (taken[0], granted) if lease is not None]
    assert len(holders) == 1, "the key is held from files and from Redis on one host at once"
    assert holders[0].backend == "redis"
    # And the other way round: while the Redis lease lives, the lagging process stays out.
    assert lagging.acquire("k", ttl=30) is None
    assert recovered.release(holders[0])
    after = lagging.acquire("k", ttl=30)
    assert after is not None and after.backend == "file"


def test_success_in_flight_before_an_outage_does_not_close_the_circuit(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    """Thread A's Redis release succeeds just before Redis stops, but its reply is processed
    after thread B found Redis down and opened the circuit: the outage must still be one
    WARNING and no INFO, and the next call must stay on files without touching Redis."""
    hybrid = hybrid_manager(own_redis_server.url, str(tmp_path / "locks"), 30.0)
    lease = hybrid.acquire("a", ttl=30)
    assert lease is not None and lease.backend == "redis"
    assert hybrid.redis is not None
    real_release = hybrid.redis._release
    done, gate = threading.Event(), threading.Event()

    def delayed_release(held: Any) -> bool:
        result = real_release(held)  # Redis answered...
        done.set()
        gate.wait(10)  # ...but this thread gets to act on it only later
        return result

    hybrid.redis._release = delayed_release  # type: ignore[method-assign]
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(hybrid.release(lease)), daemon=True)
    thread.start()
    assert done.wait(10)
    own_redis_server.stop()
    with counting_logs() as logs:
        down = hybrid.acquire("b", ttl=30)
        gate.set()
        thread.join(timeout=10)
        again = hybrid.acquire("c", ttl=30)
    assert results == [True]
    assert down is not None and down.backend == "file"
    assert again is not None and again.backend == "file"
    assert logs.count("celery_lock.hybrid", "INFO", UP) == 0, "recovery logged while Redis is down"
    assert logs.count("celery_lock.hybrid", "WARNING") == 1


# ------------------------------------------------------------------------------- CLIENT KILL


@pytest.mark.parametrize("kind", ["redis", "hybrid"])
def test_client_kill_mid_hold(
    own_redis_server: RedisServer, admin: redis.Redis, tmp_path: Path, kind: str
) -> None:
    """The lock's connections are killed (CLIENT KILL) while it is held and renewed: the renewer
    keeps the lease (no loss reported), release reconnects and succeeds, and a hybrid does not
    mistake one dropped connection for an outage (no WARNING, nothing from files)."""
    with counting_logs() as logs:
        manager = make(kind, own_redis_server, tmp_path)
        lease = manager.acquire("k", ttl=3.0)
        assert lease is not None and lease.backend == "redis"
        handle = get_renewer().register(manager, lease, interval=0.2)
        try:
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
            first = handle.lease.expires_at
            renewed, _ = poll_until(lambda: handle.lease.expires_at > first, timeout=3)
            assert renewed and not handle.lost
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        finally:
            handle.cancel()
        assert manager.release(handle.lease) is True
        assert not manager.is_locked("k")
        assert logs.count("celery_lock.hybrid", "WARNING") == 0
        assert logs.count("celery_lock.renewer", "ERROR") == 0


@pytest.mark.parametrize("kind", ["redis", "hybrid"])
def test_queue_waiter_survives_its_pubsub_connection_being_killed(
    own_redis_server: RedisServer, admin: redis.Redis, tmp_path: Path, kind: str
) -> None:
    """A QUEUE waiter subscribed for the release signal has every connection killed; it falls
    back to polling and still gets the lock within a second of the holder's release."""
    holder = make(kind, own_redis_server, tmp_path)
    waiter = make(kind, own_redis_server, tmp_path)
    lease = holder.acquire("q", ttl=30)
    assert lease is not None
    got: list[Any] = []
    thread = threading.Thread(
        target=lambda: got.append(waiter.acquire("q", ttl=30, mode=LockMode.QUEUE, timeout=10)),
        daemon=True,
    )
    thread.start()
    subscribed, _ = poll_until(
        lambda: any(c.get("cmd") == "subscribe" for c in admin.client_list()), timeout=5
    )
    assert subscribed
    assert admin.client_kill_filter(_type="pubsub", skipme=True) >= 1
    admin.client_kill_filter(_type="normal", skipme=True)
    released_at = time.monotonic()
    assert holder.release(lease)
    thread.join(timeout=10)
    assert got and got[0] is not None and got[0].backend == "redis"
    assert time.monotonic() - released_at < 1.0


# ------------------------------------------------------------------------------- lost replies


@pytest.mark.parametrize("kind", ["redis", "hybrid"])
def test_lost_acquire_reply_is_retried_as_ours(
    own_redis_server: RedisServer, admin: redis.Redis, tmp_path: Path, kind: str
) -> None:
    """The server freezes (DEBUG SLEEP 0.6 s) right after receiving an acquire whose client
    times out after 0.4 s and re-sends it (a client of the user's that retries timeouts, as
    redis-py's ``Retry`` does by default; the library's own clients do not: see the next
    test): the script runs later, its reply is lost, and the retry (same token) must report
    the lock as ours (a lease), never as busy; two scripts ran (the proof the reply really was
    lost) and the stored value carries the lease's token."""
    redis_part = RedisLockManager(
        own_redis_server.client(socket_timeout=0.4, retry=Retry(NoBackoff(), 1))
    )
    manager: Any = redis_part
    if kind == "hybrid":
        manager = HybridLockManager(
            redis_part, FileLockManager(tmp_path / "locks"), retry_interval=RETRY_INTERVAL
        )
    warm = manager.acquire("warm")  # scripts loaded, connection open
    assert warm is not None
    before = evalsha_calls(admin)
    sleeper = stall_server(own_redis_server, admin, 0.6)
    started = time.monotonic()
    lease = manager.acquire("k", ttl=30)
    elapsed = time.monotonic() - started
    sleeper.join(timeout=5)
    assert lease is not None and lease.backend == "redis"
    assert elapsed >= 0.4  # the first attempt did time out
    assert evalsha_calls(admin) - before >= 2
    info = manager.inspect("k")
    assert info is not None and info.token_prefix == lease.token[:8]
    assert info.fence == lease.fence
    assert manager.release(lease)


@pytest.mark.parametrize("kind", ["redis", "hybrid"])
def test_timed_out_acquire_costs_one_timeout_and_blocks_nothing(
    own_redis_server: RedisServer, admin: redis.Redis, tmp_path: Path, kind: str
) -> None:
    """The same stall with the library's own client (timeouts are not re-sent, issue 14: a
    hung store costs one timeout): the acquire gives up after one socket timeout (plain:
    LockBackendUnavailable; hybrid: a file lease), and the grant the server made once it woke
    up is released by the next call that gets through, so the key is not blocked for its
    ttl."""
    manager = make(kind, own_redis_server, tmp_path, socket_timeout=0.4)
    warm = manager.acquire("warm")
    assert warm is not None
    before = evalsha_calls(admin)
    sleeper = stall_server(own_redis_server, admin, 0.6)
    started = time.monotonic()
    if kind == "redis":
        with pytest.raises(LockBackendUnavailable):
            manager.acquire("k", ttl=30)
    else:
        lease = manager.acquire("k", ttl=30)
        assert lease is not None and lease.backend == "file"
    elapsed = time.monotonic() - started
    sleeper.join(timeout=5)
    assert 0.4 <= elapsed < 0.8, f"{elapsed:.2f} s: more than one socket timeout"
    assert poll_until(lambda: evalsha_calls(admin) > before, timeout=5)[0], "no late grant"
    redis_part = manager if kind == "redis" else manager.redis
    assert redis_part.is_locked("warm")  # a call that gets through releases the orphan
    assert not redis_part.is_locked("k"), "the orphaned grant was not released"
    if kind == "hybrid":
        assert manager.release(lease)


def test_stall_with_client_pause_never_reports_busy(
    own_redis_server: RedisServer, admin: redis.Redis
) -> None:
    """CLIENT PAUSE 1 s against a 0.3 s socket timeout: acquire either returns a lease that the
    store confirms, or raises LockBackendUnavailable and then nothing is held (paused commands
    of a client that hung up never run); it never returns None for a free key."""
    manager = RedisLockManager.from_url(own_redis_server.url, socket_timeout=0.3)
    assert manager.acquire("warm") is not None
    admin.execute_command("CLIENT", "PAUSE", "1000", "ALL")
    try:
        lease = manager.acquire("p", ttl=30)
    except LockBackendUnavailable as exc:
        lease, raised = None, exc
    else:
        raised = None
    unpaused, _ = poll_until(lambda: _answers(admin), timeout=3)
    assert unpaused
    if raised is not None:
        assert is_connection_error(raised)
        assert not manager.is_locked("p")
    else:
        assert lease is not None
        info = manager.inspect("p")
        assert info is not None and info.token_prefix == lease.token[:8]


def _answers(admin: redis.Redis) -> bool:
    try:
        return bool(admin.ping())
    except redis.RedisError:
        return False


def test_acquire_that_raised_leaves_no_lock_behind(
    own_redis_server: RedisServer, admin: redis.Redis
) -> None:
    """DEBUG SLEEP 1.6 s against a 0.3 s socket timeout: every attempt of the acquire times out,
    so the caller gets LockBackendUnavailable and no lease; once the server answers again the
    key must be free (within 2 s), not held for the whole TTL by a token nobody has."""
    manager = RedisLockManager.from_url(own_redis_server.url, socket_timeout=0.3)
    assert manager.acquire("warm") is not None
    sleeper = stall_server(own_redis_server, admin, 1.6)
    with pytest.raises(LockBackendUnavailable):
        manager.acquire("orphan", ttl=30)
    sleeper.join(timeout=5)
    freed, _ = poll_until(lambda: not manager.is_locked("orphan"), timeout=2.0, interval=0.05)
    assert freed, "the key is held by an acquire that reported failure"


def test_lost_release_reply_is_safe(own_redis_server: RedisServer, admin: redis.Redis) -> None:
    """The server freezes right after receiving a release (reply lost; the library's client
    does not re-send after a timeout): release raises LockBackendUnavailable (the outcome is
    unknown), the lock is gone afterwards, and calling release again on the stale lease once a
    successor holds the key leaves the successor alone."""
    manager = RedisLockManager.from_url(own_redis_server.url, socket_timeout=0.4)
    warm = manager.acquire("warm")  # both scripts loaded: no NOSCRIPT round trip below
    assert warm is not None and manager.release(warm)
    lease = manager.acquire("r", ttl=30)
    assert lease is not None
    sleeper = stall_server(own_redis_server, admin, 0.6)
    with pytest.raises(LockBackendUnavailable):
        manager.release(lease)
    sleeper.join(timeout=5)
    assert not manager.is_locked("r")
    successor = manager.acquire("r", ttl=30)
    assert successor is not None
    assert manager.release(lease) is False
    info = manager.inspect("r")
    assert info is not None and info.token_prefix == successor.token[:8]


def test_lost_release_reply_reports_true(own_redis_server: RedisServer, admin: redis.Redis) -> None:
    """Same stall as above, with a client that re-sends after a timeout (redis-py's default
    ``Retry`` errors): the lease was valid and its first attempt deleted it, so release must
    report True (False means "lost while held" to callers: lock() raises LockLost)."""
    manager = RedisLockManager(
        own_redis_server.client(socket_timeout=0.4, retry=Retry(NoBackoff(), 1))
    )
    warm = manager.acquire("warm")  # both scripts loaded: no NOSCRIPT round trip below
    assert warm is not None and manager.release(warm)
    lease = manager.acquire("r", ttl=30)
    assert lease is not None
    before = evalsha_calls(admin)
    sleeper = stall_server(own_redis_server, admin, 0.6)
    result = manager.release(lease)
    sleeper.join(timeout=5)
    assert evalsha_calls(admin) - before >= 2  # the reply really was lost and retried
    assert result is True


# ------------------------------------------------------------------------------- error replies


def _patched(error: type[Exception]) -> Callable[[RedisLockManager], None]:
    def apply(manager: RedisLockManager) -> None:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise error(f"{error.__name__} injected for {args[0] if args else '?'}")

        manager.client.execute_command = refuse  # type: ignore[method-assign, union-attr]

    return apply


UNAVAILABLE = {
    "loading-reply": "LOADING Redis is loading the dataset in memory",
    "readonly-reply": "READONLY You can't write against a read only replica.",
    "masterdown-reply": "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is "
    "set to 'no'.",
    "noauth-reply": "NOAUTH Authentication required.",
}
#: Replies only a Redis Cluster node gives: through a plain (non-cluster) client they mean the
#: URL names one node of a Cluster, a configuration error (issue 14), never an outage.
CLUSTER_NODE = {
    "moved-reply": "MOVED 3999 127.0.0.1:7001",
    "ask-reply": "ASK 3999 127.0.0.1:7001",
    "clusterdown-reply": "CLUSTERDOWN The cluster is down",
}
PATCHED = {"loading-raised": BusyLoadingError, "readonly-raised": ReadOnlyError}


@pytest.fixture(params=[*UNAVAILABLE, *PATCHED, "readonly-replica"])
def unavailable_url(
    request: pytest.FixtureRequest, own_redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[str, Callable[[RedisLockManager], None] | None]]:
    """A URL whose server refuses lock commands in one connection-class way."""
    name = request.param
    if name in UNAVAILABLE:
        with FakeRespServer(UNAVAILABLE[name]) as fake:
            yield fake.url, None
    elif name in PATCHED:
        yield own_redis_server.url, _patched(PATCHED[name])
    else:
        replica = RedisServer(
            tmp_path / "replica", "--replicaof", "127.0.0.1", str(own_redis_server.port)
        )
        replica.start()
        try:
            yield replica.url, None
        finally:
            replica.kill()


@pytest.mark.parametrize("name", CLUSTER_NODE)
def test_cluster_node_replies_are_a_configuration_error(name: str, tmp_path: Path) -> None:
    """MOVED / ASK / CLUSTERDOWN to a plain client: LockConfigurationError naming the fix,
    from the plain manager and through the hybrid, which neither falls back nor opens its
    circuit nor leaves its same-host mark (byte lock or shadow file lock) behind."""
    with FakeRespServer(CLUSTER_NODE[name]) as fake:
        plain = RedisLockManager.from_url(fake.url, socket_timeout=0.5)
        with pytest.raises(LockConfigurationError) as caught:
            plain.acquire("k", ttl=30)
        assert "this is a Redis Cluster node; use redis+cluster://127.0.0.1:" in str(caught.value)
        assert isinstance(caught.value, ValueError)
        files = FileLockManager(tmp_path / "locks")
        hybrid = HybridLockManager(
            RedisLockManager.from_url(fake.url, socket_timeout=0.5), files, retry_interval=30.0
        )
        with counting_logs() as logs:
            for _ in range(2):
                with pytest.raises(LockConfigurationError):
                    hybrid.acquire("k", ttl=30)
        assert not hybrid.using_fallback
        assert logs.count("celery_lock.hybrid", "WARNING") == 0
        assert not files.is_locked("k")
        on_files = HybridLockManager(None, FileLockManager(tmp_path / "locks"))
        assert on_files.acquire("k", ttl=30) is not None  # no mark keeps it out


def test_unavailable_replies(
    unavailable_url: tuple[str, Callable[[RedisLockManager], None] | None], tmp_path: Path
) -> None:
    """A server answering LOADING / READONLY / MASTERDOWN / CLUSTERDOWN / NOAUTH (a fake RESP
    server, an injected redis-py exception, or a real read-only replica): a plain
    RedisLockManager raises LockBackendUnavailable caused by the Redis error and judged a
    connection-class failure; a hybrid serves the lock from files, logs one WARNING and leaves
    Redis alone while its circuit is open."""
    url, patch = unavailable_url
    plain = RedisLockManager.from_url(url, socket_timeout=0.5)
    if patch is not None:
        patch(plain)
    with pytest.raises(LockBackendUnavailable) as caught:
        plain.acquire("k", ttl=30)
    assert caught.value.__cause__ is not None
    assert is_connection_error(caught.value)

    redis_part = RedisLockManager.from_url(url, socket_timeout=0.5)
    if patch is not None:
        patch(redis_part)
    hybrid = HybridLockManager(redis_part, FileLockManager(tmp_path / "locks"), retry_interval=30.0)
    with counting_logs() as logs:
        first = hybrid.acquire("k", ttl=30)
        calls: list[int] = []
        original = redis_part._try_acquire
        redis_part._try_acquire = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
        second = hybrid.acquire("k2", ttl=30)
    assert first is not None and first.backend == "file"
    assert second is not None and second.backend == "file"
    assert calls == []
    assert logs.count("celery_lock.hybrid", "WARNING") == 1
    assert hybrid.release(first) and hybrid.release(second)


# ------------------------------------------------------------------------------- memory full


def _fill_and_cap(admin: redis.Redis) -> None:
    for i in range(24):
        admin.set(f"ballast:{i}", b"x" * 100_000)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1mb")


def test_memory_full(own_redis_server: RedisServer, admin: redis.Redis, tmp_path: Path) -> None:
    """Redis at maxmemory with noeviction: a plain manager's acquire raises
    LockBackendUnavailable (an error, not an outage); a lease taken before keeps working
    (extend, release); the cleaner reports instead of crashing; a hybrid serves from files with
    one WARNING and returns to Redis once memory is available again."""
    plain = RedisLockManager.from_url(own_redis_server.url)
    held = plain.acquire("before", ttl=30)
    assert held is not None
    hybrid = hybrid_manager(own_redis_server.url, str(tmp_path / "locks"), RETRY_INTERVAL)
    _fill_and_cap(admin)

    with pytest.raises(LockBackendUnavailable) as caught:
        plain.acquire("k", ttl=30)
    assert not is_connection_error(caught.value)
    assert "maxmemory" in str(caught.value)
    extended = plain.extend(held)
    assert extended is not None
    with counting_logs() as logs:
        fallback = hybrid.acquire("k", ttl=30)
        assert fallback is not None and fallback.backend == "file"
        assert hybrid.release(fallback)
    assert logs.count("celery_lock.hybrid", "WARNING") == 1
    assert plain.release(extended)

    admin.config_set("maxmemory", "0")

    def on_redis() -> bool:
        lease = hybrid.acquire("k", ttl=30)
        if lease is None:
            return False
        hybrid.release(lease)
        return lease.backend == "redis"

    back, waited = poll_until(on_redis, timeout=RETRY_INTERVAL + 2, interval=0.05)
    assert back, f"still on files {waited:.1f} s after memory was freed"


def test_fence_counter_poisoned(
    own_redis_server: RedisServer, admin: redis.Redis, tmp_path: Path
) -> None:
    """Someone wrote a non-number into a key's fence counter (or a wrong-type value into the
    lock key): the plain manager raises LockBackendUnavailable (never a raw redis error), the
    hybrid serves that key from files, other keys are unaffected once Redis is probed again."""
    plain = RedisLockManager.from_url(own_redis_server.url)
    admin.set("celery_lock:{poisoned}:fence", "not-a-number")
    admin.rpush("celery_lock:{wrongtype}", "x")
    for key in ("poisoned", "wrongtype"):
        with pytest.raises(LockBackendUnavailable) as caught:
            plain.acquire(key, ttl=30)
        assert isinstance(caught.value.__cause__, redis.RedisError)
    hybrid = hybrid_manager(
        own_redis_server.url, str(tmp_path / "locks"), RETRY_INTERVAL, prefix="celery_lock"
    )
    lease = hybrid.acquire("poisoned", ttl=30)
    assert lease is not None and lease.backend == "file"
    assert hybrid.release(lease)
    fine = plain.acquire("fine", ttl=30)
    assert fine is not None and plain.release(fine)
