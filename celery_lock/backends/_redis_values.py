"""What the Redis backend stores, read back: lock values and key names (pure functions)."""

from __future__ import annotations

import json
from typing import Any, Final

from celery_lock import _fork

__all__ = [
    "GLOB_ESCAPES",
    "encodable",
    "holder_of",
    "key_of",
    "opt",
    "parse",
    "release_id",
    "reserved_for",
    "tag_of",
]

#: Characters with a meaning in a ``SCAN MATCH`` pattern, escaped in a prefix.
GLOB_ESCAPES: Final = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def tag_of(rest: str) -> str | None:
    """The key shown for lock name ``<prefix>:<rest>``, or None when the name is not one of ours."""
    if rest.startswith("{"):
        tag = rest[1:-1]
        return tag if "{" not in tag and "}" not in tag else None  # plain keys have no braces
    if rest.startswith("#{"):
        digest = rest[2:-1]
        if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            return "#" + digest
    return None


def release_id() -> str:
    """A new id for one release call (it only has to differ between calls on one token)."""
    return _fork.random_hex()


def encodable(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def parse(value: bytes | str) -> tuple[str, int, dict[str, Any]] | None:
    """``(token, fence, metadata)`` of a lock value, or None when it is not one of ours."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if text.startswith("@"):
        return None  # a reservation for a waiting job (see _reserved_for)
    parts = text.split(" ", 2)
    if len(parts) != 3:
        return None
    token, fence_text, meta_text = parts
    if not token or not (fence_text.isascii() and fence_text.isdigit()):
        return None
    try:
        fence = int(fence_text)  # ValueError past sys.get_int_max_str_digits()
        meta = json.loads(meta_text)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None
    return (token, fence, meta) if isinstance(meta, dict) else None


def holder_of(value: bytes | str) -> str | None:
    """The task id of a lock value's holder, or of the job it is reserved for."""
    parsed = parse(value)
    if parsed is not None:
        return opt(parsed[2].get("task_id"), str)  # type: ignore[no-any-return]
    return reserved_for(value)


def key_of(parsed: tuple[str, int, dict[str, Any]] | None, tag: str) -> str:
    """The caller's key recorded in the metadata, else the hash tag it was stored under."""
    key = parsed[2].get("key") if parsed is not None else None
    return key if isinstance(key, str) else tag


def opt(value: object, kind: type[Any]) -> Any:
    """``value`` when it is a ``kind`` (ints count as floats; bools never count), else None."""
    if isinstance(value, bool):
        return None
    if kind is float and isinstance(value, int):
        return float(value)
    return value if isinstance(value, kind) else None


def reserved_for(value: bytes | str) -> str | None:
    """The task id a reservation value ``"@<release id> <token> <task id>"`` is for, else None."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if not text.startswith("@"):
        return None
    parts = text.split(" ", 2)
    return parts[2] if len(parts) == 3 else None
