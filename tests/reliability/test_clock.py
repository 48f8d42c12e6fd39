"""Scenario 7: the wall clock jumps (NTP step, an operator) under live file leases.

The file backend's ``_time`` is replaced by a clock whose wall time (``time``, ``time_ns``) is
shifted while ``CLOCK_BOOTTIME`` and ``monotonic`` keep running normally, as they do on a real
step. Same-host leases are judged on CLOCK_BOOTTIME, so a jump must neither expire a live lease
nor keep an expired one alive, and fences must keep increasing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from celery_lock import (
    FileLockManager,
    HybridLockManager,
    LockCleaner,
    LockManager,
    RedisLockManager,
)
from celery_lock.backends import _filerecord
from celery_lock.backends import file as file_backend
from celery_lock.backends import redis as redis_backend
from tests.reliability._harness import poll_until

pytestmark = pytest.mark.reliability

HOUR = 3600.0


class SteppedClock:
    """The time module with the wall clock shifted by ``offset`` seconds."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def time_ns(self) -> int:
        return time.time_ns() + int(self.offset * 1e9)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SteppedClock:
    stepped = SteppedClock()
    monkeypatch.setattr(file_backend, "_time", stepped)
    return stepped


@pytest.fixture(params=["file", "file-only-hybrid"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[LockManager, LockManager]:
    """Two managers on one lock directory (a holder and a contender, as two processes)."""
    if request.param == "file":
        return FileLockManager(tmp_path / "locks"), FileLockManager(tmp_path / "locks")
    return (
        HybridLockManager(None, FileLockManager(tmp_path / "locks")),
        HybridLockManager(None, FileLockManager(tmp_path / "locks")),
    )


@pytest.mark.parametrize("jump", [HOUR, 24 * HOUR])
def test_forward_jump_does_not_expire_a_live_lease(
    clock: SteppedClock, pair: tuple[LockManager, LockManager], jump: float
) -> None:
    """The wall clock leaps forward far past a 30 s lease: the holder keeps it (a contender is
    refused, the cleaner keeps it), and the holder can still extend and release it."""
    holder, contender = pair
    lease = holder.acquire("k", ttl=30)
    assert lease is not None
    clock.offset = jump
    assert contender.acquire("k", ttl=30) is None
    assert contender.is_locked("k")
    assert LockCleaner(contender).clean().removed == 0
    renewed = holder.extend(lease)
    assert renewed is not None and renewed.fence == lease.fence
    assert holder.release(renewed)


def test_backward_jump_does_not_keep_an_expired_lease(
    clock: SteppedClock, pair: tuple[LockManager, LockManager]
) -> None:
    """A 0.3 s lease runs out while the wall clock is stepped an hour back: the lock is free
    at once for a contender, the old holder's release is False and its extend None."""
    holder, contender = pair
    lease = holder.acquire("k", ttl=0.3)
    assert lease is not None
    clock.offset = -HOUR
    successor, waited = poll_until(lambda: contender.acquire("k", ttl=30), timeout=3)
    assert successor is not None, "an expired lease stayed valid after the clock went back"
    assert waited < 1.5
    assert successor.fence > lease.fence
    assert holder.release(lease) is False
    assert holder.extend(lease) is None
    assert contender.is_locked("k") and contender.release(successor)


def test_extend_under_a_jumped_clock_does_not_lengthen_the_lease(
    clock: SteppedClock, pair: tuple[LockManager, LockManager]
) -> None:
    """The holder extends a 0.4 s lease while its wall clock is an hour ahead, then the clock
    comes back: the lease still ends about 0.4 s after the extension, not an hour later."""
    holder, contender = pair
    lease = holder.acquire("k", ttl=0.4)
    assert lease is not None
    clock.offset = HOUR
    renewed = holder.extend(lease)
    assert renewed is not None
    extended_at = time.monotonic()
    clock.offset = 0.0
    successor, _ = poll_until(lambda: contender.acquire("k", ttl=30), timeout=3)
    assert successor is not None, "the extension under a jumped clock lasted far too long"
    assert time.monotonic() - extended_at >= 0.35  # and it did last (no early expiry)


def test_fences_keep_increasing_across_backward_jumps(
    clock: SteppedClock, pair: tuple[LockManager, LockManager]
) -> None:
    """Fences come from max(last + 1, wall clock in µs): stepping the clock back a day between
    grants (and forward, and back again) never makes a fence smaller than the one before."""
    holder, contender = pair
    fences = []
    for offset in (0.0, -24 * HOUR, -24 * HOUR, HOUR, -HOUR, -48 * HOUR):
        clock.offset = offset
        for manager in (holder, contender):
            lease = manager.acquire("k", ttl=30)
            assert lease is not None
            fences.append(lease.fence)
            assert manager.release(lease)
    assert fences == sorted(fences) and len(set(fences)) == len(fences)


def test_foreign_host_lease_follows_the_wall_clock(clock: SteppedClock, tmp_path: Path) -> None:
    """A lock written by another host can only be judged on the wall clock (its boot clock is
    not ours): held while its wall expiry is ahead, free once the wall clock passes it. This is
    the documented limit of the jump protection."""
    manager = FileLockManager(tmp_path / "locks")
    path = manager.directory / _filerecord.file_name("k")
    now = time.time()
    meta = {
        "v": 1,
        "key": "k",
        "host": "elsewhere",
        "pid": 1,
        "start": 1,
        "boot": "other-boot",
        "pidns": None,
        "task_id": None,
        "task_name": None,
        "acquired": now,
        "ttl": 60.0,
        "token": "foreign",
        "fence": 7,
        "expires": now + 60,
        "bt_expires": 1.0,  # meaningless here: another host's boot clock
    }
    path.write_text(json.dumps(meta))
    assert manager.acquire("k", ttl=30) is None
    clock.offset = 120.0
    lease = manager.acquire("k", ttl=30)
    assert lease is not None and lease.fence > 7


def test_forward_jump_on_a_redis_client_keeps_a_lease_the_server_holds(
    fake_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside the file backend's scope but the same fault: the worker's wall clock steps an hour
    forward while Redis (whose expiry the server keeps) still holds the 30 s lease; extending
    and releasing it must still work."""
    manager = RedisLockManager(fake_redis)
    lease = manager.acquire("k", ttl=30)
    assert lease is not None
    stepped = SteppedClock()
    stepped.offset = HOUR
    monkeypatch.setattr(redis_backend, "_time", stepped)
    assert manager.is_locked("k")  # the server still holds it
    renewed = manager.extend(lease)
    assert renewed is not None
    assert manager.release(renewed)
