"""Scenarios 1 and 2 with real ``celery worker`` processes (prefork -c 2) racing for one lock.

Two workers serve ``tests._worker_app`` (reused from the Celery layer's own tests, started with
:class:`tests._workers.WorkerProcess`); a producer app in this process sends the tasks by name.
Each scenario runs twice: locks in Redis, and locks in files (the lock Redis URL points at a
closed port, so every worker process falls back to the shared lock directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_lock import (
    FileLockManager,
    HybridLockManager,
    LockCleaner,
    RedisLockManager,
)
from celery_lock.backends import _filerecord
from tests._redis_server import RedisServer
from tests._workers import NO_RETRIES, WorkerProcess, drop_results, wait_for
from tests.reliability._harness import dead_url

pytestmark = [pytest.mark.reliability, pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

BROKER_DB, BACKEND_DB, LOCKS_DB, EVENTS_DB = 1, 2, 3, 4


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from procfs)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


class Workers:
    """Two prefork workers on the default queue, a producer, the events list, lock checks."""

    def __init__(self, server: RedisServer, workdir: Path, backend: str) -> None:
        self.workdir = workdir
        self.lock_dir = workdir / "locks"
        locks_url = server.url_db(LOCKS_DB) if backend == "redis" else dead_url()
        self.env = {
            "CL_TEST_BROKER": server.url_db(BROKER_DB),
            "CL_TEST_BACKEND": server.url_db(BACKEND_DB),
            "CL_TEST_LOCKS": locks_url,
            "CL_TEST_EVENTS": server.url_db(EVENTS_DB),
            "CL_TEST_LOCK_DIR": str(self.lock_dir),
        }
        self.producer = Celery(
            "rel-producer", broker=server.url_db(BROKER_DB), backend=server.url_db(BACKEND_DB)
        )
        self.producer.conf.result_backend_transport_options = NO_RETRIES
        self.producer.conf.broker_connection_retry_on_startup = False
        self.events_client = server.client(EVENTS_DB)
        # Reads the same stores as the workers (pure reads: inspect never breaks a lock).
        self.manager = HybridLockManager(
            RedisLockManager.from_url(locks_url, socket_timeout=0.5, socket_connect_timeout=0.25),
            FileLockManager(self.lock_dir),
        )
        self.workers: list[WorkerProcess] = []

    def worker(self, name: str, *extra: str) -> WorkerProcess:
        worker = WorkerProcess(
            "tests._worker_app", self.workdir, self.env, name=name, extra_args=extra
        )
        self.workers.append(worker)
        return worker.start()

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        return self.producer.send_task(name, args=args, **options)

    def events(self, **match: Any) -> list[dict[str, Any]]:
        found = [json.loads(raw) for raw in self.events_client.lrange("events", 0, -1)]
        return [e for e in found if all(e.get(k) == v for k, v in match.items())]

    def held(self, key: str) -> bool:
        return self.manager.is_locked(key)

    def stored(self, key: str) -> bool:
        """A lock entry for ``key`` exists in either store, live or not (what the cleaner is
        for: a file backend's ``is_locked`` already hides a dead holder's lock)."""
        assert self.manager.redis is not None
        with contextlib.suppress(redis.RedisError):  # the file-fallback stack has no Redis
            value = self.manager.redis.client.get(self.manager.redis._name(key))
            if value is not None and not value.startswith(b"~"):  # "~": a release's tombstone
                return True
        # A lock file stays after release with only its fence in it: a holder record has a
        # token.
        path = self.lock_dir / _filerecord.file_name(key)
        return path.is_file() and b'"token"' in path.read_bytes()

    def close(self) -> None:
        for worker in self.workers:  # all at once: each warm shutdown takes ~2 s
            if worker.proc is not None and worker.proc.poll() is None:
                worker.signal(signal.SIGTERM)
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.wait(timeout=20)
            worker.stop()
        drop_results()
        self.producer.close()
        self.events_client.close()


@pytest.fixture(scope="module", params=["redis", "file-fallback"])
def workers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    server = RedisServer(tmp_path_factory.mktemp("celery-redis"))
    server.start()
    stack = Workers(server, tmp_path_factory.mktemp("celery-work"), request.param)
    try:
        first, second = stack.worker("r1"), stack.worker("r2")
        first.wait_ready()
        second.wait_ready()
        yield stack
    finally:
        stack.close()
        server.kill()


def run_until_it_runs(stack: Workers, tag: str, timeout: float = 10.0) -> tuple[float, int]:
    """Send ``w.hold(tag, 0)`` until one call really runs (a skipped duplicate returns None);
    return when it started (wall clock) and how many calls were skipped."""
    skipped = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.send("w.hold", tag, 0).get(timeout=10) == tag:
            starts = stack.events(kind="start", tag=tag)
            return starts[-1]["t"], skipped
        skipped += 1
    raise AssertionError(f"no duplicate of {tag} ran within {timeout} s")


def test_execution_duplicates_racing_over_two_workers(workers: Workers) -> None:
    """12 identical EXECUTION calls sent at once to two workers (4 child processes): exactly one
    runs while it holds the lock, the 11 others are skipped (state SUCCESS, result None); once
    it finished, the next identical call runs again."""
    results = [workers.send("w.hold", "race-exec", 0.8) for _ in range(12)]
    outcomes = [r.get(timeout=30) for r in results]
    assert outcomes.count("race-exec") == 1 and outcomes.count(None) == 11
    assert all(r.state == "SUCCESS" for r in results)
    starts = workers.events(kind="start", tag="race-exec")
    assert len(starts) == 1
    assert not workers.held(starts[0]["key"])
    ran_at, _ = run_until_it_runs(workers, "race-exec")
    assert ran_at > starts[0]["t"]


def test_queue_duplicates_racing_over_two_workers(workers: Workers) -> None:
    """16 QUEUE calls of one lock group over two workers: every call runs exactly once, never
    two at a time (start/end intervals and the shared in-progress counter), and each caller
    gets its own call's result."""
    results = [workers.send("w.serial", "rel-g", n, 0.02) for n in range(16)]
    assert [r.get(timeout=60) for r in results] == list(range(16))
    starts = workers.events(kind="start", group="rel-g")
    ends = {e["task_id"]: e for e in workers.events(kind="end", group="rel-g")}
    assert sorted(e["n"] for e in starts) == list(range(16))
    assert max(e["active"] for e in starts) == 1
    intervals = sorted((e["t"], ends[e["task_id"]]["t"]) for e in starts)
    assert all(b[0] >= a[1] for a, b in zip(intervals, intervals[1:]))


def test_child_killed_mid_task_duplicate_runs_at_once(workers: Workers) -> None:
    """A child process is SIGKILLed while it holds a 300 s lock: an identical call runs within
    2 s (the worker's main process releases the dead child's lock; no TTL wait)."""
    pending = workers.send("w.hold", "kill-child", 60)
    start = wait_for(lambda: workers.events(kind="start", tag="kill-child"), 10)[0]
    assert workers.held(start["key"])
    killed_at = time.time()
    os.kill(start["pid"], signal.SIGKILL)
    ran_at, skipped = run_until_it_runs(workers, "kill-child")
    assert ran_at - killed_at < 2.0, f"duplicate ran {ran_at - killed_at:.2f} s after the kill"
    with pytest.raises(Exception, match="exited prematurely"):
        pending.get(timeout=10)
    print(
        f"child SIGKILL: duplicate ran {(ran_at - killed_at) * 1e3:.0f} ms later ({skipped} skipped)"
    )


def test_whole_worker_killed_duplicate_runs_and_cleaner_frees_the_rest(workers: Workers) -> None:
    """A whole worker (main process and both children) is SIGKILLed while two tasks hold 300 s
    locks, so nobody is left to release them: an identical call on the surviving workers runs
    within 2 s (its acquire proves the holder dead and breaks the lock), and one cleaner pass
    removes the other orphan lock."""
    doomed = workers.worker("doomed", "-Q", "doomed")
    doomed.wait_ready()
    workers.send("w.hold", "kill-worker", 60, queue="doomed")
    workers.send("w.hold", "orphan", 60, queue="doomed")
    started = wait_for(
        lambda: (
            workers.events(kind="start", tag="kill-worker")
            and workers.events(kind="start", tag="orphan")
        ),
        10,
    )
    assert started
    key = workers.events(kind="start", tag="kill-worker")[0]["key"]
    orphan_key = workers.events(kind="start", tag="orphan")[0]["key"]
    assert workers.held(key) and workers.held(orphan_key)
    victims = [doomed.pid, *children_of(doomed.pid)]
    assert len(victims) == 3
    killed_at = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    doomed.wait(timeout=10)
    ran_at, skipped = run_until_it_runs(workers, "kill-worker")
    assert ran_at - killed_at < 2.0, f"duplicate ran {ran_at - killed_at:.2f} s after the kill"
    assert workers.stored(orphan_key)
    report = LockCleaner(workers.manager).clean()
    assert report.removed >= 1
    assert not workers.stored(orphan_key) and not workers.held(orphan_key)
    print(
        f"worker SIGKILL: duplicate ran {(ran_at - killed_at) * 1e3:.0f} ms later ({skipped} skipped)"
    )
