"""Opt-in durable grants: ``WAIT`` for N replicas after each grant (issue 14).

Redis replicates asynchronously: a grant acknowledged by a master that dies before its replica
has it is lost with it, and the promoted replica grants the same key again. Fences keep the
two holders apart for a fenced resource (the later grant's fence is higher); ``WAIT`` shrinks
the window itself. With ``wait_replicas = N`` every grant is followed by ``WAIT N timeout``;
a grant that fewer than N replicas acknowledged in time is released again and the acquire
reports the store unavailable. The price: one more round trip per grant (up to the timeout
while a replica lags), and no grants at all while fewer than N replicas are connected.
``WAIT`` is not a consensus protocol: a failover can still promote a replica that had not
acknowledged (Sentinel and Cluster pick the most up-to-date one they can reach).

``WAIT`` counts the writes of *its own connection*. A lock manager's commands travel on
whatever pooled connection is free, so the grant and the ``WAIT`` may not share one: the
``WAIT`` is sent in one pipeline after a small write of its own (``SET <lock>:sync``, 1 s, in
the lock key's slot). Replication is one ordered stream per master, so a replica that
acknowledged that write has the grant, which the master executed before it.
"""

from __future__ import annotations

import math
from typing import Any, Final

from redis.cluster import RedisCluster

from celery_lock.errors import LockBackendUnavailable

__all__ = ["DEFAULT_WAIT_TIMEOUT", "check", "replicas_acknowledging", "too_few"]

#: Seconds a grant waits for its replicas by default: below the lock client's default socket
#: timeout (1 s), which a reply must not exceed.
DEFAULT_WAIT_TIMEOUT: Final = 0.5
#: Lifetime (ms) of the marker key written before ``WAIT``.
_SYNC_TTL_MS: Final = 1000


def check(replicas: object, timeout: object, socket_timeout: object) -> tuple[int, float]:
    """Validated ``(wait_replicas, wait_timeout)``.

    :param socket_timeout: the client's read timeout in seconds, when known (None otherwise):
        ``WAIT`` must answer within it.
    :raises ValueError: for a negative or non-int count, a timeout that is not a positive
        finite number of seconds, or one that is not below ``socket_timeout``.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ValueError(f"wait_replicas must be an int >= 0 (0: off), got {replicas!r}")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(f"wait_timeout must be a number of seconds > 0, got {timeout!r}")
    if (
        replicas
        and isinstance(socket_timeout, (int, float))
        and not isinstance(socket_timeout, bool)
        and timeout >= socket_timeout
    ):
        raise ValueError(
            f"wait_timeout ({timeout} s) must be below the client's socket_timeout "
            f"({socket_timeout} s): WAIT answers only after it"
        )
    return replicas, float(timeout)


def replicas_acknowledging(client: Any, name: str, replicas: int, timeout: float) -> int:
    """How many replicas of ``name``'s master have every write it made so far (``WAIT``).

    :param client: the manager's client (a Cluster client asks the key's master directly).
    :param name: the lock key just granted.
    :param replicas: how many to wait for.
    :param timeout: seconds to wait at most.
    :raises redis.RedisError: when the master cannot be asked.
    """
    node = client
    if isinstance(client, RedisCluster):
        # RedisCluster sends WAIT to every node and adds the answers up; it must go to the
        # key's master, after a write on the same connection.
        node = client.get_redis_connection(client.get_node_from_key(name))  # type: ignore[no-untyped-call,unused-ignore]
    pipe = node.pipeline(transaction=False)
    pipe.set(name + ":sync", "1", px=_SYNC_TTL_MS)
    pipe.wait(replicas, max(1, math.ceil(timeout * 1000)))
    return int(pipe.execute()[1])


def too_few(key: str, acked: int, replicas: int, timeout: float) -> LockBackendUnavailable:
    """The error of a grant that fewer than ``replicas`` replicas acknowledged in time."""
    return LockBackendUnavailable(
        f"redis: {acked} of {replicas} replicas acknowledged the grant of lock {key!r} within "
        f"{timeout:g} s (wait_replicas); the grant was released",
        key=key,
        backend="redis",
        replicas=acked,
    )
