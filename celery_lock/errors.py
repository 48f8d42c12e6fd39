"""The exception hierarchy.

Every exception takes a message plus keyword attributes and survives a pickle round trip with its
attributes, because Celery carries task exceptions through its result backend (a worker that
raises an unpicklable exception is how celery-singleton#55 crashed workers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "LockBackendUnavailable",
    "LockConfigurationError",
    "LockError",
    "LockKeyError",
    "LockLost",
    "LockNotAcquired",
    "LockNotOwned",
]


class LockError(Exception):
    """Root of every celery_lock error.

    :param message: human readable text.
    :param attributes: attributes as a mapping (how Celery's JSON result backend hands them back:
        it stores ``exc.args`` and rebuilds with ``cls(*args)``); keywords win over it.
    :param key: the lock key concerned, when there is one.
    :param backend: ``"redis"`` or ``"file"``, when known.
    :param extra: further keyword attributes (``task_name``, ``holder_task_id`` ...), kept as
        attributes of the exception.
    """

    #: Attribute names every instance has (``None`` when unknown).
    key: str | None
    backend: str | None

    def __init__(
        self,
        message: str = "",
        attributes: Mapping[str, Any] | None = None,
        /,
        *,
        key: str | None = None,
        backend: str | None = None,
        **extra: Any,
    ) -> None:
        # A non-mapping second argument is what Celery's JSON backend makes of attributes it
        # could not encode (their repr): the message alone still gets through.
        state: dict[str, Any] = dict(attributes) if isinstance(attributes, Mapping) else {}
        if key is not None or "key" not in state:
            state["key"] = key
        if backend is not None or "backend" not in state:
            state["backend"] = backend
        state.update(extra)
        reserved = {"args", "message", "with_traceback", "add_note"} & state.keys()
        if reserved:
            raise TypeError(f"reserved exception attribute names: {sorted(reserved)}")
        # args carries everything, so pickle (cls(*args)) and Celery's JSON result backend
        # both rebuild the exception with its attributes (STYLE.md §2.5).
        super().__init__(message, state)
        self.message = message
        for name, value in state.items():
            setattr(self, name, value)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, key={self.key!r})"


class LockNotAcquired(LockError):
    """The lock is held by someone else (and waiting, if any, timed out)."""


class LockBackendUnavailable(LockError, ConnectionError):
    """The lock store cannot be reached and the manager fails closed."""


class LockConfigurationError(LockError, ValueError):
    """The lock store is set up in a way the client cannot work with, so retrying, or falling
    back to local files, would only hide the mistake: for example a plain ``redis://`` URL that
    points at one node of a Redis Cluster (its ``MOVED``/``ASK``/``CLUSTERDOWN`` replies).
    Never treated as an outage: the hybrid manager does not fall back to files for it."""


class LockNotOwned(LockError):
    """An operation needed this lease to still own the lock, and it does not."""


class LockLost(LockNotOwned):
    """The lease was lost (expired or taken over) while its holder was still working."""


class LockKeyError(LockError, TypeError):
    """A lock key cannot be built for a call (unsupported argument type, arguments that do not
    fit the signature, a ``lock_key`` callable that failed or returned a non-str)."""
