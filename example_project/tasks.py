"""The example's tasks: a report that must never overlap, syncs and invoices that queue up.

Each task writes a ``start`` and an ``end`` event (with its lock key and fencing token) to the
events file, and the handlers at the bottom record what celery_lock decided (acquired, skipped,
re-queued) and when the cleaner ran; :mod:`example_project.demo` reads them back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from celery.signals import beat_init, task_success, worker_ready

from celery_lock import LockedTask, LockMode
from celery_lock.signals import lock_acquired, lock_lost, lock_requeued, lock_skipped
from example_project.celery_app import EVENTS_FILE, MODE, app
from example_project.events import record

__all__ = ["nightly_report", "send_invoice", "sync_account"]

#: Simulated work, in seconds: long enough for duplicates to arrive while a run is going on.
REPORT_SECONDS = 4.0
SYNC_SECONDS = 0.4
INVOICE_SECONDS = 0.3


@contextmanager
def _running(task: Task[Any, Any], **args: Any) -> Iterator[None]:
    """Record the start and the end of one run of ``task``, with the lease it runs under."""
    lease = getattr(task.request, "lock_lease", None)
    common = {
        "task_id": task.request.id,
        "task": task.name,
        "args": args,
        "worker": task.request.hostname,
    }
    record(
        EVENTS_FILE,
        "start",
        **common,
        key=getattr(lease, "key", None),
        fence=getattr(lease, "fence", None),
        backend=getattr(lease, "backend", None),
    )
    ok = False
    try:
        yield
        ok = True
    finally:
        record(EVENTS_FILE, "end", **common, ok=ok)


@app.task(base=LockedTask, bind=True, lock_mode=LockMode.EXECUTION, lock_ttl=60)
def nightly_report(self: Task[Any, Any]) -> dict[str, int]:
    """Build the daily report. Beat fires it; if the last run is still going, this one is skipped.

    ``lock_ttl`` is far shorter than a real report may take: the lease is renewed while the task
    runs, so the TTL only bounds how long a lock outlives a holder that vanished without trace.
    """
    with _running(self):
        time.sleep(REPORT_SECONDS)
    return {"rows": 1234}


@app.task(base=LockedTask, bind=True, lock_mode=LockMode.QUEUE, lock_ttl=60, lock_countdown=0.2)
def sync_account(self: Task[Any, Any], account_id: int, full: bool = False) -> dict[str, Any]:
    """Pull one account from the upstream API. Duplicates wait their turn instead of racing.

    The lock key is the task name plus the bound arguments, so ``sync_account(1)``,
    ``sync_account(account_id=1)`` and ``sync_account(1, full=False)`` are one job, while
    ``sync_account(2)`` and ``sync_account(1, full=True)`` are others.
    """
    with _running(self, account_id=account_id, full=full):
        time.sleep(SYNC_SECONDS * (3 if full else 1))
    return {"account_id": account_id, "full": full, "task_id": self.request.id}


@app.task(
    base=LockedTask,
    bind=True,
    lock_mode=LockMode.QUEUE,
    lock_key="customer:{customer_id}",
    lock_ttl=60,
    lock_countdown=0.2,
)
def send_invoice(self: Task[Any, Any], invoice_id: int, customer_id: int) -> dict[str, Any]:
    """Render and e-mail one invoice; one customer's invoices go out one at a time, in any order.

    Keyed on the customer alone (``lock_key``): two invoices of customer 7 never run at once,
    while an invoice of customer 8 runs beside them.
    """
    with _running(self, invoice_id=invoice_id, customer_id=customer_id):
        time.sleep(INVOICE_SECONDS)
    return {"invoice_id": invoice_id, "customer_id": customer_id}


# ------------------------------------------------------------------ observers for the demo


@worker_ready.connect
def _worker_ready(sender: Any = None, **kwargs: Any) -> None:
    record(EVENTS_FILE, "worker_ready", worker=getattr(sender, "hostname", None), mode=MODE)


@beat_init.connect
def _beat_ready(sender: Any = None, **kwargs: Any) -> None:
    record(EVENTS_FILE, "beat_ready", mode=MODE)


@task_success.connect
def _cleanup_ran(sender: Any = None, result: Any = None, **kwargs: Any) -> None:
    if getattr(sender, "name", None) == "celery_lock.cleanup":
        record(EVENTS_FILE, "cleanup", result=result)


@lock_acquired.connect
def _acquired(sender: Any, task_id: Any = None, key: Any = None, **kwargs: Any) -> None:
    lease = kwargs.get("lease")
    record(
        EVENTS_FILE,
        "acquired",
        task=sender.name,
        task_id=task_id,
        key=key,
        fence=getattr(lease, "fence", None),
        wait_ms=kwargs.get("wait_ms"),
    )


@lock_skipped.connect
def _skipped(sender: Any, task_id: Any = None, key: Any = None, **kwargs: Any) -> None:
    record(
        EVENTS_FILE,
        "skipped",
        task=sender.name,
        task_id=task_id,
        key=key,
        holder=kwargs.get("holder_task_id"),
        action=kwargs.get("action"),
    )


@lock_requeued.connect
def _requeued(sender: Any, task_id: Any = None, key: Any = None, **kwargs: Any) -> None:
    record(
        EVENTS_FILE,
        "requeued",
        task=sender.name,
        task_id=task_id,
        key=key,
        holder=kwargs.get("holder_task_id"),
        requeues=kwargs.get("requeues"),
        countdown=kwargs.get("countdown"),
    )


@lock_lost.connect
def _lost(sender: Any, task_id: Any = None, key: Any = None, **kwargs: Any) -> None:
    record(EVENTS_FILE, "lost", task=sender.name, task_id=task_id, key=key)
