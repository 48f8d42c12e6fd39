"""The worker's side of celery_lock: what a task cannot see itself.

Handlers for Celery signals sent in the worker's main process (a child killed under its task,
a revoked task) and :func:`install`, which wires them and the cleaner into an app. They act
only for locked tasks (a :class:`~celery_lock.task.LockedTask` with lock options).
"""

from __future__ import annotations

import contextlib
import signal as _signal
import threading
import weakref
from typing import TYPE_CHECKING, Any, Final

from billiard.exceptions import WorkerLostError
from celery import signals as celery_signals
from celery.exceptions import TimeLimitExceeded
from celery.utils.log import get_logger

from celery_lock.beat import register_cleanup
from celery_lock.config import get_manager, warn_if_host_local
from celery_lock.errors import LockError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from celery import Celery
    from celery.app.task import Context

    from celery_lock.config import TaskLockOptions

__all__ = ["install"]

logger = get_logger("celery_lock.task")

#: revoke(terminate=True, signal=...) signals that end a prefork child at once. Others
#: (SIGUSR1 raises SoftTimeLimitExceeded, SIGINT is ignored by children) may let the task run
#: on, so its lock is left to the task's own ``finally``.
_KILLING_SIGNALS: Final = frozenset(
    {_signal.SIGTERM, _signal.SIGKILL, _signal.SIGQUIT, _signal.SIGHUP, _signal.SIGABRT}
)


def _options(task: object) -> TaskLockOptions | None:
    """The lock options of a locked task, else None."""
    options = getattr(task, "_lock_options", None)
    return options if options is not None and hasattr(task, "app") else None


# ---------------------------------------------------------------------------- worker parent


def _break(
    task: Any,
    task_id: object,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    why: str,
) -> None:
    """In the worker's main process: delete the lock a dead child held for ``task_id``.

    The parent sees the same deserialised message as the child did, so the key it computes is
    the child's; the delete is compare-and-delete on the holder entry recorded with that task
    id, so a lock re-acquired by anyone else meanwhile is left alone.
    """
    options = _options(task)
    if options is None or not isinstance(task_id, str):
        return
    try:
        key = options.keys.key(args or (), kwargs or {})
        broken = get_manager(task.app).break_lock(key, task_id=task_id)
    except (LockError, TypeError, ValueError) as exc:
        logger.warning(
            "could not release the lock of %s[%s] after it %s: %r",
            task.name,
            task_id,
            why,
            exc,
            extra={"task_id": task_id, "task_name": task.name},
        )
        return
    if broken:
        logger.info(
            "released lock %s of %s[%s]: it %s",
            key,
            task.name,
            task_id,
            why,
            extra={"lock_key": key, "task_id": task_id, "task_name": task.name},
        )


def _on_task_failure(
    sender: object = None,
    task_id: object = None,
    exception: object = None,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    **_: object,
) -> None:
    # Sent by the main process when a child died under the task (SIGKILL, OOM killer: billiard's
    # WorkerLostError) or was killed for its hard time limit; the child's finally never ran.
    if isinstance(exception, WorkerLostError):
        _break(sender, task_id, args, kwargs, "lost its worker process")
    elif isinstance(exception, TimeLimitExceeded):
        _break(sender, task_id, args, kwargs, "exceeded its hard time limit")


def _on_task_revoked(
    sender: object = None,
    request: Context | None = None,
    terminated: bool = False,
    signum: object = None,
    **_: object,
) -> None:
    if request is None:
        return
    if not terminated:
        # Revoked before it ran (discarded on arrival): if it waits in a key's line, or the key
        # is reserved for it, the next waiter gets its turn now.
        _leave_line(sender, request)
        return
    try:
        # An int from Request.terminate(); billiard reports a terminated job as "-<signum>".
        killing = abs(int(signum)) in _KILLING_SIGNALS  # type: ignore[call-overload]
    except (TypeError, ValueError):
        killing = False
    if killing:
        _break(sender, request.id, request.args, request.kwargs, "was revoked and terminated")


# ---------------------------------------------------------------------------- install

_installed_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_install_mutex = threading.Lock()


def install(app: Celery) -> None:
    """Wire celery_lock into ``app``: worker signal handlers, the ``celery_lock.cleanup`` task
    and (after ``app.finalize()``) its beat entry. Idempotent; binding a :class:`LockedTask` to
    an app calls it, so most apps never need to.

    The handlers are connected once per process (``dispatch_uid``) and act only for locked
    tasks of installed apps; they hold no reference to any app.
    """
    with _install_mutex:
        if app in _installed_apps:
            return
        _installed_apps.add(app)
    celery_signals.task_failure.connect(
        _on_task_failure, weak=False, dispatch_uid="celery_lock.task_failure"
    )
    celery_signals.task_revoked.connect(
        _on_task_revoked, weak=False, dispatch_uid="celery_lock.task_revoked"
    )
    # Sent once the worker's logging is set up (worker_init comes before it: a warning sent
    # then would reach no handler of the worker's).
    celery_signals.celeryd_after_setup.connect(
        _on_worker_setup, weak=False, dispatch_uid="celery_lock.worker_setup"
    )
    register_cleanup(app)


def _on_worker_setup(instance: object = None, **_: object) -> None:
    # Once per worker start, in its main process: host-local locks are a silent hazard.
    app = getattr(instance, "app", None)
    if app is not None and app in _installed_apps:
        # Invalid settings: the tasks report them, with their names, when they bind.
        with contextlib.suppress(TypeError, ValueError):
            warn_if_host_local(app)


def _leave_line(task: Any, request: Context) -> None:
    options = _options(task)
    task_id = request.id
    if options is None or not isinstance(task_id, str):
        return
    try:
        key = options.keys.key(request.args or (), request.kwargs or {})
        removed = get_manager(task.app).remove_waiter(key, task_id)
    except (LockError, TypeError, ValueError) as exc:
        logger.debug("could not take revoked %s out of its lock's line: %r", task_id, exc)
        return
    if removed:
        logger.info(
            "revoked %s left the line of lock %s",
            task_id,
            key,
            extra={"lock_key": key, "task_id": task_id},
        )
