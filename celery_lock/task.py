"""``LockedTask``: a Celery task base class that takes a lock around each run.

The lock is taken when the task starts (in ``__call__``, which Celery's tracer calls for a task
class with its own ``__call__``), not when it is published: ``send_task``, beat, Flower and
non-Python producers are covered, and a crashed producer never leaves a lock behind (celery-once
#113/#136, celery-singleton #24/#37 lock at publish and are bypassed by all of these).

Per call: the key is built once from the request's arguments; the lease lives on the request
(``self.request.lock_lease``) and is released in a ``finally`` on every path the task itself
survives (success, failure, ``retry``, ``Ignore``, ``Reject``). Paths it does not survive are
handled by the worker's main process: a child killed by SIGKILL/OOM/hard time limit
(``task_failure`` with ``WorkerLostError``) or by revoke-and-terminate (``task_revoked``) has its
lock deleted at once by compare-and-delete on that task's own holder entry.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
import signal as _signal
import threading
import time as _time
import types
import weakref
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple, NoReturn

from billiard.exceptions import WorkerLostError
from celery import Task
from celery import signals as celery_signals
from celery._state import _task_stack  # type: ignore[attr-defined]  # missing from the stubs
from celery.exceptions import Ignore, TimeLimitExceeded
from celery.utils.log import get_logger

from celery_lock.beat import register_cleanup
from celery_lock.config import (
    OPTION_NAMES,
    LockSettings,
    TaskLockOptions,
    get_manager,
    warn_if_host_local,
)
from celery_lock.config import get_settings as _get_settings
from celery_lock.errors import LockBackendUnavailable, LockError, LockNotAcquired
from celery_lock.modes import LockMode
from celery_lock.renewer import RenewalHandle, get_renewer
from celery_lock.signals import lock_acquired, lock_lost, lock_requeued, lock_skipped

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from celery import Celery
    from celery.app.task import Context

    from celery_lock._base import LockManager
    from celery_lock.keys import KeySpec

__all__ = ["REQUEUES_HEADER", "LockedTask", "install", "requeue_countdown"]

logger = get_logger(__name__)

#: Message header counting how often a QUEUE-mode call has been re-queued (it reaches the task
#: as ``self.request.headers[REQUEUES_HEADER]``). ``request.retries`` is left alone, so
#: re-queues never use up ``max_retries``.
REQUEUES_HEADER: Final = "lock_requeues"
#: QUEUE countdowns double per re-queue up to this multiple of ``lock_countdown``.
_GROWTH_CAP_EXPONENT: Final = 4
#: revoke(terminate=True, signal=...) signals that end a prefork child at once. Others
#: (SIGUSR1 raises SoftTimeLimitExceeded, SIGINT is ignored by children) may let the task run
#: on, so its lock is left to the task's own ``finally``.
_KILLING_SIGNALS: Final = frozenset(
    {_signal.SIGTERM, _signal.SIGKILL, _signal.SIGQUIT, _signal.SIGHUP, _signal.SIGABRT}
)
#: Request attribute holding ``(manager, lease, renewal handle)`` while the lock is held.
_HELD: Final = "_celery_lock_held"


def requeue_countdown(base: float, requeues: int, visibility_timeout: float) -> float:
    """Seconds before a re-queued duplicate runs again.

    ``base`` doubles per re-queue up to 16 times, is capped at a quarter of the broker's
    ``visibility_timeout`` (a Redis/SQS message held longer by a worker is delivered again,
    celery/celery#2599, #7009) and jittered down to half so contenders do not return in
    lockstep.
    """
    grown = base * (1 << min(requeues, _GROWTH_CAP_EXPONENT))
    return min(grown, visibility_timeout / 4) * random.uniform(0.5, 1.0)  # noqa: S311


class LockedTask(Task):  # type: ignore[type-arg]  # generic only in the stubs
    """Celery task base class: at most one run per lock key at a time.

    ::

        @app.task(base=LockedTask, lock_mode=LockMode.QUEUE, lock_ttl=600)
        def sync_account(account_id, full=False): ...

    Options are the ``lock_*`` class attributes below; set them as ``@app.task`` keywords, on a
    subclass, or through ``task_annotations``. ``None`` means "not set": the app setting
    ``lock_default_<option>`` applies, then the library default.

    A task is locked when its class has ``LockedTask`` as an explicit base (``base=LockedTask``,
    a subclass, ``shared_task(base=...)``) or sets any ``lock_*`` option. With
    ``Celery(task_cls=LockedTask)`` every task can be locked from configuration, and tasks that
    set no option (Celery's own built-ins included) stay unlocked.

    Outcomes of a duplicate (a call whose key is locked when it starts):

    - EXECUTION, ``lock_on_duplicate="skip"``: not run; state SUCCESS with result ``None``; a
      chain continues with ``None``.
    - EXECUTION, ``"fail"``: raises :class:`~celery_lock.LockNotAcquired` (state FAILURE; error
      callbacks run; a chain stops).
    - EXECUTION, ``"ignore"``: raises Celery's ``Ignore``: no state is stored and a chain stops
      (inside a chord header this hangs the chord: prefer ``skip`` there).
    - QUEUE in a worker: the message is re-published with the same task id, routing and canvas
      links and a growing countdown, then the current delivery is acknowledged (``Ignore``);
      the caller's ``AsyncResult`` stays not-ready until the real run.
    - QUEUE in eager mode or a direct call: waits in-process up to the TTL, then raises
      ``LockNotAcquired``.

    The running task sees its lease as ``self.request.lock_lease`` (``None`` when unlocked);
    pass ``lock_lease.fence`` to the resource you protect.
    """

    #: ``LockMode.EXECUTION`` (a duplicate does not run) or ``LockMode.QUEUE`` (it runs after
    #: the holder); the strings ``"execution"`` / ``"queue"`` in any case work too.
    #: Default: ``lock_default_mode``, else EXECUTION.
    lock_mode: ClassVar[LockMode | str | None] = None
    #: Lease seconds, renewed every third of it while the task runs.
    #: Default: ``lock_default_ttl``, else 300.
    lock_ttl: ClassVar[float | None] = None
    #: None (task name + hash of the bound arguments), a format string over parameter names
    #: (``"account:{account_id}"``), or a callable called as ``lock_key(*args, **kwargs)`` with
    #: the call's own arguments (never ``self``). Always prefixed by the task name.
    lock_key: ClassVar[KeySpec] = None
    #: QUEUE: base seconds before a re-queued duplicate runs again (doubles per re-queue up to
    #: 16 times, jittered, at most a quarter of the broker's ``visibility_timeout``).
    #: Default: ``lock_default_countdown``, else 1.
    lock_countdown: ClassVar[float | None] = None
    #: QUEUE: N allows N re-queues and fails the (N+1)-th conflict with ``LockNotAcquired``.
    #: Default: ``lock_default_max_requeues``, else no cap (the holder's TTL bounds the wait).
    lock_max_requeues: ClassVar[int | None] = None
    #: EXECUTION: ``"skip"``, ``"fail"`` or ``"ignore"`` (see the class docstring).
    #: Default: ``lock_default_on_duplicate``, else ``"skip"``.
    lock_on_duplicate: ClassVar[str | None] = None
    #: Keep the lease alive while the task runs (one renewer thread per process).
    #: Default: ``lock_default_renew``, else True.
    lock_renew: ClassVar[bool | None] = None

    #: Resolved options (set when the task binds); None: the task runs unlocked.
    _lock_options: ClassVar[TaskLockOptions | None] = None

    # ------------------------------------------------------------------ binding

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        """Resolve and validate the lock options and wire the app (``install``).

        :raises ValueError: for an invalid option or setting, naming the task, the option and
            the value (at bind time, so a bad task fails when the app finalizes).
        :raises TypeError: for an option of the wrong type (e.g. ``lock_key=42``).
        """
        super().on_bound(app)
        install(app)
        values = cls._lock_values()
        explicit = any(value is not None for value in values.values())
        # app.Task is LockedTask's subclass only under Celery(task_cls=LockedTask); tasks that
        # merely inherit it stay unlocked unless they set an option.
        if cls.name is not None and (explicit or not issubclass(cls, app.Task)):
            cls._lock_options = TaskLockOptions.resolve(
                cls.name, values, _get_settings(app), _signature_target(cls)
            )
        else:
            cls._lock_options = None

    @classmethod
    def _lock_values(cls) -> dict[str, Any]:
        # Read through the class so a function given as lock_key is not bound to the task.
        return {name: getattr(cls, name, None) for name in OPTION_NAMES}

    # ------------------------------------------------------------------ running

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task under its lock (or unlocked when it sets no lock options)."""
        request = self.request_stack.top
        if request is None or request.called_directly or "lock_lease" in vars(request):
            # A direct call (or a nested call of the running task): it gets a request of its
            # own, as Task.__call__ would give it, so the lease is visible on it.
            _task_stack.push(self)
            self.push_request(args=args, kwargs=kwargs)
            try:
                return self._run_locked(self.request, args, kwargs)
            finally:
                self.pop_request()
                _task_stack.pop()
        # Traced by a worker or by apply(): run on the tracer's request (Celery's own stack
        # protection does the same for a custom __call__ in workers).
        return self._run_locked(request, args, kwargs)

    def _run_locked(self, request: Context, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        options = self._lock_options
        # Also marks the request as entered (see __call__).
        request.lock_lease = None  # type: ignore[attr-defined]  # our own request attribute
        if options is None:
            return self.run(*args, **kwargs)
        in_worker = not (request.called_directly or request.is_eager)
        key = options.keys.key(args, kwargs)
        manager = get_manager(self.app)
        # In a worker a duplicate never blocks a slot; without a queue (eager/direct) QUEUE
        # mode waits in-process, up to the TTL.
        wait = options.mode is LockMode.QUEUE and not in_worker
        started = _time.monotonic()
        try:
            lease = manager.acquire(
                key,
                ttl=options.ttl,
                mode=LockMode.QUEUE if wait else LockMode.EXECUTION,
                task_id=request.id,
                task_name=self.name,
            )
        except LockBackendUnavailable as exc:
            # Fail closed (lock_fallback=None): a QUEUE call waits its turn through the broker;
            # an EXECUTION call fails.
            if options.mode is LockMode.QUEUE and in_worker:
                self._requeue(_Call(request, args, kwargs, key, options, manager), None)
            raise LockBackendUnavailable(
                f"task {self.name!r}: cannot take lock {key!r}: {exc}",
                key=key,
                backend=exc.backend,
                task_name=self.name,
                task_id=request.id,
            ) from exc
        if lease is None:
            return self._duplicate(_Call(request, args, kwargs, key, options, manager), in_worker)
        setattr(request, _HELD, (manager, lease, None))
        try:
            request.lock_lease = lease  # type: ignore[attr-defined]
            wait_ms = round((_time.monotonic() - started) * 1000, 3)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "%s[%s] took lock %s (fence %d)",
                    self.name,
                    request.id,
                    key,
                    lease.fence,
                    extra=self._extra(request, key, lease.backend, lease.fence, wait_ms=wait_ms),
                )
            lock_acquired.send(
                sender=self, task_id=request.id, key=key, lease=lease, wait_ms=wait_ms
            )
            if options.renew:
                handle = get_renewer().register(
                    manager,
                    lease,
                    on_lost=self._on_lost(request),
                    extra={"task_id": request.id, "task_name": self.name},
                )
                setattr(request, _HELD, (manager, lease, handle))
            return self.run(*args, **kwargs)
        finally:
            _release_held(request, self.name)

    def retry(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        exc: Exception | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Like :meth:`celery.Task.retry`, releasing the lock before the retry is published.

        A retried attempt is a new attempt: it must be able to take the lock as soon as it is
        delivered (with ``countdown=0`` that can be before this attempt's ``finally`` runs).
        When no retry will be published (``max_retries`` exceeded, a direct call) the lock is
        kept and Celery raises as usual. With ``throw=False`` the rest of the run is unlocked.
        """
        request = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if not request.called_directly and (limit is None or request.retries + 1 <= limit):
            _release_held(request, self.name)
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

    # ------------------------------------------------------------------ duplicates

    def _duplicate(self, call: _Call, in_worker: bool) -> None:
        holder = _holder_task_id(call.manager, call.key)
        if call.options.mode is LockMode.QUEUE:
            if in_worker:
                self._requeue(call, holder)
            action = "timeout"
        else:
            action = call.options.on_duplicate
        request = call.request
        logger.info(
            "%s[%s] not run: lock %s is held by task %s (%s)",
            self.name,
            request.id,
            call.key,
            holder,
            action,
            extra=self._extra(request, call.key, call.manager.backend, None, holder_task_id=holder),
        )
        lock_skipped.send(
            sender=self, task_id=request.id, key=call.key, holder_task_id=holder, action=action
        )
        if action == "skip":
            return
        if action == "ignore":
            raise Ignore(f"duplicate of {call.key!r}, held by task {holder}")
        raise LockNotAcquired(
            f"task {self.name!r}: lock {call.key!r} is held by task {holder}"
            + (f" (waited {call.options.ttl:g} s)" if action == "timeout" else ""),
            key=call.key,
            task_name=self.name,
            task_id=request.id,
            holder_task_id=holder,
        )

    def _requeue(self, call: _Call, holder: str | None) -> NoReturn:
        """Re-publish this call to run later and acknowledge the current delivery (``Ignore``).

        :raises LockNotAcquired: ``lock_max_requeues`` re-queues were used up.
        """
        request, key, cap = call.request, call.key, call.options.max_requeues
        headers = dict(request.headers or {})
        requeues = headers.get(REQUEUES_HEADER, 0)
        if isinstance(requeues, bool) or not isinstance(requeues, int) or requeues < 0:
            requeues = 0  # a producer's junk header must not break the task
        if cap is not None and requeues >= cap:
            raise LockNotAcquired(
                f"task {self.name!r}: lock {key!r} is still held by task {holder} after "
                f"{requeues} re-queues (lock_max_requeues={cap})",
                key=key,
                task_name=self.name,
                task_id=request.id,
                holder_task_id=holder,
                requeues=requeues,
            )
        settings: LockSettings = _get_settings(self.app)
        countdown = requeue_countdown(call.options.countdown, requeues, settings.visibility_timeout)
        headers[REQUEUES_HEADER] = requeues + 1
        # signature_from_request keeps the task id, routing (queue, priority), links, chain and
        # chord, expires and time limits, and `retries` unchanged: max_retries is not consumed.
        self.signature_from_request(
            request, tuple(call.args), dict(call.kwargs), countdown=countdown, headers=headers
        ).apply_async()
        logger.info(
            "%s[%s] re-queued (%d) to run in %.2f s: lock %s is held by task %s",
            self.name,
            request.id,
            requeues + 1,
            countdown,
            key,
            holder,
            extra=self._extra(
                request,
                key,
                call.manager.backend,
                None,
                holder_task_id=holder,
                countdown=countdown,
            ),
        )
        lock_requeued.send(
            sender=self,
            task_id=request.id,
            key=key,
            holder_task_id=holder,
            requeues=requeues + 1,
            countdown=countdown,
        )
        raise Ignore(f"re-queued: lock {key!r} is held")

    # ------------------------------------------------------------------ helpers

    def _on_lost(self, request: Context) -> Callable[[RenewalHandle], None]:
        task_id = request.id

        def on_lost(handle: RenewalHandle) -> None:
            # The renewer already logged the one ERROR line, with this task's fields.
            lease = handle.lease
            lock_lost.send(sender=self, task_id=task_id, key=lease.key, lease=lease)

        return on_lost

    def _extra(
        self,
        request: Context,
        key: str,
        backend: str,
        fence: int | None,
        **more: object,
    ) -> dict[str, object]:
        return _log_fields(self.name, request.id, key, backend, fence, **more)


def _log_fields(
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


class _Call(NamedTuple):
    """One call that found its lock taken (or its store unreachable): what the duplicate
    handling needs to know about it."""

    request: Context
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    key: str
    options: TaskLockOptions
    manager: LockManager


def _signature_target(cls: type[LockedTask]) -> Callable[..., Any]:
    """What the call arguments bind to: ``run`` without the task itself when it is a method."""
    raw = inspect.getattr_static(cls, "run")
    if isinstance(raw, staticmethod):
        return raw.__func__
    if isinstance(raw, types.FunctionType):
        # bind=True tasks and class-based run(self, ...): the first parameter is the task.
        return types.MethodType(raw, cls)
    return cls.run


def _holder_task_id(manager: LockManager, key: str) -> str | None:
    """The task id recorded by the holder of ``key`` (best effort: for logs and errors)."""
    try:
        info = manager.inspect(key)
    except LockError:
        return None
    return info.task_id if info is not None else None


def _release_held(request: Context, task_name: str) -> None:
    """Release the lease recorded on ``request`` (once); never raises into the task's outcome."""
    held = getattr(request, _HELD, None)
    if held is None:
        return
    setattr(request, _HELD, None)
    request.lock_lease = None  # type: ignore[attr-defined]
    manager, lease, handle = held
    if handle is not None:
        handle.cancel()
        lease = handle.lease
    try:
        manager.release(lease)
    except Exception as exc:  # noqa: BLE001 - the task's own result or error must stand
        logger.warning(
            "%s[%s] could not release lock %s (it ends with its TTL): %r",
            task_name,
            request.id,
            lease.key,
            exc,
            extra=_log_fields(task_name, request.id, lease.key, lease.backend, lease.fence),
        )


# ---------------------------------------------------------------------------- worker parent


def _break(
    task: object,
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
    if not isinstance(task, LockedTask) or not isinstance(task_id, str):
        return
    options = task._lock_options
    if options is None:
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
    if not terminated or request is None:
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
