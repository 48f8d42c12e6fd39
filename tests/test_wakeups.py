"""Release wake-ups on a real redis-server: one pub/sub connection per manager and process for
every waiting thread (issue 14, item 5), no release missed across reconnects and forks, and
the polling fallback when an ACL refuses the channels."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_lock.backends._wakeups import WakeHub
from celery_lock.backends.redis import RedisLockManager
from tests._acl import documented_acl
from tests._redis_server import RedisServer
from tests._workers import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

LOGGER = "celery_lock.redis"


@pytest.fixture
def admin(own_redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = own_redis_server.client(decode_responses=True)
    yield client
    client.close()


class WaiterThreads:
    """Threads that wait for locks in a test. An exception in one is recorded in
    :attr:`errors` (the test asserts it is empty), not raised in the thread; :meth:`stop`
    ends them all while the test's redis-server still runs, so a failed test leaves no thread
    behind to fail against a killed server."""

    def __init__(self, admin: redis.Redis) -> None:
        self._admin = admin
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, target: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - the test asserts errors == []
                self.errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds in all for every thread; True when all ended."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def stop(self, timeout: float = 30.0) -> None:
        """Free every lock (FLUSHDB) until each waiter got one and ended. A no-op when the
        test already joined them."""
        deadline = time.monotonic() + timeout
        while not self.join(0.05):
            if time.monotonic() > deadline:
                alive = sum(t.is_alive() for t in self.threads)
                raise AssertionError(f"{alive} waiter thread(s) still waiting after {timeout} s")
            self._admin.flushdb()


@pytest.fixture
def waiters(admin: redis.Redis) -> Iterator[WaiterThreads]:
    """Lock-waiting threads of one test, ended before its redis-server is killed."""
    threads = WaiterThreads(admin)
    yield threads
    threads.stop()


def hub_of(manager: RedisLockManager) -> WakeHub:
    hub = manager._wakeups.hub(manager.client)
    assert hub is not None
    return hub


def waiting_connections(admin: redis.Redis, name: str = "celery_lock") -> list[dict[str, Any]]:
    """Connections named ``name`` that hold a subscription (CLIENT LIST: sub / psub > 0)."""
    return [
        c
        for c in admin.client_list()
        if c.get("name") == name and (int(c.get("sub", 0)) or int(c.get("psub", 0)))
    ]


def channel_subscribers(admin: redis.Redis, channel: str) -> int:
    return int(admin.pubsub_numsub(channel)[0][1])


def test_a_thousand_queue_waiters_share_one_connection_and_are_all_served(
    own_redis_server: RedisServer,
    admin: redis.Redis,
    waiters: WaiterThreads,
    record_property: Any,
) -> None:
    """1,000 threads wait in QUEUE mode on one key of one manager; each holds the lock briefly
    in turn once the first holder releases. All are served, never two at once, fences
    increase in grant order, and waiting costs at most 2 connections (1 in practice)."""
    n = 1000
    manager = RedisLockManager.from_url(own_redis_server.url)
    holder = manager.acquire("hot", ttl=120)
    assert holder is not None
    mutex = threading.Lock()
    state = {"active": 0, "max_active": 0}
    granted: list[int] = []
    errors: list[BaseException | str] = []

    def wait_and_hold() -> None:
        try:
            lease = manager.acquire("hot", ttl=120, mode="queue", timeout=100)
            if lease is None:
                errors.append("gave up waiting")
                return
            with mutex:
                state["active"] += 1
                state["max_active"] = max(state["max_active"], state["active"])
                granted.append(lease.fence)
            time.sleep(0.001)  # the brief hold itself
            with mutex:
                state["active"] -= 1
            if not manager.release(lease):
                errors.append(f"release of fence {lease.fence} said False")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    previous = threading.stack_size(256 * 1024)
    try:
        threads = [waiters.start(wait_and_hold) for _ in range(n)]
    finally:
        threading.stack_size(previous)
    hub = hub_of(manager)
    wait_for(lambda: hub.waiters == n, timeout=60, what=f"{n} registered waiters")
    wait_for(lambda: channel_subscribers(admin, "celery_lock:{hot}:wake"), timeout=10)
    while_waiting = waiting_connections(admin)
    assert channel_subscribers(admin, "celery_lock:{hot}:wake") == 1

    started = time.monotonic()
    assert manager.release(holder)
    deadline = started + 60
    for thread in threads:
        thread.join(timeout=max(0.1, deadline - time.monotonic()))
    elapsed = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), f"waiters still waiting after {elapsed:.1f} s"
    assert errors == []
    assert len(granted) == n
    assert state["max_active"] == 1
    assert granted == sorted(granted) and len(set(granted)) == n
    assert 1 <= len(while_waiting) <= 2, while_waiting
    assert hub.connections == 1  # no reconnect needed
    record_property("thousand_waiters_seconds", round(elapsed, 2))
    print(
        f"{n} QUEUE waiters served in {elapsed:.2f} s ({elapsed / n * 1000:.1f} ms per hand-off), "
        f"{len(while_waiting)} waiting connection(s)"
    )
    wait_for(lambda: channel_subscribers(admin, "celery_lock:{hot}:wake") == 0, timeout=5)


def test_waiters_of_many_keys_share_the_connection_and_channels_come_and_go(
    own_redis_server: RedisServer, admin: redis.Redis, waiters: WaiterThreads
) -> None:
    manager = RedisLockManager.from_url(own_redis_server.url)
    keys = [f"k{i}" for i in range(5)]
    holders = {k: manager.acquire(k, ttl=60) for k in keys}
    got: dict[str, Any] = {}
    for key in keys:
        for _ in range(3):
            waiters.start(
                lambda k=key: got.update({k: manager.acquire(k, mode="queue", timeout=20)})
            )
    hub = hub_of(manager)
    wait_for(lambda: hub.waiters == 15, timeout=10, what="15 waiters")
    # A waiter counts from the moment it registers, before the server confirmed its channel.
    wait_for(
        lambda: all(channel_subscribers(admin, f"celery_lock:{{{k}}}:wake") for k in keys),
        timeout=10,
        what="the 5 channels to be subscribed",
    )
    assert hub.channels == 5
    assert len(waiting_connections(admin)) == 1
    for key in keys:
        assert channel_subscribers(admin, f"celery_lock:{{{key}}}:wake") == 1
    # The last waiter of a channel leaving unsubscribes it; the others stay.
    first = keys[0]
    assert manager.release(holders[first])  # type: ignore[arg-type]
    # Three waiters per key, served in line. The lease to release is read before releasing it:
    # once released, the next waiter may be served (and replace it in ``got``) at any moment.
    served = None
    for _ in range(3):
        wait_for(lambda s=served: got.get(first) is not s, timeout=10, what="a waiter of k0")
        served = got[first]
        assert served is not None, "a waiter of k0 gave up"
        assert manager.release(served)
    wait_for(
        lambda: channel_subscribers(admin, f"celery_lock:{{{first}}}:wake") == 0,
        timeout=10,
        what="k0 to be unsubscribed",
    )
    assert all(channel_subscribers(admin, f"celery_lock:{{{k}}}:wake") == 1 for k in keys[1:])
    for key in keys[1:]:
        manager.release(holders[key])  # type: ignore[arg-type]
        for _ in range(3):
            wait_for(lambda k=key: got.get(k) is not None, timeout=10)
            lease, got[key] = got[key], None
            assert manager.release(lease)
    assert waiters.join(timeout=10)
    assert waiters.errors == []
    assert hub.connections == 1


def test_no_release_is_missed_when_the_wakeup_connection_is_killed(
    own_redis_server: RedisServer, admin: redis.Redis
) -> None:
    """The listener's connection is killed and the release is published while nobody listens:
    the waiter is still woken (by the subscription being confirmed again), not by a poll."""
    manager = RedisLockManager.from_url(own_redis_server.url)
    channel = "celery_lock:{k}:wake"
    for _ in range(3):
        waiter = manager._waiter("k")
        try:
            assert channel_subscribers(admin, channel) == 1
            # Killed and published in one MULTI/EXEC: the listener cannot reconnect (50 ms
            # back-off, less than a descheduled test thread) between the two.
            gap = admin.pipeline(transaction=True)
            gap.client_kill_filter(_type="pubsub")
            gap.publish(channel, "1")
            killed, receivers = gap.execute()
            assert killed >= 1
            assert receivers == 0  # into the gap: published to nobody
            started = time.monotonic()
            assert waiter.wait(5.0) is True  # woken, not timed out
            assert time.monotonic() - started < 2.0
        finally:
            waiter.close()


def test_forked_child_gets_its_own_listener(own_redis_server: RedisServer) -> None:
    manager = RedisLockManager.from_url(own_redis_server.url)
    parent_waiter = manager._waiter("k")
    parent_hub = hub_of(manager)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        ok = b"0"
        try:
            hub = manager._wakeups.hub(manager.client)
            waiter = manager._waiter("k")  # subscribes through a new thread and socket
            manager.client.publish("celery_lock:{k}:wake", "1")
            if hub is not parent_hub and waiter.wait(5.0):
                ok = b"1"
            waiter.close()
        finally:
            os.write(write, ok)
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1", "the child's waiter was not woken through its own hub"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    # The parent's listener is untouched and still delivers.
    manager.client.publish("celery_lock:{k}:wake", "1")
    assert parent_waiter.wait(5.0) is True
    parent_waiter.close()


# ---------------------------------------------------------------------------------- ACL


def test_the_documented_minimal_acl_is_enough(
    own_redis_server: RedisServer,
    admin: redis.Redis,
    waiters: WaiterThreads,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The exact line of docs/redis.md: acquire, wait (pub/sub), extend, inspect, list,
    release, clean and WAIT all work for that user."""
    acl = documented_acl()
    assert acl[0] == "locks"
    admin.execute_command("ACL", "SETUSER", *acl)
    url = f"redis://locks:lockpw@127.0.0.1:{own_redis_server.port}/0"
    manager = RedisLockManager.from_url(url, wait_replicas=0)
    holder = manager.acquire("job", ttl=30)
    assert holder is not None
    got: list[Any] = []
    waiters.start(lambda: got.append(manager.acquire("job", mode="queue")))
    hub = hub_of(manager)
    wait_for(lambda: hub.waiters == 1, timeout=10)
    assert manager.release(holder)
    assert waiters.join(timeout=10)
    assert waiters.errors == []
    assert got and got[0] is not None
    assert manager.inspect("job") is not None
    assert [i.key for i in manager.iter_locks()] == ["job"]
    assert manager.extend(got[0]) is not None
    assert manager.release(got[0])
    assert manager.clean().errors == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # pub/sub allowed
    # WAIT is in the line too (no replicas here: 0 acknowledge, so the grant is given back).
    durable = RedisLockManager.from_url(url, wait_replicas=1, wait_timeout=0.1)
    with pytest.raises(Exception, match="0 of 1 replicas"):
        durable.acquire("job", ttl=30)
    assert not manager.is_locked("job")


def test_subscribe_refused_by_acl_means_polling_and_one_warning(
    own_redis_server: RedisServer,
    admin: redis.Redis,
    waiters: WaiterThreads,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user without channel rights (Redis 7 gives a new user none): its waiters are told no
    at SUBSCRIBE, log one WARNING naming '&celery_lock:*', and still get the lock by polling
    when another client (with the right) releases it."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    admin.execute_command("ACL", "SETUSER", "nochan", "on", ">pw", "resetchannels", "~*", "+@all")
    restricted = RedisLockManager.from_url(f"redis://nochan:pw@127.0.0.1:{own_redis_server.port}/0")
    full = RedisLockManager.from_url(own_redis_server.url)
    for round_ in range(2):
        holder = full.acquire("job", ttl=30)
        assert holder is not None
        got: list[Any] = []
        for _ in range(3):
            waiters.start(lambda: got.append(restricted.acquire("job", mode="queue", timeout=10)))
        if round_ == 0:
            wait_for(
                lambda: any("&celery_lock:*" in r.getMessage() for r in caplog.records),
                timeout=10,
                what="the WARNING",
            )
        assert full.release(holder)
        for _ in range(3):
            wait_for(lambda: any(g is not None for g in got), timeout=10, what="a poller")
            lease = next(g for g in got if g is not None)
            got.remove(lease)
            # Released through the manager with channel rights: this test is about waiting (a
            # release's own refused PUBLISH is reported by the release script).
            assert full.release(lease)
        assert waiters.join(timeout=10)
        assert waiters.errors == []
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "SUBSCRIBE" in warnings[0].getMessage()
    assert "ACL SETUSER <user> &celery_lock:*" in warnings[0].getMessage()
    assert waiting_connections(admin) == []


def test_publish_denied_switches_waiters_to_polling_with_one_warning(
    own_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    manager = RedisLockManager.from_url(own_redis_server.url, prefix="jobs")
    waiter = manager._waiter("k")
    hub = hub_of(manager)
    assert hub.waiters == 1
    manager._publish_denied("NOPERM this user has no permissions to access one of the channels")
    manager._publish_denied("NOPERM again")
    (warning,) = [r for r in caplog.records if r.name == LOGGER]
    assert "PUBLISH" in warning.getMessage() and "'&jobs:*'" in warning.getMessage()
    started = time.monotonic()
    assert waiter.wait(0.05) is False  # polls (sleeps) now, whatever arrives
    assert waiter.wait(0.05) is False
    assert time.monotonic() - started >= 0.09
    waiter.close()
    assert type(manager._waiter("k")).__name__ == "Waiter"  # new waiters poll at once
