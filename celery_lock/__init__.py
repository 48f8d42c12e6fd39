"""celery_lock: owner-safe, fenced, crash-aware locks for Celery tasks (Redis, file fallback).

The lock layer (managers, leases, cleaner) never imports Celery; the Celery names
(:class:`LockedTask`, :func:`install`, :func:`get_manager`) are imported on first use.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

from celery_lock._base import LockManager
from celery_lock._types import Claim, CleanReport, Lease, LockInfo
from celery_lock.backends.file import FileLockManager
from celery_lock.backends.hybrid import HybridLockManager
from celery_lock.backends.redis import RedisLockManager
from celery_lock.cleaner import LockCleaner
from celery_lock.errors import (
    LockBackendUnavailable,
    LockConfigurationError,
    LockError,
    LockKeyError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
)
from celery_lock.modes import LockMode
from celery_lock.renewer import Renewer, get_renewer

if TYPE_CHECKING:
    from celery_lock.config import get_manager
    from celery_lock.task import LockedTask, install

try:
    __version__ = _metadata.version("celery-lock")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0+unknown"

__all__ = [
    "Claim",
    "CleanReport",
    "FileLockManager",
    "HybridLockManager",
    "Lease",
    "LockBackendUnavailable",
    "LockCleaner",
    "LockConfigurationError",
    "LockError",
    "LockInfo",
    "LockKeyError",
    "LockLost",
    "LockManager",
    "LockMode",
    "LockNotAcquired",
    "LockNotOwned",
    "LockedTask",
    "RedisLockManager",
    "Renewer",
    "__version__",
    "get_manager",
    "get_renewer",
    "install",
]

_LAZY = {
    "LockedTask": "celery_lock.task",
    "get_manager": "celery_lock.config",
    "install": "celery_lock.task",
}


def __getattr__(name: str) -> Any:
    # Celery is imported only when the Celery integration is used (no import-time side effects,
    # and lock-layer users do not pay for it).
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'celery_lock' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
