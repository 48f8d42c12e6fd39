"""The Celery app run by ``celery worker`` subprocesses in tests (configured from environment
variables set by the test), and the producer side of the same app.

Tasks record ``start``/``end`` events (pid, wall-clock time, task id) in a Redis list, so a test
can check what ran, where, and whether runs overlapped.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_lock.task import LockedTask

app = Celery("tests._worker_app")
app.conf.update(
    broker_url=os.environ.get("CL_TEST_BROKER", "memory://"),
    result_backend=os.environ.get("CL_TEST_BACKEND", "cache+memory://"),
    lock_redis_url=os.environ.get("CL_TEST_LOCKS"),
    lock_directory=os.environ.get("CL_TEST_LOCK_DIR"),
    lock_retry_interval=float(os.environ.get("CL_TEST_RETRY_INTERVAL", "30")),
    broker_connection_retry_on_startup=False,
    worker_prefetch_multiplier=1,
    result_expires=600,
    # A test that stops Redis must not leave result handles retrying for 20 s.
    result_backend_transport_options={"retry_policy": {"max_retries": 1}},
)
_events = redis.Redis.from_url(os.environ.get("CL_TEST_EVENTS", "redis://127.0.0.1:1/0"))


def record(kind: str, **fields: Any) -> None:
    """Append one event to the ``events`` list."""
    event = {"kind": kind, "pid": os.getpid(), "t": time.time(), **fields}
    _events.rpush("events", json.dumps(event))


@app.task(base=LockedTask, bind=True, name="w.hold", lock_ttl=300)
def hold(self: LockedTask, tag: str, seconds: float) -> str:
    """EXECUTION mode: holds its lock for ``seconds``."""
    lease = self.request.lock_lease
    record(
        "start",
        tag=tag,
        task_id=self.request.id,
        fence=lease.fence,
        key=lease.key,
        backend=lease.backend,
    )
    time.sleep(seconds)
    record("end", tag=tag, task_id=self.request.id)
    return tag


@app.task(
    base=LockedTask,
    bind=True,
    name="w.serial",
    lock_mode="queue",
    lock_key="serial:{group}",
    lock_countdown=0.05,
    lock_ttl=60,
)
def serial(self: LockedTask, group: str, n: int, seconds: float) -> int:
    """QUEUE mode, one lock per ``group`` whatever ``n``: calls run one at a time."""
    # Counts runs in progress across processes: more than 1 is an overlap.
    active = _events.incr(f"active:{group}")
    record("start", group=group, n=n, task_id=self.request.id, active=active)
    time.sleep(seconds)
    record("end", group=group, n=n, task_id=self.request.id)
    _events.decr(f"active:{group}")
    return n
