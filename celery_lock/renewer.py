"""One renewal thread per process keeps registered leases alive (never one thread per lock)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time as _time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from celery_lock import _fork

if TYPE_CHECKING:
    from celery_lock._base import LockManager
    from celery_lock._types import Lease

__all__ = ["RenewalHandle", "Renewer", "get_renewer"]

_log = logging.getLogger("celery_lock.renewer")

#: After a failed renewal, try again this often (seconds) while the lease is still valid.
RETRY_INTERVAL = 0.5

#: An idle thread (no lease registered) exits after this many seconds.
IDLE_EXIT = 60.0


class RenewalHandle:
    """A registered lease. ``lease`` is the current (renewed) lease; ``lost`` turns True once the
    lease was truly lost (taken over, expired, or unrenewable until it expired)."""

    __slots__ = (
        "_cancelled",
        "_renewer",
        "_retired",
        "due",
        "extra",
        "interval",
        "lease",
        "lost",
        "manager",
        "on_lost",
    )

    def __init__(
        self,
        renewer: Renewer,
        manager: LockManager,
        lease: Lease,
        on_lost: Callable[[RenewalHandle], object] | None,
        interval: float,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        self._renewer = renewer
        self._retired = False
        self.manager = manager
        self.lease = lease
        self.on_lost = on_lost
        self.interval = interval
        #: Extra log fields for this lease (a task's ``task_id`` / ``task_name``).
        self.extra = dict(extra or {})
        self.lost = False
        self.due = 0.0
        self._cancelled = False

    @property
    def active(self) -> bool:
        return not (self._cancelled or self.lost)

    def cancel(self) -> None:
        """Stop renewing (call before releasing the lease)."""
        self._cancelled = True
        self._renewer._retire(self)

    def ensure_held(self) -> None:
        """Raise :class:`~celery_lock.errors.LockLost` if the lease was lost."""
        if self.lost:
            from celery_lock.errors import LockLost  # noqa: PLC0415

            raise LockLost(
                f"lock {self.lease.key!r} was lost",
                key=self.lease.key,
                backend=self.lease.backend,
                fence=self.lease.fence,
            )


class Renewer:
    """Extends registered leases every ``ttl / 3`` from one daemon thread.

    Transient errors (the store is briefly unreachable) are ridden out, retrying every
    :data:`RETRY_INTERVAL` seconds, for as long as the lease is still valid; a lease that the
    store says is no longer ours, or that expired before a renewal got through, is marked lost,
    logged at ERROR and reported to its ``on_lost`` callback (from the renewer thread).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, RenewalHandle]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        #: Monotonic time by which the thread looks at the heap again: the end of its current
        #: wait, or 0.0 while it is not waiting (it looks before it waits again).
        self._wake_at = 0.0
        self._generation = _fork.generation()
        #: Registered handles neither cancelled nor lost.
        self._live = 0

    def _retire(self, handle: RenewalHandle) -> bool:
        """Count ``handle`` out of the live ones; True for the one call (cancel or loss, from
        any thread) that did it."""
        with self._cond:
            if handle._retired:
                return False
            handle._retired = True
            self._live -= 1
            return True

    def register(
        self,
        manager: LockManager,
        lease: Lease,
        *,
        on_lost: Callable[[RenewalHandle], object] | None = None,
        interval: float | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> RenewalHandle:
        """Keep ``lease`` alive until the handle is cancelled; renew every ``interval`` seconds
        (default ``lease.ttl / 3``). ``extra`` fields go on the log record of a loss (the one
        ERROR line for it), e.g. the Celery task's ``task_id`` and ``task_name``."""
        handle = RenewalHandle(self, manager, lease, on_lost, interval or lease.ttl / 3, extra)
        due = _time.monotonic() + handle.interval
        with self._cond:
            heap = self._heap
            # Most leases end (cancelled) long before their first renewal; their entries wait
            # in the heap until due. Drop them once they outnumber the live ones, so the heap
            # stays proportional to the leases actually held.
            if len(heap) > 2 * self._live + 64:
                heap[:] = [e for e in heap if e[2].active]
                heapq.heapify(heap)
            self._live += 1
            self._schedule(handle, due)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="celery_lock-renewer", daemon=True
                )
                self._thread.start()
            elif due < self._wake_at:
                # Wake the thread only when it would otherwise sleep past this lease's first
                # renewal: a wake-up per task is a thread switch per task on the hot path.
                self._cond.notify()
        return handle

    def __len__(self) -> int:
        """How many leases are being kept alive."""
        return self._live

    def _schedule(self, handle: RenewalHandle, due: float) -> None:
        handle.due = due
        heapq.heappush(self._heap, (due, next(self._seq), handle))

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and not self._heap[0][2].active:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        # Idle: wait for a registration; exit after a while so an idle process
                        # keeps no thread (register() starts a new one).
                        if not self._wait(IDLE_EXIT) and not self._heap:
                            self._thread = None
                            return
                        continue
                    due = self._heap[0][0]
                    delay = due - _time.monotonic()
                    if delay <= 0:
                        _, _, handle = heapq.heappop(self._heap)
                        break
                    self._wait(delay)
            self._renew(handle)

    def _wait(self, delay: float) -> bool:
        """Wait on the condition (its lock held) for at most ``delay`` seconds; register()
        notifies only a lease due before this wait ends."""
        self._wake_at = _time.monotonic() + delay
        try:
            return self._cond.wait(timeout=delay)
        finally:
            self._wake_at = 0.0

    def _renew(self, handle: RenewalHandle) -> None:
        lease = handle.lease
        try:
            renewed = handle.manager.extend(lease)
        except Exception as exc:  # noqa: BLE001 - any store error is "transient" until expiry
            if _time.time() + RETRY_INTERVAL < lease.expires_at:
                _log.debug(
                    "renewal of %s failed (%s); retrying",
                    lease.key,
                    exc,
                    extra={"lock_key": lease.key, "backend": lease.backend, "fence": lease.fence},
                )
                with self._cond:
                    if handle.active:
                        self._schedule(handle, _time.monotonic() + RETRY_INTERVAL)
                return
            self._lost(handle, f"renewal kept failing until the lease expired: {exc}")
            return
        if renewed is None:
            if handle.active:
                self._lost(handle, "the store says the lease is no longer ours")
            return
        with self._cond:
            handle.lease = renewed
            if handle.active:
                self._schedule(handle, _time.monotonic() + handle.interval)

    def _lost(self, handle: RenewalHandle, reason: str) -> None:
        if not self._retire(handle):
            return  # cancelled meanwhile: the owner released it on purpose
        handle.lost = True
        lease = handle.lease
        _log.error(
            "lock lost: %s (fence %d): %s",
            lease.key,
            lease.fence,
            reason,
            extra={
                **handle.extra,
                "lock_key": lease.key,
                "backend": lease.backend,
                "fence": lease.fence,
                "reason": reason,
            },
        )
        if handle.on_lost is not None:
            try:
                handle.on_lost(handle)
            except Exception:  # noqa: BLE001 - a callback bug must not kill the renewer
                _log.exception("on_lost callback for %s raised", lease.key)


_renewer: Renewer | None = None
_renewer_lock = threading.Lock()


def get_renewer() -> Renewer:
    """The process's renewer (a forked child gets a fresh one: threads do not survive fork)."""
    global _renewer  # noqa: PLW0603 - one per process by design
    renewer = _renewer
    if renewer is None or renewer._generation != _fork.generation():
        with _renewer_lock:
            renewer = _renewer
            if renewer is None or renewer._generation != _fork.generation():
                renewer = _renewer = Renewer()
    return renewer


@_fork.in_child
def _reset_after_fork() -> None:
    global _renewer, _renewer_lock  # noqa: PLW0603
    # The parent's thread does not exist here and its lock may have been held mid-fork.
    _renewer = None
    _renewer_lock = threading.Lock()
