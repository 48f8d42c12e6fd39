"""Settings, option resolution and wiring: LockSettings, TaskLockOptions, install, beat."""

from __future__ import annotations

import gc
import logging
import math
import os
import pickle
import subprocess
import sys
import types
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals
from celery.contrib.testing.app import set_trap
from redis.connection import SSLConnection
from redis.sentinel import SentinelConnectionPool

from celery_lock._wakeup import publisher
from celery_lock.backends.file import FileLockManager
from celery_lock.backends.hybrid import HybridLockManager
from celery_lock.beat import CLEANUP_TASK
from celery_lock.config import LockSettings, get_manager, get_settings
from celery_lock.errors import LockBackendUnavailable
from celery_lock.modes import LockMode
from celery_lock.task import LockedTask, install, requeue_countdown
from tests import factories
from tests._redis_server import free_port
from tests._workers import ROOT


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Any]:
    apps: list[Celery] = []

    def make(task_cls: Any = None, **conf: Any) -> Celery:
        app = Celery(
            f"cfg{len(apps)}",
            broker=conf.pop("broker_url", None),
            set_as_current=False,
            **({"task_cls": task_cls} if task_cls else {}),
        )
        app.conf.update({"lock_directory": str(tmp_path / "locks"), **conf})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
    # pytest keeps a test's fixture values after it ends: without this, `make` would keep every
    # app alive, with its manager and, during an outage, the manager's prober thread.
    apps.clear()


# ---------------------------------------------------------------------------- LockSettings


def test_library_defaults(make_app: Any) -> None:
    settings = LockSettings.from_app(make_app())
    assert settings.redis_url is None  # the default (amqp) broker: no Redis for locks
    assert (settings.default_ttl, settings.key_prefix, settings.fallback) == (
        300.0,
        "celery_lock",
        "file",
    )
    assert (settings.retry_interval, settings.cleanup_interval) == (30.0, 300.0)
    assert settings.default_mode is LockMode.EXECUTION
    assert settings.default_on_duplicate == "skip"
    assert settings.default_renew is True
    assert settings.default_max_requeues is None
    assert settings.default_countdown == 30.0
    assert settings.visibility_timeout == 3600.0


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        ("redis://h:1/2", "redis://h:1/2"),
        ("rediss://h:1/0?ssl_cert_reqs=required", "rediss://h:1/0?ssl_cert_reqs=required"),
        ("unix:///tmp/r.sock", "unix:///tmp/r.sock"),
        ("redis+socket:///tmp/r.sock", "unix:///tmp/r.sock"),
        ("redis://a:1/0;redis://b:1/0", "redis://a:1/0"),
        ("amqp://guest@localhost//", None),
        ("amqp://guest@localhost//;redis://h:1/0", None),
    ],
)
def test_redis_url_defaults_to_a_redis_broker(make_app: Any, broker: str, expected: Any) -> None:
    assert LockSettings.from_app(make_app(broker_url=broker)).redis_url == expected


def test_explicit_redis_url_and_explicit_none_win_over_the_broker(make_app: Any) -> None:
    app = make_app(broker_url="redis://broker/0", lock_redis_url="redis://locks/3")
    assert LockSettings.from_app(app).redis_url == "redis://locks/3"
    app = make_app(broker_url="redis://broker/0", lock_redis_url=None)
    assert LockSettings.from_app(app).redis_url is None


def test_django_namespace_reads_celery_lock_settings(make_app: Any) -> None:
    django_settings = types.SimpleNamespace(
        CELERY_BROKER_URL="redis://broker/1",
        CELERY_LOCK_DEFAULT_TTL=42,
        CELERY_LOCK_FALLBACK=None,
        CELERY_LOCK_KEY_PREFIX="proj",
        CELERY_LOCK_CLEANUP_INTERVAL=None,
        CELERY_LOCK_DEFAULT_MODE="QUEUE",
        CELERY_BROKER_TRANSPORT_OPTIONS={"visibility_timeout": 400},
    )
    app = make_app()
    app.config_from_object(django_settings, namespace="CELERY")
    settings = LockSettings.from_app(app)
    assert settings.redis_url == "redis://broker/1"
    assert settings.default_ttl == 42.0
    assert settings.fallback is None
    assert settings.key_prefix == "proj"
    assert settings.cleanup_interval is None
    assert settings.default_mode is LockMode.QUEUE
    assert settings.visibility_timeout == 400.0


@pytest.mark.parametrize(
    ("setting", "value", "error"),
    [
        ("lock_default_ttl", 0, ValueError),
        ("lock_default_ttl", math.nan, ValueError),
        ("lock_default_ttl", math.inf, ValueError),
        ("lock_default_ttl", "300", ValueError),
        ("lock_fallback", "redis", ValueError),
        ("lock_key_prefix", "", ValueError),
        ("lock_retry_interval", -1, ValueError),
        ("lock_cleanup_interval", 0, ValueError),
        ("lock_default_mode", "sometimes", ValueError),
        ("lock_default_countdown", -0.5, ValueError),
        ("lock_default_max_requeues", -1, ValueError),
        ("lock_default_max_requeues", True, ValueError),
        ("lock_default_on_duplicate", "drop", ValueError),
        ("lock_default_renew", "yes", TypeError),
        ("lock_redis_url", 5, ValueError),
        ("lock_directory", 5, TypeError),
    ],
)
def test_bad_settings_name_the_setting_and_value(
    make_app: Any, setting: str, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        LockSettings.from_app(make_app(**{setting: value}))
    assert setting in str(info.value)
    assert repr(value) in str(info.value)


def test_bad_visibility_timeout_is_named(make_app: Any) -> None:
    with pytest.raises(ValueError, match="visibility_timeout"):
        LockSettings.from_app(make_app(broker_transport_options={"visibility_timeout": 0}))


# ---------------------------------------------------------------------------- task options


def _options(task: Any) -> Any:
    return task.__class__._lock_options  # __class__ sees through Celery's task proxies


def test_precedence_annotation_over_decorator_over_setting_over_default(make_app: Any) -> None:
    """task_annotations rewrite task attributes, as Celery documents for every attribute."""
    app = make_app(
        lock_default_ttl=50,
        lock_default_countdown=3,
        task_annotations={
            "cfg0.annotated": {"lock_ttl": 70, "lock_mode": "queue"},
            "cfg0.explicit": {"lock_ttl": 70, "lock_mode": "queue"},
        },
    )

    @app.task(base=LockedTask, name="cfg0.explicit", shared=False, lock_ttl=90)
    def explicit() -> None: ...

    @app.task(base=LockedTask, name="cfg0.annotated", shared=False)
    def annotated() -> None: ...

    @app.task(base=LockedTask, name="cfg0.plain", shared=False)
    def plain() -> None: ...

    app.finalize()
    assert _options(explicit).ttl == 70  # the annotation rewrites the keyword ...
    assert _options(explicit).mode is LockMode.QUEUE  # ... and fills what it left
    assert (_options(annotated).ttl, _options(annotated).mode) == (70, LockMode.QUEUE)
    assert (_options(plain).ttl, _options(plain).mode) == (50, LockMode.EXECUTION)
    assert _options(plain).countdown == 3
    assert _options(plain).renew is True


def test_subclass_attributes_are_options(make_app: Any) -> None:
    class Exclusive(LockedTask):
        lock_on_duplicate = "fail"
        lock_ttl = 12

    app = make_app()

    @app.task(base=Exclusive, shared=False, lock_ttl=5)
    def job() -> None: ...

    app.finalize()
    assert (_options(job).on_duplicate, _options(job).ttl) == ("fail", 5)
    assert Exclusive.lock_ttl == 12  # the keyword did not leak into the base class


def test_task_cls_locks_only_tasks_that_ask(make_app: Any) -> None:
    app = make_app(
        task_cls=LockedTask,
        task_annotations={"cfg0.annotated": {"lock_mode": "QUEUE"}},
    )

    @app.task(name="cfg0.plain", shared=False)
    def plain() -> None: ...

    @app.task(name="cfg0.keyword", shared=False, lock_ttl=9)
    def keyword() -> None: ...

    @app.task(name="cfg0.annotated", shared=False)
    def annotated() -> None: ...

    app.finalize()
    assert isinstance(plain, LockedTask)
    assert _options(plain) is None
    assert _options(app.tasks["celery.chord_unlock"]) is None  # built-ins stay unlocked
    assert _options(keyword).ttl == 9
    assert _options(annotated).mode is LockMode.QUEUE


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("lock_mode", "sometimes", ValueError),
        ("lock_ttl", 0, ValueError),
        ("lock_ttl", -5, ValueError),
        ("lock_ttl", math.nan, ValueError),
        ("lock_ttl", math.inf, ValueError),
        ("lock_countdown", -1, ValueError),
        ("lock_on_duplicate", "drop", ValueError),
        ("lock_max_requeues", -1, ValueError),
        ("lock_max_requeues", 1.5, ValueError),
        ("lock_renew", "no", TypeError),
        ("lock_key", 42, TypeError),
        ("lock_key", "{nope}", ValueError),
    ],
)
def test_bad_options_fail_at_bind_naming_task_option_and_value(
    make_app: Any, option: str, value: Any, error: type[Exception]
) -> None:
    app = make_app()
    app.finalize()
    with pytest.raises(error) as info:

        @app.task(base=LockedTask, name="cfg0.bad", shared=False, **{option: value})
        def bad(account_id: int) -> None: ...

    message = str(info.value)
    assert "cfg0.bad" in message
    assert option in message
    assert repr(value) in message


def test_bad_option_on_a_lazy_app_fails_when_it_finalizes(make_app: Any) -> None:
    app = make_app()

    @app.task(base=LockedTask, name="cfg0.late", shared=False, lock_mode="later")
    def late() -> None: ...

    with pytest.raises(ValueError, match="cfg0.late.*lock_mode"):
        app.finalize()


def test_importing_celery_lock_wires_nothing() -> None:
    code = (
        "import celery.signals as s, celery_lock, celery_lock.task\n"
        "print(len(s.task_failure.receivers), len(s.task_revoked.receivers))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split() == ["0", "0"]


# ---------------------------------------------------------------------------- install / beat


def test_install_is_idempotent_and_registers_cleanup_and_beat(make_app: Any) -> None:
    app = make_app(lock_cleanup_interval=0.5)
    install(app)
    install(app)

    @app.task(base=LockedTask, shared=False)
    def job() -> None: ...

    app.finalize()
    assert CLEANUP_TASK in app.tasks
    entry = app.conf.beat_schedule[CLEANUP_TASK]
    assert entry["task"] == CLEANUP_TASK
    assert entry["schedule"] == 0.5  # no hidden minimum
    receivers = [r for r in signals.task_failure.receivers if "celery_lock" in str(r[0])]
    assert len(receivers) == 1


def test_beat_entry_left_out_when_interval_is_none_and_user_entry_kept(make_app: Any) -> None:
    app = make_app(lock_cleanup_interval=None)

    @app.task(base=LockedTask, shared=False)
    def job() -> None: ...

    app.finalize()
    assert CLEANUP_TASK in app.tasks
    assert CLEANUP_TASK not in (app.conf.beat_schedule or {})

    mine = {"task": CLEANUP_TASK, "schedule": 60.0, "kwargs": {"dry_run": True}}
    app = make_app(beat_schedule={CLEANUP_TASK: mine})

    @app.task(base=LockedTask, shared=False)
    def job2() -> None: ...

    app.finalize()
    assert app.conf.beat_schedule[CLEANUP_TASK] == mine


def test_install_on_a_finalized_app_adds_the_beat_entry_at_once(make_app: Any) -> None:
    app = make_app(lock_cleanup_interval=7)
    app.finalize()
    install(app)
    assert app.conf.beat_schedule[CLEANUP_TASK]["schedule"] == 7.0
    assert CLEANUP_TASK in app.tasks


def test_cleanup_task_returns_the_report(make_app: Any) -> None:
    app = make_app()
    install(app)
    app.finalize()
    with set_trap(app):
        report = app.tasks[CLEANUP_TASK].apply(kwargs={"dry_run": True}).get()
    assert set(report) == {"scanned", "removed", "kept", "errors"}


# ---------------------------------------------------------------------------- managers


def test_managers_per_settings(make_app: Any, tmp_path: Path) -> None:
    assert isinstance(get_manager(make_app()), FileLockManager)
    hybrid = get_manager(make_app(lock_redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(hybrid, HybridLockManager)
    assert hybrid.file is not None
    assert hybrid.redis is not None and hybrid.redis.prefix == "celery_lock"
    closed = get_manager(make_app(lock_redis_url="redis://127.0.0.1:1/0", lock_fallback=None))
    assert isinstance(closed, HybridLockManager)
    assert closed.file is None


def test_manager_and_settings_are_cached_per_app(make_app: Any) -> None:
    app = make_app()
    assert get_manager(app) is get_manager(app)
    assert get_settings(app) is get_settings(app)
    assert get_manager(make_app()) is not get_manager(app)


def test_forked_child_builds_its_own_manager(make_app: Any) -> None:
    app = make_app()
    parent_manager = get_manager(app)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            child_manager = get_manager(app)
            same = child_manager is parent_manager
            again = get_manager(app) is child_manager
            os.write(write, pickle.dumps((same, again)))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        same, again = pickle.loads(pipe.read())
    os.waitpid(pid, 0)
    assert (same, again) == (False, True)
    assert get_manager(app) is parent_manager


# ---------------------------------------------------------------------------- countdown


def test_requeue_countdown_grows_caps_and_jitters() -> None:
    samples = {n: [requeue_countdown(1.0, n, 3600) for _ in range(200)] for n in range(8)}
    for n, values in samples.items():
        top = min(2**n, 16)
        assert all(top / 2 <= v <= top for v in values)
    assert len(set(samples[0])) > 100  # jittered
    assert all(v <= 25 for v in (requeue_countdown(100, 3, 100) for _ in range(200)))
    assert requeue_countdown(0, 5, 3600) == 0


def test_task_cls_and_annotations_lock_at_run_time(make_app: Any) -> None:
    app = make_app(
        task_cls="celery_lock.task:LockedTask",
        task_annotations={"cfg0.annotated": {"lock_on_duplicate": "fail"}},
    )

    @app.task(name="cfg0.annotated", shared=False)
    def annotated(x: int) -> int:
        return x

    @app.task(name="cfg0.plain", shared=False)
    def plain(x: int) -> int:
        return x

    app.finalize()
    assert _options(plain) is None  # no option: never locked
    manager = get_manager(app)
    lease = manager.acquire(_options(annotated).keys.key((1,), {}), ttl=30)
    assert lease is not None
    with set_trap(app):
        refused = annotated.apply((1,))
        assert (refused.state, type(refused.result).__name__) == ("FAILURE", "LockNotAcquired")
        assert annotated.apply((2,)).result == 2
        assert plain.apply((1,)).result == 1
    assert manager.release(lease)


# ---------------------------------------------------------------------- more than one server


SENTINELS = "sentinel://:pw@127.0.0.1:26379;sentinel://127.0.0.1:26380"


def test_sentinel_broker_gives_sentinel_locks_with_the_brokers_options(make_app: Any) -> None:
    app = make_app(
        broker_url=SENTINELS,
        broker_transport_options={"master_name": "mymaster", "visibility_timeout": 600},
        broker_use_ssl={"ssl_cert_reqs": "none"},
    )
    settings = LockSettings.from_app(app)
    assert settings.redis_url == SENTINELS
    assert settings.redis_transport_options is not None
    assert settings.redis_transport_options["master_name"] == "mymaster"
    assert settings.redis_ssl == {"ssl_cert_reqs": "none"}
    manager = get_manager(app)  # nothing connects yet
    assert isinstance(manager, HybridLockManager) and manager.redis is not None
    client = manager.redis.client
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["password"] == "pw"
    assert pool.connection_kwargs["ssl_cert_reqs"] == "none"
    assert pool.connection_kwargs["socket_timeout"] == 1.0
    client.close()


def test_sentinel_url_without_master_name_fails_when_the_settings_are_read(
    make_app: Any,
) -> None:
    with pytest.raises(ValueError, match="master_name") as info:
        LockSettings.from_app(make_app(broker_url=SENTINELS))
    assert ":pw@" not in str(info.value)
    with pytest.raises(ValueError, match="lock_redis_transport_options"):
        LockSettings.from_app(make_app(lock_redis_url=SENTINELS))


def test_lock_settings_win_and_broker_options_stay_with_the_broker(make_app: Any) -> None:
    broker_options = {"master_name": "broker-master"}
    # Locks elsewhere: the broker's options are not the locks'.
    app = make_app(
        broker_url=SENTINELS,
        broker_transport_options=broker_options,
        broker_use_ssl=True,
        lock_redis_url="redis://127.0.0.1:1/2",
    )
    settings = LockSettings.from_app(app)
    assert (settings.redis_transport_options, settings.redis_ssl) == (None, None)
    # Explicit lock_redis_* settings win, also when the locks follow the broker.
    app = make_app(
        broker_url=SENTINELS,
        broker_transport_options=broker_options,
        broker_use_ssl=True,
        lock_redis_transport_options={"master_name": "lock-master"},
        lock_redis_use_ssl=False,
    )
    settings = LockSettings.from_app(app)
    assert settings.redis_transport_options == {"master_name": "lock-master"}
    assert settings.redis_ssl is False
    # The same servers spelled out in lock_redis_url still follow the broker's options.
    app = make_app(
        broker_url=SENTINELS, broker_transport_options=broker_options, lock_redis_url=SENTINELS
    )
    assert LockSettings.from_app(app).redis_transport_options == broker_options


def test_lock_use_ssl_makes_a_tls_client(make_app: Any) -> None:
    app = make_app(lock_redis_url="redis://127.0.0.1:1/0", lock_redis_use_ssl=True)
    manager = get_manager(app)
    assert isinstance(manager, HybridLockManager) and manager.redis is not None
    pool = manager.redis.client.connection_pool
    assert issubclass(pool.connection_class, SSLConnection)


@pytest.mark.parametrize(
    ("url", "kind"),
    [("redis+cluster://127.0.0.1:1", "cluster"), ("rediss://127.0.0.1:1/0", "redis")],
)
def test_every_url_form_is_accepted(make_app: Any, url: str, kind: str) -> None:
    assert LockSettings.from_app(make_app(lock_redis_url=url)).redis_url == url


@pytest.mark.parametrize(
    ("setting", "value", "error", "words"),
    [
        ("lock_redis_url", "amqp://u:secret@h//", ValueError, "unsupported"),
        ("lock_redis_url", "redis://h:1/0;redis://h:2/0", ValueError, "failover list"),
        ("lock_redis_transport_options", ["master_name"], TypeError, "dict"),
        ("lock_redis_use_ssl", "yes", TypeError, "True"),
        ("lock_redis_wait_replicas", -1, ValueError, "wait_replicas"),
        ("lock_redis_wait_replicas", 1.5, ValueError, "wait_replicas"),
        ("lock_redis_wait_timeout", 0, ValueError, "wait_timeout"),
        ("lock_redis_wait_timeout", 5, ValueError, "socket_timeout"),
        ("lock_manager", "tests.factories:no_such_factory", ValueError, "cannot import"),
        ("lock_manager", 42, TypeError, "dotted path"),
    ],
)
def test_bad_multi_server_settings(
    make_app: Any, setting: str, value: Any, error: type[Exception], words: str
) -> None:
    conf = {setting: value}
    if setting == "lock_redis_wait_timeout":
        conf["lock_redis_wait_replicas"] = 1
    with pytest.raises(error, match=words) as info:
        LockSettings.from_app(make_app(**conf))
    assert "secret" not in str(info.value)


def test_wait_settings_reach_the_redis_manager(make_app: Any) -> None:
    app = make_app(
        lock_redis_url="redis://127.0.0.1:1/0",
        lock_redis_wait_replicas=2,
        lock_redis_wait_timeout=0.25,
    )
    manager = get_manager(app)
    assert isinstance(manager, HybridLockManager) and manager.redis is not None
    assert (manager.redis._wait_replicas, manager.redis._wait_timeout) == (2, 0.25)


@pytest.mark.parametrize("how", ["dotted", "callable"])
def test_lock_manager_factory_builds_the_apps_manager(
    make_app: Any, tmp_path: Path, how: str
) -> None:
    factory: Any = "tests.factories:app_manager" if how == "dotted" else factories.app_manager
    app = make_app(lock_manager=factory, lock_redis_url="redis://127.0.0.1:1/0")
    manager = get_manager(app)
    assert isinstance(manager, FileLockManager)
    assert manager.default_ttl == 12.5
    assert str(manager.directory) == str(tmp_path / "locks")
    assert get_manager(app) is manager  # built once per process, like the default


def test_lock_manager_factory_must_return_a_manager(make_app: Any) -> None:
    app = make_app(lock_manager=lambda app: object())
    with pytest.raises(TypeError, match="not a LockManager"):
        get_manager(app)


def test_unreachable_cluster_is_an_outage_not_a_crash(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A Cluster none of whose startup nodes answers: the app binds, its manager is built,
    and locks come from files (one WARNING); with lock_fallback=None they fail closed."""
    caplog.set_level(logging.WARNING, logger="celery_lock")
    url = f"redis+cluster://127.0.0.1:{free_port()};redis+cluster://127.0.0.1:{free_port()}"
    app = make_app(lock_redis_url=url, lock_retry_interval=60)
    manager = get_manager(app)
    assert isinstance(manager, HybridLockManager)
    for key in ("a", "b", "c"):
        lease = manager.acquire(key)
        assert lease is not None and lease.backend == "file"
        assert manager.release(lease)
    warnings = [r for r in caplog.records if r.name == "celery_lock.hybrid"]
    assert len(warnings) == 1 and "only processes on this host" in warnings[0].getMessage()
    closed = get_manager(make_app(lock_redis_url=url, lock_fallback=None))
    with pytest.raises(LockBackendUnavailable):
        closed.acquire("a")
    with pytest.raises(LockBackendUnavailable):  # circuit open: at once
        closed.acquire("b")


def test_a_closed_app_and_its_manager_are_garbage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager is cached per app in a weak-keyed table: nothing in it may hold the app
    strongly (the QUEUE hand-off callback did), or every app that took a lock lives on after
    close(), with its manager, its connections and, during an outage, a prober thread that
    keeps probing Redis."""
    # pytest's log capture would keep the outage WARNING, whose exception's traceback holds
    # the manager's frames, until the test ends.
    monkeypatch.setattr(logging.getLogger("celery_lock"), "propagate", False)
    app = Celery("gone", set_as_current=False)
    app.conf.update(
        lock_directory=str(tmp_path / "locks"),
        lock_redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: files
        lock_retry_interval=60,
    )
    manager = get_manager(app)
    lease = manager.acquire("k")
    assert lease is not None and lease.backend == "file"  # the circuit is open: a prober runs
    assert manager.release(lease)
    app.close()
    app_ref, manager_ref = weakref.ref(app), weakref.ref(manager)
    del app, manager, lease
    gc.collect()
    assert app_ref() is None
    assert manager_ref() is None


def test_a_hand_off_for_an_app_that_is_gone_fails_and_says_why() -> None:
    """A manager kept alive past its app (someone held it) cannot publish wake-ups: the
    callback raises, which the manager logs as a failed wake-up (the waiter's safety-net copy
    still runs it)."""
    app = Celery("gone-too", set_as_current=False)
    hand_off = publisher(app)
    app.close()
    del app
    gc.collect()
    with pytest.raises(RuntimeError, match="the Celery app of lock 'k' no longer exists"):
        hand_off("k", "task-1", b"payload")
