"""What the Celery layer knows about one call of a locked task: its structured log fields,
the lease held on its request, and its re-queue count."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, NamedTuple

from celery.utils.log import get_logger

from celery_lock.errors import LockError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from celery.app.task import Context

    from celery_lock._base import LockManager
    from celery_lock.config import TaskLockOptions

__all__ = [
    "HELD",
    "REQUEUES_HEADER",
    "Call",
    "holder_task_id",
    "log_fields",
    "release_held",
    "requeues",
]

logger = get_logger("celery_lock.task")

#: Message header counting how often a QUEUE-mode call has been re-queued (it reaches the task
#: as ``self.request.headers[REQUEUES_HEADER]``). ``request.retries`` is left alone, so
#: re-queues never use up ``max_retries``.
REQUEUES_HEADER: Final = "lockrequeues"
#: Request attribute holding ``(manager, lease, renewal handle, request)`` while the lock is
#: held (the request itself: Celery copies it into a nested direct call's request).
HELD: Final = "_celery_lock_held"


def log_fields(
    task_name: str, task_id: str | None, key: str, backend: str, fence: int | None, **more: object
) -> dict[str, object]:
    """The structured ``extra`` of a log record about a task's lock (DESIGN §5)."""
    return {
        "lock_key": key,
        "backend": backend,
        "fence": fence,
        "task_id": task_id,
        "task_name": task_name,
        **more,
    }


class Call(NamedTuple):
    """One call that found its lock taken (or its store unreachable): what the duplicate
    handling needs to know about it."""

    request: Context
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    key: str
    options: TaskLockOptions
    manager: LockManager


def holder_task_id(manager: LockManager, key: str) -> str | None:
    """The task id recorded by the holder of ``key`` (best effort: for logs and errors)."""
    try:
        info = manager.inspect(key)
    except LockError:
        return None
    return info.task_id if info is not None else None


def release_held(request: Context, task_name: str, done: tuple[float, bool] | None) -> None:
    """Release the lease recorded on ``request`` (once); never raises into the task's outcome.

    ``done``: the job ran to completion: ``(done_ttl, mark)`` for :meth:`LockManager.finish`.
    """
    held = getattr(request, HELD, None)
    if held is None:
        return
    setattr(request, HELD, None)
    request.lock_lease = None  # type: ignore[attr-defined]
    manager, lease, handle, _ = held
    if handle is not None:
        handle.cancel()
        lease = handle.lease
    try:
        if done is None:
            manager.release(lease)
        else:
            manager.finish(lease, done_ttl=done[0], mark=done[1])
    except Exception as exc:  # noqa: BLE001 - the task's own result or error must stand
        logger.warning(
            "%s[%s] could not release lock %s (it ends with its TTL): %r",
            task_name,
            request.id,
            lease.key,
            exc,
            extra=log_fields(task_name, request.id, lease.key, lease.backend, lease.fence),
        )


def requeues(request: Context) -> int:
    """How often this call was re-queued (its header; a producer's junk counts as 0)."""
    requeues = (request.headers or {}).get(REQUEUES_HEADER, 0)
    if isinstance(requeues, bool) or not isinstance(requeues, int) or requeues < 0:
        return 0
    return requeues
