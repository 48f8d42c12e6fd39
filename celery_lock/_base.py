"""The :class:`LockManager` base: argument checks, the QUEUE wait loop, the context manager and
logging live here once; backends implement a handful of small I/O methods."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import secrets
import time as _time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Final

from celery_lock import _fork, _identity
from celery_lock._types import Claim, CleanReport, Lease, LockInfo
from celery_lock._validate import check_key, check_timeout, check_ttl
from celery_lock.errors import LockLost, LockNotAcquired
from celery_lock.modes import LockMode

if TYPE_CHECKING:
    from celery_lock.renewer import RenewalHandle

__all__ = ["DONE_TTL", "HandOff", "LockManager", "Waiter"]

#: ``callback(key, task_id, payload)``: what a release does with the waiter whose turn it is
#: (the Celery layer publishes the waiter's wake-up message). See :meth:`LockManager.set_handoff`.
HandOff = Callable[[str, str, bytes], object]
#: Default seconds a finished job's marker (and a waiter line) lives (``claim``/``finish``).
DONE_TTL: Final = 3660.0


#: Compact JSON for holder metadata (made once: ``json.dumps`` with options builds an encoder per
#: call). ASCII only, so a record is valid in any encoding a store may apply.
_encode_json = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


class Waiter:
    """Waits between QUEUE-mode attempts; backends with a release signal override :meth:`wait`."""

    #: Longest poll interval while waiting (None: the manager's ``poll_max``). A waiter that a
    #: release wakes polls only for holders that die or expire, and may poll less often.
    poll_max: float | None = None

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return True when woken by a release signal."""
        _time.sleep(seconds)
        return False

    def close(self) -> None:
        """Free what the waiter holds (a pub/sub connection, say)."""


class LockManager(abc.ABC):
    """Abstract lock manager (the public contract every backend fulfils).

    Subclasses set :attr:`backend` and implement ``_try_acquire``, ``_release``, ``_extend``,
    ``_inspect``, ``_iter_locks``, ``_break`` and ``clean``; they may override ``_waiter`` to
    wake QUEUE waiters on release instead of polling.
    """

    #: ``"redis"`` or ``"file"``.
    backend: ClassVar[str] = "abstract"
    #: QUEUE polling bounds (seconds): the delay grows from the first to the second, jittered.
    poll_min: ClassVar[float] = 0.01
    poll_max: ClassVar[float] = 0.25

    #: Seconds the key stays reserved for the waiter a release handed it to.
    reserve_ttl: ClassVar[float] = 60.0

    def __init__(self, *, default_ttl: float = 300.0) -> None:
        self._default_ttl = check_ttl(default_ttl, name="default_ttl")
        self._log = logging.getLogger(f"celery_lock.{self.backend}")
        self._handoff: HandOff | None = None

    @property
    def default_ttl(self) -> float:
        """Lease length used when ``acquire(ttl=None)``."""
        return self._default_ttl

    # ---------------------------------------------------------------- public API

    def acquire(
        self,
        key: str,
        *,
        ttl: float | None = None,
        mode: LockMode | str = LockMode.EXECUTION,
        timeout: float | None = None,
        task_id: str | None = None,
        task_name: str | None = None,
    ) -> Lease | None:
        """Take the lock on ``key``; return the :class:`Lease`, or None when it is held.

        :param ttl: lease seconds (None: the manager's ``default_ttl``).
        :param mode: ``EXECUTION`` tries once; ``QUEUE`` waits up to ``timeout``.
        :param timeout: QUEUE only: seconds to wait; None waits up to the lease's ttl.
        :param task_id: recorded in the holder metadata (Celery fills it in).
        :param task_name: recorded in the holder metadata.
        :raises TypeError: for a non-str key.
        :raises ValueError: for an empty key, a bad ttl, mode or timeout.
        :raises LockBackendUnavailable: when the store cannot be reached (fail-closed managers).
        """
        check_key(key)
        mode = LockMode.coerce(mode)
        ttl_s = self._default_ttl if ttl is None else check_ttl(ttl)
        wait_s = check_timeout(timeout)
        token = secrets.token_hex(16)
        started = _time.monotonic()
        lease = self._try_acquire(key, ttl_s, token, task_id, task_name)
        if lease is not None and lease.pid is None:
            lease = self._owned(lease)
        if lease is not None or mode is LockMode.EXECUTION:
            if lease is None and self._log.isEnabledFor(logging.DEBUG):
                self._log.debug(
                    "lock busy: %s", key, extra={"lock_key": key, "backend": self.backend}
                )
            elif lease is not None and self._log.isEnabledFor(logging.DEBUG):
                self._debug_acquired(lease, 0.0)
            return lease
        return self._wait_and_acquire(
            key, ttl_s, token, task_id, task_name, started + (ttl_s if wait_s is None else wait_s)
        )

    def release(self, lease: Lease) -> bool:
        """Release ``lease``; True only if it still held the lock and this call released it.

        A lease that expired or was taken over is never allowed to touch the new holder's lock. A
        second release of one lease says False. In a process other than the one that acquired
        the lease (a forked child) it returns False and leaves the lock alone.
        """
        self._check_lease(lease)
        if not self._in_owner(lease, "release"):
            return False
        released = self._release(lease)
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug(
                "lock %s: %s",
                "released" if released else "release found it no longer ours",
                lease.key,
                extra=self._extra(lease, hold_ms=self._hold_ms(lease)),
            )
        return released

    def extend(self, lease: Lease, ttl: float | None = None) -> Lease | None:
        """Renew ``lease`` for ``ttl`` seconds from now (None: its own ttl).

        Returns the renewed lease (same token and fence), or None when it was lost or expired,
        and None without touching the store in a process other than the one that acquired it.
        """
        self._check_lease(lease)
        ttl_s = lease.ttl if ttl is None else check_ttl(ttl)
        if not self._in_owner(lease, "extend"):
            return None
        return self._extend(lease, ttl_s)

    def is_locked(self, key: str) -> bool:
        """True when somebody holds ``key`` right now."""
        return self.inspect(key) is not None

    def inspect(self, key: str) -> LockInfo | None:
        """Holder metadata of ``key``, or None when it is free."""
        return self._inspect(check_key(key))

    def iter_locks(self) -> Iterator[LockInfo]:
        """Every lock currently held in this store (for ``celery locks list``)."""
        return self._iter_locks()

    def break_lock(
        self,
        key: str,
        *,
        task_id: str | None = None,
        token_prefix: str | None = None,
        only_if_dead: bool = False,
    ) -> bool:
        """Delete the lock on ``key`` by compare-and-delete on its current holder's exact token.

        :param task_id: only if the holder recorded this Celery task id.
        :param token_prefix: only if the holder's token starts with this (``LockInfo.token_prefix``
            of the holder you inspected: the lock is not broken if it changed hands since).
        :param only_if_dead: only if the holder is provably dead (same host, pid gone).
        :returns: True when a lock was deleted.
        """
        if token_prefix is not None and (not isinstance(token_prefix, str) or not token_prefix):
            raise ValueError(f"token_prefix must be a non-empty str or None, got {token_prefix!r}")
        return self._break(
            check_key(key), task_id=task_id, token_prefix=token_prefix, only_if_dead=only_if_dead
        )

    @contextlib.contextmanager
    def lock(
        self,
        key: str,
        *,
        renew: bool = False,
        ttl: float | None = None,
        mode: LockMode | str = LockMode.EXECUTION,
        timeout: float | None = None,
        task_id: str | None = None,
        task_name: str | None = None,
    ) -> Iterator[Lease]:
        """Hold ``key`` for the ``with`` body and yield the :class:`Lease`.

        :param renew: keep the lease alive with the process's renewer while the body runs.
        :raises LockNotAcquired: the lock is held (and a QUEUE wait timed out).
        :raises LockBackendUnavailable: a fail-closed manager cannot reach its store.
        :raises LockLost: on exit, when the lease was lost while the body ran and the body
            itself raised nothing.
        """
        lease = self.acquire(
            key, ttl=ttl, mode=mode, timeout=timeout, task_id=task_id, task_name=task_name
        )
        if lease is None:
            raise LockNotAcquired(
                f"lock {key!r} is held by someone else", key=key, backend=self.backend
            )
        handle = None
        if renew:
            from celery_lock.renewer import get_renewer  # noqa: PLC0415 - avoid a cycle

            handle = get_renewer().register(self, lease)
        body_failed = True
        try:
            yield lease
            body_failed = False
        finally:
            if lease.pid is None or lease.pid == _fork.pid():
                self._leave(key, lease, handle, body_failed=body_failed)
            else:
                # A child forked inside the block leaves it: the lock is its parent's, which
                # goes on holding it (and renewing it: the renewer thread is the parent's).
                self._log.debug(
                    "lock %s left in forked child %d: kept for process %d",
                    key,
                    _fork.pid(),
                    lease.pid,
                    extra=self._extra(lease),
                )

    def _leave(
        self, key: str, lease: Lease, handle: RenewalHandle | None, *, body_failed: bool
    ) -> None:
        """End the ``lock()`` block: stop renewing, release, raise LockLost if it was lost."""
        lost = False
        if handle is not None:
            handle.cancel()
            lease = handle.lease
            lost = handle.lost
        released = self.release(lease) and not lost
        if not released and not body_failed:
            raise LockLost(
                f"lock {key!r} was lost while the body ran (expired or taken over)",
                key=key,
                backend=lease.backend,
                fence=lease.fence,
            )

    # ---------------------------------------------------------------- jobs

    def set_handoff(self, callback: HandOff | None) -> None:
        """Set what a release does when a waiter's turn comes (see :meth:`claim`).

        ``callback(key, task_id, payload)`` runs in the releasing thread after the release,
        with the ``waiter`` payload the job gave to :meth:`claim`; an exception it raises is
        logged and swallowed (the waiter's own safety net still runs it).
        """
        self._handoff = callback

    def claim(
        self,
        key: str,
        *,
        task_id: str,
        ttl: float | None = None,
        task_name: str | None = None,
        waiter: bytes | None = None,
        done_ttl: float = DONE_TTL,
        waits: bool = False,
    ) -> Claim:
        """One attempt to take ``key`` for the job ``task_id`` (a Celery task id); never waits.

        In one atomic step of the store:

        - a ``task_id`` recorded as finished by :meth:`finish` gives ``"finished"``;
        - a free key, or one reserved for this ``task_id`` by a release, is granted (and the
          job leaves the waiter line);
        - a held key with ``waiter`` given records the job as a FIFO waiter of the key (once
          per task id; the payload is replaced): ``"queued"``. When a release hands the key
          over, it reserves the key for the first waiter for :attr:`reserve_ttl` seconds and
          calls the hand-off callback with its payload;
        - otherwise ``"held"``.

        Backends without a waiter line (a plain :class:`LockManager` subclass) answer
        ``"held"`` where others answer ``"queued"``.

        :param done_ttl: seconds a waiter line lives without activity.
        :param waits: without ``waiter``: the job will wait in line if the key is held (it
            claims again with its payload), so a publish-time coalescing marker naming it
            stays meanwhile and identical calls keep being handed this job.
        :raises LockBackendUnavailable: when the store cannot be reached (fail-closed managers).
        """
        check_key(key)
        if not isinstance(task_id, str) or not task_id:
            raise ValueError(f"task_id must be a non-empty str, got {task_id!r}")
        if waiter is not None and not isinstance(waiter, bytes):
            raise TypeError(f"waiter must be bytes or None, got {type(waiter).__name__}")
        ttl_s = self._default_ttl if ttl is None else check_ttl(ttl)
        token = secrets.token_hex(16)
        done_s = check_ttl(done_ttl)
        claim = self._claim(key, ttl_s, token, task_id, task_name, waiter, done_s, waits=waits)
        lease = claim.lease
        if lease is not None:
            if lease.pid is None or lease.task_id != task_id:
                lease = dataclasses.replace(lease, pid=lease.pid or _fork.pid(), task_id=task_id)
                claim = dataclasses.replace(claim, lease=lease)
            if self._log.isEnabledFor(logging.DEBUG):
                self._debug_acquired(lease, 0.0)
        return claim

    def finish(self, lease: Lease, *, done_ttl: float = DONE_TTL, mark: bool = True) -> bool:
        """Release the lease of a job whose run completed (see :meth:`claim`).

        Later claims of ``lease.task_id`` answer ``"finished"`` for ``done_ttl`` seconds when
        ``mark`` is true or when copies of the job wait in the key's line (they are removed).
        The key then goes to the first waiter, as with :meth:`release`.
        """
        self._check_lease(lease)
        if not self._in_owner(lease, "release"):
            return False
        if lease.task_id is None:
            return self.release(lease)
        released = self._finish(lease, check_ttl(done_ttl), mark)
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug(
                "lock %s: %s",
                "released" if released else "release found it no longer ours",
                lease.key,
                extra=self._extra(lease, hold_ms=self._hold_ms(lease), task_id=lease.task_id),
            )
        return released

    def remove_waiter(self, key: str, task_id: str) -> bool:
        """Take ``task_id`` out of the waiter line of ``key`` (a revoked job); if the key was
        reserved for it, hand it to the next waiter. True when something was removed."""
        return self._remove_waiter(check_key(key), task_id)

    def waiting(self, key: str) -> list[str]:
        """Task ids waiting for ``key``, first in line first (for operators and tests)."""
        return self._waiting(check_key(key))

    def _hand_off(self, key: str, task_id: str, payload: bytes) -> None:
        """Give a waiter its turn: call the hand-off callback (from the releasing thread)."""
        callback = self._handoff
        if callback is None:
            self._log.debug(
                "lock %s reserved for waiter %s; no hand-off callback is set",
                key,
                task_id,
                extra={"lock_key": key, "backend": self.backend, "task_id": task_id},
            )
            return
        try:
            callback(key, task_id, payload)
        except Exception as exc:  # noqa: BLE001 - the waiter's safety net still runs it
            self._log.warning(
                "could not wake waiter %s of lock %s (it runs when its re-queued copy is due): %r",
                task_id,
                key,
                exc,
                extra={"lock_key": key, "backend": self.backend, "task_id": task_id},
            )

    def _claim(
        self,
        key: str,
        ttl: float,
        token: str,
        task_id: str,
        task_name: str | None,
        waiter: bytes | None,  # noqa: ARG002 - no waiter line in the generic version
        done_ttl: float,  # noqa: ARG002
        *,
        waits: bool = False,  # noqa: ARG002 - nor coalescing markers
    ) -> Claim:
        """The generic claim: a plain attempt; backends with a waiter line override it."""
        lease = self._try_acquire(key, ttl, token, task_id, task_name)
        if lease is not None:
            return Claim("granted", lease)
        info = self._inspect(key)
        return Claim("held", None, info.task_id if info is not None else None)

    def _finish(self, lease: Lease, done_ttl: float, mark: bool) -> bool:  # noqa: ARG002
        return self._release(lease)

    def _remove_waiter(self, key: str, task_id: str) -> bool:  # noqa: ARG002
        return False

    def _waiting(self, key: str) -> list[str]:  # noqa: ARG002
        return []

    @abc.abstractmethod
    def clean(self, *, dry_run: bool = False) -> CleanReport:
        """Remove expired and provably dead locks by compare-and-delete (see LockCleaner)."""

    # ------------------------------------------------------------- backend hooks

    @abc.abstractmethod
    def _try_acquire(
        self, key: str, ttl: float, token: str, task_id: str | None, task_name: str | None
    ) -> Lease | None:
        """One attempt. Must be idempotent for the same ``token`` (a retry after a lost reply)."""

    @abc.abstractmethod
    def _release(self, lease: Lease) -> bool: ...

    @abc.abstractmethod
    def _extend(self, lease: Lease, ttl: float) -> Lease | None: ...

    @abc.abstractmethod
    def _inspect(self, key: str) -> LockInfo | None: ...

    @abc.abstractmethod
    def _iter_locks(self) -> Iterator[LockInfo]: ...

    @abc.abstractmethod
    def _break(
        self, key: str, *, task_id: str | None, token_prefix: str | None, only_if_dead: bool
    ) -> bool: ...

    def _waiter(self, key: str) -> Waiter:  # noqa: ARG002 - hook signature
        """A waiter for QUEUE mode; the default polls."""
        return Waiter()

    # ---------------------------------------------------------------- helpers

    def _wait_and_acquire(
        self,
        key: str,
        ttl: float,
        token: str,
        task_id: str | None,
        task_name: str | None,
        deadline: float,
    ) -> Lease | None:
        started = _time.monotonic()
        waiter = self._waiter(key)
        delay = self.poll_min
        try:
            while True:
                # The waiter is armed (subscribed) before this attempt, so a release between
                # the attempt and the wait still wakes us.
                lease = self._try_acquire(key, ttl, token, task_id, task_name)
                if lease is not None:
                    if lease.pid is None:
                        lease = self._owned(lease)
                    if self._log.isEnabledFor(logging.DEBUG):
                        self._debug_acquired(lease, (_time.monotonic() - started) * 1000)
                    return lease
                remaining = deadline - _time.monotonic()
                if remaining <= 0:
                    self._log.info(
                        "gave up waiting for lock %s after %.0f ms",
                        key,
                        (_time.monotonic() - started) * 1000,
                        extra={
                            "lock_key": key,
                            "backend": self.backend,
                            "wait_ms": round((_time.monotonic() - started) * 1000, 3),
                        },
                    )
                    return None
                # Jittered, growing delay so contenders do not poll in lockstep; a release
                # signal cuts the wait short.
                if waiter.wait(min(remaining, delay * _fork.jitter())):
                    delay = self.poll_min
                else:
                    delay = min(delay * 1.6, waiter.poll_max or self.poll_max)
        finally:
            waiter.close()

    def _record(
        self, key: str, now: float, ttl: float, task_id: str | None, task_name: str | None
    ) -> dict[str, Any]:
        """Holder metadata as a dict (token and fence are added by the backend)."""
        return {
            "v": 1,
            "key": key,
            **_identity.current().fields,
            "task_id": task_id,
            "task_name": task_name,
            "acquired": now,
            "ttl": ttl,
        }

    def _meta(
        self, key: str, now: float, ttl: float, task_id: str | None, task_name: str | None
    ) -> str:
        """Holder metadata as compact, ASCII-only JSON text (see :meth:`_record`)."""
        return _encode_json(self._record(key, now, ttl, task_id, task_name))

    def _owned(self, lease: Lease) -> Lease:
        """``lease`` marked as this process's (for backends that build leases without a pid)."""
        return dataclasses.replace(lease, pid=_fork.pid())

    def _in_owner(self, lease: Lease, what: str) -> bool:
        """True unless ``lease`` was acquired by another process (we are a forked child)."""
        if lease.pid is None or lease.pid == _fork.pid():
            return True
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug(
                "%s of lock %s skipped: the lease belongs to process %d",
                what,
                lease.key,
                lease.pid,
                extra=self._extra(lease),
            )
        return False

    def _check_lease(self, lease: object) -> None:
        if not isinstance(lease, Lease):
            raise TypeError(f"expected a Lease, got {type(lease).__name__}")
        if lease.backend != self.backend:
            raise ValueError(
                f"lease for {lease.key!r} was granted by the {lease.backend!r} backend; "
                f"this is a {self.backend!r} manager"
            )

    def _extra(self, lease: Lease, **more: Any) -> dict[str, Any]:
        return {"lock_key": lease.key, "backend": lease.backend, "fence": lease.fence, **more}

    @staticmethod
    def _hold_ms(lease: Lease) -> float | None:
        if not lease.acquired_at:
            return None
        return round((_time.time() - lease.acquired_at) * 1000, 3)

    def _debug_acquired(self, lease: Lease, wait_ms: float) -> None:
        self._log.debug(
            "lock acquired: %s (fence %d)",
            lease.key,
            lease.fence,
            extra=self._extra(lease, wait_ms=round(wait_ms, 3)),
        )
