"""The lock Redis is unreachable: with ``lock_fallback="file"`` tasks keep running and
deduplicating (one WARNING); with ``lock_fallback=None`` EXECUTION tasks fail with
LockBackendUnavailable and QUEUE tasks are re-queued until the store answers again."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_lock.errors import LockBackendUnavailable
from celery_lock.signals import lock_fallback, lock_requeued
from celery_lock.task import LockedTask
from tests._redis_server import RedisServer
from tests._workers import NO_RETRIES, drop_results, root_log_level_kept, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.celery]


class Stack:
    def __init__(self, app: Celery, locks: RedisServer, tasks: dict[str, Any]) -> None:
        self.app = app
        self.locks = locks
        self.t = tasks
        self.gates: dict[str, threading.Event] = {}
        self.started: list[tuple[str, str]] = []  # (tag, backend of the lease)

    def gate(self, tag: str) -> threading.Event:
        return self.gates.setdefault(tag, threading.Event())


def _stack(
    broker: RedisServer, workdir: Path, name: str, fallback: str | None, dbs: tuple[int, int]
) -> Iterator[Stack]:
    locks = RedisServer(workdir / "locks-redis")
    locks.start()
    locks.stop()  # unreachable from the start; tests restart it to show recovery
    app = Celery(name, broker=broker.url_db(dbs[0]), backend=broker.url_db(dbs[1]))
    app.conf.update(
        lock_redis_url=locks.url_db(0),
        lock_fallback=fallback,
        lock_directory=str(workdir / "locks"),
        lock_retry_interval=0.2,
        lock_default_countdown=0.05,
        broker_connection_retry_on_startup=False,
        worker_hijack_root_logger=False,
        result_backend_transport_options=NO_RETRIES,
    )
    tasks: dict[str, Any] = {}
    stack = Stack(app, locks, tasks)

    @app.task(base=LockedTask, bind=True, name=f"{name}.hold", shared=False)
    def hold(self: LockedTask, tag: str) -> str:
        stack.started.append((tag, self.request.lock_lease.backend))
        assert stack.gate(tag).wait(15)
        return tag

    @app.task(base=LockedTask, name=f"{name}.queued", shared=False, lock_mode="queue")
    def queued(tag: str) -> str:
        stack.started.append((tag, "queued"))
        return tag

    tasks.update(hold=hold, queued=queued)
    with (
        root_log_level_kept(),
        start_worker(app, pool="threads", concurrency=2, perform_ping_check=False),
    ):
        yield stack
    drop_results()
    app.close()
    locks.kill()


# Class scope: one embedded worker per process at a time (a second one would take over the
# first one's fast-trace task registry).
@pytest.fixture(scope="class")
def fallback(
    module_redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    yield from _stack(module_redis_server, tmp_path_factory.mktemp("fb"), "fb", "file", (1, 2))


@pytest.fixture(scope="class")
def closed(
    module_redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    yield from _stack(module_redis_server, tmp_path_factory.mktemp("fc"), "fc", None, (3, 4))


@pytest.fixture
def transitions() -> Iterator[list[tuple[Any, str]]]:
    seen: list[tuple[Any, str]] = []

    def receiver(sender: Any, state: str, **_: Any) -> None:
        seen.append((sender, state))

    lock_fallback.connect(receiver)
    yield seen
    lock_fallback.disconnect(receiver)


class TestFileFallback:
    def test_keeps_running_and_deduplicating_with_one_warning(
        self, fallback: Stack, caplog: pytest.LogCaptureFixture, transitions: list[Any]
    ) -> None:
        caplog.set_level(logging.INFO, logger="celery_lock")
        hold = fallback.t["hold"]
        for round_ in ("a", "b"):
            holder = hold.delay(round_)
            wait_for(lambda r=round_: (r, "file") in fallback.started, 10, what="holder")
            assert hold.delay(round_).get(timeout=10) is None  # deduplicated by the file lock
            fallback.gate(round_).set()
            assert holder.get(timeout=10) == round_
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "this host" in warnings[0].getMessage()  # says file locks are host-local
        assert transitions == [(fallback.app, "down")]

        fallback.locks.start()  # Redis answers again: the next lock comes from Redis
        fallback.gate("c").set()

        def served_by_redis() -> bool:
            hold.delay("c").get(timeout=10)
            return ("c", "redis") in fallback.started

        wait_for(served_by_redis, 10, 0.1, "a lease from Redis after recovery")
        assert transitions == [(fallback.app, "down"), (fallback.app, "up")]
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


class TestFailClosed:
    def test_execution_task_fails_with_backend_unavailable(self, closed: Stack) -> None:
        result = closed.t["hold"].delay("x")
        with pytest.raises(LockBackendUnavailable) as info:
            result.get(timeout=10)
        assert "fc.hold" in str(info.value)
        assert result.state == "FAILURE"
        assert [s for s in closed.started if s[0] == "x"] == []  # the class shares the list

    def test_queue_task_is_requeued_until_the_store_answers(self, closed: Stack) -> None:
        requeues: list[dict[str, Any]] = []

        def receiver(sender: Any, **kwargs: Any) -> None:
            requeues.append(kwargs)

        lock_requeued.connect(receiver)
        try:
            result = closed.t["queued"].delay("q")
            wait_for(lambda: len(requeues) >= 2, 10, what="two re-queues while Redis is down")
            assert result.state == "PENDING"
            assert {r["holder_task_id"] for r in requeues} == {None}
            closed.locks.start()
            assert result.get(timeout=15) == "q"
        finally:
            lock_requeued.disconnect(receiver)
            closed.locks.stop()  # unreachable again, as the class's other test expects
        assert [s for s in closed.started if s[0] == "q"] == [("q", "queued")]
