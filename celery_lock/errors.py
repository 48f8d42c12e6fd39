"""The exception hierarchy.

Every exception takes a message plus keyword attributes and survives a pickle round trip with its
attributes, because Celery carries task exceptions through its result backend (a worker that
raises an unpicklable exception is how celery-singleton#55 crashed workers).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LockBackendUnavailable", "LockError", "LockLost", "LockNotAcquired", "LockNotOwned"]


class LockError(Exception):
    """Root of every celery_lock error.

    :param message: human readable text.
    :param key: the lock key concerned, when there is one.
    :param backend: ``"redis"`` or ``"file"``, when known.
    :param extra: further keyword attributes (``task_name``, ``timeout``, ``holder`` ...), kept as
        attributes of the exception.
    """

    #: Attribute names every instance has (``None`` when unknown).
    key: str | None
    backend: str | None

    def __init__(
        self, message: str = "", *, key: str | None = None, backend: str | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.backend = backend
        self._extra = dict(extra)
        for name, value in extra.items():
            setattr(self, name, value)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, key={self.key!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild through a helper that accepts keyword arguments; pickle's default would call
        # cls(*self.args) and lose the keyword attributes.
        state = {"key": self.key, "backend": self.backend, **self._extra}
        return (_rebuild, (type(self), self.message, state), None)


def _rebuild(cls: type[LockError], message: str, state: dict[str, Any]) -> LockError:
    return cls(message, **state)


class LockNotAcquired(LockError):
    """The lock is held by someone else (and waiting, if any, timed out)."""


class LockBackendUnavailable(LockError, ConnectionError):
    """The lock store cannot be reached and the manager fails closed."""


class LockNotOwned(LockError):
    """An operation needed this lease to still own the lock, and it does not."""


class LockLost(LockNotOwned):
    """The lease was lost (expired or taken over) while its holder was still working."""
