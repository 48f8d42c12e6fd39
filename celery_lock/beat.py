"""The ``celery_lock.cleanup`` task and its beat entry.

The task runs :class:`~celery_lock.LockCleaner` over the app's lock manager: it removes only
locks that expired or whose holder is provably dead, by compare-and-delete on the exact holder
it judged (never a ``clear_locks()``-style wipe, celery-singleton#21/#22). Beat runs it every
``lock_cleanup_interval`` seconds (``None`` leaves the entry out); a beat entry of the same name
in the user's ``beat_schedule`` is kept as it is.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Final

from celery_lock.cleaner import LockCleaner
from celery_lock.config import get_manager, get_settings

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["CLEANUP_TASK", "add_beat_entry", "register_cleanup"]

#: Name of the cleanup task and of its beat entry.
CLEANUP_TASK: Final = "celery_lock.cleanup"


def register_cleanup(app: Celery) -> None:
    """Register ``celery_lock.cleanup`` on ``app`` and add its beat entry once the app is
    finalized (at once when it already is)."""

    def cleanup(dry_run: bool = False) -> dict[str, Any]:
        """Remove expired and provably dead locks; return the CleanReport as a dict."""
        return dataclasses.asdict(LockCleaner(get_manager(app)).clean(dry_run=dry_run))

    # lazy: on an app that is not finalized yet the task is created during finalize, before
    # Celery binds the registered tasks (inserting then would change the registry mid-loop).
    app.task(name=CLEANUP_TASK, shared=False, lazy=True)(cleanup)
    if app.finalized:  # type: ignore[attr-defined]  # missing from the stubs
        add_beat_entry(app)
    else:
        app.on_after_finalize.connect(_on_after_finalize, weak=False, dispatch_uid=CLEANUP_TASK)


def _on_after_finalize(sender: Celery, **_: object) -> None:
    add_beat_entry(sender)


def add_beat_entry(app: Celery) -> None:
    """Put ``celery_lock.cleanup`` on ``app``'s beat schedule per ``lock_cleanup_interval``.

    No minimum interval is imposed. The entry's messages expire after one interval, so a
    stopped worker does not find a backlog of cleanups.
    """
    interval = get_settings(app).cleanup_interval
    if interval is None:
        return
    schedule = dict(app.conf.beat_schedule or {})
    schedule.setdefault(
        CLEANUP_TASK,
        {"task": CLEANUP_TASK, "schedule": interval, "options": {"expires": interval}},
    )
    app.conf.beat_schedule = schedule
