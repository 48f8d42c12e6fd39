"""Shared fixtures: real redis-server processes, fakeredis servers, private lock directories."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (tests that break it use ``own_redis_server``)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-session"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone: free to stop, restart, pause or kill."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_client(redis_server: RedisServer):  # type: ignore[no-untyped-def]
    """A client of the session server on a flushed DB 9 (broker/results tests use other DBs)."""
    client = redis_server.client(db=9)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake_redis():  # type: ignore[no-untyped-def]
    """A FakeRedis client on a FakeServer of its own (one server per test)."""
    import fakeredis

    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    client.fake_server = server  # tests reach the server to simulate outages
    yield client
    client.close()


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    """A path for a FileLockManager directory (not created: the manager creates it 0700)."""
    return tmp_path / "locks"


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="celery_lock")
    return caplog


@pytest.fixture(scope="module")
def module_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for one test module (broker, results and locks of its Celery workers), so
    no other module's FLUSHDB or fault injection can reach it."""
    server = RedisServer(tmp_path_factory.mktemp("redis-module"))
    server.start()
    yield server
    server.stop()
