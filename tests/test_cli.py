"""``celery -A app locks list|show|release|clean`` through click's CliRunner."""

from __future__ import annotations

import json
import logging
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
from tests._redis_server import RedisServer, free_port

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


def runner() -> CliRunner:
    """A runner that keeps stderr apart from stdout on every click we support: click 8.1 mixes
    them unless told ``mix_stderr=False`` (and then ``.stderr`` raises ValueError); click 8.2
    removed the argument (a TypeError) and always captures both, ``.output`` interleaving them."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        return CliRunner()


@pytest.fixture
def manager(app: Celery) -> Iterator[Any]:
    manager = get_manager(app)
    yield manager
    for info in list(manager.iter_locks()):
        manager.break_lock(info.key)


def run(*args: str, input: str | None = None) -> Any:  # noqa: A002 - click's name
    return runner().invoke(
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


def test_list_shows_coalescing_markers_as_waiting_calls(manager: Any) -> None:
    redis_manager = manager.redis
    assert redis_manager.coalesce("proj.c:3", "id-waiting", running=False, ttl=60) is None
    assert redis_manager.reveal("proj.c:3", "id-waiting", published=True)
    assert redis_manager.coalesce("proj.d:4", "id-publishing", running=False, ttl=60) is None
    try:
        result = run("list")
        assert result.exit_code == 0
        lines = result.output.strip().splitlines()
        assert lines[0] == "Waiting calls shared by coalescing:"
        assert lines[1].split()[:4] == ["proj.c:3", "task", "id-waiting", "waiting"]
        assert lines[2].split()[:5] == ["proj.d:4", "task", "id-publishing", "being", "published"]
        entries = json.loads(run("list", "--json").output)
        assert [(e["key"], e["waiting"]) for e in entries] == [
            ("proj.c:3", "published"),
            ("proj.d:4", "being published"),
        ]
    finally:
        redis_manager.reveal("proj.c:3", "id-waiting", published=False)
        redis_manager.reveal("proj.d:4", "id-publishing", published=False)


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
    # Counts are stored entries: the Redis locks (their same-host marks are not files).
    dry = json.loads(run("clean", "--dry-run", "--json").output)
    assert dry == {"scanned": 2, "removed": 1, "kept": 1, "errors": 0}
    assert manager.is_locked("proj.dead:1")
    result = run("clean")
    assert result.output.strip() == "scanned 2, removed 1, kept 1, errors 0"
    assert not manager.is_locked("proj.dead:1")
    assert manager.is_locked("proj.live:1")


# ---------------------------------------------------------------- exit codes and bad input

#: Apps whose lock Redis does not answer (a port nobody listens on): with the file fallback,
#: and failing closed. Configured by the ``down`` fixture.
down_app = Celery("tests.test_cli.down", set_as_current=False)
closed_app = Celery("tests.test_cli.closed", set_as_current=False)


@pytest.fixture(scope="module")
def down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    base = tmp_path_factory.mktemp("cli-down")
    down_app.conf.update(
        broker_url="memory://", lock_redis_url=dead, lock_directory=str(base / "a")
    )
    closed_app.conf.update(
        broker_url="memory://",
        lock_redis_url=dead,
        lock_fallback=None,
        lock_directory=str(base / "b"),
    )
    celery.add_command(locks)
    yield get_manager(down_app)
    down_app.close()
    closed_app.close()


def run_app(app: str, *args: str, input: str | None = None) -> Any:  # noqa: A002
    return runner().invoke(
        celery, ["-A", f"tests.test_cli:{app}", "locks", *args], input=input, catch_exceptions=False
    )


@pytest.mark.parametrize("command", ["show", "release"])
@pytest.mark.parametrize("key", ["", "k" * 70_000, "a\x00b"])
def test_a_bad_key_is_one_line_and_exit_2(app: Celery, command: str, key: str) -> None:
    """Bad usage: exit status 2 and a single error line, never a traceback."""
    result = run(command, key, "--yes") if command == "release" else run(command, key)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: invalid lock key:")
    assert "Traceback" not in result.stdout + result.stderr


def test_show_prints_times_readably(manager: Any) -> None:
    manager.acquire("proj.t:1", ttl=60, task_id="id-t", task_name="proj.t")
    text = run("show", "proj.t:1").stdout
    fields = dict(line.split(": ", 1) for line in text.strip().splitlines())
    assert fields["acquired_at"].endswith("s ago)") and " UTC (" in fields["acquired_at"]
    assert fields["expires_at"].startswith(time.strftime("%Y-", time.gmtime()))
    assert fields["expires_at"].endswith("s)") and "(in " in fields["expires_at"]
    raw = json.loads(run("show", "proj.t:1", "--json").stdout)
    assert isinstance(raw["expires_at"], float)  # --json keeps the numbers


def test_unreachable_redis_is_exit_3_and_file_locks_still_show(down: Any) -> None:
    """An operator must tell "nothing is locked" from "I could not look"."""
    down.file.acquire("proj.f:1", ttl=60, task_id="id-f", task_name="proj.f")
    listed = run_app("down_app", "list")
    assert listed.exit_code == 3
    assert "proj.f:1" in listed.stdout and "file" in listed.stdout
    assert "the redis lock store could not be read" in listed.stderr
    shown = run_app("down_app", "show", "proj.f:1")
    assert shown.exit_code == 3 and "task_id: id-f" in shown.stdout
    missing = run_app("down_app", "show", "proj.nope")
    assert missing.exit_code == 3
    assert "not locked in the stores that could be read" in missing.stdout
    cleaned = run_app("down_app", "clean")
    assert cleaned.exit_code == 3 and "errors 1" in cleaned.stdout
    released = run_app("down_app", "release", "proj.f:1", "--yes")
    assert released.exit_code == 3 and "released" in released.stdout
    assert not down.file.is_locked("proj.f:1")


def test_fail_closed_store_unreachable_is_never_nothing_locked(down: Any) -> None:
    listed = run_app("closed_app", "list")
    assert listed.exit_code == 3
    assert "No locks held." not in listed.stdout
    assert run_app("closed_app", "show", "proj.x").exit_code == 3
    assert run_app("closed_app", "clean").exit_code == 3


def test_clean_with_errors_exits_1_and_warnings_are_formatted(
    app: Celery, manager: Any, monkeypatch: Any
) -> None:
    """A value under our prefix that is not ours is kept and counted as an error; the warning
    about it reaches stderr with its level and logger name."""
    # As in a real `celery` process, where nothing configured logging (pytest's own capture
    # handlers would otherwise count as configured logging, and the CLI adds none).
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    ours = logging.getLogger("celery_lock")
    monkeypatch.setattr(ours, "handlers", [])
    monkeypatch.setattr(ours, "level", logging.NOTSET)
    client = module_client(app)
    client.set("celery_lock:{junk}", "not a lock value", px=60_000)
    try:
        result = run("clean")
        assert result.exit_code == 1
        assert "errors 1" in result.stdout
        assert "WARNING celery_lock.redis: kept lock celery_lock:{junk}" in result.stderr
    finally:
        client.delete("celery_lock:{junk}")
        client.close()


def test_release_deletes_only_the_holder_it_showed(manager: Any, monkeypatch: Any) -> None:
    """A holder without a task id: if the lock changes hands between show and confirm, the new
    holder is left alone (compare-and-delete on the token shown, not on the key)."""
    first = manager.acquire("proj.n:1", ttl=60)

    def swap_then_confirm(*_: Any, **__: Any) -> bool:
        manager.release(first)
        assert manager.acquire("proj.n:1", ttl=60) is not None  # someone else, no task id
        return True

    monkeypatch.setattr("click.confirm", swap_then_confirm)
    result = run("release", "proj.n:1")
    assert result.exit_code == 1
    assert "not released" in result.stdout
    assert manager.is_locked("proj.n:1")


def module_client(app: Celery) -> Any:
    """A plain client of the app's lock Redis."""
    import redis

    return redis.Redis.from_url(app.conf.lock_redis_url)
