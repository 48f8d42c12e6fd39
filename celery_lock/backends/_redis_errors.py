"""How the Redis backend reads redis-py's errors: outage, misconfiguration, or other failure.

An outage (connection refused or reset, timeout, ``LOADING``, ``READONLY``, ``MASTERDOWN``,
``CLUSTERDOWN``, authentication) is worth retrying or falling back to files for. A reply only a
Cluster node gives (``MOVED``, ``ASK``, ``CLUSTERDOWN``), seen by a client that is not a
cluster client, means the URL names one node of a Cluster: a configuration error that neither
a retry nor a fallback would fix (issue 14).
"""

from __future__ import annotations

from typing import Final

import redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)

from celery_lock.errors import LockBackendUnavailable, LockConfigurationError

__all__ = ["CLIENT_ERRORS", "cluster_node_error", "is_connection_error"]

#: Everything a redis-py call can raise: its own errors, cluster set-up errors (not RedisError
#: subclasses) and raw socket errors.
CLIENT_ERRORS: Final = (RedisError, RedisClusterException, OSError)

#: Exception classes that mean "the store cannot be reached right now" (retrying, or falling
#: back to files, is the right answer). ``BusyLoadingError`` (LOADING), ``AuthenticationError``
#: and Sentinel's ``MasterNotFoundError`` are ``redis.ConnectionError`` subclasses;
#: ``MasterDownError`` (MASTERDOWN) is a ``ClusterDownError``, itself a ``ClusterError``.
_CONNECTION_ERRORS: Final = (
    redis.ConnectionError,
    redis.TimeoutError,
    ReadOnlyError,
    ClusterError,
    SlotNotCoveredError,
    OSError,
)

#: Reply prefixes of the same failures when they come back as a plain ``ResponseError``: an error
#: raised by ``redis.call`` inside a Lua script is not mapped to its own class by redis-py.
_CONNECTION_REPLIES: Final = ("LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "NOAUTH")


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` means Redis cannot be reached right now.

    Connection-class failures: connection refused/reset, socket timeouts, ``LOADING``,
    ``READONLY``, ``MASTERDOWN``, ``CLUSTERDOWN`` and authentication errors. A
    :class:`LockBackendUnavailable` is judged by the Redis error that caused it.
    """
    if isinstance(exc, LockBackendUnavailable):
        return exc.__cause__ is not None and is_connection_error(exc.__cause__)
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_CONNECTION_REPLIES)


#: Replies only a Redis Cluster node gives. A client that is not a cluster client sees them
#: when its URL names one node of a Cluster: a configuration error, not an outage.
_CLUSTER_REPLIES: Final = ("MOVED ", "ASK ", "CLUSTERDOWN")


def cluster_node_error(
    client: object, key: str | None, exc: BaseException
) -> LockConfigurationError | None:
    """A :class:`LockConfigurationError` when ``exc`` is a reply only a Cluster node gives and
    ``client`` is not a cluster client (its URL names one node of a Cluster), else None."""
    if isinstance(client, RedisCluster):
        return None  # redirections are its job; CLUSTERDOWN is an outage there
    if isinstance(exc, MasterDownError):
        return None  # MASTERDOWN: a replica cut off from its master (a ClusterDownError class)
    if not (
        isinstance(exc, (AskError, ClusterDownError))  # MovedError is an AskError
        or (isinstance(exc, ResponseError) and str(exc).startswith(_CLUSTER_REPLIES))
    ):
        return None
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    address = f"{kwargs.get('host', '<host>')}:{kwargs.get('port', '<port>')}"
    return LockConfigurationError(
        f"redis for lock {key!r}: this is a Redis Cluster node; use redis+cluster://{address} "
        f"so the client follows the cluster's slots (the node answered {type(exc).__name__}: "
        f"{exc})",
        key=key,
        backend="redis",
    )
