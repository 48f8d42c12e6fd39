"""RedisLockManager on a real Redis Cluster (3 masters, 1 replica each) from a cluster URL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from celery_lock.backends._clients import client_from_url
from celery_lock.backends.redis import RedisLockManager
from celery_lock.errors import LockBackendUnavailable
from tests._cluster import LocalCluster, key_on
from tests._workers import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

PREFIX = "cl"


@pytest.fixture
def cluster_client(redis_cluster: LocalCluster) -> Iterator[RedisCluster]:
    client = client_from_url(redis_cluster.url(all_nodes=False))
    assert isinstance(client, RedisCluster)
    yield client
    client.close()


def subscribers(cluster: LocalCluster, channel: str) -> int:
    """Subscribers of ``channel`` on every running node (PUBSUB NUMSUB is per node)."""
    return sum(
        int(node.call("PUBSUB", "NUMSUB", channel)[1])
        for node in cluster.nodes
        if node.running and not node.paused
    )


def test_cluster_starts_quickly_with_a_replica_per_master(redis_cluster: LocalCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert all(len(redis_cluster.replicas_of(m)) == 1 for m in masters)
    assert {m.role() for m in masters} == {"master"}
    print(f"cluster start: {redis_cluster.start_seconds:.2f} s")
    assert redis_cluster.start_seconds < 15


def test_url_with_one_node_discovers_all_with_bounded_timeouts(
    redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    assert cluster_client.ping()
    # One startup node was enough to find every master.
    ports = sorted(node.port for node in cluster_client.get_primaries())
    assert ports == sorted(m.port for m in redis_cluster.masters())
    node = cluster_client.get_node(host="127.0.0.1", port=redis_cluster.masters()[0].port)
    assert node is not None
    kwargs = node.redis_connection.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 1.0
    assert kwargs["socket_connect_timeout"] == 0.5
    retry = cluster_client.retry
    if hasattr(retry, "get_retries"):  # redis-py >= 5.1
        assert retry.get_retries() == 1


def test_locks_on_every_master_exclude_and_hand_off(
    redis_cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    manager = RedisLockManager(cluster_client, prefix=PREFIX)
    handoffs = []
    for master in redis_cluster.masters():
        key = key_on(redis_cluster, master)
        lease = manager.acquire(key, ttl=30)
        assert lease is not None
        # The lock lives on the master that serves its slot (read without redirection).
        direct = master.client()
        try:
            assert direct.exists(f"{PREFIX}:{{{key}}}") == 1
        finally:
            direct.close()
        assert manager.acquire(key, ttl=30) is None  # held: a second acquire fails

        got: list[object] = []
        waiter = threading.Thread(
            target=lambda k=key: got.append(
                (manager.acquire(k, ttl=30, mode="queue", timeout=20), time.monotonic())
            )
        )
        waiter.start()
        # Measure a pub/sub hand-off, not a poll: release once the waiter is subscribed to
        # the key's wake-up channel. The manager's one wake-up connection may sit on any node
        # (cluster pub/sub reaches every node), so count subscribers on all of them.
        channel = f"{PREFIX}:{{{key}}}:wake"
        wait_for(
            lambda c=channel: subscribers(redis_cluster, c) == 1,
            timeout=10,
            what="the waiter to subscribe",
        )
        released_at = time.monotonic()
        assert manager.release(lease) is True
        waiter.join(timeout=20)
        assert not waiter.is_alive()
        second, granted_at = got[0]  # type: ignore[misc]
        assert second is not None, f"waiter on {master} was not served"
        assert second.fence > lease.fence
        handoffs.append(granted_at - released_at)
        assert manager.release(second) is True
        assert manager.inspect(key) is None
    print("cluster hand-off per master (ms):", [round(h * 1000, 1) for h in handoffs])
    assert max(handoffs) < 2.0


def test_failover_helpers_and_locks_after_failover(own_redis_cluster: LocalCluster) -> None:
    """Graceful CLUSTER FAILOVER, then a SIGKILLed master: the helpers leave a cluster that
    is ok, and a client from the URL locks on the new master afterwards. The killed master
    stays dead, so the test has a cluster of its own."""
    redis_cluster = own_redis_cluster
    client = client_from_url(redis_cluster.url(all_nodes=False))
    assert isinstance(client, RedisCluster)
    manager = RedisLockManager(client, prefix=PREFIX)
    master = redis_cluster.masters()[0]
    key = key_on(redis_cluster, master)
    replica = redis_cluster.replicas_of(master)[0]
    began = time.monotonic()
    redis_cluster.failover(replica)
    graceful = time.monotonic() - began
    assert replica.role() == "master"
    assert master.role() == "slave"

    def grant() -> object:
        try:
            return manager.acquire(key, ttl=30)
        except LockBackendUnavailable:
            return None

    lease = wait_for(grant, timeout=10, what="a grant after the graceful failover")
    assert redis_cluster.master_of_slot(key_slot(key.encode())) is replica
    assert manager.release(lease) is True  # type: ignore[arg-type]

    began = time.monotonic()
    promoted = redis_cluster.kill_master(replica)
    killed = time.monotonic() - began
    assert promoted is master  # the old master, now its replica, took over again
    lease = wait_for(grant, timeout=15, what="a grant after the master was killed")
    assert manager.release(lease) is True  # type: ignore[arg-type]
    print(f"cluster failover: graceful {graceful:.2f} s, after SIGKILL {killed:.2f} s")
    client.close()
