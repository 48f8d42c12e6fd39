"""``celery -A app locks list|show|release|clean`` through click's CliRunner."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.bin.celery import celery
from click.testing import CliRunner

from celery_lock.cli import locks
from celery_lock.config import get_manager
from tests._redis_server import RedisServer

pytestmark = pytest.mark.redis

#: The app the CLI loads with ``-A tests.test_cli:cli_app`` (configured by the fixture).
cli_app = Celery("tests.test_cli", set_as_current=False)


@pytest.fixture(scope="module")
def app(
    module_redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Celery]:
    server = module_redis_server
    cli_app.conf.update(
        broker_url=server.url_db(1),
        lock_redis_url=server.url_db(2),
        lock_directory=str(tmp_path_factory.mktemp("cli") / "locks"),
    )
    celery.add_command(locks)
    yield cli_app
    cli_app.close()


@pytest.fixture
def manager(app: Celery) -> Iterator[Any]:
    manager = get_manager(app)
    yield manager
    for info in list(manager.iter_locks()):
        manager.break_lock(info.key)


def run(*args: str, input: str | None = None) -> Any:  # noqa: A002 - click's name
    return CliRunner().invoke(
        celery,
        ["-A", "tests.test_cli:cli_app", "locks", *args],
        input=input,
        catch_exceptions=False,
    )


def test_list_shows_one_row_per_lock(manager: Any) -> None:
    assert run("list").output.strip() == "No locks held."
    manager.acquire("proj.a:1", ttl=60, task_id="id-a", task_name="proj.a")
    manager.acquire("proj.b:2", ttl=30, task_id="id-b", task_name="proj.b")
    result = run("list")
    assert result.exit_code == 0
    header, *rows = result.output.strip().splitlines()
    assert header.split() == ["KEY", "TASK", "BACKEND", "HOST", "PID", "AGE", "TTL"]
    assert [row.split()[:3] for row in rows] == [
        ["proj.a:1", "proj.a", "redis"],
        ["proj.b:2", "proj.b", "redis"],
    ]
    assert rows[0].split()[4] == str(os.getpid())
    ttl_left = float(rows[1].split()[6].rstrip("s"))
    assert 25 < ttl_left <= 30


def test_list_json_has_the_lock_info_fields(manager: Any) -> None:
    manager.acquire("proj.a:1", ttl=60, task_id="id-a", task_name="proj.a")
    result = run("list", "--json")
    assert result.exit_code == 0
    (entry,) = json.loads(result.output)
    assert set(entry) == {
        "key",
        "token_prefix",
        "fence",
        "backend",
        "host",
        "pid",
        "task_id",
        "task_name",
        "acquired_at",
        "expires_at",
    }
    assert (entry["key"], entry["task_id"], entry["pid"]) == ("proj.a:1", "id-a", os.getpid())
    assert entry["expires_at"] > time.time()


def test_show(manager: Any) -> None:
    manager.acquire("proj.a:1", ttl=60, task_id="id-a", task_name="proj.a")
    result = run("show", "proj.a:1")
    assert result.exit_code == 0
    assert "task_id: id-a" in result.output
    assert json.loads(run("show", "proj.a:1", "--json").output)["task_name"] == "proj.a"
    missing = run("show", "proj.nope")
    assert (missing.exit_code, missing.output.strip()) == (1, "proj.nope: not locked")
    assert json.loads(run("show", "proj.nope", "--json").output) is None


def test_release_asks_first(manager: Any) -> None:
    manager.acquire("proj.a:1", ttl=60, task_id="id-a", task_name="proj.a")
    declined = run("release", "proj.a:1", input="n\n")
    assert declined.exit_code == 1
    assert "held by task proj.a[id-a]" in declined.output
    assert manager.is_locked("proj.a:1")
    accepted = run("release", "proj.a:1", input="y\n")
    assert accepted.exit_code == 0
    assert accepted.output.strip().endswith("proj.a:1: released")
    assert not manager.is_locked("proj.a:1")


def test_release_yes_and_json(manager: Any) -> None:
    manager.acquire("proj.a:1", ttl=60, task_id="id-a", task_name="proj.a")
    result = run("release", "proj.a:1", "--yes", "--json")
    assert json.loads(result.output) == {"key": "proj.a:1", "released": True}
    again = run("release", "proj.a:1", "--yes", "--json")
    assert again.exit_code == 1
    assert json.loads(again.output) == {"key": "proj.a:1", "released": False}


def test_clean_removes_only_dead_holders(app: Celery, manager: Any) -> None:
    manager.acquire("proj.live:1", ttl=60, task_id="live", task_name="proj.live")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: take a lock and die holding it
        try:
            get_manager(app).acquire("proj.dead:1", ttl=60, task_id="dead", task_name="proj.dead")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert manager.is_locked("proj.dead:1")
    # Counts are stored entries: each Redis lock of the hybrid has a same-token shadow file.
    dry = json.loads(run("clean", "--dry-run", "--json").output)
    assert dry == {"scanned": 4, "removed": 2, "kept": 2, "errors": 0}
    assert manager.is_locked("proj.dead:1")
    result = run("clean")
    assert result.output.strip() == "scanned 4, removed 2, kept 2, errors 0"
    assert not manager.is_locked("proj.dead:1")
    assert manager.is_locked("proj.live:1")
