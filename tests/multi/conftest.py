"""Fixtures with several real Redis servers: a 3-master Cluster with replicas, a Sentinel group.

Module-scoped: starting one costs about 2 s (the cluster forms and syncs, the sentinels find
each other), so a test module shares one and its tests leave it usable, in whatever order they
run: a test that fails the master over reads the current topology instead of assuming the
first one, and leaves the group settled. A test that changes it for good (a SIGKILLed master
that does not come back) takes one of its own instead (``own_redis_cluster``,
``own_sentinel_group``). Every process is killed at teardown, also after a failed test or a
failed start.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests._cluster import LocalCluster
from tests._sentinel import SentinelGroup

#: Passwords of the shared Sentinel group: the master's (in the URL) and the sentinels' own
#: (``sentinel_kwargs``), so every test also covers the way kombu users pass both.
MASTER_PASSWORD = "master-secret"
SENTINEL_PASSWORD = "sentinel-secret"

Group = TypeVar("Group", LocalCluster, SentinelGroup)


def _sentinel_group(path: Path) -> SentinelGroup:
    """The password-protected Sentinel group of these tests (not started)."""
    return SentinelGroup(path, password=MASTER_PASSWORD, sentinel_password=SENTINEL_PASSWORD)


def _running(group: Group) -> Iterator[Group]:
    """Start ``group`` (a cluster or a sentinel group), yield it, stop it however the test ends."""
    group.start()
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster of 3 masters with 1 replica each, ``cluster_state:ok`` and in sync."""
    yield from _running(LocalCluster(tmp_path_factory.mktemp("cluster")))


@pytest.fixture
def own_redis_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Like ``redis_cluster``, for one test only (one that kills a master for good)."""
    yield from _running(LocalCluster(tmp_path / "cluster"))


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A master, its replica and 3 sentinels, all password-protected, settled."""
    yield from _running(_sentinel_group(tmp_path_factory.mktemp("sentinel")))


@pytest.fixture
def own_sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """Like ``sentinel_group``, for one test only (one that kills the master for good)."""
    yield from _running(_sentinel_group(tmp_path / "sentinel"))
