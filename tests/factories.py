"""Importable manager factories for the multi-process harness (``"tests.factories:<name>"``)."""

from __future__ import annotations

from celery_lock.backends.file import FileLockManager
from celery_lock.backends.hybrid import HybridLockManager
from celery_lock.backends.redis import RedisLockManager


def file_manager(directory: str) -> FileLockManager:
    """A :class:`FileLockManager` on ``directory`` (built fresh in each contender process)."""
    return FileLockManager(directory)


def redis_manager(url: str, prefix: str = "celery_lock") -> RedisLockManager:
    """A :class:`RedisLockManager` from ``url`` with the library's bounded client settings."""
    return RedisLockManager.from_url(url, prefix=prefix)


def hybrid_manager(url: str, directory: str) -> HybridLockManager:
    """Redis first, files in ``directory`` while Redis is unreachable."""
    return HybridLockManager(RedisLockManager.from_url(url), FileLockManager(directory))


def app_manager(app: object) -> FileLockManager:
    """A ``lock_manager`` factory (``"tests.factories:app_manager"``): files in a folder named
    by the app's ``lock_directory`` setting, with a default ttl the settings do not give."""
    conf = app.conf  # type: ignore[attr-defined]
    return FileLockManager(conf.lock_directory, default_ttl=12.5)
