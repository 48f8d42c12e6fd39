"""Fixtures of the reliability scenarios: a manager plus the spec that rebuilds it elsewhere."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest

from celery_lock import LockManager
from tests._contention import build
from tests._redis_server import RedisServer
from tests.reliability._harness import spec

#: DB of the session redis-server used by these scenarios (other suites use 9 and 10).
RELIABILITY_DB = 11


@dataclasses.dataclass
class Setup:
    """One backend under test: ``manager`` in this process, ``spec`` for other processes."""

    backend: str
    spec: tuple[str, dict[str, Any]]
    manager: LockManager
    lock_dir: Path


def make_setup(backend: str, server: RedisServer, tmp_path: Path) -> Setup:
    """Build ``backend`` on the session server (own key prefix per test) and ``tmp_path``."""
    prefix = "rel-" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]  # noqa: S324
    lock_dir = tmp_path / "locks"
    backend_spec = spec(backend, server.url_db(RELIABILITY_DB), lock_dir, prefix=prefix)
    return Setup(backend, backend_spec, build(*backend_spec), lock_dir)


@pytest.fixture
def setup(request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path) -> Setup:
    """The backend named by the test's (indirect) ``setup`` parameter."""
    return make_setup(request.param, redis_server, tmp_path)
