"""LockedTask in an embedded worker (threads pool, concurrency 2) with a real Redis broker, result
backend and lock store: duplicates, outcomes through the result backend, canvas, retries and
QUEUE re-queues."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, chain, signals
from celery.contrib.testing.worker import start_worker

from celery_lock.config import get_manager
from celery_lock.errors import LockNotAcquired
from celery_lock.signals import lock_requeued, lock_skipped
from celery_lock.task import REQUEUES_HEADER, LockedTask
from tests._redis_server import RedisServer
from tests._workers import NO_RETRIES, drop_results, root_log_level_kept, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.celery]


class Probe:
    """What the tasks did, and gates the test opens to let a holder finish."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.gates: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self.runs: list[dict[str, Any]] = []

    def _event(self, table: dict[str, threading.Event], tag: str) -> threading.Event:
        with self.mutex:
            return table.setdefault(tag, threading.Event())

    def enter(self, tag: str, **info: Any) -> None:
        with self.mutex:
            self.runs.append({"tag": tag, **info})
        self._event(self.entered, tag).set()

    def block(self, tag: str) -> None:
        assert self._event(self.gates, tag).wait(15), f"gate {tag} never opened"

    def open(self, tag: str) -> None:
        self._event(self.gates, tag).set()

    def wait_entered(self, tag: str) -> None:
        assert self._event(self.entered, tag).wait(10), f"{tag} never started"

    def ran(self, tag: str) -> list[dict[str, Any]]:
        with self.mutex:
            return [run for run in self.runs if run["tag"] == tag]


class Env:
    def __init__(self, app: Celery, probe: Probe, tasks: dict[str, Any]) -> None:
        self.app = app
        self.probe = probe
        self.t = tasks


@pytest.fixture(scope="module")
def env(
    module_redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    server = module_redis_server
    probe = Probe()
    app = Celery("tw", broker=server.url_db(1), backend=server.url_db(2), set_as_current=False)
    app.conf.update(
        lock_redis_url=server.url_db(3),
        lock_directory=str(tmp_path_factory.mktemp("tw") / "locks"),
        lock_default_countdown=0.05,
        broker_connection_retry_on_startup=False,
        worker_hijack_root_logger=False,
        result_backend_transport_options=NO_RETRIES,
    )
    tasks: dict[str, Any] = {}

    def register(**options: Any) -> Any:
        def deco(fun: Any) -> Any:
            task = app.task(name=f"tw.{fun.__name__}", shared=False, **options)(fun)
            tasks[fun.__name__] = task
            return task

        return deco

    @register(base=LockedTask, bind=True)
    def hold(self: LockedTask, tag: str, b: int = 2) -> str:
        probe.enter(tag, task_id=self.request.id, fence=self.request.lock_lease.fence)
        probe.block(tag)
        return tag

    @register(base=LockedTask, lock_on_duplicate="fail")
    def hold_fail(tag: str) -> str:
        probe.enter(tag)
        probe.block(tag)
        return tag

    @register(base=LockedTask, lock_on_duplicate="ignore")
    def hold_ignore(tag: str) -> str:
        probe.enter(tag)
        probe.block(tag)
        return tag

    @register()
    def after(value: Any) -> str:
        probe.enter(f"after:{value}")
        return f"after:{value}"

    @register()
    def errback(request: Any, exc: BaseException, traceback: Any) -> None:
        probe.enter(f"errback:{request.id}", exc=exc)

    @register(base=LockedTask)
    def boom(tag: str) -> None:
        probe.enter(tag)
        raise ValueError(tag)

    @register(base=LockedTask, bind=True, max_retries=1)
    def flaky(self: LockedTask, tag: str) -> str:
        probe.enter(tag, task_id=self.request.id, retries=self.request.retries)
        if len(probe.ran(tag)) == 1:  # only the very first run retries
            probe.block(tag)
            raise self.retry(countdown=2)
        return tag

    @register(base=LockedTask, bind=True, lock_mode="queue", lock_key="{tag}", max_retries=0)
    def queued(self: LockedTask, tag: str, n: int) -> int:
        headers = self.request.headers or {}
        probe.enter(tag, n=n, requeues=headers.get(REQUEUES_HEADER), retries=self.request.retries)
        if n == 0:
            probe.block(tag)
        return n

    @register(base=LockedTask, lock_mode="queue", lock_key="{tag}", lock_max_requeues=2)
    def capped(tag: str, n: int) -> int:
        probe.enter(tag, n=n)
        if n == 0:
            probe.block(tag)
        return n

    with (
        root_log_level_kept(),
        start_worker(
            app,
            pool="threads",
            concurrency=2,
            perform_ping_check=False,
            queues=["celery", "lockq"],
            shutdown_timeout=30,
        ),
    ):
        yield Env(app, probe, tasks)
    drop_results()
    app.close()


@pytest.fixture(autouse=True)
def no_lock_left_behind(env: Env) -> Iterator[None]:
    """Every path of every test releases what it took (checked straight after the test)."""
    yield
    manager = get_manager(env.app)
    wait_for(
        lambda: not [info for info in manager.iter_locks() if info.key.startswith("tw.")],
        5,
        what="every tw.* lock to be released",
    )


@pytest.fixture
def signals_seen() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    def on_skip(sender: Any, **kwargs: Any) -> None:
        seen.append(("skipped", kwargs))

    def on_requeue(sender: Any, **kwargs: Any) -> None:
        seen.append(("requeued", kwargs))

    lock_skipped.connect(on_skip)
    lock_requeued.connect(on_requeue)
    yield seen
    lock_skipped.disconnect(on_skip)
    lock_requeued.disconnect(on_requeue)


def _wait_skipped(seen: list[Any], task_id: str) -> None:
    wait_for(
        lambda: any(name == "skipped" and kw["task_id"] == task_id for name, kw in seen),
        10,
        what=f"{task_id} to be handled as a duplicate",
    )


def _holding(env: Env, task: str, tag: str, *args: Any) -> Any:
    result = env.t[task].delay(tag, *args)
    env.probe.wait_entered(tag)
    return result


def test_execution_duplicate_while_holder_runs_never_runs(
    env: Env, signals_seen: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_lock.task")
    holder = _holding(env, "hold", "dup")
    duplicate = env.t["hold"].delay("dup")
    assert duplicate.get(timeout=10) is None
    assert duplicate.state == "SUCCESS"
    assert not holder.ready()
    env.probe.open("dup")
    assert holder.get(timeout=10) == "dup"
    assert len(env.probe.ran("dup")) == 1
    skipped = [kw for name, kw in signals_seen if name == "skipped"]
    assert [(kw["task_id"], kw["holder_task_id"], kw["action"]) for kw in skipped] == [
        (duplicate.id, holder.id, "skip")
    ]
    lines = [r for r in caplog.records if r.name == "celery_lock.task" and r.levelno > 10]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO
    assert holder.id in lines[0].getMessage()
    assert lines[0].task_id == duplicate.id
    assert lines[0].holder_task_id == holder.id
    assert lines[0].lock_key.startswith("tw.hold:")


def test_argument_spellings_are_one_key_and_other_arguments_run_concurrently(env: Env) -> None:
    hold = env.t["hold"]
    holder = hold.apply_async(("sp",), {"b": 2})
    env.probe.wait_entered("sp")
    spellings = [
        hold.delay("sp", 2),
        hold.delay("sp"),
        hold.apply_async(kwargs={"tag": "sp"}),
        env.app.send_task("tw.hold", args=["sp"], kwargs={"b": 2}),
    ]
    assert [r.get(timeout=10) for r in spellings] == [None] * 4
    other = hold.delay("sp", 3)  # another b: another lock, runs while the holder still runs
    wait_for(lambda: len(env.probe.ran("sp")) == 2, 10, what="b=3 to start")
    assert not holder.ready()
    env.probe.open("sp")
    assert holder.get(timeout=10) == other.get(timeout=10) == "sp"
    assert len(env.probe.ran("sp")) == 2


def test_fail_reaches_the_caller_as_lock_not_acquired(env: Env) -> None:
    holder = _holding(env, "hold_fail", "fail")
    duplicate = env.t["hold_fail"].delay("fail")
    with pytest.raises(LockNotAcquired) as info:
        duplicate.get(timeout=10)
    assert duplicate.state == "FAILURE"
    message = str(info.value)
    assert "tw.hold_fail" in message
    assert holder.id in message
    assert "tw.hold_fail:" in message  # the key
    env.probe.open("fail")
    assert holder.get(timeout=10) == "fail"


def test_ignore_stores_no_state(env: Env, signals_seen: list[Any]) -> None:
    holder = _holding(env, "hold_ignore", "ign")
    duplicate = env.t["hold_ignore"].delay("ign")
    _wait_skipped(signals_seen, duplicate.id)
    assert duplicate.state == "PENDING"
    env.probe.open("ign")
    assert holder.get(timeout=10) == "ign"
    assert duplicate.state == "PENDING"
    assert len(env.probe.ran("ign")) == 1


def test_chain_with_skipped_duplicate_continues_with_none(env: Env) -> None:
    t = env.t
    holder = _holding(env, "hold", "ch-skip")
    skipped = chain(t["hold"].si("ch-skip"), t["after"].s()).delay()
    assert skipped.get(timeout=10) == "after:None"
    env.probe.open("ch-skip")
    assert holder.get(timeout=10) == "ch-skip"


def test_chain_with_failed_duplicate_runs_errbacks_and_stops(env: Env) -> None:
    t = env.t
    holder = _holding(env, "hold_fail", "ch-fail")
    first = t["hold_fail"].si("ch-fail").set(link_error=t["errback"].s())
    failed = chain(first, t["after"].s("y")).delay()
    with pytest.raises(LockNotAcquired):
        failed.get(timeout=10)
    errback_runs = wait_for(lambda: env.probe.ran(f"errback:{failed.parent.id}"), 10)
    assert isinstance(errback_runs[0]["exc"], LockNotAcquired)
    env.probe.open("ch-fail")
    assert holder.get(timeout=10) == "ch-fail"
    assert not env.probe.ran("after:y")


def test_chain_with_ignored_duplicate_stops(env: Env, signals_seen: list[Any]) -> None:
    t = env.t
    holder = _holding(env, "hold_ignore", "ch-ign")
    ignored = chain(t["hold_ignore"].si("ch-ign"), t["after"].s("x")).delay()
    _wait_skipped(signals_seen, ignored.parent.id)
    assert ignored.state == ignored.parent.state == "PENDING"
    env.probe.open("ch-ign")
    assert holder.get(timeout=10) == "ch-ign"
    assert not env.probe.ran("after:x")


def test_lock_is_released_when_the_task_raises(env: Env) -> None:
    with pytest.raises(ValueError, match="boom-1"):
        env.t["boom"].delay("boom-1").get(timeout=10)
    with pytest.raises(ValueError, match="boom-1"):
        env.t["boom"].delay("boom-1").get(timeout=10)
    assert len(env.probe.ran("boom-1")) == 2  # the second call ran: nothing was left locked


def test_retry_releases_the_lock_for_the_next_attempt_and_duplicates(env: Env) -> None:
    flaky = env.t["flaky"]
    key = flaky._lock_options.keys.key(("fl",), {})
    manager = get_manager(env.app)
    first = flaky.delay("fl")
    env.probe.wait_entered("fl")
    assert manager.is_locked(key)
    env.probe.open("fl")
    # The retry is due in 2 s; the lock is free as soon as it is raised, so a duplicate runs.
    wait_for(lambda: not manager.is_locked(key), 1.5, what="the retry to release")
    assert flaky.delay("fl").get(timeout=5) == "fl"
    assert first.get(timeout=10) == "fl"
    runs = env.probe.ran("fl")
    assert [(run["task_id"] == first.id, run["retries"]) for run in runs] == [
        (True, 0),
        (False, 0),
        (True, 1),
    ]


def test_queue_duplicate_is_requeued_then_runs_with_its_own_result(
    env: Env, signals_seen: list[Any]
) -> None:
    queued = env.t["queued"]
    holder = _holding(env, "queued", "q1", 0)
    duplicate = queued.delay("q1", 1)
    wait_for(
        lambda: (
            sum(1 for n, kw in signals_seen if n == "requeued" and kw["task_id"] == duplicate.id)
            >= 2
        ),
        10,
        what="two re-queues",
    )
    assert duplicate.state == "PENDING"  # not ready while it waits its turn
    env.probe.open("q1")
    assert holder.get(timeout=10) == 0
    assert duplicate.get(timeout=10) == 1
    run = [r for r in env.probe.ran("q1") if r["n"] == 1]
    assert len(run) == 1
    assert run[0]["requeues"] >= 2  # the header counted them ...
    assert run[0]["retries"] == 0  # ... and max_retries=0 was never consumed
    counts = [kw["requeues"] for n, kw in signals_seen if kw["task_id"] == duplicate.id]
    assert counts == list(range(1, len(counts) + 1))


def test_queue_requeue_keeps_routing_and_links(env: Env) -> None:
    published: list[dict[str, Any]] = []

    def on_publish(sender: Any = None, headers: Any = None, routing_key: Any = None, **_: Any):
        if sender == "tw.queued" and headers.get(REQUEUES_HEADER):
            published.append({"id": headers["id"], "routing_key": routing_key})

    signals.before_task_publish.connect(on_publish)
    try:
        holder = _holding(env, "queued", "q2", 0)
        linked = env.t["queued"].apply_async(("q2", 7), queue="lockq", link=env.t["after"].s())
        wait_for(lambda: published, 10, what="a re-queue")
        env.probe.open("q2")
        assert holder.get(timeout=10) == 0
        assert linked.get(timeout=10) == 7
        wait_for(lambda: env.probe.ran("after:7"), 10, what="the link to run")
    finally:
        signals.before_task_publish.disconnect(on_publish)
    assert {p["id"] for p in published} == {linked.id}
    assert {p["routing_key"] for p in published} == {"lockq"}


def test_lock_max_requeues_fails_the_next_conflict(env: Env, signals_seen: list[Any]) -> None:
    holder = _holding(env, "capped", "cap", 0)
    duplicate = env.t["capped"].delay("cap", 1)
    with pytest.raises(LockNotAcquired, match="after 2 re-queues"):
        duplicate.get(timeout=10)
    requeues = [kw["requeues"] for n, kw in signals_seen if kw["task_id"] == duplicate.id]
    assert requeues == [1, 2]
    env.probe.open("cap")
    assert holder.get(timeout=10) == 0
    assert [r["n"] for r in env.probe.ran("cap")] == [0]


def test_lease_fence_is_visible_to_the_task_and_increases(env: Env) -> None:
    for tag in ("fence-a", "fence-b"):
        env.probe.open(tag)
    env.t["hold"].delay("fence-a").get(timeout=10)
    env.t["hold"].delay("fence-a").get(timeout=10)
    fences = [run["fence"] for run in env.probe.ran("fence-a")]
    assert len(fences) == 2
    assert fences[0] < fences[1]


def test_junk_requeue_header_counts_as_zero(env: Env, signals_seen: list[Any]) -> None:
    holder = _holding(env, "capped", "junk", 0)
    duplicate = env.t["capped"].apply_async(("junk", 1), headers={REQUEUES_HEADER: "many"})
    with pytest.raises(LockNotAcquired, match="after 2 re-queues"):
        duplicate.get(timeout=10)
    assert [kw["requeues"] for n, kw in signals_seen if kw["task_id"] == duplicate.id] == [1, 2]
    env.probe.open("junk")
    assert holder.get(timeout=10) == 0
