"""Lock modes: what a contender does when the lock is already held."""

from __future__ import annotations

import enum


class LockMode(str, enum.Enum):
    """What happens when the lock is held by someone else.

    ``EXECUTION``: one attempt, give up at once (a duplicate is skipped).
    ``QUEUE``: wait for the holder to finish (the lock layer blocks up to a timeout; a Celery
    task is re-queued with a countdown instead, so no worker slot sleeps).
    """

    QUEUE = "queue"
    EXECUTION = "execution"

    @classmethod
    def coerce(cls, value: object) -> LockMode:
        """Accept a :class:`LockMode` or its value in any case; anything else is a ValueError.

        :raises ValueError: naming the value and the allowed ones.
        """
        if isinstance(value, LockMode):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"invalid lock mode {value!r}; expected LockMode or one of {allowed}")

    def __str__(self) -> str:
        return self.value
