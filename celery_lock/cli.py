"""``celery -A proj locks ...``: list, show, release and clean locks (a ``celery.commands``
plugin)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import click
from celery.bin.base import CeleryCommand, handle_preload_options

from celery_lock.cleaner import LockCleaner
from celery_lock.config import get_manager

if TYPE_CHECKING:
    from celery.bin.base import CLIContext

    from celery_lock._types import LockInfo

__all__ = ["locks"]

_COLUMNS = ("KEY", "TASK", "BACKEND", "HOST", "PID", "AGE", "TTL")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group(name="locks")
def locks() -> None:
    """Inspect and manage celery_lock locks (those of the -A app's lock store)."""


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _row(info: LockInfo, now: float) -> tuple[str, ...]:
    return (
        info.key,
        info.task_name or "-",
        info.backend,
        info.host or "-",
        "-" if info.pid is None else str(info.pid),
        _seconds(None if info.acquired_at is None else now - info.acquired_at),
        _seconds(None if info.expires_at is None else max(0.0, info.expires_at - now)),
    )


def _table(rows: Iterable[tuple[str, ...]]) -> str:
    rows = [_COLUMNS, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


@locks.command(name="list", cls=CeleryCommand)
@_json_option
@click.pass_context
@handle_preload_options
def list_locks(ctx: click.Context, as_json: bool, **_: Any) -> None:
    """One row per held lock: key, task, backend, host, pid, age and TTL left."""
    obj: CLIContext = ctx.obj
    infos = sorted(get_manager(obj.app).iter_locks(), key=lambda info: info.key)
    if as_json:
        obj.echo(_dump([info.as_dict() for info in infos]))
    elif infos:
        now = time.time()
        obj.echo(_table(_row(info, now) for info in infos))
    else:
        obj.echo("No locks held.")


@locks.command(cls=CeleryCommand)
@click.argument("key")
@_json_option
@click.pass_context
@handle_preload_options
def show(ctx: click.Context, key: str, as_json: bool, **_: Any) -> None:
    """The holder of the lock KEY (exit status 1 when it is not held)."""
    obj: CLIContext = ctx.obj
    info = get_manager(obj.app).inspect(key)
    if as_json:
        obj.echo(_dump(None if info is None else info.as_dict()))
    elif info is not None:
        obj.echo("\n".join(f"{name}: {value}" for name, value in info.as_dict().items()))
    else:
        obj.echo(f"{key}: not locked")
    if info is None:
        ctx.exit(1)


@locks.command(cls=CeleryCommand)
@click.argument("key")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_json_option
@click.pass_context
@handle_preload_options
def release(ctx: click.Context, key: str, yes: bool, as_json: bool, **_: Any) -> None:
    """Delete the lock KEY, held by the holder shown (compare-and-delete).

    Only that holder's entry is deleted: if the lock changed hands (another task id) since it
    was shown, nothing is. Exit status 1 when nothing was released.
    """
    obj: CLIContext = ctx.obj
    manager = get_manager(obj.app)
    info = manager.inspect(key)
    released = False
    if info is not None:
        if not yes:
            click.confirm(
                f"Release {key} held by task {info.task_name or '-'}[{info.task_id or '-'}] "
                f"on {info.host or '-'} (pid {info.pid or '-'})? The task may still be running",
                abort=True,
            )
        released = manager.break_lock(key, task_id=info.task_id)
    if as_json:
        obj.echo(_dump({"key": key, "released": released}))
    else:
        obj.echo(f"{key}: {'released' if released else 'not locked'}")
    if not released:
        ctx.exit(1)


@locks.command(cls=CeleryCommand)
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@_json_option
@click.pass_context
@handle_preload_options
def clean(ctx: click.Context, dry_run: bool, as_json: bool, **_: Any) -> None:
    """Remove expired locks and locks whose holder is provably dead."""
    obj: CLIContext = ctx.obj
    report = LockCleaner(get_manager(obj.app)).clean(dry_run=dry_run)
    if as_json:
        obj.echo(_dump(dataclasses.asdict(report)))
    else:
        verb = "would remove" if dry_run else "removed"
        obj.echo(
            f"scanned {report.scanned}, {verb} {report.removed}, kept {report.kept}, "
            f"errors {report.errors}"
        )
