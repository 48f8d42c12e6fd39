"""The job API (claim, finish, remove_waiter, waiting, hand-off) on every backend: Redis (a real
server), files, and the hybrid on both."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from celery_lock import FileLockManager, HybridLockManager, LockManager, RedisLockManager
from celery_lock.backends import _hostlocks
from tests._redis_server import RedisServer
from tests.reliability._harness import dead_url

pytestmark = pytest.mark.redis

#: hybrid-shadow: the hybrid where byte locks of open file descriptions do not exist (a shadow
#: lock file beside each Redis lease).
BACKENDS = ["redis", "file", "hybrid", "hybrid-shadow", "hybrid-down"]


@pytest.fixture(params=BACKENDS)
def manager(
    request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path
) -> tuple[LockManager, list[tuple[str, str, bytes]]]:
    if request.param == "hybrid-shadow":
        request.getfixturevalue("monkeypatch").setattr(_hostlocks, "_SUPPORTED", False)
    prefix = "jobs-" + uuid.uuid4().hex[:8]
    url = dead_url() if request.param == "hybrid-down" else redis_server.url_db(9)
    redis = RedisLockManager.from_url(url, prefix=prefix)
    files = FileLockManager(tmp_path / "locks")
    built: LockManager = {
        "redis": redis,
        "file": files,
        "hybrid": HybridLockManager(redis, files),
        "hybrid-shadow": HybridLockManager(redis, files),
        "hybrid-down": HybridLockManager(redis, files, retry_interval=60),
    }[request.param]
    handed: list[tuple[str, str, bytes]] = []
    built.set_handoff(lambda key, task_id, payload: handed.append((key, task_id, payload)))
    return built, handed


def test_outcomes_fifo_hand_off_and_done_markers(manager: Any) -> None:
    jobs, handed = manager
    first = jobs.claim("k", task_id="a", ttl=30)
    assert first.outcome == "granted" and first.lease.task_id == "a"
    assert jobs.claim("k", task_id="b", ttl=30).outcome == "held"
    assert jobs.claim("k", task_id="b", ttl=30).holder_task_id == "a"
    for waiter in ("b", "c", "b"):  # b again: keeps its place, payload replaced
        claim = jobs.claim("k", task_id=waiter, ttl=30, waiter=f"wake-{waiter}".encode())
        assert (claim.outcome, claim.holder_task_id) == ("queued", "a")
    assert jobs.waiting("k") == ["b", "c"]
    # A newcomer cannot take a key reserved for the first waiter.
    assert jobs.finish(first.lease, done_ttl=60, mark=True)
    assert handed == [("k", "b", b"wake-b")]
    assert jobs.inspect("k").task_id == "b"
    assert jobs.claim("k", task_id="x", ttl=30).outcome == "held"
    assert jobs.claim("k", task_id="a", ttl=30).outcome == "finished"
    second = jobs.claim("k", task_id="b", ttl=30)
    assert second.outcome == "granted"
    assert jobs.waiting("k") == ["c"]
    # A plain release hands off too; the job may run again (not finished).
    assert jobs.release(second.lease)
    assert handed[-1] == ("k", "c", b"wake-c")
    assert jobs.claim("k", task_id="b", ttl=30).outcome == "held"  # reserved for c
    third = jobs.claim("k", task_id="c", ttl=30)
    assert third.outcome == "granted"
    assert jobs.finish(third.lease, done_ttl=60, mark=False)
    assert jobs.claim("k", task_id="c", ttl=30).outcome == "granted"  # no marker: mark=False


def test_task_ids_with_spaces_and_newlines_are_whole_ids(manager: Any) -> None:
    # Celery task ids are any string a producer chose; the Redis scripts take the task id as
    # the last field of a packed argument, so "a b" must never be read as "a" (or "b").
    jobs, handed = manager
    first = jobs.claim("k", task_id="a b", ttl=30)
    assert first.outcome == "granted"
    assert jobs.claim("k", task_id="a", ttl=30).holder_task_id == "a b"
    assert jobs.claim("k", task_id="c d\ne", ttl=30, waiter=b"").outcome == "queued"
    assert jobs.claim("k", task_id="a b", ttl=30, waiter=b"copy").outcome == "queued"
    assert jobs.waiting("k") == ["c d\ne", "a b"]
    assert jobs.finish(first.lease, done_ttl=60, mark=True)
    assert handed == [("k", "c d\ne", b"")]
    assert jobs.waiting("k") == []  # the finished job's own copy left the line
    assert jobs.claim("k", task_id="a b", ttl=30).outcome == "finished"
    assert jobs.claim("k", task_id="a", ttl=30).outcome == "held"  # reserved for the waiter
    assert jobs.claim("k", task_id="c d\ne", ttl=30).outcome == "granted"


def test_copies_of_the_holder_in_line_are_dropped_by_its_finish(manager: Any) -> None:
    jobs, handed = manager
    held = jobs.claim("k", task_id="a", ttl=30).lease
    assert jobs.claim("k", task_id="a", ttl=30, waiter=b"copy").outcome == "queued"
    assert jobs.finish(held, done_ttl=60, mark=False)
    assert handed == [] and jobs.waiting("k") == []
    assert jobs.claim("k", task_id="a", ttl=30).outcome == "finished"


def test_break_and_remove_waiter_hand_off(manager: Any) -> None:
    jobs, handed = manager
    held = jobs.claim("k", task_id="a", ttl=30).lease
    for waiter in ("b", "c"):
        jobs.claim("k", task_id=waiter, ttl=30, waiter=waiter.encode())
    assert jobs.break_lock("k", task_id="a")
    assert handed == [("k", "b", b"b")]
    # b was revoked: the key goes on to c.
    assert jobs.remove_waiter("k", "b")
    assert handed[-1] == ("k", "c", b"c")
    assert jobs.claim("k", task_id="c", ttl=30).outcome == "granted"
    assert not jobs.release(held)


def test_a_reservation_ends_by_itself(manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs, handed = manager
    for part in (jobs, getattr(jobs, "redis", None), getattr(jobs, "file", None)):
        if part is not None:
            monkeypatch.setattr(part, "reserve_ttl", 0.3)
    held = jobs.claim("k", task_id="a", ttl=30).lease
    jobs.claim("k", task_id="b", ttl=30, waiter=b"b")
    jobs.release(held)
    assert handed == [("k", "b", b"b")]
    assert jobs.acquire("k", ttl=30) is None  # plain acquire respects it
    time.sleep(0.5)
    lease = jobs.acquire("k", ttl=30)
    assert lease is not None  # the woken job never came: the key is free again
    jobs.release(lease)


def test_a_failing_hand_off_is_logged_and_the_release_stands(
    manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    jobs, _ = manager

    def broken(*_: Any) -> None:
        raise RuntimeError("broker down")

    jobs.set_handoff(broken)
    held = jobs.claim("k", task_id="a", ttl=30).lease
    jobs.claim("k", task_id="b", ttl=30, waiter=b"b")
    assert jobs.release(held)
    assert any("could not wake waiter b" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("backend", ["redis", "hybrid"])
def test_a_held_claim_of_a_job_that_will_wait_keeps_its_coalescing_marker(
    backend: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A QUEUE job's first claim carries no payload (it is built only when the key is held):
    its publish-time coalescing marker must survive that claim, or identical calls published
    before its second claim (with the payload) are published anew instead of handed this job."""
    redis = RedisLockManager.from_url(redis_server.url_db(9), prefix="co-" + uuid.uuid4().hex[:8])
    jobs: LockManager = (
        redis if backend == "redis" else HybridLockManager(redis, FileLockManager(tmp_path / "l"))
    )
    for key in ("k", "k2"):
        assert jobs.claim(key, task_id="a", ttl=30).outcome == "granted"
    assert redis.coalesce("k", "b", running=False, ttl=30) is None  # reserved for b...
    assert redis.reveal("k", "b", published=True)  # ...and visible once b is published
    assert jobs.claim("k", task_id="b", ttl=30, waits=True).outcome == "held"
    assert redis.coalesce("k", "c", running=False, ttl=30) == "b"
    assert jobs.claim("k", task_id="b", ttl=30, waiter=b"wake-b").outcome == "queued"
    assert redis.coalesce("k", "c", running=False, ttl=30) == "b"
    # A job that will not wait (an EXECUTION duplicate, skipped) ends its marker.
    assert redis.coalesce("k2", "d", running=False, ttl=30) is None
    assert redis.reveal("k2", "d", published=True)
    assert jobs.claim("k2", task_id="d", ttl=30).outcome == "held"
    assert redis.coalesce("k2", "e", running=False, ttl=30) is None
