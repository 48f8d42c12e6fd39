"""FileLockManager under concurrency: threads, fork, processes, SIGKILL, SIGSTOP, cleaner races."""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_lock import _fork
from celery_lock._types import Lease
from celery_lock.backends import _filerecord, _lockfiles, _notify
from celery_lock.backends._filerecord import file_name
from celery_lock.backends.file import FileLockManager
from tests._contention import ContentionResult, run_contention
from tests._workers import wait_for

ROOT = Path(__file__).resolve().parents[1]

#: A holder in its own interpreter: acquires, reports its lease as JSON, waits for a line on
#: stdin, then tries extend and release and reports what they returned.
HOLDER = """
import json, sys
from celery_lock.backends.file import FileLockManager
manager = FileLockManager(sys.argv[1])
lease = manager.acquire(sys.argv[2], ttl=float(sys.argv[3]))
print(json.dumps({"fence": lease.fence, "token": lease.token}), flush=True)
sys.stdin.readline()
extended = manager.extend(lease)
print(json.dumps({"extend": extended is not None, "release": manager.release(lease)}), flush=True)
"""


@pytest.fixture
def holder(lock_dir: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Holder processes started by the test; killed and reaped whatever happens."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)


def start_holder(
    procs: list[subprocess.Popen[str]], lock_dir: Path, key: str, ttl: float
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_dir), key, str(ttl)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    procs.append(proc)
    line = read_line(proc)
    assert line, "holder process died before acquiring"
    return proc, json.loads(line)


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """One line from ``proc``'s stdout, waiting at most ``timeout`` seconds for it."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from the holder within {timeout} s"
    return proc.stdout.readline()


# ------------------------------------------------------------------------------- threads


def test_threads_never_overlap_and_fences_increase(lock_dir: Path) -> None:
    # Two managers on one directory, four threads each: every operation opens a descriptor of
    # its own, so flock excludes threads of one manager as it excludes the two managers.
    managers = [FileLockManager(lock_dir), FileLockManager(lock_dir)]
    occupant: list[int | None] = [None]
    overlaps: list[int] = []
    fences: list[int] = []
    errors: list[str] = []
    deadline = time.monotonic() + 60

    def work(ident: int) -> None:
        manager = managers[ident % 2]
        for _ in range(200):
            if time.monotonic() > deadline:
                errors.append("deadline")
                return
            lease = manager.acquire("shared", mode="queue", timeout=20, ttl=30)
            if lease is None:
                errors.append("timed out")
                continue
            if occupant[0] is not None:
                overlaps.append(ident)
            occupant[0] = ident
            fences.append(lease.fence)
            time.sleep(0)  # let another thread run inside the critical section if it can
            if occupant[0] != ident:
                overlaps.append(ident)
            occupant[0] = None
            if not manager.release(lease):
                errors.append("release failed")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(thread.is_alive() for thread in threads)
    assert (overlaps, errors) == ([], [])
    assert len(fences) == 1600
    assert all(a < b for a, b in zip(fences, fences[1:]))


@pytest.mark.parametrize("managers", [1, 2], ids=["one manager", "two managers"])
def test_racing_threads_break_a_stale_lock_only_once(lock_dir: Path, managers: int) -> None:
    # Every decision, fresh or over a stale lock, is made under the file's exclusive flock;
    # threads of one manager open descriptors of their own, so flock excludes them too.
    pool = [FileLockManager(lock_dir) for _ in range(managers)]
    path = lock_dir / file_name("job")
    for round_ in range(30):
        stale = {"key": "job", "token": f"stale{round_}", "fence": 1, "expires": time.time() - 1}
        path.write_text(json.dumps(stale))
        barrier = threading.Barrier(8)
        winners: list[Lease] = []

        def race(ident: int) -> None:
            barrier.wait(10)
            lease = pool[ident % managers].acquire("job", ttl=30)
            if lease is not None:
                winners.append(lease)

        threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(winners) == 1, f"round {round_}: {len(winners)} winners"
        assert pool[0].release(winners[0])


# ---------------------------------------------------------------------------------- fork


def test_a_child_forked_inside_a_lock_operation_does_not_keep_the_file_busy(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The child shares the parent's open file description, flocked at the moment of the fork;
    # a close() alone would leave the flock to the child for as long as it lives.
    manager = FileLockManager(lock_dir)
    real_write = _filerecord.write
    children: list[int] = []

    def write_then_fork(*args: Any) -> bytes:
        written = real_write(*args)
        if not children:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child only keeps the descriptor a while
                time.sleep(5)
                os._exit(0)
            children.append(pid)
        return written

    monkeypatch.setattr(_filerecord, "write", write_then_fork)
    monkeypatch.setattr(_lockfiles, "BUSY_TIMEOUT", 1.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads around
            lease = manager.acquire("k")
        assert lease is not None and children
        monkeypatch.setattr(_filerecord, "write", real_write)
        other = FileLockManager(lock_dir)
        started = time.monotonic()
        assert other.acquire("k") is None  # held, and said so without waiting for the child
        assert manager.release(lease)
        again = other.acquire("k")
        assert again is not None and other.release(again)
        assert time.monotonic() - started < 0.5
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# ------------------------------------------------------------------------------ processes


def test_processes_never_overlap(lock_dir: Path, tmp_path: Path) -> None:
    result = run_contention(
        "tests.factories:file_manager",
        {"directory": str(lock_dir)},
        workdir=tmp_path / "work",
        processes=6,
        iterations=150,
    )
    assert result.errors == []
    assert result.overlaps == 0
    assert result.acquired == result.final_count == 900
    assert result.fences_increasing
    assert set(result.backends) == {"file"}


def test_sigkilled_holder_is_replaced_within_100_ms(
    lock_dir: Path, holder: list[subprocess.Popen[str]]
) -> None:
    proc, held = start_holder(holder, lock_dir, "job", ttl=300)
    manager = FileLockManager(lock_dir)
    assert manager.acquire("job") is None
    proc.kill()  # not reaped: the zombie must count as dead too
    killed = time.monotonic()
    lease = None
    for _ in range(2000):
        lease = manager.acquire("job")
        if lease is not None or time.monotonic() - killed > 2:
            break
        time.sleep(0.001)
    recovered = time.monotonic() - killed
    assert lease is not None
    assert recovered < 0.1, f"took {recovered * 1000:.1f} ms"
    assert lease.fence > held["fence"]


def test_holder_paused_past_its_ttl_loses_the_lock(
    lock_dir: Path, holder: list[subprocess.Popen[str]]
) -> None:
    proc, held = start_holder(holder, lock_dir, "job", ttl=0.3)
    manager = FileLockManager(lock_dir)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert manager.acquire("job") is None  # a stopped process is alive
        deadline = time.monotonic() + 5
        lease = None
        for _ in range(1000):
            lease = manager.acquire("job", ttl=30)
            if lease is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert lease is not None
        assert lease.fence > held["fence"]
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert json.loads(read_line(proc)) == {"extend": False, "release": False}
    assert proc.wait(timeout=10) == 0
    info = manager.inspect("job")
    assert info is not None
    assert (info.token_prefix, info.fence) == (lease.token[:8], lease.fence)
    assert manager.release(lease)


def test_cleaner_racing_live_locks_never_removes_one(lock_dir: Path, tmp_path: Path) -> None:
    # Contender processes hammer one key (occupancy marker + counter); here, one thread keeps
    # planting locks that expire at once (on the contended key, so contenders and the cleaner
    # race to break them, and on a side key) while the main thread cleans without pause. A
    # cleaner that deleted a live lock would let two contenders in (overlap) or make a
    # holder's release return False (an error).
    planter, cleaner = FileLockManager(lock_dir), FileLockManager(lock_dir)
    outcome: dict[str, ContentionResult] = {}
    done = threading.Event()

    def contend() -> None:
        try:
            outcome["result"] = run_contention(
                "tests.factories:file_manager",
                {"directory": str(lock_dir)},
                workdir=tmp_path / "work",
                processes=3,
                iterations=100,
            )
        finally:
            done.set()

    def plant() -> None:
        for _ in range(20_000):
            if done.is_set():
                return
            planter.acquire("contended", ttl=0.001)
            planter.acquire("side", ttl=0.001)
            time.sleep(0.02)

    threads = [threading.Thread(target=contend), threading.Thread(target=plant)]
    for thread in threads:
        thread.start()
    removed = errors = passes = 0
    deadline = time.monotonic() + 120
    while not done.is_set() and time.monotonic() < deadline:
        report = cleaner.clean()
        removed += report.removed
        errors += report.errors
        passes += 1
        time.sleep(0.001)
    for thread in threads:
        thread.join(30)
    result = outcome["result"]
    assert result.errors == []
    assert result.overlaps == 0
    assert result.acquired == result.final_count == 300
    assert result.fences_increasing
    assert errors == 0
    assert passes > 10 and removed > 0  # the cleaner really ran, and really removed locks


# ------------------------------------------------------------------------------ QUEUE wake-ups


def _handoff_seconds(lock_dir: Path, *, same_manager: bool = False) -> float:
    """Seconds from a release in one thread to a QUEUE waiter (of another manager, as in
    another process, unless ``same_manager``) holding it."""
    holder = FileLockManager(lock_dir)
    waiting = holder if same_manager else FileLockManager(lock_dir)
    waiting.poll_min = waiting.poll_max = 3.0  # type: ignore[misc] # polls too slow to matter
    lease = holder.acquire("job", ttl=30)
    assert lease is not None
    released: list[float] = []
    waiting_now = threading.Event()
    make_waiter = waiting._waiter

    def spied_waiter(key: str) -> Any:
        waiter = make_waiter(key)
        real_wait = waiter.wait

        def wait(seconds: float) -> bool:
            waiting_now.set()  # tried once, now waiting: the release must wake (or be polled)
            return real_wait(seconds)

        waiter.wait = wait  # type: ignore[method-assign]
        return waiter

    waiting._waiter = spied_waiter  # type: ignore[method-assign]

    def release_later() -> None:
        assert waiting_now.wait(10)
        assert holder.release(lease)  # type: ignore[arg-type]
        released.append(time.monotonic())

    thread = threading.Thread(target=release_later)
    thread.start()
    got = waiting.acquire("job", mode="queue", timeout=10, ttl=30)
    acquired = time.monotonic()
    thread.join(10)
    assert got is not None and waiting.release(got)
    return acquired - released[0]


def test_queue_waiter_is_woken_by_the_release(lock_dir: Path) -> None:
    if _notify._binding() is None:  # pragma: no cover - every Linux libc has inotify
        pytest.fail("no inotify in libc")
    assert _handoff_seconds(lock_dir) < 1.0  # not after the 1.5-3 s poll


def test_queue_waiter_polls_without_inotify(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_notify, "inotify", None)
    assert 1.0 < _handoff_seconds(lock_dir) < 5.0  # the (slow) poll took it


def test_a_release_in_this_process_hands_over_at_once_without_inotify(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where there is no inotify (macOS), the release sets the line's wake event: the waiter of
    # this process does not wait for its (here 3 s) poll.
    monkeypatch.setattr(_notify, "inotify", None)
    assert _handoff_seconds(lock_dir, same_manager=True) < 1.0


@pytest.mark.parametrize("fails", ["init", "add_watch"])
def test_queue_waiter_polls_when_inotify_refuses(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    real_init, real_add = _notify._binding()  # type: ignore[misc]
    monkeypatch.setattr(
        _notify,
        "inotify",
        (
            (lambda flags: -1) if fails == "init" else real_init,  # EMFILE: too many instances
            (lambda fd, path, mask: -1) if fails == "add_watch" else real_add,
        ),
    )
    manager = FileLockManager(lock_dir)
    assert manager._watches.take() == -1
    manager.poll_min = manager.poll_max = 0.01  # type: ignore[misc]
    lease = manager.acquire("job")
    assert lease is not None
    assert manager.acquire("job", mode="queue", timeout=0.1) is None  # polled, gave up
    assert manager.release(lease)


def test_inotify_instances_are_kept_drained_and_not_shared_with_a_child(
    lock_dir: Path,
) -> None:
    manager = FileLockManager(lock_dir)
    watches = manager._watches
    waiter = manager._waiter("job")
    fd = waiter._fd  # type: ignore[attr-defined]
    assert fd >= 0
    waiter.close()
    assert watches.idle == [fd]  # kept: closing one costs an RCU grace period
    other = manager.acquire("job")  # writes the file: an event queued on the idle instance
    assert other is not None
    again = manager._waiter("job")
    assert again._fd == fd  # type: ignore[attr-defined]
    assert again.wait(0.05) is False  # the old event was drained, not taken for a release
    assert manager.release(other)
    assert again.wait(1.0) is True  # this release is news
    again.close()
    extra = [watches.take() for _ in range(_Watches_keep() + 2)]
    for taken in extra:
        watches.give(taken)
    assert len(watches.idle) == _Watches_keep()

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            inherited = list(watches.idle)
            reused = os.dup2(read_end, inherited[0])  # as if the child reused the number
            child_fd = watches.take()
            fresh = watches.idle == [] and watches.generation == _fork.generation()
            os.fstat(reused)  # not closed: it is no inotify instance any more
            code = 0 if fresh and child_fd >= 0 else 1
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"\x00"
    os.close(read_end)
    os.close(write_end)
    assert len(watches.idle) == _Watches_keep()  # the parent's are untouched and still work
    waiter = manager._waiter("job")
    assert waiter._fd in extra  # type: ignore[attr-defined]
    lease = manager.acquire("job")
    assert lease is not None and manager.release(lease)
    assert waiter.wait(1.0) is True
    waiter.close()


def _Watches_keep() -> int:  # noqa: N802 - reads the class constant
    return int(_notify.Watches.KEEP)


def test_inotify_overflow_counts_as_a_wake_up(lock_dir: Path) -> None:
    waiter = FileLockManager(lock_dir)._waiter("job")
    name = file_name("job").encode()
    other = struct.pack("iIII", 1, 0x2, 0, 16) + b"other.lock".ljust(16, b"\0")
    ours = struct.pack("iIII", 1, 0x2, 0, 48) + name.ljust(48, b"\0")
    overflow = struct.pack("iIII", -1, 0x4000, 0, 0)
    assert waiter._mentions_us(other) is False  # type: ignore[attr-defined]
    assert waiter._mentions_us(other + ours) is True  # type: ignore[attr-defined]
    assert waiter._mentions_us(overflow) is True  # type: ignore[attr-defined]
    waiter.close()


# ------------------------------------------------------------------------------ waiting in line


def _in_line(manager: FileLockManager, key: str, count: int) -> None:
    """Wait until ``count`` threads stand in ``key``'s line (their first attempt failed)."""
    wait_for(
        lambda: len(manager._lines._lines.get(key, _EMPTY).tickets) == count,
        what=f"{count} waiters in line",
    )


class _Empty:
    tickets: tuple[()] = ()


_EMPTY = _Empty()


def _count_attempts(monkeypatch: pytest.MonkeyPatch, manager: FileLockManager) -> list[int]:
    attempts = [0]
    real = manager._try_acquire

    def counted(*args: Any) -> Lease | None:
        attempts[0] += 1
        return real(*args)

    monkeypatch.setattr(manager, "_try_acquire", counted)
    return attempts


def test_many_threads_on_one_key_wait_in_line(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # filelock's stress test, scaled down: 50 threads x 20 cycles on one key. Issue 14 item 6:
    # every waiter woke on every release and tried the file (17 attempts a cycle here, minutes
    # for 100 x 100). In line, the first try of each call plus the leader's wake-ups remain.
    manager = FileLockManager(lock_dir)
    attempts = _count_attempts(monkeypatch, manager)
    occupant: list[int | None] = [None]
    overlaps: list[int] = []
    fences: list[int] = []
    errors: list[str] = []
    deadline = time.monotonic() + 60

    def work(ident: int) -> None:
        for _ in range(20):
            if time.monotonic() > deadline:
                errors.append("deadline")
                return
            lease = manager.acquire("herd", mode="queue", timeout=30, ttl=30)
            if lease is None:
                errors.append("timed out")
                continue
            if occupant[0] is not None:
                overlaps.append(ident)
            occupant[0] = ident
            fences.append(lease.fence)
            time.sleep(0)  # let the others run while we hold it
            if occupant[0] != ident:
                overlaps.append(ident)
            occupant[0] = None
            if not manager.release(lease):
                errors.append("release failed")

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    took = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads)
    assert (overlaps, errors) == ([], [])
    assert len(fences) == 1000
    assert all(a < b for a, b in zip(fences, fences[1:]))
    assert attempts[0] / 1000 < 8, f"{attempts[0] / 1000:.1f} attempts a cycle: a herd"
    assert took < 60


def test_a_release_wakes_one_waiter_not_all(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = FileLockManager(lock_dir)
    manager.poll_min = manager.poll_max = 3.0  # type: ignore[misc] # no poll in the window
    lease = manager.acquire("k", ttl=30)
    assert lease is not None
    attempts = [0]
    #: (fence, attempts made by anybody until this waiter held the lock)
    got: list[tuple[int, int]] = []

    def wait() -> None:
        mine = manager.acquire("k", mode="queue", timeout=30)
        assert mine is not None
        got.append((mine.fence, attempts[0]))
        assert manager.release(mine)

    threads = [threading.Thread(target=wait) for _ in range(20)]
    for thread in threads:
        thread.start()
    _in_line(manager, "k", 20)
    attempts = _count_attempts(monkeypatch, manager)
    assert manager.release(lease)
    for thread in threads:
        thread.join(30)
    assert len(got) == 20
    # Up to the first hand-over: the leader's attempt (perhaps two, the release's write and a
    # late event), not one by each of the 20 waiters.
    assert got[0][1] <= 3, got[0]
    # Every later hand-over wakes the next leader and it tries: about two attempts a turn.
    assert got[-1][1] <= 20 * 4, got[-1]


def test_a_waiter_whose_time_runs_out_leaves_the_line_and_nobody_loses_a_turn(
    lock_dir: Path,
) -> None:
    manager = FileLockManager(lock_dir)
    lease = manager.acquire("k", ttl=30)
    assert lease is not None
    results: dict[str, Lease | None] = {}
    done = {name: threading.Event() for name in "abcde"}

    def wait(name: str, timeout: float) -> threading.Thread:
        def run() -> None:
            results[name] = manager.acquire("k", mode="queue", timeout=timeout, ttl=30)
            done[name].set()

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    # The middle of the line gives up: the ones before and after it keep their places.
    threads = [wait("a", 30)]
    _in_line(manager, "k", 1)
    threads.append(wait("b", 0.3))
    _in_line(manager, "k", 2)
    threads.append(wait("c", 30))
    _in_line(manager, "k", 3)
    assert done["b"].wait(10) and results["b"] is None
    _in_line(manager, "k", 2)
    assert manager.release(lease)
    assert done["a"].wait(10) and results["a"] is not None
    assert not done["c"].is_set()  # c waits for a's lease
    assert manager.release(results["a"])
    assert done["c"].wait(10) and results["c"] is not None

    # The leader gives up: the next one leads at once and gets the lock on the next release.
    threads.append(wait("d", 0.3))
    _in_line(manager, "k", 1)
    threads.append(wait("e", 30))
    _in_line(manager, "k", 2)
    assert done["d"].wait(10) and results["d"] is None
    released = time.monotonic()
    assert manager.release(results["c"])
    assert done["e"].wait(10) and results["e"] is not None
    assert time.monotonic() - released < 5
    assert manager.release(results["e"])
    for thread in threads:
        thread.join(10)


def test_a_forked_child_does_not_stand_in_its_parents_lines(lock_dir: Path) -> None:
    manager = FileLockManager(lock_dir)
    lease = manager.acquire("k", ttl=30)
    assert lease is not None
    waiter = threading.Thread(target=lambda: manager.acquire("k", mode="queue", timeout=30))
    waiter.start()
    _in_line(manager, "k", 1)
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads around
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            # The parent's waiting thread does not exist here: were its ticket inherited, we
            # would queue behind it for ever. We lead our own line at once.
            _line, ticket = manager._lines.join("k")
            code = 0 if ticket.is_set() else 1
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"\x00"
    os.close(read_end)
    os.close(write_end)
    assert manager.release(lease)
    waiter.join(10)
    assert not waiter.is_alive()
