"""QUEUE wake-ups and task identity with real ``celery worker`` processes on a Redis broker.

A QUEUE duplicate waits in the key's line and keeps a safety-net re-queue in the broker (30 s
here, as by default, unless a scenario needs it short); the holder's release publishes the first
waiter at once. Copies of one task id (wake-up, safety net, broker redelivery) run once.
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
from celery import Celery

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
    """QUEUE calls sent 50 ms apart, after the first one started (a defined arrival order)."""
    results = [stack.send("q.serial", ns[0], seconds)]
    wait_for(lambda: stack.events("start"), 20, what="the first call to start")
    for n in ns[1:]:
        time.sleep(0.05)
        results.append(stack.send("q.serial", n, seconds))
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
