"""An append-only JSON-lines log shared by every process of the example (workers, beat, demo)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

__all__ = ["EventReader", "record"]


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return str(value)


def record(path: Path, event: str, **fields: Any) -> None:
    """Append one event (``ts`` wall-clock seconds, ``event``, ``pid`` and ``fields``) to ``path``.

    Several processes append at once: each line goes out in a single ``write`` on an
    ``O_APPEND`` descriptor, so lines never interleave.
    """
    line = json.dumps(
        {"ts": time.time(), "event": event, "pid": os.getpid(), **fields}, default=_jsonable
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class EventReader:
    """Reads the events appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        """Complete lines appended since the last call (a line still being written waits)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data.rfind(b"\n") + 1
        self._offset += complete
        return [json.loads(line) for line in data[:complete].splitlines() if line.strip()]
