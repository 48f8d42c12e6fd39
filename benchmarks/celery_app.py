"""Celery app for bench_celery: one no-op task per lock flavour, configured from the environment."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery, Task

BROKER = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6399/0")
LOCKS = os.environ.get("BENCH_LOCK_URL", BROKER.rsplit("/", 1)[0] + "/2")

app = Celery("bench", broker=BROKER)
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,  # the harness detects "all ran" by an empty unacked hash
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    lock_redis_url=LOCKS,
    lock_cleanup_interval=None,
    # BENCH_LOCK_FALLBACK=none: Redis only (no same-host shadow file lock beside each lease).
    lock_fallback=None if os.environ.get("BENCH_LOCK_FALLBACK") == "none" else "file",
    ONCE={
        "backend": "celery_once.backends.Redis",
        "settings": {"url": LOCKS, "default_timeout": 60},
    },
    singleton_backend_url=LOCKS,
    singleton_lock_expiry=60,
)


@app.task(name="bench.plain", base=Task)
def plain(i: int) -> None:
    """Baseline: no lock."""


class BareCalls(Task):
    """Two bare redis-py calls around the run: ``SET NX PX`` before it, ``DEL`` after it. Not
    a lock to use (no owner check, fence, fallback or redelivery detection): the least that a
    lock taken when the task starts and freed when it ends costs in a worker, its two round
    trips and nothing else."""

    _client: redis.Redis | None = None  # per process, made after the pool's fork

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        client = BareCalls._client
        if client is None:
            client = BareCalls._client = redis.Redis.from_url(LOCKS)
        key = f"bare:{self.name}:{args!r}:{kwargs!r}"
        if not client.set(key, "1", nx=True, px=300_000):
            return None
        try:
            return self.run(*args, **kwargs)
        finally:
            client.delete(key)


@app.task(name="bench.bare", base=BareCalls)
def bare(i: int) -> None:
    """Two bare redis-py calls (see BareCalls)."""


def _register_optional() -> None:
    from celery_lock import LockedTask, LockMode

    @app.task(name="bench.execution", base=LockedTask, lock_mode=LockMode.EXECUTION)
    def execution(i: int) -> None:
        """celery_lock, EXECUTION mode."""

    @app.task(name="bench.queue", base=LockedTask, lock_mode=LockMode.QUEUE)
    def queue(i: int) -> None:
        """celery_lock, QUEUE mode."""

    @app.task(
        name="bench.execution_co", base=LockedTask, lock_mode=LockMode.EXECUTION, lock_coalesce=True
    )
    def execution_co(i: int) -> None:
        """celery_lock, EXECUTION mode, coalesced at publish time."""

    @app.task(name="bench.queue_co", base=LockedTask, lock_mode=LockMode.QUEUE, lock_coalesce=True)
    def queue_co(i: int) -> None:
        """celery_lock, QUEUE mode, coalesced at publish time."""

    try:
        from celery_once import QueueOnce

        @app.task(name="bench.once", base=QueueOnce, once={"graceful": True})
        def once(i: int) -> None:
            """celery-once."""
    except ImportError:
        pass
    try:
        from celery_singleton import Singleton

        @app.task(name="bench.singleton", base=Singleton)
        def singleton(i: int) -> None:
            """celery-singleton."""
    except ImportError:
        pass


_register_optional()
