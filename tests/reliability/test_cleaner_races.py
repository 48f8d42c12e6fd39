"""Scenario 5: the cleaner races live locks; it must never remove a live lock and must remove
dead ones.

Three layers: real processes contending while the cleaner loops; deterministic interleavings of
the cleaner's look-then-delete with a takeover in between; and hypothesis state machines that
drive random sequences of acquire / release / clock jumps / holder deaths / cleaning against a
model, on fakeredis and on a lock directory.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import fakeredis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from celery_lock import (
    FileLockManager,
    Lease,
    LockCleaner,
    LockManager,
    RedisLockManager,
    _identity,
)
from celery_lock.backends import file as file_backend
from tests.reliability._harness import BACKENDS, cleaner_race
from tests.reliability.conftest import Setup

pytestmark = pytest.mark.reliability


# ------------------------------------------------------------------------------- processes


@pytest.mark.redis
@pytest.mark.parametrize("setup", BACKENDS, indirect=True)
def test_cleaner_loop_during_contention(setup: Setup, tmp_path: Path) -> None:
    """The cleaner runs back to back while 3 processes x 40 QUEUE acquisitions contend on one
    key and 3 SIGKILLed holders left orphan locks on other keys: no release ever finds its lock
    gone (the cleaner stole nothing live), no overlap, nothing lost, and exactly the 3 orphans
    were removed."""
    facts = cleaner_race(
        setup.spec, setup.manager, tmp_path / "work", processes=3, iterations=40, dead=3
    )
    stats = facts.contention.stats
    assert stats.errors == []
    assert stats.release_false == 0
    assert stats.overlaps == []
    assert facts.contention.lost == 0
    assert stats.acquired == facts.contention.count == 120
    assert facts.passes > 1
    assert facts.removed_live == 0
    assert facts.dead_removed == 3
    assert facts.dead_left == 0
    if setup.backend == "hybrid-down":
        assert facts.clean_errors <= facts.passes  # one per failed Redis probe, nothing else
    else:
        assert facts.clean_errors == 0


# ------------------------------------------------------------------------------- interleavings


def reaped_pid() -> int:
    """The pid of a process that has exited and been reaped (provably dead)."""
    proc = subprocess.Popen(["true"])  # noqa: S607 - coreutils, no input
    proc.wait(timeout=10)
    return proc.pid


@contextlib.contextmanager
def as_dead_holder(manager: LockManager, pid: int) -> Iterator[None]:
    """Locks that ``manager`` writes in the block name ``pid`` (a dead process of this host and
    boot) as their holder; everything else about this process stays as it is."""
    if isinstance(manager, FileLockManager):  # builds its record as a dict of its own
        original_record = manager._holder_record

        def record(*args: Any) -> dict[str, Any]:
            data = original_record(*args)
            data["pid"], data["start"] = pid, 1
            return data

        with mock.patch.object(manager, "_holder_record", record):
            yield
        return
    original = manager._meta

    def meta(*args: Any) -> str:
        data = json.loads(original(*args))
        data["pid"], data["start"] = pid, 1
        return json.dumps(data, separators=(",", ":"))

    with mock.patch.object(manager, "_meta", meta):
        yield


def test_file_cleaner_and_a_contender_for_the_orphan_both_come_out_right(tmp_path: Path) -> None:
    """The file cleaner judges a dead holder's orphan under the file's exclusive flock; a
    contender arriving meanwhile waits for that flock, finds the file removed and takes the key
    in a new file with a higher fence. Judging and deleting are one step under the flock, so
    the cleaner cannot delete the contender's lock."""
    cleaner_view = FileLockManager(tmp_path / "locks")
    other = FileLockManager(tmp_path / "locks")
    with as_dead_holder(other, reaped_pid()):
        orphan = other.acquire("k", ttl=30)
    assert orphan is not None
    taken: list[Lease | None] = []
    threads: list[threading.Thread] = []
    blocked = threading.Event()
    original, real_wait = cleaner_view._stale_reason, other._files.wait_flock

    def wait_flock(*args: Any) -> None:
        blocked.set()
        real_wait(*args)

    def look_then_contend(*args: Any) -> str | None:
        reason = original(*args)
        if reason is not None and not threads:
            thread = threading.Thread(target=lambda: taken.append(other.acquire("k", ttl=30)))
            thread.start()
            threads.append(thread)
            # The contender has opened the orphan's file and waits for the cleaner's flock.
            assert blocked.wait(5)
        return reason

    other._files.wait_flock = wait_flock  # type: ignore[method-assign]

    with mock.patch.object(cleaner_view, "_stale_reason", look_then_contend):
        report = cleaner_view.clean()
    threads[0].join(10)
    assert taken and taken[0] is not None and taken[0].fence > orphan.fence
    assert report.removed == 1 and report.kept == 0
    info = other.inspect("k")
    assert info is not None and info.token_prefix == taken[0].token[:8]
    assert other.release(taken[0])


def test_redis_cleaner_keeps_a_lock_taken_over_after_its_look(fake_redis: Any) -> None:
    """Same race on Redis: the cleaner read the orphan's value and proved its holder dead; a
    contender breaks and re-takes the lock before the cleaner's delete, which must then match
    nothing (compare-and-delete on the exact value read)."""
    manager = RedisLockManager(fake_redis)
    with as_dead_holder(manager, reaped_pid()):
        orphan = manager.acquire("k", ttl=30)
    assert orphan is not None
    taken: list[Lease | None] = []
    original = _identity.holder_is_dead

    def proved_then_takeover(meta: dict[str, Any]) -> bool:
        dead = original(meta)
        if dead and not taken:
            taken.append(None)  # re-entrant calls from the contender pass straight through
            taken[0] = manager.acquire("k", ttl=30)
        return dead

    with mock.patch.object(_identity, "holder_is_dead", proved_then_takeover):
        report = LockCleaner(manager).clean()
    assert taken and taken[0] is not None and taken[0].fence > orphan.fence
    assert report.removed == 0
    info = manager.inspect("k")
    assert info is not None and info.token_prefix == taken[0].token[:8]
    assert manager.release(taken[0])


# ------------------------------------------------------------------------------- state machines


class FakeClock:
    """Wall clock and CLOCK_BOOTTIME shifted by ``offset``; monotonic time left alone (the file
    backend's guard timeouts use it)."""

    CLOCK_BOOTTIME = time.CLOCK_BOOTTIME

    def __init__(self) -> None:
        self.offset = 0.0
        self._real_time = time.time

    def time(self) -> float:
        return self._real_time() + self.offset

    def time_ns(self) -> int:
        return int(self.time() * 1e9)

    def clock_gettime(self, clock: int) -> float:
        real = time.clock_gettime(clock)
        return real + self.offset if clock == time.CLOCK_BOOTTIME else real

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


KEYS = ("a", "b", "c")
DEAD_PID = reaped_pid()


class CleanerMachine(RuleBasedStateMachine):
    """Random acquire / release / time / death / clean sequences against a model of who holds
    each key. Subclasses provide the manager and how the clock is moved."""

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.holder: dict[str, tuple[Lease, bool] | None] = dict.fromkeys(KEYS)
        self.last_fence: dict[str, int] = dict.fromkeys(KEYS, 0)
        self.manager = self.build()
        self.cleaner = LockCleaner(self.manager)

    def build(self) -> LockManager:
        raise NotImplementedError

    #: Does the cleaner remove expired locks itself (files), or does the store expire them?
    cleans_expired = False

    def expired(self, lease: Lease) -> bool:
        return lease.expires_at <= self.clock.time()

    def live(self, key: str) -> Lease | None:
        held = self.holder[key]
        if held is None or held[1] or self.expired(held[0]):
            return None
        return held[0]

    @initialize()
    def start(self) -> None:
        assert all(not self.manager.is_locked(k) for k in KEYS)

    @rule(
        target=leases,
        key=st.sampled_from(KEYS),
        dead=st.booleans(),
        ttl=st.sampled_from([1.0, 4.0]),
    )
    def acquire(self, key: str, dead: bool, ttl: float) -> Any:
        free = self.live(key) is None
        with as_dead_holder(self.manager, DEAD_PID) if dead else contextlib.nullcontext():
            lease = self.manager.acquire(key, ttl=ttl)
        assert (lease is not None) == free, (key, self.holder[key], lease)
        if lease is None:
            return multiple()
        assert lease.fence > self.last_fence[key]
        self.last_fence[key] = lease.fence
        self.holder[key] = (lease, dead)
        return multiple() if dead else lease  # the dead never release

    @rule(lease=consumes(leases))
    def release(self, lease: Lease) -> None:
        held = self.holder[lease.key]
        current = held is not None and held[0].token == lease.token
        assert self.manager.release(lease) is (current and not self.expired(lease))
        if current:
            self.holder[lease.key] = None

    @rule(seconds=st.sampled_from([0.5, 1.5, 5.0]))
    def advance(self, seconds: float) -> None:
        self.clock.offset += seconds

    @rule()
    def clean(self) -> None:
        doomed = []
        for key in KEYS:
            held = self.holder[key]
            if held is None:
                continue
            expired = self.expired(held[0])
            if (held[1] and not expired) or (expired and self.cleans_expired):
                doomed.append(key)
        report = self.cleaner.clean()
        assert report.errors == 0
        assert report.removed == len(doomed), (report, doomed, self.holder)
        for key in doomed:
            self.holder[key] = None

    @invariant()
    def live_locks_are_intact(self) -> None:
        for key in KEYS:
            lease = self.live(key)
            if lease is not None:
                info = self.manager.inspect(key)
                assert info is not None and info.token_prefix == lease.token[:8], key
            elif self.holder[key] is None or self.expired(self.holder[key][0]):  # type: ignore[index]
                assert not self.manager.is_locked(key), key

    def teardown(self) -> None:
        self.close()

    def close(self) -> None:
        pass


class FileCleanerMachine(CleanerMachine):
    cleans_expired = True

    def build(self) -> LockManager:
        self.directory = tempfile.mkdtemp(prefix="cleaner-machine-")
        self._patch = mock.patch.object(file_backend, "_time", self.clock)
        self._patch.start()
        return FileLockManager(Path(self.directory) / "locks")

    def close(self) -> None:
        self._patch.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisCleanerMachine(CleanerMachine):
    cleans_expired = False  # the server drops expired keys itself

    def build(self) -> LockManager:
        # fakeredis and the backend both read time.time: one patch moves both.
        self._patch = mock.patch("time.time", self.clock.time)
        self._patch.start()
        return RedisLockManager(fakeredis.FakeRedis(server=fakeredis.FakeServer()))

    def close(self) -> None:
        self._patch.stop()


MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class TestFileCleanerMachine(FileCleanerMachine.TestCase):  # type: ignore[name-defined]
    """Random interleavings on a lock directory: the cleaner never removes a live lock (the
    invariant checks every live holder's token after every step) and removes exactly the dead
    and expired ones."""

    settings = MACHINE_SETTINGS


class TestRedisCleanerMachine(RedisCleanerMachine.TestCase):  # type: ignore[name-defined]
    """Random interleavings on fakeredis: same properties (expired keys vanish by themselves,
    so the cleaner removes exactly the dead holders' locks)."""

    settings = MACHINE_SETTINGS
