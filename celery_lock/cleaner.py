"""The orphan-lock cleaner: removes expired and provably dead locks, never a live one."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from celery_lock._base import LockManager
from celery_lock._types import CleanReport
from celery_lock.errors import LockError

__all__ = ["CleanReport", "LockCleaner"]

_log = logging.getLogger("celery_lock.cleaner")


class LockCleaner:
    """Runs one cleaning pass over one or several managers.

    Each backend decides per lock, then deletes by compare-and-delete on the exact token it judged
    stale, so a lock re-acquired between the scan and the delete is never removed. Redis expires
    its own keys; its cleaner removes locks whose holder is provably dead (same host, pid gone).

    :param manager_or_managers: a :class:`LockManager` or an iterable of them.
    """

    def __init__(self, manager_or_managers: LockManager | Iterable[LockManager]) -> None:
        if isinstance(manager_or_managers, LockManager):
            managers = [manager_or_managers]
        else:
            managers = list(manager_or_managers)
        for manager in managers:
            if not isinstance(manager, LockManager):
                raise TypeError(f"LockCleaner takes LockManager objects, got {manager!r}")
        if not managers:
            raise ValueError("LockCleaner needs at least one manager")
        self.managers: tuple[LockManager, ...] = tuple(managers)

    def clean(self, dry_run: bool = False) -> CleanReport:
        """One pass; with ``dry_run`` nothing is deleted and ``removed`` counts what would go.

        A store that cannot be reached counts as one error; the other managers still run.
        """
        report = CleanReport()
        for manager in self.managers:
            try:
                report += manager.clean(dry_run=dry_run)
            except LockError as exc:
                report.errors += 1
                _log.warning(
                    "lock cleaner could not clean %s: %s",
                    manager.backend,
                    exc,
                    extra={"backend": manager.backend},
                )
        _log.info(
            "lock cleaner%s: scanned %d, removed %d, kept %d, errors %d",
            " (dry run)" if dry_run else "",
            report.scanned,
            report.removed,
            report.kept,
            report.errors,
            extra={
                "scanned": report.scanned,
                "removed": report.removed,
                "kept": report.kept,
                "errors": report.errors,
                "dry_run": dry_run,
            },
        )
        return report
