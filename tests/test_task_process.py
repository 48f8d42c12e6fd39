"""LockedTask in real ``celery worker`` processes (prefork -c 2): QUEUE serialisation across
processes, and locks freed at once when a child is SIGKILLed, revoked with terminate, or the
worker shuts down warm."""

from __future__ import annotations

import importlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests._redis_server import RedisServer
from tests._workers import WorkerProcess, drop_results, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

BROKER_DB, BACKEND_DB, LOCKS_DB, EVENTS_DB = 1, 2, 3, 4


class Stack:
    """Two prefork workers plus the producer side of tests._worker_app."""

    def __init__(self, server: RedisServer, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {
            "CL_TEST_BROKER": server.url_db(BROKER_DB),
            "CL_TEST_BACKEND": server.url_db(BACKEND_DB),
            "CL_TEST_LOCKS": server.url_db(LOCKS_DB),
            "CL_TEST_EVENTS": server.url_db(EVENTS_DB),
            "CL_TEST_LOCK_DIR": str(workdir / "locks"),
        }
        saved = dict(os.environ)
        os.environ.update(self.env)  # the producer side reads them when first imported
        try:
            self.module: ModuleType = importlib.import_module("tests._worker_app")
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.events_client = server.client(EVENTS_DB)
        self.locks_client = server.client(LOCKS_DB)
        self.workers: list[WorkerProcess] = []

    def events(self, **match: Any) -> list[dict[str, Any]]:
        found = [json.loads(raw) for raw in self.events_client.lrange("events", 0, -1)]
        return [e for e in found if all(e.get(k) == v for k, v in match.items())]

    def worker(self, name: str, *extra: str) -> WorkerProcess:
        return WorkerProcess(
            "tests._worker_app", self.workdir, self.env, name=name, extra_args=extra
        )

    def redis_holds(self, key: str) -> bool:
        # Straight from Redis (not through a manager that could break a dead holder itself).
        value = self.locks_client.get(f"celery_lock:{{{key}}}")
        return value is not None and not value.startswith(b"~")  # "~": a release's tombstone


@pytest.fixture(scope="module")
def stack(
    module_redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = Stack(module_redis_server, tmp_path_factory.mktemp("workers"))
    stack.workers = [stack.worker("w1"), stack.worker("w2")]
    try:
        for worker in stack.workers:
            worker.start()
        for worker in stack.workers:
            worker.wait_ready()
        yield stack
    finally:
        for worker in stack.workers:
            worker.stop()
        drop_results()
        stack.module.app.close()


def test_queue_duplicates_across_processes_run_one_at_a_time(stack: Stack) -> None:
    serial = stack.module.serial
    results = [serial.delay("g20", n, 0.05) for n in range(20)]
    # Every caller gets its own call's result (the re-queue keeps the task id).
    assert [r.get(timeout=60) for r in results] == list(range(20))
    starts = stack.events(kind="start", group="g20")
    ends = {e["task_id"]: e for e in stack.events(kind="end", group="g20")}
    assert sorted(e["n"] for e in starts) == list(range(20))  # each ran exactly once
    assert max(e["active"] for e in starts) == 1
    intervals = sorted((e["t"], ends[e["task_id"]]["t"]) for e in starts)
    overlaps = sum(1 for a, b in zip(intervals, intervals[1:]) if b[0] < a[1])
    assert overlaps == 0
    assert len({e["pid"] for e in starts}) >= 2  # really spread over processes
    waited = sum(w.log().count("waits in line") for w in stack.workers)
    # Most calls found the key held and waited in line (one released just before a call
    # arrives hands it over without a wait).
    assert waited >= 10


def _start_holder(stack: Stack, tag: str) -> tuple[Any, dict[str, Any]]:
    result = stack.module.hold.delay(tag, 60)
    start = wait_for(lambda: stack.events(kind="start", tag=tag), 10, what=f"{tag} to start")[0]
    assert stack.redis_holds(start["key"])
    return result, start


def test_sigkilled_child_lock_is_released_at_once(stack: Stack) -> None:
    result, start = _start_holder(stack, "sigkill")
    os.kill(start["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: not stack.redis_holds(start["key"]), 5, what="the parent to release")
    freed_after = time.monotonic() - killed_at
    with pytest.raises(Exception, match="Worker exited prematurely"):
        result.get(timeout=10)
    # The duplicate runs now (its own start event), not after the 300 s TTL.
    assert stack.module.hold.delay("sigkill", 0).get(timeout=5) == "sigkill"
    assert len(stack.events(kind="start", tag="sigkill")) == 2
    assert "lost its worker process" in "".join(w.log() for w in stack.workers)
    print(f"SIGKILL: lock freed {freed_after * 1000:.0f} ms after the kill")


def test_revoke_terminate_releases_at_once(stack: Stack) -> None:
    result, start = _start_holder(stack, "revoke")
    stack.module.app.control.revoke(result.id, terminate=True)
    revoked_at = time.monotonic()
    wait_for(lambda: not stack.redis_holds(start["key"]), 5, what="the parent to release")
    freed_after = time.monotonic() - revoked_at
    assert stack.module.hold.delay("revoke", 0).get(timeout=5) == "revoke"
    assert result.state == "REVOKED"
    print(f"revoke(terminate=True): lock freed {freed_after * 1000:.0f} ms after the revoke")


def test_warm_shutdown_lets_the_holder_finish_and_release(stack: Stack) -> None:
    worker = stack.worker("warm", "-Q", "warm")
    stack.workers.append(worker)
    worker.start()
    worker.wait_ready()
    result = stack.module.hold.apply_async(("warm", 1.0), queue="warm")
    start = wait_for(lambda: stack.events(kind="start", tag="warm"), 10)[0]
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    assert result.get(timeout=5) == "warm"
    assert not stack.redis_holds(start["key"])


def test_hard_time_limit_releases_at_once(stack: Stack) -> None:
    result = stack.module.hold.apply_async(("limit", 60), time_limit=1)
    start = wait_for(lambda: stack.events(kind="start", tag="limit"), 10)[0]
    assert stack.redis_holds(start["key"])
    wait_for(lambda: not stack.redis_holds(start["key"]), 5, what="the parent to release")
    freed_after = time.time() - start["t"]
    assert 0.9 < freed_after < 5  # killed at the limit, released then: not after the TTL
    with pytest.raises(Exception, match="TimeLimitExceeded"):
        result.get(timeout=10)
    assert stack.module.hold.delay("limit", 0).get(timeout=5) == "limit"
    print(f"hard time limit 1 s: lock freed {freed_after * 1000:.0f} ms after the start")
