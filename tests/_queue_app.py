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
