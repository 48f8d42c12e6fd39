"""An in-memory LockManager used to test the base class and the renewer in isolation."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

from celery_lock import CleanReport, Lease, LockInfo, LockManager
from celery_lock.errors import LockBackendUnavailable


class MemoryLockManager(LockManager):
    backend = "memory"
    poll_min = 0.001
    poll_max = 0.01

    def __init__(self, *, default_ttl: float = 300.0) -> None:
        super().__init__(default_ttl=default_ttl)
        self.held: dict[str, tuple[str, int, float]] = {}
        self.fence = 0
        self.mutex = threading.Lock()
        self.down = False
        self.calls: list[str] = []

    def _check(self, op: str) -> None:
        self.calls.append(op)
        if self.down:
            raise LockBackendUnavailable("memory store is down", backend=self.backend)

    def _live(self, key: str) -> tuple[str, int, float] | None:
        entry = self.held.get(key)
        if entry is not None and entry[2] <= time.time():
            del self.held[key]
            return None
        return entry

    def _try_acquire(self, key, ttl, token, task_id, task_name):  # type: ignore[no-untyped-def]
        self._check("acquire")
        with self.mutex:
            entry = self._live(key)
            now = time.time()
            if entry is not None and entry[0] != token:
                return None
            if entry is None:
                self.fence += 1
                entry = (token, self.fence, now + ttl)
                self.held[key] = entry
            return Lease(key, token, entry[1], self.backend, ttl, entry[2], now)

    def _release(self, lease: Lease) -> bool:
        self._check("release")
        with self.mutex:
            entry = self._live(lease.key)
            if entry is None or entry[0] != lease.token:
                return False
            del self.held[lease.key]
            return True

    def _extend(self, lease: Lease, ttl: float) -> Lease | None:
        self._check("extend")
        with self.mutex:
            entry = self._live(lease.key)
            if entry is None or entry[0] != lease.token:
                return None
            expires = time.time() + ttl
            self.held[lease.key] = (entry[0], entry[1], expires)
            return dataclasses.replace(lease, ttl=ttl, expires_at=expires)

    def _inspect(self, key: str) -> LockInfo | None:
        self._check("inspect")
        entry = self._live(key)
        if entry is None:
            return None
        return LockInfo(
            key, entry[0][:8], entry[1], self.backend, None, None, None, None, None, entry[2]
        )

    def _iter_locks(self) -> Iterator[LockInfo]:
        for key in list(self.held):
            info = self._inspect(key)
            if info is not None:
                yield info

    def _break(self, key: str, *, task_id: str | None, only_if_dead: bool) -> bool:
        self._check("break")
        return self.held.pop(key, None) is not None

    def clean(self, *, dry_run: bool = False) -> CleanReport:
        self._check("clean")
        return CleanReport(scanned=len(self.held), kept=len(self.held))
