"""The lock file format: file names, the JSON record (parse, build) and its in-place write.

A lock file holds one JSON object. A holder's record carries the key, the holder's identity
(host, pid, process start, boot id, pid namespace), the task, the token, the fence and the
expiry (wall clock, plus ``bt_expires`` on CLOCK_BOOTTIME where the platform has it); a free
file holds only ``{"v":1,"fence":N}``, the key's last fence. Records are built as dicts and
encoded with :mod:`json`, never spliced from strings. Nothing here reads a clock: callers pass
the times in, so a test's fake clock applies to every decision the manager makes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
from typing import Any, Final, TypeGuard

from celery_lock import _identity

__all__ = [
    "FENCE_LIMIT",
    "LOCK_NAME",
    "MAX_BYTES",
    "encode",
    "file_name",
    "free",
    "holder",
    "is_time",
    "opt",
    "parse",
    "read",
    "remaining",
    "write",
]

#: Hex characters of sha256(key) in a lock file name (160 bits: collisions are not a concern).
_NAME_HEX: Final = 40
LOCK_NAME: Final = re.compile(r"[0-9a-f]{40}\.lock\Z")
#: Reads are capped (a planted multi-GB file must not be slurped); what we write always fits.
MAX_BYTES: Final = 64 * 1024
#: A record longer than this is written again with the free-text fields (key, task id, task
#: name) cut to _FIELD_CAP characters and ``"truncated": true``, so it stays under MAX_BYTES.
_RECORD_LIMIT: Final = 48 * 1024
_FIELD_CAP: Final = 1024
#: A record shorter than the file by at most this many bytes is padded with spaces (one write);
#: beyond it the file is truncated after the write.
_PAD_LIMIT: Final = 4096
#: A stored fence at or above this cannot come from the µs clock for 140,000 years: it is garbage.
FENCE_LIMIT: Final = 1 << 62
_VERSION: Final = 1

#: Compact, ASCII-only JSON: a record is bytes on disk, and ASCII has one encoding. Records are
#: flat dicts of scalars, so the encoder's cycle check has nothing to find.
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
#: json.loads minus its type dispatch (we always read bytes we decode as UTF-8 first).
_decode = json.JSONDecoder().decode


def file_name(key: str) -> str:
    """The lock file name of ``key``: a hash, so no key can name a path (``../``, ``/``, NUL)."""
    # surrogatepass: keys decoded with surrogateescape (odd file names, argv) must hash too.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:_NAME_HEX] + ".lock"


def is_time(value: object) -> TypeGuard[float]:
    """True for a finite int or float (a bool is not a time)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def opt(meta: dict[str, Any], name: str, kind: type) -> Any:
    """``meta[name]`` when it is a ``kind`` (never a bool), else None: optional fields written by
    other versions or other code must not break a reader."""
    value = meta.get(name)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def parse(data: bytes) -> dict[str, Any] | int | None:
    """What a lock file holds: a holder's record (dict), a free file's last fence (int), or
    None when ``data`` is nothing we could have written."""
    try:
        record = _decode(data.decode("utf-8"))
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than the stack
        return None
    if not isinstance(record, dict):
        return None
    if "token" not in record:
        fence = record.get("fence")
        return fence if type(fence) is int and fence >= 0 else None
    if (
        not isinstance(record.get("key"), str)
        or not isinstance(record["token"], str)
        or not record["token"]
        or type(record.get("fence")) is not int
        or not is_time(record.get("expires"))
        or not (record.get("bt_expires") is None or is_time(record["bt_expires"]))
    ):
        return None
    return record


def holder(
    key: str,
    *,
    token: str,
    fence: int,
    now: float,
    now_bt: float | None,
    ttl: float,
    task_id: str | None,
    task_name: str | None,
) -> dict[str, Any]:
    """A holder's record, as a dict (the manager may adjust it before :func:`encode`).

    :param now: wall-clock time of the grant.
    :param now_bt: CLOCK_BOOTTIME of the grant, or None where the platform has no such clock
        (then no ``bt_expires`` is written and every reader judges the wall clock).
    """
    ident = _identity.current()
    record: dict[str, Any] = {
        "v": _VERSION,
        "key": key,
        "host": ident.host,
        "pid": ident.pid,
        "start": ident.start,
        "boot": ident.boot_id,
        "pidns": ident.pid_ns,
        "task_id": task_id,
        "task_name": task_name,
        "acquired": now,
        "ttl": ttl,
        "token": token,
        "fence": fence,
        "expires": now + ttl,
    }
    if now_bt is not None:
        record["bt_expires"] = now_bt + ttl
    return record


def encode(record: dict[str, Any]) -> bytes:
    """``record`` as the bytes of a lock file, shortened to fit under :data:`MAX_BYTES`."""
    text = _encode(record)
    if len(text) > _RECORD_LIMIT:
        # A key of 64 Ki escaped characters (or a huge task name) would not fit under the read
        # cap, and an over-long file counts as corrupt. Keep the lock valid; describe it with
        # shortened text instead.
        short = dict(record, truncated=True)
        for field in ("key", "task_id", "task_name"):
            if isinstance(short.get(field), str):
                short[field] = short[field][:_FIELD_CAP]
        text = _encode(short)
    return text.encode("ascii")


def free(fence: int) -> bytes:
    """The record of a free lock file whose key's last fence is ``fence``."""
    return _encode({"v": _VERSION, "fence": fence}).encode("ascii")


def remaining(meta: dict[str, Any], now: float, now_bt: float | None) -> float:
    """Seconds left on the lease described by ``meta``.

    Written on this host and boot, and read where CLOCK_BOOTTIME exists: that clock, which
    wall-clock steps (NTP, an operator) cannot move and which keeps counting through suspend.
    Otherwise only the wall clock is comparable between writer and reader.
    """
    bt_expires = meta.get("bt_expires")
    if bt_expires is not None and now_bt is not None and _identity.current().same_host(meta):
        return float(bt_expires - now_bt)
    return float(meta["expires"] - now)


def read(fd: int, size: int) -> bytes:
    """The bytes of a lock file of ``size`` bytes, or none when it is empty or over the cap."""
    return os.pread(fd, size, 0) if 0 < size <= MAX_BYTES else b""


def write(fd: int, content: bytes, old: bytes, old_size: int) -> bytes:
    """Replace the record in ``fd`` (flocked by the caller) with ``content``; return what was
    written.

    One ``pwrite`` from offset 0, padded with spaces to the old length (JSON allows trailing
    white space), so the file never holds a mix of two records. On failure the old bytes are
    put back: an error path must not leave a lock held that nobody knows.
    """
    gap = old_size - len(content)
    if 0 < gap <= _PAD_LIMIT:
        content += b" " * gap
    try:
        written = os.pwrite(fd, content, 0)
        if written != len(content):
            raise OSError(errno.ENOSPC, "short write of a lock file")  # noqa: TRY301
        if gap > _PAD_LIMIT:
            os.ftruncate(fd, len(content))
    except BaseException:
        with contextlib.suppress(OSError):
            if old or not old_size:
                os.pwrite(fd, old, 0)
                os.ftruncate(fd, len(old))
        raise
    return content
