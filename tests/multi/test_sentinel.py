"""Locks on a real Sentinel group from kombu's ``sentinel://`` URL, and following a switch of
master within a second (issue 14, item 3).

Tests run in any order: each starts on a settled group (the failover test leaves the
sentinels reconfiguring the old master) and reads the current master from the sentinels.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_lock.backends._clients import client_from_url
from celery_lock.backends._sentinel import FollowingSentinel, SwitchWatcher
from celery_lock.backends.redis import RedisLockManager
from celery_lock.errors import LockBackendUnavailable
from tests._sentinel import SentinelGroup
from tests._workers import wait_for
from tests.multi.conftest import MASTER_PASSWORD, SENTINEL_PASSWORD

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

PREFIX = "st"


def lock_key(key: str) -> str:
    return f"{PREFIX}:{{{key}}}"


def watcher_of(client: redis.Redis) -> SwitchWatcher:
    sentinel = client.connection_pool.sentinel_manager  # type: ignore[attr-defined]
    assert isinstance(sentinel, FollowingSentinel)
    assert sentinel.watcher is not None
    return sentinel.watcher


@pytest.fixture(autouse=True)
def settled(sentinel_group: SentinelGroup) -> None:
    """Every test starts on a settled group, whatever ran before it (a failover test leaves
    the sentinels still reconfiguring the old master)."""
    sentinel_group.wait_settled(30)


@pytest.fixture
def sentinel_client(sentinel_group: SentinelGroup) -> Iterator[redis.Redis]:
    client = client_from_url(
        sentinel_group.url(), transport_options=sentinel_group.transport_options()
    )
    assert isinstance(client, redis.Redis)
    yield client
    client.close()


def test_group_starts_quickly(sentinel_group: SentinelGroup) -> None:
    print(f"sentinel group start: {sentinel_group.start_seconds:.2f} s")
    assert sentinel_group.start_seconds < 15
    assert sentinel_group.master().role() == "master"
    assert sentinel_group.replica().role() == "slave"


def test_sentinel_url_locks_on_the_current_master(
    sentinel_group: SentinelGroup, sentinel_client: redis.Redis
) -> None:
    manager = RedisLockManager(sentinel_client, prefix=PREFIX)
    lease = manager.acquire("report", ttl=30)
    assert lease is not None
    master, replica = sentinel_group.master(), sentinel_group.replica()
    admin = master.client()
    try:
        assert admin.exists(lock_key("report")) == 1  # written on the master itself
    finally:
        admin.close()
    assert manager.acquire("report", ttl=30) is None
    assert manager.release(lease) is True
    # The replica follows the master: the grant went through the master it replicates.
    follower = replica.client()
    try:
        wait_for(lambda: follower.exists(lock_key("report")) == 1, timeout=5)
    finally:
        follower.close()
    # Options as kombu reads them: password from the URL, sentinel password from
    # sentinel_kwargs, bounded timeouts everywhere.
    kwargs = sentinel_client.connection_pool.connection_kwargs
    assert kwargs["password"] == MASTER_PASSWORD
    assert kwargs["socket_timeout"] == 1.0
    assert kwargs["socket_connect_timeout"] == 0.5
    sentinel = sentinel_client.connection_pool.sentinel_manager  # type: ignore[attr-defined]
    for node in sentinel.sentinels:
        node_kwargs = node.connection_pool.connection_kwargs
        assert node_kwargs["password"] == SENTINEL_PASSWORD
        assert node_kwargs["socket_connect_timeout"] == pytest.approx(0.3)  # 0.9 s / 3


def test_wrong_password_is_an_outage_that_never_shows_the_password(
    sentinel_group: SentinelGroup,
) -> None:
    url = sentinel_group.url(with_password=False).replace(
        "sentinel://", "sentinel://:not-the-password@", 1
    )
    client = client_from_url(url, transport_options=sentinel_group.transport_options())
    try:
        manager = RedisLockManager(client, prefix=PREFIX)
        with pytest.raises(LockBackendUnavailable) as info:
            manager.acquire("secret", ttl=5)
        text = f"{info.value} {info.value.__cause__!r}"
        assert "not-the-password" not in text
        assert SENTINEL_PASSWORD not in text
    finally:
        client.close()


def test_watcher_starts_on_use_stops_on_close_and_gc_and_restarts_after_fork(
    sentinel_group: SentinelGroup,
) -> None:
    client = client_from_url(
        sentinel_group.url(), transport_options=sentinel_group.transport_options()
    )
    assert isinstance(client, redis.Redis)
    watcher = watcher_of(client)
    assert not watcher.running  # nothing connected yet: no threads
    assert client.ping()
    wait_for(lambda: watcher.running, timeout=5, what="the watcher threads")
    # Running threads have not necessarily read their sentinel's view yet.
    wait_for(lambda: watcher.hint() is not None, timeout=5, what="the first master view")
    assert watcher.hint().address == sentinel_group.master().address  # type: ignore[union-attr]

    client.close()
    wait_for(lambda: not watcher.running, timeout=5, what="the threads to end after close()")
    assert client.ping()  # used again: following again
    wait_for(lambda: watcher.running, timeout=5, what="the threads after reuse")

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        ok = False
        try:
            ok = not watcher.running  # the parent's threads do not exist here
            ok = ok and bool(client.ping())
            deadline = time.monotonic() + 5
            while not watcher.running and time.monotonic() < deadline:
                time.sleep(0.02)
            ok = ok and watcher.running
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1", "the forked child did not start its own watcher"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert watcher.running  # the parent's threads are untouched

    del client
    gc.collect()
    wait_for(lambda: not watcher.running, timeout=5, what="the threads to end after gc")


def test_watcher_resubscribes_to_a_restarted_sentinel(
    sentinel_group: SentinelGroup,
    sentinel_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="celery_lock.redis")
    assert sentinel_client.ping()
    watcher = watcher_of(sentinel_client)
    wait_for(lambda: watcher.subscribed == 3, timeout=10, what="three subscriptions")
    node = sentinel_group.sentinels[-1]
    name = f"127.0.0.1:{node.port}"
    node.kill()
    wait_for(lambda: watcher.subscribed == 2, timeout=10, what="the lost subscription")
    sentinel_group.restart(node)
    wait_for(lambda: watcher.subscribed == 3, timeout=15, what="the subscription again")

    def logged() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if name in r.getMessage()]

    # The watcher counts the subscription before it logs the recovery (outside its mutex): a
    # reader that saw the count can be ahead of the line.
    wait_for(lambda: len(logged()) >= 2, timeout=5, what="the recovery's log line")
    messages = logged()
    assert [level for level, _ in messages] == [logging.WARNING, logging.INFO], messages
    assert "unreachable" in messages[0][1]
    assert "reachable again" in messages[1][1]
    sentinel_group.wait_settled(30)


def test_follows_a_graceful_failover_within_one_second(sentinel_group: SentinelGroup) -> None:
    """A manager made before ``SENTINEL FAILOVER`` grants nothing on the old master later than
    1 s after the first sentinel announced ``+switch-master`` (issue 14, item 3: it did for
    10 s, while the old master still took writes)."""
    sentinel_group.wait_settled(30)
    client = client_from_url(
        sentinel_group.url(), transport_options=sentinel_group.transport_options()
    )
    manager = RedisLockManager(client, prefix=PREFIX)
    assert manager.acquire("warm-up", ttl=60) is not None  # connected to the old master
    old, new = sentinel_group.master(), sentinel_group.replica()
    # Sentinel kills the normal clients of both nodes when it reconfigures them: the test's own
    # EXISTS checks retry once on a fresh connection (idempotent reads).
    old_admin, new_admin = (node.client(retry=Retry(NoBackoff(), 1)) for node in (old, new))

    # The test's own record of the first announcement, from every sentinel.
    announced: list[float] = []
    observing: list[int] = []
    done = threading.Event()

    def observe(sentinel_client: redis.Redis) -> None:
        pubsub = sentinel_client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe("+switch-master")
            observing.append(1)
            while not done.is_set():
                message = pubsub.get_message(timeout=0.2)
                if message is not None and message["type"] == "message":
                    announced.append(time.monotonic())
        except redis.RedisError:
            pass
        finally:
            pubsub.close()
            sentinel_client.close()

    observers = [
        threading.Thread(target=observe, args=(s.client(),)) for s in sentinel_group.sentinels
    ]
    for thread in observers:
        thread.start()

    # (time granted, on the old master, on the new master) per grant; a grant on the old
    # master after the promotion stays there (nothing replicates it to the new master).
    grants: list[tuple[float, bool, bool]] = []
    errors: list[BaseException] = []

    def grant_loop() -> None:
        for i in range(2000):  # bounded: ~20 s at most
            if done.is_set():
                return
            key = f"k{i}"
            try:
                lease = manager.acquire(key, ttl=60)
            except LockBackendUnavailable as exc:
                errors.append(exc)
                done.wait(0.01)
                continue
            at = time.monotonic()
            if lease is not None:
                grants.append(
                    (
                        at,
                        old_admin.exists(lock_key(key)) == 1,
                        new_admin.exists(lock_key(key)) == 1,
                    )
                )
            done.wait(0.01)

    worker = threading.Thread(target=grant_loop)
    try:
        watcher = watcher_of(client)
        wait_for(
            lambda: len(observing) == 3 and watcher.subscribed == 3,
            timeout=10,
            what="observer and watcher subscriptions on every sentinel",
        )
        worker.start()
        wait_for(lambda: len(grants) >= 5, timeout=10, what="grants before the failover")
        sentinel_group.sentinels[0].call("SENTINEL", "FAILOVER", sentinel_group.name)
        wait_for(lambda: announced, timeout=15, what="+switch-master")
        switch = announced[0]
        # Long enough to see grants 1 s after the announcement, and more.
        wait_for(
            lambda: any(t > switch + 2.5 for t, _, _ in grants),
            timeout=15,
            what="grants after the switch",
        )
    finally:
        done.set()
        if worker.is_alive() or worker.ident is not None:
            worker.join(timeout=20)
        for thread in observers:
            thread.join(timeout=5)
        old_admin.close()
        new_admin.close()
        client.close()

    late_on_old = [t - switch for t, on_old, _ in grants if on_old and t > switch + 1.0]
    on_old_after = [t - switch for t, on_old, _ in grants if on_old and t > switch]
    on_new_only = [t - switch for t, on_old, on_new in grants if on_new and not on_old]
    print(
        f"sentinel switch: {len(grants)} grants; on the old master after +switch-master: "
        f"{len(on_old_after)} (last at {max(on_old_after, default=0) * 1000:.0f} ms); first "
        f"on the new master {min(on_new_only, default=float('nan')) * 1000:.0f} ms after it; "
        f"{len(errors)} errors; watcher switches: {watcher.switches}"
    )
    assert late_on_old == [], (
        f"{len(late_on_old)} grants on the old master later than 1 s after the switch, "
        f"the first {late_on_old[:3]} s after it"
    )
    assert on_new_only, "no grant reached the new master"
    assert watcher.switches == 1  # three sentinels announced one switch: one reconnect
    assert min(on_new_only) < 1.0
