"""The Celery app of the QUEUE wake-up and task-identity scenarios (``celery worker``
subprocesses, configured from environment variables), and its producer side.

Tasks record ``start``/``end`` events (pid, wall-clock time, task id) in a Redis list; the
library's own signals (``lock_requeued``, ``lock_woken``) are recorded too, so a scenario can
count what was re-published.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_process_init

from celery_lock import get_manager
from celery_lock.signals import lock_requeued, lock_woken
from celery_lock.task import LockedTask

app = Celery("tests._queue_app")
app.conf.update(
    broker_url=os.environ.get("CL_TEST_BROKER", "memory://"),
    result_backend=os.environ.get("CL_TEST_BACKEND", "cache+memory://"),
    lock_redis_url=os.environ.get("CL_TEST_LOCKS"),
    lock_directory=os.environ.get("CL_TEST_LOCK_DIR"),
    lock_default_countdown=float(os.environ.get("CL_TEST_COUNTDOWN", "30")),
    lock_retry_interval=1.0,
    lock_fallback=os.environ.get("CL_TEST_FALLBACK", "file") or None,
    broker_connection_retry_on_startup=False,
    # Unacknowledged messages older than the visibility timeout are delivered again; kombu
    # >= 5.6 looks for them every interval x throttle seconds (default 10 x 10).
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("CL_TEST_VISIBILITY", "3600")),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    worker_prefetch_multiplier=1,
    result_expires=600,
    result_backend_transport_options={"retry_policy": {"max_retries": 1}},
)
_events = redis.Redis.from_url(os.environ.get("CL_TEST_EVENTS", "redis://127.0.0.1:1/0"))


def record(kind: str, **fields: Any) -> None:
    """Append one event to the ``events`` list."""
    _events.rpush(
        "events", json.dumps({"kind": kind, "pid": os.getpid(), "t": time.time(), **fields})
    )


@app.task(base=LockedTask, bind=True, name="q.serial", lock_mode="queue", lock_key="q-serial")
def serial(self: LockedTask, n: int, seconds: float) -> int:
    """QUEUE mode, one key for every call: calls run one at a time, in arrival order."""
    active = _events.incr("active")
    record("start", n=n, task_id=self.request.id, active=active)
    time.sleep(seconds)
    record("end", n=n, task_id=self.request.id)
    _events.decr("active")
    return n


@app.task(base=LockedTask, bind=True, name="q.late", acks_late=True, lock_key="q-late:{tag}")
def late(self: LockedTask, tag: str, seconds: float) -> str:
    """EXECUTION mode, acknowledged late: a redelivery while it runs is its own copy."""
    record("start", tag=tag, task_id=self.request.id)
    time.sleep(seconds)
    record("end", tag=tag, task_id=self.request.id)
    return f"ran:{tag}"


def coalesced_tasks(target: Celery, body: Any) -> dict[str, Any]:
    """The coalescing tasks, registered on ``target`` with ``body`` (the worker's records; a
    producer's never runs): one definition, so producer and worker compute the same keys."""
    common = {
        "base": LockedTask,
        "bind": True,
        "lock_coalesce": True,
        "lock_ttl": 60,
        "shared": False,
    }

    @target.task(name="q.sync", lock_mode="queue", lock_key="sync:{account}", **common)
    def sync(self: LockedTask, account: int, seconds: float) -> str:
        return body(self, account, seconds)  # type: ignore[no-any-return]

    @target.task(name="q.sync_exec", lock_key="sync-exec:{account}", **common)
    def sync_exec(self: LockedTask, account: int, seconds: float) -> str:
        return body(self, account, seconds)  # type: ignore[no-any-return]

    return {"q.sync": sync, "q.sync_exec": sync_exec}


def _sync_body(task: LockedTask, account: int, seconds: float) -> str:
    record("start", account=account, task_id=task.request.id, name=task.name)
    time.sleep(seconds)
    record("end", account=account, task_id=task.request.id, name=task.name)
    return f"synced:{account}:{task.request.id}"


coalesced_tasks(app, _sync_body)


@app.task(name="q.link")
def link(result: Any) -> None:
    """A callback: records each run."""
    record("link", result=result)


@lock_requeued.connect
def _requeued(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    record("requeued", task_id=task_id)


@lock_woken.connect
def _woken(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    record("woken", task_id=task_id)


@worker_process_init.connect
def _die_on_hand_off(**_: Any) -> None:
    """With ``CL_TEST_DIE_ON_HAND_OFF`` set, a child dies (SIGKILL) right after a release gave
    the key to a waiter and before it publishes the wake-up."""
    if os.environ.get("CL_TEST_DIE_ON_HAND_OFF"):
        get_manager(app).set_handoff(lambda *_: os.kill(os.getpid(), signal.SIGKILL))
