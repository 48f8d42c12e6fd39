"""Fixtures with several real Redis servers: a 3-master Cluster with replicas, a Sentinel group.

Module-scoped: starting one costs about 2 s (the cluster forms and syncs, the sentinels find
each other), so a test module shares one and its tests leave it usable: a test that fails the
master over reads the current topology instead of assuming the first one. Every process is
killed at teardown, also after a failed test or a failed start.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._cluster import LocalCluster
from tests._sentinel import SentinelGroup

#: Passwords of the shared Sentinel group: the master's (in the URL) and the sentinels' own
#: (``sentinel_kwargs``), so every test also covers the way kombu users pass both.
MASTER_PASSWORD = "master-secret"
SENTINEL_PASSWORD = "sentinel-secret"


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster of 3 masters with 1 replica each, ``cluster_state:ok`` and in sync."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A master, its replica and 3 sentinels, all password-protected, settled."""
    group = SentinelGroup(
        tmp_path_factory.mktemp("sentinel"),
        password=MASTER_PASSWORD,
        sentinel_password=SENTINEL_PASSWORD,
    )
    group.start()
    try:
        yield group
    finally:
        group.stop()
