"""Argument checks shared by every manager (one place, one wording)."""

from __future__ import annotations

import math
from typing import Final

#: Longest accepted key, in characters. Keys are hashed before they reach a file name or a Redis
#: hash tag, so this only bounds memory; 64 KiB is far above any sane key.
MAX_KEY_LENGTH: Final = 65536


def check_key(key: object) -> str:
    """Return ``key`` if it is a non-empty str.

    :raises TypeError: for a non-str key.
    :raises ValueError: for an empty or over-long key.
    """
    if not isinstance(key, str):
        raise TypeError(f"lock key must be a str, got {type(key).__name__}: {key!r:.80}")
    if not key:
        raise ValueError("lock key must be a non-empty str, got ''")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"lock key is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}")
    if "\x00" in key:
        raise ValueError(f"lock key must not contain NUL characters: {key!r:.80}")
    return key


#: Longest ttl (s): 68 years. Redis refuses expiry times past a bound (a ttl of 10^16 s was
#: reported as an unreachable store), and a lock that must outlive its holder by decades is not
#: a lock.
MAX_TTL = 2**31


def check_ttl(ttl: object, *, name: str = "ttl") -> float:
    """Return ``ttl`` as a positive, finite float (seconds).

    :raises ValueError: for anything else, naming the value (bools are refused too).
    """
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise ValueError(f"{name} must be a positive number of seconds, got {ttl!r}")
    value = float(ttl)
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {ttl!r}")
    if value < 0.001:
        raise ValueError(f"{name} must be at least 0.001 seconds (1 ms), got {ttl!r}")
    if value > MAX_TTL:
        raise ValueError(f"{name} must be at most {MAX_TTL} seconds (68 years), got {ttl!r}")
    return value


def check_timeout(timeout: object) -> float | None:
    """Return ``timeout`` as a non-negative float, or None.

    :raises ValueError: for a negative, NaN or non-numeric timeout.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
    value = float(timeout)
    if math.isnan(value) or value < 0:
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
    return value
