"""``LockedTask``: a Celery task base class that takes a lock around each run.

The lock is taken when the task's body starts (``run`` is wrapped when the task binds, so the
worker's tracer, ``apply()`` and direct calls all go through it), not when it is published:
``send_task``, beat, Flower and non-Python producers are covered, and a crashed producer never
leaves a lock behind (celery-once #113/#136, celery-singleton #24/#37 lock at publish and are
bypassed by all of these).

Per call: the key is built once from the request's arguments; the lease lives on the request
(``self.request.lock_lease``) and is released in a ``finally`` on every path the task itself
survives (success, failure, ``retry``, ``Ignore``, ``Reject``). Paths it does not survive are
handled by the worker's main process: a child killed by SIGKILL/OOM/hard time limit
(``task_failure`` with ``WorkerLostError``) or by revoke-and-terminate (``task_revoked``) has its
lock deleted at once by compare-and-delete on that task's own holder entry (``_worker.py``).

In a worker a call is a *job*, named by its task id (DESIGN §4a). Its claim is one round trip
that also answers whether that task id already ran (a redelivered or re-queued copy: dropped)
and, for a QUEUE duplicate, records it as a FIFO waiter whose wake-up the holder's release
publishes (``_wakeup.py``); a safety-net re-queue stays in the broker in case it never comes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time as _time
import types
from typing import TYPE_CHECKING, Any, ClassVar, Final, NoReturn

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.log import get_logger

from celery_lock import _coalesce, _fork, _wakeup
from celery_lock._calls import (
    HELD,
    REQUEUES_HEADER,
    Call,
    holder_task_id,
    log_fields,
    release_held,
)
from celery_lock._calls import (
    requeues as requeues_of,
)
from celery_lock._worker import _on_task_failure, _on_task_revoked, install
from celery_lock.config import OPTION_NAMES, LockSettings, TaskLockOptions, get_manager
from celery_lock.config import get_settings as _get_settings
from celery_lock.errors import LockBackendUnavailable, LockNotAcquired
from celery_lock.modes import LockMode
from celery_lock.renewer import RenewalHandle, get_renewer
from celery_lock.signals import lock_acquired, lock_lost, lock_requeued, lock_skipped

if TYPE_CHECKING:
    from collections.abc import Callable

    from celery import Celery
    from celery.app.task import Context

    from celery_lock._types import Claim, Lease
    from celery_lock.keys import KeySpec

__all__ = ["REQUEUES_HEADER", "LockedTask", "install", "requeue_countdown"]
# Re-exported for code that imported the worker handlers from here.
_WORKER_HANDLERS = (_on_task_failure, _on_task_revoked)

logger = get_logger(__name__)

#: QUEUE countdowns double per re-queue up to this multiple of ``lock_countdown``.
_GROWTH_CAP_EXPONENT: Final = 4
#: Attribute of the wrapper ``run`` that holds the task's own ``run`` (raw class attribute).
_ORIGINAL: Final = "_celery_lock_run"


def requeue_countdown(base: float, requeues: int, visibility_timeout: float) -> float:
    """Seconds before a re-queued duplicate runs again.

    ``base`` doubles per re-queue up to 16 times, is capped at a quarter of the broker's
    ``visibility_timeout`` (a Redis/SQS message held longer by a worker is delivered again,
    celery/celery#2599, #7009) and jittered down to half so contenders do not return in
    lockstep.
    """
    grown = base * (1 << min(requeues, _GROWTH_CAP_EXPONENT))
    return min(grown, visibility_timeout / 4) * _fork.jitter()


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
    - QUEUE in a worker: the call waits in the key's line (FIFO) and keeps a safety-net copy
      in the broker (the message re-published with the same task id, routing and canvas links
      and a long, growing countdown); the current delivery is acknowledged (``Ignore``). The
      holder's release publishes the first waiter at once. The caller's ``AsyncResult`` stays
      not-ready until the real run.
    - QUEUE in eager mode or a direct call: waits in-process up to the TTL, then raises
      ``LockNotAcquired``.

    A copy of a call whose task id already ran to completion, or is running (a redelivery,
    a re-queued copy), never runs or stores anything: it waits while the original runs and is
    dropped (``Ignore``, one INFO line) once it finished, or runs once if the original died.

    The running task sees its lease as ``self.request.lock_lease`` (``None`` when unlocked);
    pass ``lock_lease.fence`` to the resource you protect.
    """

    #: ``lock_on_duplicate="fail"`` is an expected outcome: the worker logs it at INFO, without
    #: a traceback (Celery's ``Task.throws``).
    throws = (LockNotAcquired,)

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
    #: QUEUE: base seconds of a waiting duplicate's safety-net re-queue, which runs it if no
    #: release wakes it first (doubles per re-queue up to 16 times, jittered, at most a quarter
    #: of the broker's ``visibility_timeout``). Default: ``lock_default_countdown``, else 30.
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
    #: Coalesce duplicates at publish time: ``apply_async``/``delay`` of a call whose identical
    #: call already waits (QUEUE), or waits or runs (EXECUTION), returns that call's
    #: ``AsyncResult`` instead of publishing (Redis locks only; see ``_coalesce``). Per call:
    #: ``apply_async(..., lock_coalesce=True/False)``. Default: ``lock_default_coalesce``, else
    #: False.
    lock_coalesce: ClassVar[bool | None] = None

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
        # Unlocked tasks too: their run sees request.lock_lease as None.
        _wrap_run(cls)

    @classmethod
    def _lock_values(cls) -> dict[str, Any]:
        # Read through the class so a function given as lock_key is not bound to the task.
        return {name: getattr(cls, name, None) for name in OPTION_NAMES}

    # ------------------------------------------------------------------ publishing

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """:meth:`celery.Task.apply_async`, coalescing identical calls when ``lock_coalesce``
        is on (per call: ``lock_coalesce=True/False``)."""
        coalesce = options.pop("lock_coalesce", None)
        lock = self._lock_options

        def send(new_id: str | None) -> Any:
            return super(LockedTask, self).apply_async(
                args, kwargs, new_id, producer, link, link_error, shadow, **options
            )

        if lock is None or not (lock.coalesce if coalesce is None else coalesce):
            return send(task_id)
        if link or link_error or not _coalesce.eligible(self.app, options):
            return send(task_id)
        return _coalesce.publish(self, lock, args, kwargs, task_id, send)

    # ------------------------------------------------------------------ running

    def _locked(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], run: Callable[..., Any]
    ) -> Any:
        """Run ``run(*args, **kwargs)`` under the call's lock (the wrapped ``run``)."""
        request = self.request
        options = self._lock_options
        held = getattr(request, HELD, None)
        if options is None or (held is not None and held[3] is request):
            # Unlocked, or run() called again inside the run that holds the lock.
            if options is None:
                request.lock_lease = None  # type: ignore[attr-defined]  # our own attribute
            return run(*args, **kwargs)
        # A direct call of the task inside its own run gets a copy of the running request
        # (Task.push_request): it is a call of its own, never the job itself.
        nested = held is not None
        setattr(request, HELD, None)
        request.lock_lease = None  # type: ignore[attr-defined]
        call = Call(
            request, args, kwargs, options.keys.key(args, kwargs), options, get_manager(self.app)
        )
        started = _time.monotonic()
        in_worker = not (nested or request.called_directly or request.is_eager) and bool(request.id)
        lease = self._claim(call) if in_worker else self._acquire(call)
        if lease is None:
            return None  # a skipped duplicate
        setattr(request, HELD, (call.manager, lease, None, request))
        finished = False
        try:
            request.lock_lease = lease  # type: ignore[attr-defined]
            self._took(call, lease, _time.monotonic() - started)
            if options.renew:
                handle = get_renewer().register(
                    call.manager,
                    lease,
                    on_lost=self._on_lost(request),
                    extra={"task_id": request.id, "task_name": self.name},
                )
                setattr(request, HELD, (call.manager, lease, handle, request))
            result = run(*args, **kwargs)
        except Retry:
            raise  # a new attempt of the job (retry() released the lock before publishing it)
        except Reject as exc:
            finished = not getattr(exc, "requeue", False)  # a requeued message runs the job again
            raise
        except Exception:
            finished = True  # the job ran and failed: its result is stored
            raise
        else:
            finished = True
            return result
        finally:
            settings = _get_settings(self.app)
            done = (settings.done_ttl, self._copies_may_exist(request)) if finished else None
            release_held(request, self.name, done)

    def _acquire(self, call: Call) -> Lease | None:
        """Eager mode and direct calls: no queue to wait in, so QUEUE waits in-process, up to
        the TTL. Returns None for a skipped duplicate."""
        options = call.options
        wait = options.mode is LockMode.QUEUE
        try:
            lease = call.manager.acquire(
                call.key,
                ttl=options.ttl,
                mode=LockMode.QUEUE if wait else LockMode.EXECUTION,
                task_id=call.request.id,
                task_name=self.name,
            )
        except LockBackendUnavailable as exc:
            raise self._unavailable(call, exc) from exc
        if lease is None:
            self._duplicate(
                call, holder_task_id(call.manager, call.key), "timeout" if wait else None
            )
        return lease

    def _claim(self, call: Call) -> Lease | None:
        """In a worker: claim the key for this job (task id). Returns the lease, None for a
        skipped duplicate; raises ``Ignore`` for a copy that waits or is dropped."""
        request, options, manager = call.request, call.options, call.manager
        task_id: str = request.id or ""
        done_ttl = _get_settings(self.app).done_ttl
        try:
            # QUEUE: if held, this job waits in line (a second claim gives the payload, built
            # only then); a coalescing marker naming it must stay meanwhile.
            claim: Claim = manager.claim(
                call.key,
                task_id=task_id,
                ttl=options.ttl,
                task_name=self.name,
                done_ttl=done_ttl,
                waits=options.mode is LockMode.QUEUE,
            )
            if claim.outcome == "held" and (
                options.mode is LockMode.QUEUE or claim.holder_task_id == task_id
            ):
                # Wait in line: the key's release publishes this payload (its wake-up).
                claim = manager.claim(
                    call.key,
                    task_id=task_id,
                    ttl=options.ttl,
                    task_name=self.name,
                    waiter=_wakeup.encode(self, self._copy(call, None)),
                    done_ttl=done_ttl,
                )
        except LockBackendUnavailable as exc:
            # Fail closed (lock_fallback=None): a QUEUE call waits its turn through the broker;
            # an EXECUTION call fails.
            if options.mode is LockMode.QUEUE:
                self._requeue(call, None)
            raise self._unavailable(call, exc) from exc
        if claim.outcome == "granted":
            return claim.lease
        if claim.outcome == "finished":
            self._drop(call, "it already ran to completion")
        holder = claim.holder_task_id
        if options.mode is LockMode.QUEUE or holder == task_id:
            self._requeue(call, holder)
        self._duplicate(call, holder, None)
        return None

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
            release_held(request, self.name, None)
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

    # ------------------------------------------------------------------ duplicates

    def _duplicate(self, call: Call, holder: str | None, action: str | None) -> None:
        """A call that does not run because another holds the key: skip (return), fail or
        ignore (raise) per ``lock_on_duplicate``, or ``action`` ("timeout": an eager QUEUE
        call gave up)."""
        action = action or call.options.on_duplicate
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

    def _drop(self, call: Call, why: str) -> NoReturn:
        """A copy of a job that must not run: acknowledged, nothing stored, no links run."""
        request = call.request
        logger.info(
            "%s[%s] dropped: %s (a redelivered or re-queued copy)",
            self.name,
            request.id,
            why,
            extra=self._extra(request, call.key, call.manager.backend, None),
        )
        raise Ignore(f"{request.id}: {why}")

    def _requeue(self, call: Call, holder: str | None) -> NoReturn:
        """Publish this call's safety-net copy and acknowledge the current delivery (``Ignore``).

        :raises LockNotAcquired: ``lock_max_requeues`` re-queues were used up.
        """
        request, key, cap = call.request, call.key, call.options.max_requeues
        requeues = requeues_of(request)
        own = holder is not None and holder == request.id
        if cap is not None and requeues >= cap and not own:
            call.manager.remove_waiter(key, request.id or "")
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
        self._copy(call, countdown).apply_async(**_wakeup.BYPASS)
        logger.info(
            "%s[%s] %s (%d); safety-net copy in %.2f s: lock %s is held by task %s",
            self.name,
            request.id,
            "waits for its own earlier delivery" if own else "waits in line",
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

    def _copy(self, call: Call, countdown: float | None) -> Any:
        """This call's message again (a signature): same task id, routing (queue, priority),
        links, chain and chord, expires, time limits and ``retries`` (``max_retries`` is not
        consumed), with the re-queue header counted up."""
        request = call.request
        headers = dict(request.headers or {})
        headers[REQUEUES_HEADER] = requeues_of(request) + 1
        return self.signature_from_request(
            request, tuple(call.args), dict(call.kwargs), countdown=countdown, headers=headers
        )

    def _copies_may_exist(self, request: Context) -> bool:
        """Whether other copies of this job may still arrive after it ran (then a finished
        marker is kept): it was re-queued, redelivered, or is acknowledged late."""
        delivery = request.delivery_info or {}
        return bool(
            requeues_of(request)
            or delivery.get("redelivered")
            or getattr(request, "acks_late", False)
            or self.acks_late
        )

    def _took(self, call: Call, lease: Lease, waited: float) -> None:
        request = call.request
        wait_ms = round(waited * 1000, 3)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s[%s] took lock %s (fence %d)",
                self.name,
                request.id,
                call.key,
                lease.fence,
                extra=self._extra(request, call.key, lease.backend, lease.fence, wait_ms=wait_ms),
            )
        lock_acquired.send(
            sender=self, task_id=request.id, key=call.key, lease=lease, wait_ms=wait_ms
        )

    def _unavailable(self, call: Call, exc: LockBackendUnavailable) -> LockBackendUnavailable:
        return LockBackendUnavailable(
            f"task {self.name!r}: cannot take lock {call.key!r}: {exc}",
            key=call.key,
            backend=exc.backend,
            task_name=self.name,
            task_id=call.request.id,
        )

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
        return log_fields(self.name, request.id, key, backend, fence, **more)


def _signature_target(cls: type[LockedTask]) -> Callable[..., Any]:
    """What the call arguments bind to: ``run`` without the task itself when it is a method."""
    raw = inspect.getattr_static(cls, "run")
    raw = getattr(raw, _ORIGINAL, raw)
    if isinstance(raw, staticmethod):
        return raw.__func__
    if isinstance(raw, types.FunctionType):
        # bind=True tasks and class-based run(self, ...): the first parameter is the task.
        return types.MethodType(raw, cls)
    return cls.run


def _wrap_run(cls: type[LockedTask]) -> None:
    """Make the task's ``run`` take the lock (once per class; the original is kept on it)."""
    raw = inspect.getattr_static(cls, "run")
    if getattr(raw, _ORIGINAL, None) is not None:
        return
    original = raw.__func__ if isinstance(raw, staticmethod) else raw
    bound = not isinstance(raw, staticmethod)

    @functools.wraps(original)
    def run(self: LockedTask, *args: Any, **kwargs: Any) -> Any:
        body = types.MethodType(original, self) if bound else original
        return self._locked(args, kwargs, body)

    setattr(run, _ORIGINAL, raw)
    cls.run = run  # type: ignore[method-assign,assignment]
