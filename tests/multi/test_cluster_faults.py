"""Cluster: a plain URL of one node is a configuration error, the documented ACL works on
every node, and fences stay above everything granted before a lossy failover (issue 14).

The lossy failover kills a master for good, so it runs on a cluster of its own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MovedError

from celery_lock import (
    FileLockManager,
    HybridLockManager,
    LockBackendUnavailable,
    LockConfigurationError,
    LockedTask,
)
from celery_lock.backends.redis import RedisLockManager
from tests._acl import documented_acl
from tests._cluster import LocalCluster, Node, key_on
from tests._redis_server import RedisServer
from tests._workers import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

PREFIX = "cf"


def moved_key(cluster: LocalCluster, node: Node) -> str:
    """A lock key whose slot ``node`` does not serve."""
    other = next(m for m in cluster.masters() if m is not node)
    return key_on(cluster, other)


def test_a_plain_url_of_one_node_is_a_configuration_error(
    redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    node = redis_cluster.masters()[0]
    url = f"redis://127.0.0.1:{node.port}/0"
    plain = RedisLockManager.from_url(url, prefix=PREFIX)
    own = plain.acquire(key_on(redis_cluster, node), ttl=30)  # its own slots work...
    assert own is not None and plain.release(own)
    key = moved_key(redis_cluster, node)
    with pytest.raises(LockConfigurationError) as info:  # ...the others are MOVED
        plain.acquire(key, ttl=30)
    message = str(info.value)
    assert f"this is a Redis Cluster node; use redis+cluster://127.0.0.1:{node.port}" in message
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, MovedError)

    files = FileLockManager(tmp_path / "locks")
    hybrid = HybridLockManager(RedisLockManager.from_url(url, prefix=PREFIX), files)
    for _ in range(3):  # not an outage: no fallback, no circuit, no shadow left behind
        with pytest.raises(LockConfigurationError):
            hybrid.acquire(key, ttl=30)
    assert not hybrid.using_fallback
    assert not files.is_locked(key)
    plain.client.close()


def test_a_cluster_url_of_a_plain_server_is_a_configuration_error(
    own_redis_server: RedisServer,
) -> None:
    with pytest.raises(LockConfigurationError, match="is not a Redis Cluster"):
        RedisLockManager.from_url(f"redis+cluster://127.0.0.1:{own_redis_server.port}")


def test_a_celery_task_fails_with_it_naming_the_task(
    redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    node = redis_cluster.masters()[0]
    app = Celery("cluster-misconfigured", set_as_current=False)
    app.conf.update(
        lock_redis_url=f"redis://127.0.0.1:{node.port}/0",
        lock_key_prefix=PREFIX,
        lock_directory=str(tmp_path / "locks"),
    )

    @app.task(base=LockedTask, bind=True, name="cluster.report", shared=False)
    def report(self: Any, n: int) -> str:
        return str(self.request.lock_lease.backend)

    try:
        outcomes = [report.apply(args=(n,)) for n in range(12)]
        failed = [r for r in outcomes if r.failed()]
        served = [r.get(timeout=5) for r in outcomes if not r.failed()]
        # Two masters of three serve the other slots: most calls meet a MOVED.
        assert failed, "no call met a MOVED"
        for result in failed:
            assert isinstance(result.result, LockConfigurationError)
            assert "cluster.report" in str(result.result)
            assert "use redis+cluster://" in str(result.result)
        assert set(served) <= {"redis"}  # never a fallback to files
    finally:
        app.close()


def test_the_documented_acl_with_the_cluster_rights(redis_cluster: LocalCluster) -> None:
    acl = documented_acl()
    acl[acl.index("resetkeys") + 1] = f"~{PREFIX}:*"
    acl[acl.index("resetchannels") + 1] = f"&{PREFIX}:*"
    acl += ["+cluster|slots", "+cluster|shards", "+command"]
    for node in redis_cluster.nodes:
        if node.running:
            node.call("ACL", "SETUSER", *acl)
    nodes = ";".join(f"redis+cluster://127.0.0.1:{n.port}" for n in redis_cluster.masters())
    url = nodes.replace("redis+cluster://", "redis+cluster://locks:lockpw@", 1)
    manager = RedisLockManager.from_url(url, prefix=PREFIX)
    try:
        for master in redis_cluster.masters():
            key = key_on(redis_cluster, master)
            lease = manager.acquire(key, ttl=30)
            assert lease is not None
            assert manager.inspect(key) is not None
            assert manager.release(lease)
        assert manager.clean().errors == 0
    finally:
        manager.client.close()
        for node in redis_cluster.nodes:
            if node.running:
                node.call("ACL", "DELUSER", "locks")


def test_fences_after_a_lossy_failover_are_above_every_fence_before(
    own_redis_cluster: LocalCluster, record_property: Any
) -> None:
    """A master grants while its replica receives nothing (SIGSTOP, link killed), then is
    SIGKILLed; the replica takes over without those grants. Every fence granted after the
    failover is above every fence granted before it, also the lost ones. The killed master
    stays dead, so the test has a cluster of its own."""
    cluster = own_redis_cluster
    client = cluster.client()
    assert isinstance(client, RedisCluster)
    manager = RedisLockManager(client, prefix=PREFIX)
    master = cluster.masters()[0]
    (replica,) = cluster.replicas_of(master)
    key = key_on(cluster, master)
    fence_key = f"{PREFIX}:{{{key}}}:fence"
    master_admin = master.client()
    # One connection, in READONLY mode: a cluster replica answers reads of its slots then.
    replica_admin = replica.client(single_connection_client=True)
    replica_admin.execute_command("READONLY")
    before: list[int] = []

    def cycle() -> None:
        lease = manager.acquire(key, ttl=60)
        assert lease is not None
        before.append(lease.fence)
        assert manager.release(lease)

    try:
        for _ in range(5):
            cycle()
        assert master_admin.execute_command("WAIT", 1, 2000) == 1
        replicated = int(replica_admin.get(fence_key))
        cluster.pause(replica)
        assert master_admin.execute_command("CLIENT", "KILL", "TYPE", "replica") >= 1
        for _ in range(5):
            cycle()
        lost = before[-5:]
        began = time.monotonic()
        cluster.kill(master)
        cluster.resume(replica)
        wait_for(lambda: replica.role() == "master", timeout=30, what="the replica to take over")
        cluster.wait_ok(30)
        took_over = time.monotonic() - began
        assert int(replica_admin.get(fence_key)) == replicated < min(lost)  # really lost

        def grant() -> Any:
            try:
                return manager.acquire(key, ttl=60)
            except LockBackendUnavailable:
                return None

        after: list[int] = []
        for _ in range(5):
            lease = wait_for(grant, timeout=20, what="a grant on the new master")
            after.append(lease.fence)
            assert manager.release(lease)
        assert cluster.master_of_slot(key_slot(f"{PREFIX}:{{{key}}}".encode())) is replica
    finally:
        master_admin.close()
        replica_admin.close()
        client.close()
    print(
        f"cluster lossy failover ({took_over:.1f} s): before {before[0]}..{before[-1]} "
        f"(lost {len(lost)}, replicated up to {replicated}); after {after[0]}..{after[-1]}"
    )
    assert min(after) > max(before)
    assert after == sorted(after)
    record_property("cluster_fence_gap_us", min(after) - max(before))
