"""Coalescing at publish time (``lock_coalesce``): hand a caller the identical call that
already waits (QUEUE), or waits or runs (EXECUTION), instead of publishing another copy.

The execution-time lock stays the guarantee; this only keeps copies out of the queue. Markers
live in Redis beside the lock (``<prefix>:{<key>}:pending``, see ``backends/_redis_jobs``): one
is reserved before the publish and made visible after it succeeded (a producer killed in between
leaves an invisible marker that nobody is ever handed), cleared when the call claims the key
(unless it then waits in line), when it is revoked, and when it expires after the task's
``lock_ttl``. Without Redis (an outage, file-only locks) calls are published as usual: the
producer never fails because of coalescing.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Final

from celery import states
from celery.utils import uuid

from celery_lock.backends.hybrid import HybridLockManager
from celery_lock.backends.redis import RedisLockManager
from celery_lock.config import get_manager
from celery_lock.errors import LockBackendUnavailable
from celery_lock.modes import LockMode
from celery_lock.signals import lock_coalesced

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from celery import Celery
    from celery.result import AsyncResult

    from celery_lock._base import LockManager
    from celery_lock.config import TaskLockOptions

__all__ = ["eligible", "publish"]

logger = logging.getLogger("celery_lock.task")

#: apply_async options of a call that belongs to a canvas or has callbacks of its own: such a
#: call is always published (sharing another call's result would drop its links or hang a chord).
_CANVAS_OPTIONS: Final = ("chain", "chord", "group_id", "group_index", "link", "link_error")

#: Apps whose coalescing found Redis unreachable: one WARNING per outage.
_outage: weakref.WeakSet[Celery] = weakref.WeakSet()
_outage_mutex = threading.Lock()


def eligible(app: Celery, options: Mapping[str, Any]) -> bool:
    """Whether a call with these apply_async ``options`` may be coalesced at all."""
    if app.conf.task_always_eager:
        return False
    return not any(options.get(name) for name in _CANVAS_OPTIONS)


def _redis(manager: LockManager) -> RedisLockManager | None:
    """The Redis manager serving ``manager`` now, or None (file locks, or an open circuit)."""
    if isinstance(manager, RedisLockManager):
        return manager
    if isinstance(manager, HybridLockManager) and not manager.using_fallback:
        return manager.redis
    return None


def publish(
    task: Any,
    options: TaskLockOptions,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    task_id: str | None,
    send: Callable[[str], AsyncResult[Any]],
) -> AsyncResult[Any]:
    """Publish the call with ``send(task_id)`` unless an identical call can be shared."""
    app = task.app
    manager = get_manager(app)
    redis = _redis(manager)
    task_id = task_id or uuid()
    if redis is None:
        if isinstance(manager, HybridLockManager) and manager.redis is not None:
            _warn(app, None)  # on files during an outage
        return send(task_id)
    try:
        key = options.keys.key(args or (), kwargs or {})
    except (TypeError, ValueError):
        return send(task_id)  # bad arguments: the worker reports them
    try:
        existing = redis.coalesce(
            key, task_id, running=options.mode is LockMode.EXECUTION, ttl=options.ttl
        )
    except LockBackendUnavailable as exc:
        _warn(app, exc)
        return send(task_id)
    _recovered(app)
    if existing is not None and _ended(task, existing):
        # Its marker outlived it (revoked and discarded a moment ago): not a call to share.
        return send(task_id)
    if existing is not None:
        logger.debug(
            "%s: call coalesced into %s (lock %s)",
            task.name,
            existing,
            key,
            extra={"lock_key": key, "task_id": existing, "task_name": task.name},
        )
        lock_coalesced.send(sender=task, task_id=existing, key=key)
        result: AsyncResult[Any] = task.AsyncResult(existing)
        return result
    try:
        result = send(task_id)
    except BaseException:
        _settle(redis, key, task_id, published=False)
        raise
    _settle(redis, key, task_id, published=True)
    return result


def _ended(task: Any, task_id: str) -> bool:
    """Whether the call to share has a final state already (one result-backend read, only
    when a call would be coalesced; a backend that cannot tell counts as not ended)."""
    try:
        return task.AsyncResult(task_id).state in states.READY_STATES
    except Exception:  # noqa: BLE001 - coalescing must never make the producer fail
        return False


def _settle(redis: RedisLockManager, key: str, task_id: str, *, published: bool) -> None:
    try:
        redis.reveal(key, task_id, published=published)
    except LockBackendUnavailable as exc:
        # Not visible: later callers publish (the marker expires with the lock's ttl).
        logger.debug("could not settle the coalescing marker of %s: %s", key, exc)


def _warn(app: Celery, exc: BaseException | None) -> None:
    with _outage_mutex:
        if app in _outage:
            return
        _outage.add(app)
    logger.warning(
        "celery_lock: coalescing is off while Redis is unreachable for locks (%s): calls are "
        "published as usual; the worker-side lock still deduplicates them",
        exc.__cause__ or exc if exc is not None else "the locks are on files",
        extra={"backend": "redis"},
    )


def _recovered(app: Celery) -> None:
    if app in _outage:
        with _outage_mutex:
            _outage.discard(app)
