"""Deployments on one host: separate by default, and a loud warning when locks are host-local.

Issue 12: production and staging on one host, as one user, each with its own lock Redis and
key prefix and both with the default ``lock_directory``, blocked each other through the hybrid's
same-host shadow file locks (file names are a hash of the key alone).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_lock import LockedTask, get_manager
from celery_lock.config import LockSettings
from tests._redis_server import RedisServer
from tests._workers import WorkerProcess


@pytest.fixture
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp dir, as celery_lock's default lock folders see it, inside tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _settings(**conf: Any) -> LockSettings:
    app = Celery("settings", set_as_current=False)
    app.conf.update(conf)
    try:
        return LockSettings.from_app(app)
    finally:
        app.close()


def test_default_directory_separates_stores_and_prefixes(private_tempdir: Path) -> None:
    prod = _settings(lock_redis_url="redis://prod:6379/0")
    staging = _settings(lock_redis_url="redis://staging:6379/0")
    staging_prefixed = _settings(lock_redis_url="redis://prod:6379/0", lock_key_prefix="staging")
    files_a = _settings(broker_url="amqp://", lock_key_prefix="a")
    files_b = _settings(broker_url="amqp://", lock_key_prefix="b")
    dirs = [s.lock_directory for s in (prod, staging, staging_prefixed, files_a, files_b)]
    assert len(set(dirs)) == 5
    for directory in dirs:
        assert Path(directory).parent == private_tempdir
        assert Path(directory).name.startswith(f"celery_lock-{os.geteuid()}-")
    # The same deployment (a password rotated, another worker's app object) keeps its folder.
    rotated = _settings(lock_redis_url="redis://:secret@prod:6379/0")
    assert rotated.lock_directory == prod.lock_directory
    # An explicit lock_directory is used as it is.
    assert _settings(lock_directory="/srv/locks").lock_directory == "/srv/locks"


@pytest.fixture
def two_deployments(
    redis_server: RedisServer, private_tempdir: Path
) -> Iterator[tuple[Celery, Celery]]:
    apps = []
    for name, db in (("prod", 5), ("staging", 6)):
        app = Celery(name, set_as_current=False)
        app.conf.update(
            broker_url="memory://",
            lock_redis_url=redis_server.url_db(db),
            lock_key_prefix=f"{name}-locks",
        )
        apps.append(app)
    yield apps[0], apps[1]
    for app in apps:
        for info in list(get_manager(app).iter_locks()):
            get_manager(app).break_lock(info.key)
        app.close()


@pytest.mark.redis
def test_the_same_task_and_arguments_run_in_two_deployments_at_once(
    two_deployments: tuple[Celery, Celery],
) -> None:
    """Production holds ``exec_job("nightly-report")``; staging's call of the same task with the
    same arguments runs too (it used to be skipped as "held by task <production's id>")."""
    prod, staging = two_deployments
    holding, release = threading.Event(), threading.Event()
    ran: dict[str, Any] = {}

    def make(app: Celery) -> Any:
        @app.task(base=LockedTask, name="proj.exec_job", shared=False, bind=True)
        def exec_job(self: Any, job: str) -> str:
            if app is prod:
                holding.set()
                assert release.wait(10)
            return f"{app.main}:{job}:{self.request.lock_lease.backend}"

        return exec_job

    prod_job, staging_job = make(prod), make(staging)
    worker = threading.Thread(
        target=lambda: ran.setdefault("prod", prod_job.apply(args=("nightly-report",)).get())
    )
    worker.start()
    try:
        assert holding.wait(10)
        ran["staging"] = staging_job.apply(args=("nightly-report",)).get()
    finally:
        release.set()
        worker.join(10)
    assert ran == {"prod": "prod:nightly-report:redis", "staging": "staging:nightly-report:redis"}
    assert (
        get_manager(prod).file.directory != get_manager(staging).file.directory  # type: ignore[attr-defined]
    )


@pytest.mark.slow
@pytest.mark.celery
@pytest.mark.redis
@pytest.mark.parametrize("locks", ["files", "redis"])
def test_worker_start_warns_once_when_locks_are_host_local(
    redis_server: RedisServer, tmp_path: Path, locks: str
) -> None:
    """A real ``celery worker`` whose locks are only local files says so once at start, naming
    the setting that fixes it; with a lock Redis it says nothing of the kind."""
    env = {
        "CL_TEST_BROKER": redis_server.url_db(7),
        "CL_TEST_BACKEND": redis_server.url_db(8),
        "CL_TEST_EVENTS": redis_server.url_db(8),
        "CL_TEST_LOCK_DIR": str(tmp_path / "locks"),
    }
    if locks == "redis":
        env["CL_TEST_LOCKS"] = redis_server.url_db(9)
    worker = WorkerProcess("tests._worker_app", tmp_path, env, concurrency=1).start()
    try:
        worker.wait_ready()
        log = worker.log()
    finally:
        worker.stop()
    warning = "are local files in"
    if locks == "files":
        assert log.count(warning) == 1, log
        assert "Set lock_redis_url" in log
        assert str(tmp_path / "locks") in log
    else:
        assert warning not in log, log


def test_get_manager_is_public() -> None:
    import celery_lock
    import celery_lock.config

    assert "get_manager" in celery_lock.__all__
    assert celery_lock.get_manager is celery_lock.config.get_manager
