"""LockedTask without a worker: ``apply()`` (eager) and direct calls, under Celery's app trap
(any use of ``current_app`` fails), with file locks in a private folder."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from billiard.exceptions import WorkerLostError
from celery import Celery
from celery.app.task import Context
from celery.contrib.testing.app import set_trap
from celery.exceptions import Ignore, Reject, TimeLimitExceeded

from celery_lock.config import get_manager
from celery_lock.errors import LockError, LockNotAcquired
from celery_lock.keys import LockKeyError
from celery_lock.signals import lock_acquired, lock_lost, lock_skipped
from celery_lock.task import LockedTask, _on_task_failure, _on_task_revoked
from tests._workers import wait_for


class Gates:
    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.events: dict[str, threading.Event] = {}
        self.log: list[tuple[str, str, float]] = []

    def _get(self, name: str) -> threading.Event:
        with self.mutex:
            return self.events.setdefault(name, threading.Event())

    def mark(self, what: str, tag: str) -> None:
        with self.mutex:
            self.log.append((what, tag, time.monotonic()))
        self._get(f"{what}:{tag}").set()

    def wait(self, name: str, timeout: float = 10) -> None:
        assert self._get(name).wait(timeout), f"{name} not set"

    def open(self, tag: str) -> None:
        self._get(f"open:{tag}").set()

    def count(self, what: str, tag: str) -> int:
        with self.mutex:
            return sum(1 for w, t, _ in self.log if (w, t) == (what, tag))


class Env:
    def __init__(self, app: Celery, gates: Gates, tasks: dict[str, Any]) -> None:
        self.app = app
        self.gates = gates
        self.t = tasks

    def in_thread(self, task: str, *args: Any) -> tuple[threading.Thread, list[Any]]:
        """apply() in another thread (a concurrent caller); returns the thread and its result."""
        out: list[Any] = []
        thread = threading.Thread(target=lambda: out.append(self.t[task].apply(args)))
        thread.start()
        return thread, out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    gates = Gates()
    app = Celery("te", set_as_current=False)
    app.conf.update(lock_directory=str(tmp_path_factory.mktemp("te") / "locks"))
    tasks: dict[str, Any] = {}

    def register(**options: Any) -> Any:
        def deco(fun: Any) -> Any:
            tasks[fun.__name__] = app.task(name=f"te.{fun.__name__}", shared=False, **options)(fun)
            return tasks[fun.__name__]

        return deco

    def body(tag: str) -> str:
        gates.mark("start", tag)
        gates.wait(f"open:{tag}")
        gates.mark("end", tag)
        return tag

    @register(base=LockedTask, bind=True)
    def hold(self: LockedTask, tag: str) -> Any:
        gates.mark("lease", repr(self.request.lock_lease))
        return body(tag)

    @register(base=LockedTask, lock_on_duplicate="fail")
    def hold_fail(tag: str) -> str:
        return body(tag)

    @register(base=LockedTask, lock_on_duplicate="ignore")
    def hold_ignore(tag: str) -> str:
        return body(tag)

    @register(base=LockedTask, lock_mode="queue", lock_ttl=5)
    def queued(tag: str) -> str:
        return body(tag)

    @register(base=LockedTask, lock_mode="queue", lock_ttl=0.4)
    def queued_short(tag: str) -> str:
        return body(tag)

    @register(base=LockedTask)
    def raises(kind: str) -> None:
        gates.mark("start", kind)
        exc = {"error": ValueError("boom"), "ignore": Ignore(), "reject": Reject("no")}[kind]
        raise exc

    @register(base=LockedTask, lock_ttl=0.3)
    def renewed(tag: str) -> str:
        return body(tag)

    @register(base=LockedTask, lock_ttl=0.3, lock_renew=False)
    def unrenewed(tag: str) -> str:
        return body(tag)

    @register(base=LockedTask, bind=True)
    def nested(self: LockedTask, depth: int) -> Any:
        lease = self.request.lock_lease
        inner = self(depth - 1) if depth else None
        return (lease.key if lease else None, inner, self.request.lock_lease is lease)

    @register(base=LockedTask, bind=True, lock_key="acct:{account_id}")
    def by_account(self: LockedTask, account_id: int, note: str = "") -> str:
        return self.request.lock_lease.key

    app.finalize()
    with set_trap(app):
        yield Env(app, gates, tasks)
    app.close()


@pytest.fixture
def seen() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    receivers = []
    for name, lock_signal in (
        ("acquired", lock_acquired),
        ("skipped", lock_skipped),
        ("lost", lock_lost),
    ):

        def receiver(sender: Any, _name: str = name, **kwargs: Any) -> None:
            found.append((_name, {"sender": sender, **kwargs}))

        lock_signal.connect(receiver)
        receivers.append((lock_signal, receiver))
    yield found
    for lock_signal, receiver in receivers:
        lock_signal.disconnect(receiver)


def test_eager_execution_duplicate_is_skipped(env: Env, seen: list[Any]) -> None:
    thread, out = env.in_thread("hold", "e1")
    env.gates.wait("start:e1")
    duplicate = env.t["hold"].apply(("e1",))
    assert (duplicate.state, duplicate.result) == ("SUCCESS", None)
    env.gates.open("e1")
    thread.join(10)
    assert out[0].result == "e1"
    assert env.gates.count("start", "e1") == 1
    skipped = [kw for name, kw in seen if name == "skipped"]
    assert [(kw["task_id"], kw["holder_task_id"]) for kw in skipped] == [(duplicate.id, out[0].id)]
    acquired = [kw for name, kw in seen if name == "acquired"]
    assert [kw["task_id"] for kw in acquired] == [out[0].id]
    assert acquired[0]["lease"].key == acquired[0]["key"]
    assert acquired[0]["wait_ms"] >= 0


def test_eager_fail_and_ignore(env: Env) -> None:
    for task, tag in (("hold_fail", "e2"), ("hold_ignore", "e3")):
        thread, _ = env.in_thread(task, tag)
        env.gates.wait(f"start:{tag}")
        duplicate = env.t[task].apply((tag,))
        env.gates.open(tag)
        thread.join(10)
        if task == "hold_fail":
            assert duplicate.state == "FAILURE"
            assert isinstance(duplicate.result, LockNotAcquired)
            assert duplicate.result.key.startswith("te.hold_fail:")
            assert duplicate.result.task_name == "te.hold_fail"
        else:
            assert duplicate.state == "IGNORED"
        assert env.gates.count("start", tag) == 1


def test_direct_calls_are_locked_too(env: Env) -> None:
    thread, _ = env.in_thread("hold_fail", "d1")
    env.gates.wait("start:d1")
    with pytest.raises(LockNotAcquired) as info:
        env.t["hold_fail"]("d1")
    assert info.value.task_id is None  # no Celery request behind a direct call
    env.gates.open("d1")
    thread.join(10)
    env.gates.open("d2")
    assert env.t["hold"]("d2") == "d2"  # unlocked again: runs
    assert "Lease(key='te.hold:" in [t for w, t, _ in env.gates.log if w == "lease"][-1]


def test_nested_direct_call_gets_its_own_request_and_lease(env: Env) -> None:
    outer_key, inner, same = env.t["nested"](1)
    inner_key, innermost, inner_same = inner
    assert outer_key != inner_key  # other arguments, other lock
    assert innermost is None
    assert same and inner_same  # each call still saw its own lease after the nested one
    result = env.t["nested"].apply((1,)).result
    assert result[0] == outer_key


def test_format_key_is_namespaced_by_task(env: Env) -> None:
    assert env.t["by_account"](42, note="x") == "te.by_account:acct:42"


def test_queue_waits_in_process_then_runs(env: Env) -> None:
    thread, out = env.in_thread("queued", "q1")
    env.gates.wait("start:q1")
    waiter, waited = env.in_thread("queued", "q1")
    time.sleep(0.2)  # the waiter is blocked in acquire, not running
    assert env.gates.count("start", "q1") == 1
    env.gates.open("q1")
    thread.join(10)
    waiter.join(10)
    assert [r.result for r in out + waited] == ["q1", "q1"]
    starts = [t for w, tag, t in env.gates.log if (w, tag) == ("start", "q1")]
    ends = [t for w, tag, t in env.gates.log if (w, tag) == ("end", "q1")]
    assert starts[1] >= ends[0]  # one after the other


def test_queue_direct_call_gives_up_after_the_ttl(env: Env, seen: list[Any]) -> None:
    thread, _ = env.in_thread("queued_short", "q2")
    env.gates.wait("start:q2")
    started = time.monotonic()
    with pytest.raises(LockNotAcquired, match=r"waited 0\.4 s"):
        env.t["queued_short"]("q2")
    assert 0.3 <= time.monotonic() - started < 3
    assert [kw["action"] for name, kw in seen if name == "skipped"] == ["timeout"]
    env.gates.open("q2")
    thread.join(10)


@pytest.mark.parametrize("kind", ["error", "ignore", "reject"])
def test_lock_is_released_on_error_ignore_and_reject(env: Env, kind: str) -> None:
    first = env.t["raises"].apply((kind,))
    second = env.t["raises"].apply((kind,))
    assert first.state == second.state
    assert first.state in ("FAILURE", "IGNORED", "REJECTED")
    assert env.gates.count("start", kind) == 2  # the second one ran: nothing stayed locked
    key = env.t["raises"].__class__._lock_options.keys.key((kind,), {})
    assert not get_manager(env.app).is_locked(key)


def test_unserialisable_argument_fails_naming_the_task(env: Env) -> None:
    result = env.t["hold"].apply((object(),))
    assert result.state == "FAILURE"
    assert isinstance(result.result, LockKeyError)
    assert "te.hold" in str(result.result)
    assert "lock_key" in str(result.result)
    with pytest.raises(LockKeyError):
        env.t["hold"](object())


def test_lease_is_renewed_while_the_task_runs(env: Env) -> None:
    thread, out = env.in_thread("renewed", "r1")
    env.gates.wait("start:r1")
    time.sleep(0.8)  # well past the 0.3 s ttl
    assert env.t["renewed"].apply(("r1",)).result is None  # still held: skipped
    env.gates.open("r1")
    thread.join(10)
    assert out[0].result == "r1"


def test_without_renewal_the_lease_expires_during_a_long_run(env: Env) -> None:
    thread, _ = env.in_thread("unrenewed", "r2")
    env.gates.wait("start:r2")
    time.sleep(0.5)
    env.gates.open("r2")  # the duplicate below finds the gate open and runs
    assert env.t["unrenewed"].apply(("r2",)).result == "r2"
    thread.join(10)
    assert env.gates.count("start", "r2") == 2


def test_lost_lease_logs_one_error_and_sends_lock_lost(
    env: Env, seen: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_lock")
    thread, out = env.in_thread("renewed", "r3")
    env.gates.wait("start:r3")
    key = env.t["renewed"].__class__._lock_options.keys.key(("r3",), {})
    assert get_manager(env.app).break_lock(key)  # an operator released it by hand
    lost = wait_for(lambda: [kw for name, kw in seen if name == "lost"], 5, what="lock_lost")
    env.gates.open("r3")
    thread.join(10)
    assert out[0].result == "r3"  # the task itself runs on
    assert [(kw["task_id"], kw["key"]) for kw in lost] == [(out[0].id, key)]
    # One ERROR line for the event (the renewer's), carrying the task's fields.
    errors = [r for r in caplog.records if r.name.startswith("celery_lock") and r.levelno >= 40]
    assert len(errors) == 1
    assert errors[0].name == "celery_lock.renewer"
    assert (errors[0].task_id, errors[0].task_name, errors[0].lock_key) == (
        out[0].id,
        env.t["renewed"].name,
        key,
    )


def test_successful_run_logs_nothing_above_debug(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_lock")
    env.gates.open("quiet")
    assert env.t["hold"].apply(("quiet",)).result == "quiet"
    records = [r for r in caplog.records if r.name.startswith("celery_lock")]
    assert records  # the DEBUG lines exist ...
    assert all(r.levelno == logging.DEBUG for r in records)  # ... and nothing louder
    took = [r for r in records if r.name == "celery_lock.task"]
    assert took[0].task_name == "te.hold"
    assert took[0].backend == "file"
    assert isinstance(took[0].fence, int)
    assert took[0].wait_ms >= 0


def test_unlocked_task_keeps_its_eager_request(tmp_path: Path) -> None:
    app = Celery("te2", set_as_current=False, task_cls=LockedTask)
    app.conf.lock_directory = str(tmp_path / "locks")

    @app.task(bind=True, shared=False)
    def plain(self: Any) -> Any:
        return (self.request.id, self.request.lock_lease)

    app.finalize()
    with set_trap(app):
        result = plain.apply()
    assert result.result == (result.id, None)
    app.close()


def test_release_failure_is_logged_and_never_replaces_the_result(
    env: Env, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = get_manager(env.app)

    def broken_release(lease: Any) -> bool:
        raise LockError("store went away", key=lease.key)

    monkeypatch.setattr(manager, "release", broken_release)
    env.gates.open("rel")
    assert env.t["hold"].apply(("rel",)).result == "rel"
    warnings = [r for r in caplog.records if r.name == "celery_lock.task"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "ends with its TTL" in warnings[0].getMessage()
    monkeypatch.undo()
    key = env.t["hold"].__class__._lock_options.keys.key(("rel",), {})
    assert manager.break_lock(key)  # it was indeed left held


class TestWorkerParentHandlers:
    """The main-process handlers, driven directly (real workers: tests/test_task_process.py)."""

    def _held(self, env: Env, tag: str) -> str:
        key = env.t["hold"].__class__._lock_options.keys.key((tag,), {})
        assert get_manager(env.app).acquire(key, ttl=60, task_id=f"id-{tag}") is not None
        return key

    def _request(self, tag: str) -> Context:
        return Context(id=f"id-{tag}", args=[tag], kwargs={})

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, "-15", 9])
    def test_revoke_with_a_killing_signal_releases(self, env: Env, signum: Any) -> None:
        key = self._held(env, "rv")
        _on_task_revoked(env.t["hold"], self._request("rv"), terminated=True, signum=signum)
        assert not get_manager(env.app).is_locked(key)

    @pytest.mark.parametrize(
        ("terminated", "signum"), [(True, signal.SIGUSR1), (True, "SIGTERM?"), (False, 15)]
    )
    def test_revoke_that_may_leave_the_task_running_keeps_the_lock(
        self, env: Env, terminated: bool, signum: Any
    ) -> None:
        key = self._held(env, "rk")
        _on_task_revoked(env.t["hold"], self._request("rk"), terminated=terminated, signum=signum)
        assert get_manager(env.app).break_lock(key)  # still there

    def test_worker_lost_and_hard_time_limit_release_only_that_task_id(self, env: Env) -> None:
        manager = get_manager(env.app)
        for exc in (WorkerLostError("gone"), TimeLimitExceeded(1)):
            key = self._held(env, "wl")
            _on_task_failure(env.t["hold"], "id-other", exc, ["wl"], {})
            assert manager.is_locked(key)  # another task id: not ours to break
            _on_task_failure(env.t["hold"], "id-wl", exc, ["wl"], {})
            assert not manager.is_locked(key)

    def test_ordinary_failures_and_foreign_tasks_are_left_alone(self, env: Env) -> None:
        key = self._held(env, "of")
        _on_task_failure(env.t["hold"], "id-of", ValueError("x"), ["of"], {})
        _on_task_failure(object(), "id-of", WorkerLostError("gone"), ["of"], {})
        assert get_manager(env.app).break_lock(key)

    def test_arguments_that_no_longer_fit_are_logged(
        self, env: Env, caplog: pytest.LogCaptureFixture
    ) -> None:
        _on_task_failure(env.t["hold"], "id-x", WorkerLostError("gone"), [1, 2, 3], {})
        (record,) = [r for r in caplog.records if r.name == "celery_lock.task"]
        assert record.levelno == logging.WARNING
        assert "lost its worker process" in record.getMessage()
