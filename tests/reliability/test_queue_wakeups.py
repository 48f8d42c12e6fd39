"""QUEUE wake-ups and task identity with real ``celery worker`` processes on a Redis broker.

A QUEUE duplicate waits in the key's line and keeps a safety-net re-queue in the broker (30 s
here, as by default, unless a scenario needs it short); the holder's release publishes the first
waiter at once. Copies of one task id (wake-up, safety net, broker redelivery) run once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_lock import RedisLockManager
from tests._redis_server import RedisServer
from tests._workers import NO_RETRIES, WorkerProcess, drop_results, wait_for
from tests.reliability._harness import dead_url

pytestmark = [pytest.mark.reliability, pytest.mark.redis, pytest.mark.celery, pytest.mark.slow]

BROKER_DB, BACKEND_DB, LOCKS_DB, EVENTS_DB = 1, 2, 3, 4


class Stack:
    """A private redis-server (broker, results, locks, events), workers and a producer."""

    def __init__(self, server: RedisServer, workdir: Path, *, locks: str = "redis", **env: str):
        self.server = server
        self.workdir = workdir
        self.env = {
            "CL_TEST_BROKER": server.url_db(BROKER_DB),
            "CL_TEST_BACKEND": server.url_db(BACKEND_DB),
            "CL_TEST_LOCKS": server.url_db(LOCKS_DB) if locks == "redis" else dead_url(),
            "CL_TEST_EVENTS": server.url_db(EVENTS_DB),
            "CL_TEST_LOCK_DIR": str(workdir / "locks"),
            **env,
        }
        self.producer = Celery(
            "q-producer", broker=server.url_db(BROKER_DB), backend=server.url_db(BACKEND_DB)
        )
        self.producer.conf.result_backend_transport_options = NO_RETRIES
        self.producer.conf.broker_connection_retry_on_startup = False
        self.events_client = server.client(EVENTS_DB)
        self.locks_client = server.client(LOCKS_DB)
        self.workers: list[WorkerProcess] = []

    def worker(self, name: str, concurrency: int = 4, **env: str) -> WorkerProcess:
        worker = WorkerProcess(
            "tests._queue_app",
            self.workdir,
            {**self.env, **env},
            name=name,
            concurrency=concurrency,
        )
        self.workers.append(worker)
        worker.start()
        worker.wait_ready()
        return worker

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        return self.producer.send_task(name, args=args, **options)

    def events(self, kind: str) -> list[dict[str, Any]]:
        found = [json.loads(raw) for raw in self.events_client.lrange("events", 0, -1)]
        return [e for e in found if e["kind"] == kind]

    def close(self) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.signal(signal.SIGTERM)
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.wait(timeout=20)
            worker.stop()
        drop_results()
        self.producer.close()
        self.events_client.close()
        self.locks_client.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


def send_in_order(stack: Stack, ns: range, seconds: float) -> list[Any]:
    """QUEUE calls, each sent once the one before it has started or joined the key's line: the
    order in which they reach the lock is then the order they were sent in. (Sent 50 ms apart
    instead, they reached it out of order when a loaded machine held the worker's dispatch to
    its pool for 300 ms: a lock can only order the calls it has seen.)"""
    results: list[Any] = []
    for n in ns:
        result = stack.send("q.serial", n, seconds)
        results.append(result)

        def arrived(task_id: str = result.id) -> bool:
            seen = stack.events("start") + stack.events("requeued")
            return any(e["task_id"] == task_id for e in seen)

        wait_for(arrived, 20, what=f"call {n} to start or join the line")
    return results


def check_serial(
    stack: Stack, results: list[Any], ns: range, timeout: float
) -> list[dict[str, Any]]:
    """Every call returned its own result, ran once, never two at a time; returns the starts."""
    assert [r.get(timeout=timeout) for r in results] == list(ns)
    starts = stack.events("start")
    ends = {e["task_id"]: e for e in stack.events("end")}
    assert sorted(e["n"] for e in starts) == list(ns), "a call ran twice or not at all"
    assert max(e["active"] for e in starts) == 1
    intervals = sorted((e["t"], ends[e["task_id"]]["t"]) for e in starts)
    assert all(b[0] >= a[1] for a, b in zip(intervals, intervals[1:])), "runs overlapped"
    return starts


@pytest.mark.parametrize("locks", ["redis", "redis-only", "files"])
def test_queue_duplicates_run_in_arrival_order_woken_by_each_release(
    server: RedisServer, tmp_path: Path, locks: str
) -> None:
    """10 QUEUE calls of one key: FIFO, no overlap, each its own result, woken by releases
    (the 30 s safety nets never come due: all 10 done well within one of them), at most two
    publishes per waiting call. Locks in Redis with the file fallback (the default), in Redis
    alone (``lock_fallback=None``), and in files (Redis for locks unreachable)."""
    fallback = {"CL_TEST_FALLBACK": ""} if locks == "redis-only" else {}
    stack = Stack(server, tmp_path, locks=locks.split("-", maxsplit=1)[0], **fallback)
    try:
        stack.worker("fifo")
        started = time.monotonic()
        results = send_in_order(stack, range(10), 0.3)
        starts = check_serial(stack, results, range(10), timeout=60)
        elapsed = time.monotonic() - started
        order = [e["n"] for e in sorted(starts, key=lambda e: e["t"])]
        assert order == list(range(10)), f"not in arrival order: {order}"
        assert elapsed < 20, f"10 x 0.3 s took {elapsed:.1f} s: waiters were not woken"
        publishes = len(stack.events("requeued")) + len(stack.events("woken"))
        assert publishes <= 2 * 9, publishes
        print(f"{locks}: 10 x 0.3 s in {elapsed:.2f} s, {publishes} publishes for 9 waiters")
    finally:
        stack.close()


def test_waiters_run_when_the_store_loses_the_line(server: RedisServer, tmp_path: Path) -> None:
    """5 waiters wait; the store loses the line (as after a restart or eviction): each still
    runs once, through its safety-net re-queue. (Locks in Redis alone: on one host the
    hybrid's waiters wait in the file line, whose loss is the same story.)"""
    stack = Stack(server, tmp_path, CL_TEST_COUNTDOWN="1", CL_TEST_FALLBACK="")
    try:
        stack.worker("lost")
        results = send_in_order(stack, range(6), 0.1)
        wait_for(lambda: len(stack.events("requeued")) >= 5, 20, what="5 waiters in line")
        lost = [k for k in stack.locks_client.keys("*") if k.endswith((b":line", b":wake-ups"))]
        stack.locks_client.delete(*lost)
        check_serial(stack, results, range(6), timeout=60)
        assert not stack.events("woken") or len(stack.events("woken")) < 5
    finally:
        stack.close()


def test_waiter_runs_when_the_releaser_dies_before_waking_it(
    server: RedisServer, tmp_path: Path
) -> None:
    """The releasing child is SIGKILLed after its release gave the key to the waiter and
    before it published the wake-up: the waiter runs once, through its safety net."""
    stack = Stack(server, tmp_path, CL_TEST_COUNTDOWN="1")
    try:
        stack.worker("die", CL_TEST_DIE_ON_HAND_OFF="1")
        first = stack.send("q.serial", 0, 0.5)
        wait_for(lambda: stack.events("start"), 20, what="the holder to start")
        second = stack.send("q.serial", 1, 0.1)
        assert second.get(timeout=30) == 1
        with pytest.raises(Exception, match="exited prematurely|WorkerLost"):
            first.get(timeout=30)
        starts = stack.events("start")
        assert sorted(e["n"] for e in starts) == [0, 1]
        assert stack.events("woken") == []
    finally:
        stack.close()


def test_acks_late_task_delivered_again_while_it_runs_runs_once(
    server: RedisServer, tmp_path: Path
) -> None:
    """A 1 s visibility timeout makes the Redis broker deliver a 4 s acks_late task again
    while it runs: the copy is not a duplicate: one run, the real result stored, the link run
    once; no copy stores a result."""
    stack = Stack(server, tmp_path, CL_TEST_VISIBILITY="1")
    try:
        stack.worker("late", concurrency=2)
        link = stack.producer.signature("q.link")
        result = stack.producer.send_task("q.late", args=("a", 4.0), link=link)
        assert result.get(timeout=60) == "ran:a"
        wait_for(lambda: stack.events("link"), 20, what="the link")
        time.sleep(3)  # room for late copies to (wrongly) run or store
        assert len(stack.events("start")) == 1
        assert [e["result"] for e in stack.events("link")] == ["ran:a"]
        assert result.get(timeout=5) == "ran:a"
        assert stack.events("requeued"), "the broker did not deliver the message again"
    finally:
        stack.close()


def test_redelivered_copy_of_a_killed_worker_runs_once(server: RedisServer, tmp_path: Path) -> None:
    """A whole worker is SIGKILLed while an acks_late task runs; the broker delivers the
    message again to another worker, which proves the holder dead (same host) and runs it."""
    stack = Stack(server, tmp_path, CL_TEST_VISIBILITY="2")
    try:
        victim = stack.worker("victim", concurrency=1)
        result = stack.send("q.late", "k", 1.0)
        wait_for(lambda: stack.events("start"), 20, what="the first run")
        for pid in [victim.pid, *_children(victim.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stack.worker("heir", concurrency=1)
        assert result.get(timeout=60) == "ran:k"
        time.sleep(3)
        assert len(stack.events("end")) == 1
        assert len(stack.events("start")) == 2  # the killed run, then the one that finished
    finally:
        stack.close()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                    found.append(int(entry))
    return found


# ------------------------------------------------------------------------------- coalescing


class Producer:
    """A producer app with the coalescing tasks, on the stack's broker, results and locks."""

    def __init__(self, stack: Stack, locks_url: str | None = None) -> None:
        from tests._queue_app import coalesced_tasks  # noqa: PLC0415 - its env is the worker's

        self.app = Celery(
            "q-coalescer",
            broker=stack.server.url_db(BROKER_DB),
            backend=stack.server.url_db(BACKEND_DB),
        )
        self.app.conf.update(
            lock_redis_url=locks_url or stack.server.url_db(LOCKS_DB),
            lock_directory=str(stack.workdir / "producer-locks"),
            result_backend_transport_options=NO_RETRIES,
            broker_connection_retry_on_startup=False,
        )
        self.tasks = coalesced_tasks(self.app, lambda *_: "never runs here")
        self.app.finalize()
        self.coalesced: list[str] = []
        from celery_lock.signals import lock_coalesced  # noqa: PLC0415

        lock_coalesced.connect(self._on_coalesced, weak=False)

    def _on_coalesced(self, sender: Any = None, task_id: str = "", **_: Any) -> None:
        if sender is not None and sender.app is self.app:
            self.coalesced.append(task_id)

    def close(self) -> None:
        from celery_lock.signals import lock_coalesced  # noqa: PLC0415

        lock_coalesced.disconnect(self._on_coalesced)
        self.app.close()


@pytest.fixture
def coalescing(server: RedisServer, tmp_path: Path) -> Iterator[tuple[Stack, Producer]]:
    stack = Stack(server, tmp_path)
    producer = Producer(stack)
    try:
        stack.worker("coalesce")
        yield stack, producer
    finally:
        producer.close()
        stack.close()


def starts_of(stack: Stack, name: str) -> list[dict[str, Any]]:
    return [e for e in stack.events("start") if e.get("name") == name]


def test_queue_coalescing_keeps_one_running_and_one_waiting(
    coalescing: tuple[Stack, Producer],
) -> None:
    """QUEUE, holder running 1 s, 20 identical calls at once: one more message is published,
    19 calls share it; 2 runs; every AsyncResult resolves to a run that started after it."""
    stack, producer = coalescing
    sync = producer.tasks["q.sync"]
    holder = sync.delay(7, 1.0)
    wait_for(lambda: starts_of(stack, "q.sync"), 20, what="the holder to start")
    results = [sync.delay(7, 0.2) for _ in range(20)]
    ids = {r.id for r in results}
    assert len(ids) == 1 and holder.id not in ids
    assert len(producer.coalesced) == 19
    values = [r.get(timeout=30) for r in results]
    assert holder.get(timeout=30) == f"synced:7:{holder.id}"
    assert set(values) == {f"synced:7:{next(iter(ids))}"}
    time.sleep(0.5)
    assert len(starts_of(stack, "q.sync")) == 2
    # Once both ran, the next call is published anew.
    again = sync.delay(7, 0)
    assert again.id not in ids | {holder.id}
    assert again.get(timeout=30) == f"synced:7:{again.id}"


def test_execution_coalescing_hands_out_the_running_call(
    coalescing: tuple[Stack, Producer],
) -> None:
    """EXECUTION: 20 calls while one runs give that run's id; other arguments never coalesce;
    the default (lock_coalesce=False per call) publishes as before."""
    stack, producer = coalescing
    sync = producer.tasks["q.sync_exec"]
    holder = sync.delay(1, 1.0)
    wait_for(lambda: starts_of(stack, "q.sync_exec"), 20, what="the holder to start")
    results = [sync.delay(1, 0) for _ in range(20)]
    assert {r.id for r in results} == {holder.id}
    other = sync.delay(2, 0)
    assert other.id != holder.id
    forced = sync.apply_async((1, 0), lock_coalesce=False)
    assert forced.id != holder.id
    assert {r.get(timeout=30) for r in results} == {f"synced:1:{holder.id}"}
    assert other.get(timeout=30) == f"synced:2:{other.id}"
    assert forced.get(timeout=30) is None  # published, and skipped by the worker-side lock
    assert [e["account"] for e in starts_of(stack, "q.sync_exec")] == [1, 2]


def test_a_marker_whose_producer_died_before_publishing_is_never_handed_out(
    coalescing: tuple[Stack, Producer],
) -> None:
    """A producer killed between its marker and its publish leaves a reserved marker: the next
    caller publishes, and its result resolves."""
    stack, producer = coalescing
    sync = producer.tasks["q.sync"]
    key = sync._lock_options.keys.key((3, 0), {})
    redis_manager = RedisLockManager.from_url(stack.server.url_db(LOCKS_DB))
    assert redis_manager.coalesce(key, "ghost", running=False, ttl=60) is None
    result = sync.delay(3, 0)
    assert result.id != "ghost"
    assert result.get(timeout=30) == f"synced:3:{result.id}"


def test_coalescing_publishes_as_usual_when_redis_is_down(
    server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lock Redis unreachable: every call is published, nothing raises, one WARNING."""
    stack = Stack(server, tmp_path)
    producer = Producer(stack, locks_url=dead_url())
    try:
        caplog.set_level(logging.WARNING, logger="celery_lock")
        sync = producer.tasks["q.sync"]
        ids = {sync.delay(5, 0).id for _ in range(5)}
        assert len(ids) == 5
        warnings = [r for r in caplog.records if "coalescing is off" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        producer.close()
        stack.close()


def test_a_revoked_waiting_call_is_not_handed_out_once_the_worker_saw_it(
    coalescing: tuple[Stack, Producer],
) -> None:
    """A waiting call is revoked; when its turn comes the worker discards it, which clears its
    marker: the next caller publishes a call of its own, which runs."""
    stack, producer = coalescing
    sync = producer.tasks["q.sync"]
    holder = sync.delay(9, 1.0)
    wait_for(lambda: starts_of(stack, "q.sync"), 20, what="the holder to start")
    waiting = sync.delay(9, 0)
    wait_for(lambda: stack.events("requeued"), 20, what="the call to wait in line")
    producer.app.control.revoke(waiting.id)
    assert holder.get(timeout=30)
    wait_for(lambda: waiting.state == "REVOKED", 20, what="the waiting call to be discarded")
    fresh = sync.delay(9, 0)
    assert fresh.id not in (holder.id, waiting.id)
    assert fresh.get(timeout=30) == f"synced:9:{fresh.id}"
