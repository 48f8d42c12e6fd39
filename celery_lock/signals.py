"""Signals for observers (metrics, alerts, audit), sent by :class:`~celery_lock.task.LockedTask`.

Connect like any Celery signal::

    from celery_lock.signals import lock_skipped

    @lock_skipped.connect
    def count_skip(sender, key, holder_task_id, **kwargs):
        statsd.incr(f"locks.skipped.{sender.name}")

Receivers run in the process that sent the signal (``lock_lost`` from the renewer thread) and
must be quick; an exception in a receiver is logged by Celery and does not reach the task.
Every signal may gain arguments later: accept ``**kwargs``.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "lock_acquired",
    "lock_coalesced",
    "lock_fallback",
    "lock_lost",
    "lock_requeued",
    "lock_skipped",
    "lock_woken",
]

#: A task took its lock and is about to run.
#:
#: ``sender``: the task. Arguments: ``task_id`` (None for a direct call), ``key``, ``lease``
#: (the :class:`~celery_lock.Lease`), ``wait_ms`` (time spent acquiring, float).
lock_acquired = Signal(name="lock_acquired")

#: An EXECUTION-mode duplicate did not run because the lock was held.
#:
#: ``sender``: the task. Arguments: ``task_id``, ``key``, ``holder_task_id`` (the task id
#: recorded by the holder, None when unknown), ``action`` (``"skip"``, ``"fail"``,
#: ``"ignore"``, or ``"timeout"`` when an eager/direct QUEUE call gave up waiting).
lock_skipped = Signal(name="lock_skipped")

#: A QUEUE-mode duplicate was re-published to run later.
#:
#: ``sender``: the task. Arguments: ``task_id``, ``key``, ``holder_task_id`` (None when unknown
#: or when the lock store was unreachable), ``requeues`` (how many times this call has now been
#: re-queued, 1 for the first), ``countdown`` (seconds until it runs again).
lock_requeued = Signal(name="lock_requeued")

#: A release handed a QUEUE key to the first waiting call and published its wake-up.
#:
#: ``sender``: the woken task (None when this process does not know it). Arguments:
#: ``task_id`` (of the woken call), ``key``. Sent by the releasing process.
lock_woken = Signal(name="lock_woken")

#: A call was not published: it shares the result of an identical call (``lock_coalesce``).
#:
#: ``sender``: the task. Arguments: ``task_id`` (of the existing call, whose AsyncResult the
#: caller got), ``key``. Sent by the producer.
lock_coalesced = Signal(name="lock_coalesced")

#: A running task's lease was lost (it expired or was taken over while the task ran).
#:
#: ``sender``: the task. Arguments: ``task_id``, ``key``, ``lease`` (the last lease the task
#: held). Sent from the renewer thread; the task itself keeps running.
lock_lost = Signal(name="lock_lost")

#: The app's lock store changed state: Redis became unreachable (locks now come from files,
#: or fail when ``lock_fallback`` is None) or answers again.
#:
#: ``sender``: the Celery app. Arguments: ``state`` (``"down"`` or ``"up"``), ``exc`` (the
#: error that opened the circuit, None for ``"up"``).
lock_fallback = Signal(name="lock_fallback")
