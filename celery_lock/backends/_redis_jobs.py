"""The Redis backend's jobs: claims with a FIFO waiter line, done markers, hand-offs, and the
coalescing markers of publish-time coalescing (a mixin of :class:`RedisLockManager`).

Keys, under the lock's hash tag (see ``_redis_scripts``): ``:line``, ``:wake-ups``,
``:done:<task id>`` and ``:pending``.
"""

from __future__ import annotations

import math
import time as _time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis

from celery_lock import _fork
from celery_lock._types import Claim, Lease
from celery_lock.backends import _redis_scripts as scripts
from celery_lock.backends._redis_errors import CLIENT_ERRORS as _CLIENT_ERRORS
from celery_lock.backends._redis_errors import is_connection_error
from celery_lock.backends._redis_values import GLOB_ESCAPES, tag_of

if TYPE_CHECKING:
    import collections

    from celery_lock.backends.redis import RedisClient
    from celery_lock.errors import LockBackendUnavailable, LockConfigurationError

__all__ = ["RedisJobs", "done_key", "release_keys"]


class RedisJobs:
    """Job methods of :class:`RedisLockManager` (see :meth:`LockManager.claim`)."""

    if TYPE_CHECKING:
        reserve_ttl: float
        _prefix: str
        _orphans: collections.deque[tuple[str, str]]

        @property
        def _client(self) -> RedisClient: ...
        def _eval(
            self, script: scripts.Lua, numkeys: int, *keys_and_args: str | int | bytes
        ) -> Any: ...
        def _name(self, key: str) -> str: ...
        def _meta(
            self, key: str, now: float, ttl: float, task_id: str | None, task_name: str | None
        ) -> str: ...
        def _reap_orphans(self) -> None: ...
        def _replicated(self, lease: Lease) -> Lease: ...
        def _break_if_dead(self, key: str, name: str, value: bytes | str) -> bool: ...
        def _end(self, lease: Lease, finished: str, done_ttl: float, mark: bool) -> bool: ...
        def _hand_off(self, key: str, task_id: str, payload: bytes) -> None: ...
        @staticmethod
        def _holder_task_id(value: bytes | str) -> str | None: ...
        def _unavailable(
            self, key: str | None, exc: BaseException
        ) -> LockBackendUnavailable | LockConfigurationError: ...

    def _claim(
        self,
        key: str,
        ttl: float,
        token: str,
        task_id: str,
        task_name: str | None,
        waiter: bytes | None,
        done_ttl: float,
        *,
        waits: bool = False,
    ) -> Claim:
        name = self._name(key)
        now = _time.time()
        keys = (
            name,
            name + ":fence",
            name + ":line",
            name + ":wake-ups",
            done_key(name, task_id),
            name + ":pending",
        )
        wait = "1" if waiter is not None else "k" if waits else "0"
        args: tuple[str | bytes, ...] = (
            scripts.grant_arg(ttl, token, self._meta(key, now, ttl, task_id, task_name)),
            f"{math.ceil(done_ttl * 1000)} {wait} {task_id}",
        )
        if waiter is not None:
            args += (waiter,)
        if self._orphans:
            self._reap_orphans()
        try:
            reply = self._eval(scripts.CLAIM, 6, *keys, *args)
        except _CLIENT_ERRORS as exc:
            # Same token, same task id: a re-sent claim that already ran answers "already ours"
            # (or "queued" again, which changes nothing).
            if isinstance(exc, redis.TimeoutError) or not is_connection_error(exc):
                if isinstance(exc, redis.TimeoutError):
                    self._orphans.append((name, token))
                raise self._unavailable(key, exc) from exc
            try:
                reply = self._eval(scripts.CLAIM, 6, *keys, *args)
            except _CLIENT_ERRORS as again:
                self._orphans.append((name, token))
                raise self._unavailable(key, again) from again
        code = int(reply[0])
        if code == 3:
            return Claim("finished")
        if code in (1, 2):
            lease = Lease(
                key, token, int(reply[1]), "redis", ttl, now + ttl, now, _fork.pid(), task_id
            )
            return Claim("granted", self._replicated(lease))
        holder = self._holder_task_id(reply[2])
        if code == 0 and self._break_if_dead(key, name, reply[2]):
            return self._claim(key, ttl, token, task_id, task_name, waiter, done_ttl, waits=waits)
        return Claim("queued" if code == 4 else "held", None, holder)

    def _finish(self, lease: Lease, done_ttl: float, mark: bool) -> bool:
        return self._end(lease, lease.task_id or "", done_ttl, mark)

    def _remove_waiter(self, key: str, task_id: str) -> bool:
        name = self._name(key)
        try:
            reply = self._eval(
                scripts.REMOVE_WAITER,
                4,
                name,
                name + ":line",
                name + ":wake-ups",
                name + ":pending",
                task_id,
                math.ceil(self.reserve_ttl * 1000),
            )
        except _CLIENT_ERRORS as exc:
            raise self._unavailable(key, exc) from exc
        self._turn(key, reply)
        return bool(int(reply[0]))

    def _waiting(self, key: str) -> list[str]:
        name = self._name(key)
        try:
            ids = self._client.lrange(name + ":line", 0, -1)
        except _CLIENT_ERRORS as exc:
            raise self._unavailable(key, exc) from exc
        return [i.decode("utf-8", "replace") if isinstance(i, bytes) else i for i in ids]

    def _turn(self, key: str, reply: list[Any]) -> None:
        """Hand the key to the job a script reserved it for (``reply[1:3]``), if any."""
        if len(reply) == 3:
            task_id = (
                reply[1].decode("utf-8", "replace") if isinstance(reply[1], bytes) else reply[1]
            )
            payload = reply[2] if isinstance(reply[2], bytes) else reply[2].encode("utf-8")
            self._hand_off(key, task_id, payload)

    # ------------------------------------------------------------------ coalescing

    def coalesce(self, key: str, task_id: str, *, running: bool, ttl: float) -> str | None:
        """Publish-time coalescing: the task id of an identical call to share, or None after
        reserving the key's marker for ``task_id`` (invisible until :meth:`reveal`).

        :param running: EXECUTION: a running (or woken) call counts too; QUEUE: only a call
            that waits (published, not started).
        :param ttl: seconds the marker lives at most (the task's ``lock_ttl``).
        :raises LockBackendUnavailable: when the store cannot be reached.
        """
        name = self._name(key)
        try:
            reply = self._eval(
                scripts.COALESCE,
                2,
                name,
                name + ":pending",
                task_id,
                "e" if running else "q",
                math.ceil(ttl * 1000),
            )
        except _CLIENT_ERRORS as exc:
            raise self._unavailable(key, exc) from exc
        if int(reply[0]) == 0:
            return None
        found = reply[1]
        return found.decode("utf-8", "replace") if isinstance(found, bytes) else str(found)

    def reveal(self, key: str, task_id: str, *, published: bool) -> bool:
        """After the publish of ``task_id``: make its reserved marker visible (or drop it when
        the publish failed). False when the marker is no longer its own (the call already
        started, or another call reserved the marker)."""
        name = self._name(key)
        try:
            done = self._eval(
                scripts.REVEAL, 1, name + ":pending", task_id, "1" if published else "0"
            )
        except _CLIENT_ERRORS as exc:
            raise self._unavailable(key, exc) from exc
        return bool(int(done) == 1)

    def iter_pending(self) -> Iterator[tuple[str, str, bool, float | None]]:
        """Coalescing markers: ``(lock key name, task id, visible, seconds left)``."""
        head = f"{self._prefix}:"
        pattern = head.translate(GLOB_ESCAPES) + "*}:pending"
        try:
            client = self._client
            for raw in client.scan_iter(match=pattern, count=500):
                name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
                key = tag_of(name[len(head) : -len(":pending")])
                value, pttl = client.get(name), client.pttl(name)
                if key is None or value is None:
                    continue
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                yield key, text[2:], text.startswith("v "), pttl / 1000 if pttl > 0 else None
        except _CLIENT_ERRORS as exc:
            raise self._unavailable(None, exc) from exc


# ---------------------------------------------------------------------- module helpers


def done_key(name: str, task_id: str) -> str:
    """The done marker of a finished job (same hash tag as its lock)."""
    return f"{name}:done:{task_id}"


def release_keys(name: str, task_id: str) -> tuple[str, ...]:
    """KEYS of the RELEASE script: a finished job (``task_id``) adds its done marker."""
    if task_id:
        return name, name + ":line", name + ":wake-ups", done_key(name, task_id)
    return name, name + ":line", name + ":wake-ups"
