"""A lock holder in a process of its own, driven over stdin/stdout (JSON lines).

``python -m tests.reliability._child '<json config>'`` builds a manager from an importable
factory, acquires one key and then obeys commands (``release``, ``extend``, ``inspect``,
``exit``) until stdin closes or a bounded idle time passes. Everything it observes (acquired,
busy, lost, log records at WARNING and above) is printed as one JSON object per line with a
``time.monotonic()`` stamp (``CLOCK_MONOTONIC`` is system-wide on Linux, so the parent can compare
it with its own clock). Tests kill, stop and continue these processes to inject faults.

Config keys: ``factory`` and ``kwargs`` (see :func:`tests._contention.build`), ``key``, ``ttl``,
``mode`` (``"execution"`` or ``"queue"``), ``timeout`` (QUEUE wait), ``renew`` (register the lease
with the process's renewer), ``interval`` (renewal interval, None = ttl / 3), ``idle`` (seconds
without a command before the child exits by itself).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import sys
import threading
import time
from typing import Any

from tests._contention import build

_out = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Print one event line (thread-safe: the renewer thread reports too)."""
    line = json.dumps({"event": event, "t": time.monotonic(), "pid": os.getpid(), **fields})
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class _Forward(logging.Handler):
    """Forwards celery_lock log records to the parent as events."""

    def emit(self, record: logging.LogRecord) -> None:
        emit("log", level=record.levelname, logger=record.name, msg=record.getMessage())


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    logger = logging.getLogger("celery_lock")
    logger.setLevel(logging.INFO)
    handler = _Forward(level=logging.WARNING)
    logger.addHandler(handler)

    from celery_lock import get_renewer

    manager = build(config["factory"], config.get("kwargs", {}))
    emit("ready")
    emit("waiting")
    lease = manager.acquire(
        config["key"],
        ttl=config.get("ttl", 300.0),
        mode=config.get("mode", "execution"),
        timeout=config.get("timeout"),
    )
    if lease is None:
        emit("busy")
    else:
        emit("acquired", fence=lease.fence, token=lease.token, backend=lease.backend)
    handle = None
    if lease is not None and config.get("renew"):
        handle = get_renewer().register(
            manager,
            lease,
            on_lost=lambda h: emit("lost", fence=h.lease.fence),
            interval=config.get("interval"),
        )

    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    idle_deadline = time.monotonic() + float(config.get("idle", 60.0))
    while time.monotonic() < idle_deadline:
        if not selector.select(timeout=0.5):
            continue
        command = sys.stdin.readline().strip()
        if not command or command == "exit":
            break
        idle_deadline = time.monotonic() + float(config.get("idle", 60.0))
        current = handle.lease if handle is not None else lease
        try:
            if command == "release":
                assert current is not None
                emit("released", result=manager.release(current))
            elif command == "extend":
                assert current is not None
                renewed = manager.extend(current)
                emit("extended", result=None if renewed is None else renewed.fence)
            elif command == "inspect":
                info = manager.inspect(config["key"])
                emit("inspected", token_prefix=None if info is None else info.token_prefix)
            else:
                emit("error", error=f"unknown command {command!r}")
        except Exception as exc:  # reported, never fatal: the parent decides
            emit("error", error=f"{type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
