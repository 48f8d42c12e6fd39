"""Immutable records: :class:`Lease` (one held lock), :class:`LockInfo` and :class:`CleanReport`."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Claim", "CleanReport", "Lease", "LockInfo"]


@dataclasses.dataclass(frozen=True)
class Lease:
    """One held lock.

    Ownership is the ``token``: any manager instance of the same backend and store can release or
    extend the lease, in the process that acquired it (a forked child cannot). ``fence`` strictly
    increases across successive leases of one key on one backend; pass it to the resource you
    protect so it can refuse writes from an older holder.
    """

    #: The lock key as the caller gave it.
    key: str
    #: Random owner token (hex); the only proof of ownership.
    token: str
    #: Fencing token: strictly increasing per key and backend.
    fence: int
    #: ``"redis"`` or ``"file"``: the backend that granted the lease.
    backend: str
    #: Lease length in seconds.
    ttl: float
    #: Wall-clock epoch seconds when the lease ends unless extended.
    expires_at: float
    #: Wall-clock epoch seconds when the lock was acquired (kept by ``extend``).
    acquired_at: float = 0.0
    #: Process id of the process that acquired the lease; only that process may release or
    #: extend it (a child forked while it was held must not end its parent's lock). None:
    #: unknown (a lease built by hand), any process may. Not shown and not compared.
    pid: int | None = dataclasses.field(default=None, repr=False, compare=False)
    #: The job (Celery task id) the lease was claimed for by :meth:`LockManager.claim`; None
    #: for a plain ``acquire``. Not shown and not compared.
    task_id: str | None = dataclasses.field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        # Never print the whole token: it is a capability.
        return (
            f"Lease(key={self.key!r}, token={self.token[:8]}..., fence={self.fence}, "
            f"backend={self.backend!r}, ttl={self.ttl}, expires_at={self.expires_at:.3f})"
        )


@dataclasses.dataclass(frozen=True)
class Claim:
    """What :meth:`LockManager.claim` decided for one job (a task id) on one key.

    ``outcome`` is one of:

    - ``"granted"``: ``lease`` holds the lock; run the job.
    - ``"held"``: another holder has it and nothing was recorded (no ``waiter`` was given).
    - ``"queued"``: it is held; the job was recorded as a FIFO waiter of the key and its
      ``waiter`` payload is handed to the hand-off callback when its turn comes.
    - ``"finished"``: this task id already ran to completion: drop this copy.
    """

    outcome: str
    lease: Lease | None = None
    #: Task id recorded by the current holder (or the waiter the key is reserved for).
    holder_task_id: str | None = None


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """Holder metadata of a held lock, as returned by ``inspect()``; unknown fields are None."""

    key: str
    token_prefix: str | None
    fence: int | None
    backend: str
    host: str | None
    pid: int | None
    task_id: str | None
    task_name: str | None
    acquired_at: float | None
    expires_at: float | None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON output)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CleanReport:
    """What one cleaner pass did: locks ``scanned``, ``removed`` (or, dry run, would remove),
    ``kept`` and ``errors``."""

    scanned: int = 0
    removed: int = 0
    kept: int = 0
    errors: int = 0

    def __add__(self, other: CleanReport) -> CleanReport:
        return CleanReport(
            self.scanned + other.scanned,
            self.removed + other.removed,
            self.kept + other.kept,
            self.errors + other.errors,
        )
