"""One renewer thread per process: renews, rides out transient errors, reports real loss."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from celery_lock import LockLost, get_renewer
from celery_lock.renewer import Renewer
from tests._memory import MemoryLockManager


def wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def _count_notifies(renewer: Renewer) -> list[int]:
    count = [0]
    notify = renewer._cond.notify

    def counting(n: int = 1) -> None:
        count[0] += 1
        notify(n)

    renewer._cond.notify = counting  # type: ignore[method-assign]
    return count


def test_keeps_leases_alive_with_one_thread() -> None:
    m = MemoryLockManager()
    renewer = Renewer()
    leases = [m.acquire(f"k{i}", ttl=0.3) for i in range(5)]
    before = set(threading.enumerate())
    handles = [renewer.register(m, lease) for lease in leases if lease is not None]
    time.sleep(0.8)  # > 2 TTLs: without renewal every lease would have expired
    assert all(m.is_locked(f"k{i}") for i in range(5))
    started = [t for t in set(threading.enumerate()) - before if t.name == "celery_lock-renewer"]
    assert len(started) == 1  # one thread for five leases
    assert len(renewer) == 5
    for h in handles:
        assert not h.lost
        assert h.lease.expires_at > leases[0].expires_at  # type: ignore[union-attr]
        h.cancel()
    assert len(renewer) == 0


def test_reports_a_lease_taken_over(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="celery_lock")
    m = MemoryLockManager()
    lease = m.acquire("k", ttl=0.3)
    assert lease is not None
    lost = threading.Event()
    handle = Renewer().register(m, lease, on_lost=lambda h: lost.set())
    m.held.clear()
    assert m.acquire("k") is not None  # somebody else now holds it
    assert lost.wait(2)
    assert handle.lost
    with pytest.raises(LockLost):
        handle.ensure_held()
    (record,) = [r for r in caplog.records if r.name == "celery_lock.renewer"]
    assert record.levelno == logging.ERROR
    assert record.lock_key == "k"  # type: ignore[attr-defined]


def test_rides_out_transient_errors_while_valid() -> None:
    m = MemoryLockManager()
    lease = m.acquire("k", ttl=1.5)
    assert lease is not None
    handle = Renewer().register(m, lease, interval=0.1)
    m.down = True
    time.sleep(0.6)  # several failed renewals, lease still valid
    assert not handle.lost
    m.down = False
    assert wait_for(lambda: handle.lease.expires_at > lease.expires_at)
    assert not handle.lost
    handle.cancel()


def test_lost_when_errors_last_until_expiry() -> None:
    m = MemoryLockManager()
    lease = m.acquire("k", ttl=0.6)
    assert lease is not None
    calls: list[object] = []
    handle = Renewer().register(m, lease, on_lost=calls.append, interval=0.1)
    m.down = True
    assert wait_for(lambda: handle.lost, timeout=3)
    assert calls == [handle]


def test_callback_errors_are_contained(caplog: pytest.LogCaptureFixture) -> None:
    m = MemoryLockManager()
    lease = m.acquire("k", ttl=0.3)
    assert lease is not None

    def boom(_h: object) -> None:
        raise RuntimeError("callback bug")

    renewer = Renewer()
    handle = renewer.register(m, lease, on_lost=boom)
    m.held.clear()
    assert wait_for(lambda: handle.lost)
    assert wait_for(lambda: any("callback" in r.getMessage() for r in caplog.records))
    # The thread survived the callback's exception and still renews others.
    other = m.acquire("other", ttl=0.3)
    assert other is not None
    h2 = renewer.register(m, other)
    time.sleep(0.5)
    assert m.is_locked("other") and not h2.lost
    h2.cancel()


def test_cancelled_lease_is_not_reported_lost() -> None:
    m = MemoryLockManager()
    lease = m.acquire("k", ttl=0.3)
    assert lease is not None
    calls: list[object] = []
    handle = Renewer().register(m, lease, on_lost=calls.append)
    handle.cancel()
    m.release(lease)
    time.sleep(0.3)
    assert calls == [] and not handle.lost


def test_forked_child_gets_its_own_renewer() -> None:
    parent = get_renewer()
    assert get_renewer() is parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        ok = get_renewer() is not parent
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.waitpid(pid, 0)


def test_short_leases_leave_a_bounded_heap_and_no_wakeups() -> None:
    """Tasks register and cancel far more leases than ever reach a renewal: the heap stays
    proportional to live leases, and registering a later lease does not wake the thread."""
    m = MemoryLockManager()
    renewer = Renewer()
    first = renewer.register(m, m.acquire("first", ttl=300))  # type: ignore[arg-type]
    notified = _count_notifies(renewer)
    for i in range(2000):
        lease = m.acquire(f"k{i}", ttl=300)
        assert lease is not None
        renewer.register(m, lease).cancel()
        m.release(lease)
    assert notified == [0]  # each was due after the first lease: nothing to wake up for
    assert len(renewer) == 1
    assert len(renewer._heap) <= 2 * 1 + 65
    first.cancel()
    first.cancel()  # idempotent
    assert len(renewer) == 0


def test_a_lost_then_cancelled_lease_is_counted_out_once() -> None:
    m = MemoryLockManager()
    renewer = Renewer()
    lease = m.acquire("k", ttl=0.3)
    assert lease is not None
    handle = renewer.register(m, lease)
    m.held.clear()
    assert wait_for(lambda: handle.lost)
    handle.cancel()
    assert len(renewer) == 0


def test_short_lived_leases_do_not_wake_the_thread() -> None:
    # A task's lease is registered and cancelled long before its first renewal. Measured in a
    # worker: the thread woke once per task (it dropped the cancelled entry, went idle, and the
    # next registration found an empty heap and notified): a thread switch per task.
    m = MemoryLockManager()
    renewer = Renewer()
    count = _count_notifies(renewer)
    for i in range(100):
        lease = m.acquire(f"k{i}", ttl=300)
        assert lease is not None
        renewer.register(m, lease).cancel()
        time.sleep(0.002)  # the thread gets its turn, as it does during a task's I/O
        m.release(lease)
    assert count == [0]


def test_a_lease_due_before_the_threads_wait_ends_wakes_it() -> None:
    m = MemoryLockManager()
    renewer = Renewer()
    slow = m.acquire("slow", ttl=300)
    assert slow is not None
    renewer.register(m, slow)
    assert wait_for(lambda: renewer._wake_at > time.monotonic() + 60)  # asleep for ~100 s
    fast = m.acquire("fast", ttl=0.3)
    assert fast is not None
    handle = renewer.register(m, fast)
    assert wait_for(lambda: handle.lease.expires_at > fast.expires_at, timeout=2)
    time.sleep(0.5)
    assert m.is_locked("fast")
