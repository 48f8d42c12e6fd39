"""Redis first, local lock files when Redis is unreachable, with a circuit breaker."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time as _time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final, TypeVar

from celery_lock._base import HandOff, LockManager, Waiter
from celery_lock._types import Claim, CleanReport, Lease, LockInfo
from celery_lock._validate import check_ttl
from celery_lock.backends import _hostlocks
from celery_lock.backends._circuit import Circuit
from celery_lock.backends._filerecord import file_name
from celery_lock.errors import LockBackendUnavailable
from celery_lock.modes import LockMode

if TYPE_CHECKING:
    from celery_lock.backends.file import FileLockManager
    from celery_lock.backends.redis import RedisLockManager

__all__ = ["HybridLockManager"]

_T = TypeVar("_T")

#: ``on_transition(state, error)``: state is ``"down"`` (Redis lost, files in use) or ``"up"``.
TransitionCallback = Callable[[str, "BaseException | None"], object]

#: The key a background probe reads (INSPECT: one read-only round trip, any Cluster slot).
PROBE_KEY: Final = "celery_lock-probe"


def _granted(lease: Lease | None) -> Claim:
    """An acquire's answer as a claim's."""
    return Claim("held") if lease is None else Claim("granted", lease)


class HybridLockManager(LockManager):
    """Redis first; on a connection-class failure, local file locks until Redis answers again.

    On the first failure the manager logs one WARNING and opens its circuit: from then on every
    call is served from the file backend (or fails at once without one) and never touches
    Redis, so a hung store costs a caller at most one timeout per outage (issue 14). A
    background thread probes Redis every ``retry_interval`` seconds (a failed probe is logged
    at DEBUG); the first success logs one INFO and closes the circuit, and the next call uses
    Redis again. A lease is always released and extended on the backend that granted it
    (``lease.backend``): while the circuit is open, extending a Redis lease fails at once
    (the renewer retries while the lease lasts) and releasing one is left to the probe, which
    releases it by token once Redis answers. While it serves from Redis the hybrid also marks
    each lease on this host (a byte lock of ``.hostlocks``, or where there are none a
    same-token "shadow" file lock), so processes on this host that still (or already) see
    Redis as down cannot take the key from files meanwhile, and vice versa.

    A :class:`~celery_lock.errors.LockConfigurationError` (a Redis Cluster node behind a
    plain URL) is not an outage: it reaches the caller and the circuit stays as it is.

    .. warning:: File locks exclude only processes on the **same host**. While Redis is down,
       two hosts can run the same job; fences are comparable only within one backend.

    :param redis: the Redis manager, or None for file locks only.
    :param file: the file manager, or None to fail closed (``LockBackendUnavailable``) while
        Redis is unreachable.
    :param retry_interval: seconds between Redis probes while the circuit is open.
    :param on_transition: called as ``on_transition("down", error)`` once per up→down
        transition and ``on_transition("up", None)`` once per recovery.
    """

    backend = "hybrid"

    def __init__(
        self,
        redis: RedisLockManager | None,
        file: FileLockManager | None,
        *,
        retry_interval: float = 30.0,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        if redis is None and file is None:
            raise ValueError("HybridLockManager needs a redis manager, a file manager, or both")
        granting = redis if redis is not None else file
        assert granting is not None
        super().__init__(default_ttl=granting.default_ttl)
        self._redis = redis
        self._file = file
        self._circuit = Circuit(
            check_ttl(retry_interval, name="retry_interval"),
            self._probe,
            self._probe_failed,
            self._came_up,
        )
        self._on_transition = on_transition
        #: Per-thread facts about the acquire call in progress (was its ttl defaulted?).
        self._call = threading.local()
        #: Redis leases released while the circuit was open, each with how (``_finish``
        #: arguments, or None for a plain release): released by token on recovery.
        self._unreleased: collections.deque[tuple[Lease, tuple[float, bool] | None]] = (
            collections.deque(maxlen=4096)
        )
        #: Same-host marks of Redis leases, asked by grants from files too (see _hostlocks).
        host = _hostlocks.for_directory(file._files.dir_fd) if file is not None else None
        self._marks: _hostlocks.Marks = host or _hostlocks.NO_MARKS

    @property
    def redis(self) -> RedisLockManager | None:
        return self._redis

    @property
    def file(self) -> FileLockManager | None:
        return self._file

    @property
    def retry_interval(self) -> float:
        return self._circuit.retry_interval

    @property
    def using_fallback(self) -> bool:
        """True while Redis is considered down (or absent) and files serve the locks."""
        return self._redis is None or self._circuit.is_open

    # ------------------------------------------------------------ circuit

    def _redis_due(self) -> RedisLockManager | None:
        """The Redis manager if calls should use it now (the circuit is closed), else None.

        Never a probe: probes run on the prober thread, so no caller waits for a Redis that
        does not answer.
        """
        redis = self._redis
        return redis if redis is not None and self._circuit.closed() else None

    def _via_redis(self, call: Callable[[], _T]) -> _T:
        """Run one Redis call and open the circuit if it fails.

        Only a call that started after the last transition may move it: a failure that started
        before a recovery is old news (it would log a false transition).
        """
        started = _time.monotonic()
        try:
            result = call()
        except LockBackendUnavailable as exc:
            self._went_down(exc, started)
            raise
        return result

    def _went_down(self, exc: LockBackendUnavailable, started: float | None = None) -> None:
        if not self._circuit.trip(_time.monotonic() if started is None else started):
            return  # already open, or the call began before the last recovery
        if self._file is not None:
            self._log.warning(
                "Redis is unreachable for locks (%s); using local file locks in %s, which "
                "exclude only processes on this host; retrying Redis every %g s",
                exc.__cause__ or exc,
                self._file.directory,
                self._circuit.retry_interval,
                extra={"backend": "file", "reason": str(exc.__cause__ or exc)},
            )
        else:
            self._log.warning(
                "Redis is unreachable for locks (%s) and no file fallback is configured: "
                "lock requests fail until it answers (retrying every %g s)",
                exc.__cause__ or exc,
                self._circuit.retry_interval,
                extra={"backend": "redis", "reason": str(exc.__cause__ or exc)},
            )
        self._notify("down", exc)

    def _came_up(self) -> None:
        self._log.info("Redis answers again; locks are served from Redis")
        self._notify("up", None)

    # ------------------------------------------------------------ probing

    def _probe(self) -> None:
        """One probe (on the circuit's prober thread): a read-only round trip, then release the
        leases whose release was left to it; raises while Redis is down."""
        redis = self._redis
        assert redis is not None
        redis._inspect(PROBE_KEY)
        while self._unreleased:
            lease, finished = self._unreleased[0]
            # By token: a lock that changed hands is left alone.
            if finished is not None:
                redis._finish(lease, *finished)
            elif lease.expires_at > _time.time():
                redis._release(lease)
            with contextlib.suppress(IndexError):
                self._unreleased.popleft()

    def _probe_failed(self, exc: Exception) -> None:
        self._log.debug("Redis probe failed: %s", exc, extra={"backend": "redis"})

    def _notify(self, state: str, exc: BaseException | None) -> None:
        if self._on_transition is not None:
            try:
                self._on_transition(state, exc)
            except Exception:  # noqa: BLE001 - an observer must not break locking
                self._log.exception("on_transition callback raised")

    def _need_file(self, exc: LockBackendUnavailable | None) -> FileLockManager:
        if self._file is None:
            raise exc or LockBackendUnavailable(
                "Redis is unreachable for locks and no file fallback is configured",
                backend="redis",
            )
        return self._file

    # ------------------------------------------------------------ API

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
        """See :meth:`LockManager.acquire`; ``ttl=None`` uses the default of the backend that
        grants the lease (Redis's while it answers, the file manager's while it does not)."""
        self._call.ttl_defaulted = ttl is None
        try:
            return super().acquire(
                key, ttl=ttl, mode=mode, timeout=timeout, task_id=task_id, task_name=task_name
            )
        finally:
            self._call.ttl_defaulted = False

    def _try_acquire(
        self, key: str, ttl: float, token: str, task_id: str | None, task_name: str | None
    ) -> Lease | None:
        def from_files(file: FileLockManager) -> Claim:
            # The backend is chosen here, per attempt, so its default ttl is applied here too.
            t = file.default_ttl if getattr(self._call, "ttl_defaulted", False) else ttl
            return _granted(
                file._try_acquire(key, t, token, task_id, task_name, self._marks.held_name)
            )

        return self._take(
            key,
            token,
            None,
            lambda file: _granted(file._try_acquire(key, ttl, token, task_id, task_name)),
            lambda redis: _granted(redis._try_acquire(key, ttl, token, task_id, task_name)),
            from_files,
        ).lease

    def _take(
        self,
        key: str,
        token: str,
        task_id: str | None,
        in_files: Callable[[FileLockManager], Claim],
        in_redis: Callable[[RedisLockManager], Claim],
        from_files: Callable[[FileLockManager], Claim],
    ) -> Claim:
        """An acquire or a claim (``task_id``): the same-host mark, then Redis; files when Redis
        is down.

        Processes on this host that see Redis as down (each notices an outage, and its end, on
        its own schedule) take file locks, so a Redis lease is marked on this host too: a byte
        of .hostlocks (see _hostlocks), or where that cannot be, a "shadow" file lock with the
        same token (``in_files``). Either is taken before the Redis grant and checked by grants
        from files after they wrote, and vice versa: no same-host double grant across a
        transition, in either direction (a check without the mark first would leave a window
        open: check-then-act). A job finished in files (during an outage) is found there: its
        claim takes the shadow path.
        """
        redis = self._redis_due()
        file = self._file
        error: LockBackendUnavailable | None = None
        if redis is not None:
            shadow = None
            name = file_name(key)
            marked = self._marks.mark(token, name)
            if file is not None and not (marked and file._quiet(key, name, task_id)):
                try:
                    in_file = in_files(file)
                except LockBackendUnavailable as exc:
                    # The folder is unusable (disk full...): Redis alone still excludes.
                    self._log.debug("shadow file lock for %s failed: %s", key, exc)
                    file = None
                else:
                    if in_file.lease is None:
                        self._marks.drop(token)
                        return in_file  # held (or finished) in files on this host
                    shadow = in_file.lease
                    self._marks.add_shadow(token)
            try:
                claim = self._via_redis(lambda: in_redis(redis))
            except LockBackendUnavailable as exc:
                self._marks.drop(token)
                if shadow is not None and file is not None:
                    # Redis just failed: the shadow is the fallback lease (with the file
                    # manager's default ttl when the caller gave none), unless a Redis lease
                    # of this host holds the key.
                    if self._marks.held_name(name):
                        self._release_shadow(shadow)
                        return Claim("held")
                    if getattr(self._call, "ttl_defaulted", False):
                        shadow = file._extend(shadow, file.default_ttl) or shadow
                    return Claim("granted", shadow)
                error = exc
            except BaseException:
                # Not an outage (LockConfigurationError...): no lease, so no mark either.
                self._marks.drop(token)
                if shadow is not None:
                    self._release_shadow(shadow)
                raise
            else:
                if claim.lease is None:
                    self._marks.drop(token)
                    if shadow is not None:
                        self._release_shadow(shadow)
                return claim
        return from_files(self._need_file(error))

    def _release_shadow(
        self, lease: Lease, finished: tuple[float, bool] | None = None, marked: bool = False
    ) -> None:
        """Drop the same-token file lock that stands beside a Redis lease (best effort: a
        leftover shadow only delays same-host contenders until it expires or is cleaned).

        :param marked: Redis recorded the finished job's marker: the files get one only when
            somebody waits in the file line (a file per finished job, kept for done_ttl,
            piled up in the lock directory of a busy host and cost every task a create and a
            rename).
        """
        if self._file is None:
            return
        shadow = dataclasses.replace(lease, backend="file")
        try:
            if finished is None:
                self._file._release(shadow)
            elif marked:
                self._file._finish(shadow, finished[0], False, if_line=True)
            else:
                self._file._finish(shadow, *finished)
        except LockBackendUnavailable as exc:
            self._log.debug("could not release the shadow file lock of %s: %s", lease.key, exc)

    def set_handoff(self, callback: HandOff | None) -> None:
        super().set_handoff(callback)
        for manager in (self._redis, self._file):
            if manager is not None:
                manager.set_handoff(callback)

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
        """Like ``_try_acquire`` (see :meth:`_take`).

        A job that finds the shadow held (a same-host holder, or a same-host process on files)
        waits in the file line and is woken when that file lock ends; one that finds the key
        held in Redis waits in the Redis line. Each line is FIFO.
        """
        return self._take(
            key,
            token,
            task_id,
            lambda file: file._claim(key, ttl, token, task_id, task_name, waiter, done_ttl),
            lambda redis: redis._claim(
                key, ttl, token, task_id, task_name, waiter, done_ttl, waits=waits
            ),
            lambda file: file._claim(
                key, ttl, token, task_id, task_name, waiter, done_ttl, self._marks.held_name
            ),
        )

    def _remove_waiter(self, key: str, task_id: str) -> bool:
        removed = False
        redis = self._redis_due()
        if redis is not None:
            with contextlib.suppress(LockBackendUnavailable):
                removed = self._via_redis(lambda: redis._remove_waiter(key, task_id))
        if self._file is not None:
            removed = self._file._remove_waiter(key, task_id) or removed
        return removed

    def _waiting(self, key: str) -> list[str]:
        ids: list[str] = []
        redis = self._redis_due()
        if redis is not None:
            with contextlib.suppress(LockBackendUnavailable):
                ids = self._via_redis(lambda: redis._waiting(key))
        if self._file is not None:
            ids += [i for i in self._file._waiting(key) if i not in ids]
        return ids

    def _check_lease(self, lease: object) -> None:
        if not isinstance(lease, Lease):
            raise TypeError(f"expected a Lease, got {type(lease).__name__}")
        if self._manager_for(lease) is None:
            raise ValueError(
                f"lease for {lease.key!r} was granted by the {lease.backend!r} backend, "
                "which this hybrid manager does not have"
            )

    def _manager_for(self, lease: Lease) -> LockManager | None:
        if lease.backend == "redis":
            return self._redis
        if lease.backend == "file":
            return self._file
        return None

    def _release(self, lease: Lease) -> bool:
        return self._end(lease, None)

    def _finish(self, lease: Lease, done_ttl: float, mark: bool) -> bool:
        return self._end(lease, (done_ttl, mark))

    def _end(self, lease: Lease, finished: tuple[float, bool] | None) -> bool:
        """Release ``lease`` on its own backend (``finished``: ``_finish``'s arguments)."""
        manager = self._manager_for(lease)
        assert manager is not None
        if lease.backend == "file":
            if finished is None:
                return manager._release(lease)
            return manager._finish(lease, *finished)
        if self._circuit.is_open:
            # Circuit open: not on the caller's path. The probe releases it by token once
            # Redis answers (until then, or if it never does, it ends with its TTL).
            self._unreleased.append((lease, finished))
            released = False
        else:
            try:
                if finished is None:
                    released = self._via_redis(lambda: manager._release(lease))
                else:
                    released = self._via_redis(lambda: manager._finish(lease, *finished))
            except LockBackendUnavailable:
                # Cannot be confirmed released; it ends with its TTL (the caller is not given
                # an exception: the work is done and nothing else can be saved).
                released = False
        # The mark last: the shadow's release hands the key to a same-host job waiting in the
        # file line, whose claim must then find the Redis lock ended too.
        if self._marks.drop(lease.token):
            self._release_shadow(lease, finished, marked=released)
        elif finished is not None and finished[1] and not released and self._file is not None:
            # No shadow, and Redis did not record the job as done: the files do, so that a
            # same-host claim during the outage learns it finished.
            assert lease.task_id is not None
            try:
                self._file._mark_done(lease.key, lease.task_id, finished[0])
            except LockBackendUnavailable as exc:
                self._log.debug("could not mark %s done in files: %s", lease.key, exc)
        return released

    def _extend(self, lease: Lease, ttl: float) -> Lease | None:
        manager = self._manager_for(lease)
        assert manager is not None
        if lease.backend == "file":
            return manager._extend(lease, ttl)
        # A LockBackendUnavailable is raised, not turned into None ("lost"): the Redis lease may
        # still be valid, and the renewer retries while it lasts. While the circuit is open it
        # is raised at once: the renewer thread must not wait for a hung store either.
        if self._circuit.is_open:
            raise LockBackendUnavailable(
                f"Redis is unreachable for locks: cannot extend {lease.key!r} now",
                key=lease.key,
                backend="redis",
            )
        renewed = self._via_redis(lambda: manager._extend(lease, ttl))
        if renewed is not None and self._file is not None and self._marks.has_shadow(lease.token):
            with contextlib.suppress(LockBackendUnavailable):
                # Best effort, like the shadow itself: Redis decides whether the lease lives.
                self._file._extend(dataclasses.replace(lease, backend="file"), ttl)
        return renewed

    def _inspect(self, key: str) -> LockInfo | None:
        redis = self._redis_due()
        if redis is not None:
            try:
                info = self._via_redis(lambda: redis._inspect(key))
            except LockBackendUnavailable:
                pass
            else:
                if info is not None:
                    return info
        return self._file._inspect(key) if self._file is not None else None

    def _iter_locks(self) -> Iterator[LockInfo]:
        shadows: set[tuple[str, str | None]] = set()
        redis = self._redis_due()
        if redis is not None:
            try:
                infos = self._via_redis(lambda: list(redis._iter_locks()))
            except LockBackendUnavailable:
                pass
            else:
                yield from infos
                shadows = {(i.key, i.token_prefix) for i in infos}
        if self._file is not None:
            for info in self._file._iter_locks():
                if (info.key, info.token_prefix) not in shadows:  # a Redis lease's shadow
                    yield info

    def _break(
        self, key: str, *, task_id: str | None, token_prefix: str | None, only_if_dead: bool
    ) -> bool:
        broken = False
        redis = self._redis_due()
        if redis is not None:
            with contextlib.suppress(LockBackendUnavailable):
                broken = self._via_redis(
                    lambda: redis._break(
                        key, task_id=task_id, token_prefix=token_prefix, only_if_dead=only_if_dead
                    )
                )
        if self._file is not None:
            broken = (
                self._file._break(
                    key, task_id=task_id, token_prefix=token_prefix, only_if_dead=only_if_dead
                )
                or broken
            )
        return broken

    def clean(self, *, dry_run: bool = False) -> CleanReport:
        report = CleanReport()
        redis = self._redis_due()
        if redis is not None:
            try:
                report += self._via_redis(lambda: redis.clean(dry_run=dry_run))
            except LockBackendUnavailable:
                report.errors += 1
        if self._file is not None:
            report += self._file.clean(dry_run=dry_run)
        return report

    def _waiter(self, key: str) -> Waiter:
        redis = self._redis_due()
        if redis is not None:
            return redis._waiter(key)
        return self._need_file(None)._waiter(key)
