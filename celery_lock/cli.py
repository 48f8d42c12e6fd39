"""``celery -A proj locks ...``: list, show, release and clean locks (a ``celery.commands``
plugin).

Exit status, the same for every command: 0 done / found; 1 not locked, not released, or (clean)
some entries could not be handled; 2 bad usage (one line on stderr, no traceback); 3 a lock store
could not be read, so the answer may be incomplete (never reported as "nothing locked").

With the hybrid manager (Redis plus local files) each store is read on its own, so an operator
still sees the file locks while Redis is unreachable, with an error line saying so.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click
from celery.bin.base import CeleryCommand, handle_preload_options

from celery_lock._types import CleanReport
from celery_lock._validate import check_key
from celery_lock.backends.hybrid import HybridLockManager
from celery_lock.backends.redis import RedisLockManager
from celery_lock.config import get_manager
from celery_lock.errors import LockBackendUnavailable

if TYPE_CHECKING:
    from celery.bin.base import CLIContext

    from celery_lock._base import LockManager
    from celery_lock._types import LockInfo

__all__ = ["EXIT_NOT_FOUND", "EXIT_OK", "EXIT_UNREADABLE", "EXIT_USAGE", "locks"]

#: Exit statuses (see the module docstring).
EXIT_OK: Final = 0
EXIT_NOT_FOUND: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREADABLE: Final = 3

_T = TypeVar("_T")
_COLUMNS = ("KEY", "TASK", "BACKEND", "HOST", "PID", "AGE", "TTL")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
#: Marks the handler this module adds, so that it is added once per process.
_HANDLER_NAME: Final = "celery_lock.cli"


@click.group(name="locks")
def locks() -> None:
    """Inspect and manage celery_lock locks (those of the -A app's lock store).

    Exit status: 0 done or found; 1 not locked / not released / clean had errors; 2 bad usage;
    3 a lock store could not be read.
    """
    _log_to_stderr()


def _log_to_stderr() -> None:
    """Show the library's warnings on stderr with their level and logger, unless the app
    configured logging itself (the library never does; a command-line tool may)."""
    logger = logging.getLogger("celery_lock")
    if logger.hasHandlers():
        return
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (click's test runner, a
    redirected stream), not to the stream that was current when the handler was made."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # StreamHandler.__init__ assigns it; the property decides


class _Outcome:
    """Collects the stores a command could not read, and reports them on stderr."""

    def __init__(self, obj: CLIContext) -> None:
        self.obj = obj
        self.unreadable: list[str] = []

    def read(self, store: str, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
        """``call(*args, **kwargs)``, or None (with an error line) when the store cannot be
        reached."""
        try:
            return call(*args, **kwargs)
        except LockBackendUnavailable as exc:
            self.unreadable.append(store)
            self.obj.error(f"Error: the {store} lock store could not be read: {exc}")
            return None

    def exit(self, ctx: click.Context, status: int) -> None:
        ctx.exit(EXIT_UNREADABLE if self.unreadable else status)


def _stores(manager: LockManager) -> list[tuple[str, LockManager]]:
    """The stores behind ``manager``, each to be read on its own (Redis first)."""
    if isinstance(manager, HybridLockManager):
        parts: list[tuple[str, LockManager | None]] = [
            ("redis", manager.redis),
            ("file", manager.file),
        ]
        return [(name, store) for name, store in parts if store is not None]
    return [(manager.backend, manager)]


def _checked_key(ctx: click.Context, obj: CLIContext, key: str) -> str:
    try:
        return check_key(key)
    except (TypeError, ValueError) as exc:
        obj.error(f"Error: invalid lock key: {exc}")
        ctx.exit(EXIT_USAGE)
        raise AssertionError("unreachable") from None  # ctx.exit raises


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _when(epoch: float | None, now: float) -> str:
    """An epoch time as UTC text plus how far it is from now (``12.3s ago`` / ``in 4.0s``)."""
    if epoch is None:
        return "-"
    stamp = datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc)
    delta = epoch - now
    relative = f"in {delta:.1f}s" if delta >= 0 else f"{-delta:.1f}s ago"
    return f"{stamp:%Y-%m-%d %H:%M:%S} UTC ({relative})"


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


def _all_locks(store: LockManager) -> list[LockInfo]:
    return list(store.iter_locks())


def _find(outcome: _Outcome, manager: LockManager, key: str) -> LockInfo | None:
    """The holder of ``key``: the first store (Redis first) that has one."""
    for store_name, store in _stores(manager):
        info = outcome.read(store_name, store.inspect, key)
        if info is not None:
            return info
    return None


@locks.command(name="list", cls=CeleryCommand)
@_json_option
@click.pass_context
@handle_preload_options
def list_locks(ctx: click.Context, as_json: bool, **_: Any) -> None:
    """One row per held lock: key, task, backend, host, pid, age and TTL left."""
    obj: CLIContext = ctx.obj
    outcome = _Outcome(obj)
    infos: list[LockInfo] = []
    markers: list[tuple[str, str, bool, float | None]] = []
    seen: set[tuple[str, str | None]] = set()
    for store_name, store in _stores(get_manager(obj.app)):
        found = outcome.read(store_name, _all_locks, store)
        for info in found or ():
            # A Redis lease's same-token shadow file lock is the same lock: one row.
            if (info.key, info.token_prefix) not in seen:
                seen.add((info.key, info.token_prefix))
                infos.append(info)
        if isinstance(store, RedisLockManager):
            pending = outcome.read(store_name, lambda s: list(s.iter_pending()), store)
            markers.extend(pending or ())
    infos.sort(key=lambda info: (info.key, info.backend))
    markers.sort()
    now = time.time()
    if as_json:
        obj.echo(
            _dump(
                [info.as_dict() for info in infos]
                + [
                    {
                        "key": key,
                        "task_id": task_id,
                        "backend": "redis",
                        "waiting": "published" if visible else "being published",
                        "expires_at": None if left is None else now + left,
                    }
                    for key, task_id, visible, left in markers
                ]
            )
        )
    elif infos or markers:
        if infos:
            obj.echo(_table(_row(info, now) for info in infos))
        if markers:
            # Coalescing markers (lock_coalesce): calls that wait to run and that identical
            # calls share instead of publishing their own.
            obj.echo("\nWaiting calls shared by coalescing:")
            for key, task_id, visible, left in markers:
                state = "waiting" if visible else "being published"
                obj.echo(f"  {key}  task {task_id}  {state}  TTL {_seconds(left)}")
    elif outcome.unreadable:
        obj.echo("No locks found in the stores that could be read.")
    else:
        obj.echo("No locks held.")
    outcome.exit(ctx, EXIT_OK)


@locks.command(cls=CeleryCommand)
@click.argument("key")
@_json_option
@click.pass_context
@handle_preload_options
def show(ctx: click.Context, key: str, as_json: bool, **_: Any) -> None:
    """The holder of the lock KEY (exit status 1 when it is not held)."""
    obj: CLIContext = ctx.obj
    key = _checked_key(ctx, obj, key)
    outcome = _Outcome(obj)
    info = _find(outcome, get_manager(obj.app), key)
    if as_json:
        obj.echo(_dump(None if info is None else info.as_dict()))
    elif info is not None:
        now = time.time()
        fields = info.as_dict()
        for name in ("acquired_at", "expires_at"):
            fields[name] = _when(fields[name], now)
        obj.echo("\n".join(f"{name}: {'-' if v is None else v}" for name, v in fields.items()))
    elif outcome.unreadable:
        obj.echo(f"{key}: not locked in the stores that could be read")
    else:
        obj.echo(f"{key}: not locked")
    outcome.exit(ctx, EXIT_OK if info is not None else EXIT_NOT_FOUND)


@locks.command(cls=CeleryCommand)
@click.argument("key")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_json_option
@click.pass_context
@handle_preload_options
def release(ctx: click.Context, key: str, yes: bool, as_json: bool, **_: Any) -> None:
    """Delete the lock KEY, held by the holder shown (compare-and-delete).

    Only that holder's entry is deleted (matched by its token): if the lock changed hands since
    it was shown, nothing is. Exit status 1 when nothing was released.
    """
    obj: CLIContext = ctx.obj
    key = _checked_key(ctx, obj, key)
    outcome = _Outcome(obj)
    manager = get_manager(obj.app)
    info = _find(outcome, manager, key)
    released = False
    if info is not None:
        if not yes:
            click.confirm(
                f"Release {key} held by task {info.task_name or '-'}[{info.task_id or '-'}] "
                f"on {info.host or '-'} (pid {info.pid or '-'})? The task may still be running",
                abort=True,
            )
        prefix = info.token_prefix
        for store_name, store in _stores(manager):
            # Every store: a Redis lease has a same-token shadow in the files.
            broke = outcome.read(
                store_name, store.break_lock, key, task_id=info.task_id, token_prefix=prefix
            )
            released = bool(broke) or released
    if as_json:
        obj.echo(_dump({"key": key, "released": released}))
    elif released:
        obj.echo(f"{key}: released")
    elif info is not None:
        obj.echo(f"{key}: not released (the holder changed or released it meanwhile)")
    else:
        obj.echo(f"{key}: not locked")
    outcome.exit(ctx, EXIT_OK if released else EXIT_NOT_FOUND)


@locks.command(cls=CeleryCommand)
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@_json_option
@click.pass_context
@handle_preload_options
def clean(ctx: click.Context, dry_run: bool, as_json: bool, **_: Any) -> None:
    """Remove expired locks and locks whose holder is provably dead (exit status 1 when some
    entries could not be handled, 3 when a store could not be read)."""
    obj: CLIContext = ctx.obj
    outcome = _Outcome(obj)
    report = CleanReport()
    for store_name, store in _stores(get_manager(obj.app)):
        part = outcome.read(store_name, store.clean, dry_run=dry_run)
        if part is None:
            report.errors += 1
        else:
            report += part
    if as_json:
        obj.echo(_dump(dataclasses.asdict(report)))
    else:
        verb = "would remove" if dry_run else "removed"
        obj.echo(
            f"scanned {report.scanned}, {verb} {report.removed}, kept {report.kept}, "
            f"errors {report.errors}"
        )
    outcome.exit(ctx, EXIT_NOT_FOUND if report.errors else EXIT_OK)
