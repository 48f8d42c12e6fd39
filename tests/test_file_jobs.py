"""FileLockManager job API: claim / finish / remove_waiter / waiting, reservations, hand-off."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from celery_lock.backends._filerecord import file_name
from celery_lock.backends._jobstate import done_name
from celery_lock.backends.file import FileLockManager

KEY = "job-key"


class Recorder:
    """A hand-off callback that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bytes]] = []

    def __call__(self, key: str, task_id: str, payload: bytes) -> None:
        self.calls.append((key, task_id, payload))

    @property
    def ids(self) -> list[str]:
        return [task_id for _, task_id, _ in self.calls]


@pytest.fixture
def manager(lock_dir: Path) -> FileLockManager:
    return FileLockManager(lock_dir, default_ttl=30)


@pytest.fixture
def handed(manager: FileLockManager) -> Recorder:
    recorder = Recorder()
    manager.set_handoff(recorder)
    return recorder


def state_path(manager: FileLockManager, key: str = KEY) -> Path:
    return manager.directory / (file_name(key)[:-5] + ".jobs")


def lock_record(manager: FileLockManager, key: str = KEY) -> dict[str, Any]:
    record = json.loads((manager.directory / file_name(key)).read_bytes())
    assert isinstance(record, dict)
    return record


def held_by(manager: FileLockManager, task_id: str, key: str = KEY) -> Any:
    claim = manager.claim(key, task_id=task_id)
    assert claim.outcome == "granted", claim
    return claim.lease


# ------------------------------------------------------------------------------ outcomes


def test_a_free_key_is_granted_with_the_task_id_on_the_lease(manager: FileLockManager) -> None:
    """A claim of a free key grants it like acquire; the lease names the job."""
    claim = manager.claim(KEY, task_id="a", task_name="t.a")
    assert claim.outcome == "granted" and claim.lease is not None
    assert claim.lease.task_id == "a" and claim.lease.pid == os.getpid()
    info = manager.inspect(KEY)
    assert info is not None and (info.task_id, info.task_name) == ("a", "t.a")
    assert not state_path(manager).exists()  # no job state for an uncontended claim


def test_held_and_queued_name_the_holder(manager: FileLockManager, handed: Recorder) -> None:
    """Without a payload the claim says held; with one it joins the FIFO line once."""
    held_by(manager, "a")
    assert manager.claim(KEY, task_id="b") == type(manager.claim(KEY, task_id="b"))(
        "held", None, "a"
    )
    assert manager.claim(KEY, task_id="b", waiter=b"1").outcome == "queued"
    assert manager.claim(KEY, task_id="c", waiter=b"c").holder_task_id == "a"
    assert manager.claim(KEY, task_id="b", waiter=b"2").outcome == "queued"  # payload replaced
    assert manager.waiting(KEY) == ["b", "c"]
    assert handed.calls == []


def test_finish_marks_done_and_hands_off_in_fifo_order(
    manager: FileLockManager, handed: Recorder
) -> None:
    """finish writes the done marker and reserves the key for the first waiter only."""
    lease = held_by(manager, "a")
    manager.claim(KEY, task_id="b", waiter=b"B")
    manager.claim(KEY, task_id="c", waiter=b"C")
    assert manager.finish(lease)
    assert handed.calls == [(KEY, "b", b"B")]
    assert manager.claim(KEY, task_id="a").outcome == "finished"
    # Reserved for b: others see it held by b, plain acquire too; inspect shows b.
    assert manager.claim(KEY, task_id="z") == type(manager.claim(KEY, task_id="z"))(
        "held", None, "b"
    )
    assert manager.acquire(KEY) is None
    info = manager.inspect(KEY)
    assert info is not None and info.task_id == "b" and info.token_prefix is None
    assert [i.task_id for i in manager.iter_locks()] == ["b"]
    lease_b = held_by(manager, "b")
    assert lease_b.fence > lease.fence
    assert manager.waiting(KEY) == ["c"]
    assert manager.release(lease_b)
    assert handed.ids == ["b", "c"]
    assert manager.finish(held_by(manager, "c"), mark=False)
    assert handed.ids == ["b", "c"] and manager.inspect(KEY) is None
    assert manager.claim(KEY, task_id="c").outcome == "granted"  # mark=False: no marker


def test_finish_without_mark_still_marks_when_copies_wait(
    manager: FileLockManager, handed: Recorder
) -> None:
    """A copy of the finished job in the line is removed and the job is marked done."""
    lease = held_by(manager, "a")
    manager.claim(KEY, task_id="a", waiter=b"copy")
    manager.claim(KEY, task_id="b", waiter=b"B")
    assert manager.finish(lease, mark=False)
    assert handed.ids == ["b"] and manager.waiting(KEY) == []
    assert manager.claim(KEY, task_id="a").outcome == "finished"


def test_finish_of_a_lease_that_is_not_ours_changes_nothing(
    manager: FileLockManager, handed: Recorder
) -> None:
    lease = held_by(manager, "a")
    assert manager.release(lease)
    other = held_by(manager, "b")
    manager.claim(KEY, task_id="c", waiter=b"C")
    assert not manager.finish(lease)
    assert handed.calls == []
    assert manager.inspect(KEY).task_id == "b"  # type: ignore[union-attr]
    assert manager.release(other) and handed.ids == ["c"]


def test_done_marker_and_line_expire(manager: FileLockManager, handed: Recorder) -> None:
    """Done markers live done_ttl; a line lives done_ttl after its last write."""
    lease = held_by(manager, "a")
    manager.claim(KEY, task_id="b", waiter=b"B", done_ttl=0.2)
    assert manager.finish(lease, done_ttl=0.2)
    assert handed.ids == ["b"]
    manager.remove_waiter(KEY, "b")  # b gives its turn up: nobody else waits
    assert manager.inspect(KEY) is None
    assert manager.claim(KEY, task_id="a").outcome == "finished"
    lease = held_by(manager, "x")
    manager.claim(KEY, task_id="y", waiter=b"Y", done_ttl=0.2)
    time.sleep(0.3)
    assert manager.waiting(KEY) == []
    assert manager.claim(KEY, task_id="a").outcome != "finished"
    assert manager.release(lease) and handed.ids == ["b"]  # y's line expired: no hand-off


def test_clean_drops_expired_job_state(manager: FileLockManager) -> None:
    lease = held_by(manager, "a")
    assert manager.finish(lease, done_ttl=0.1)
    assert (manager.directory / done_name(file_name(KEY), "a")).exists()
    time.sleep(0.2)
    manager.clean()
    assert sorted(p.name for p in manager.directory.iterdir() if not p.name.startswith(".")) == []


def test_clean_removes_stale_temp_and_unreadable_state_files_and_expired_lines(
    manager: FileLockManager,
) -> None:
    """Leftovers of a writer that died mid-replace (temp files), state files nobody can read
    (after the grace) and a line whose waiters all expired: the cleaner removes them all and
    keeps fresh ones."""
    lease = held_by(manager, "a")
    manager.claim(KEY, task_id="b", waiter=b"B", done_ttl=0.05)
    stem = file_name(KEY)[:-5]
    directory = manager.directory
    temp = directory / f"{stem}.jobs.{'0' * 16}.tmp"
    unreadable = directory / f"{stem}.{'1' * 16}.done"
    fresh = directory / f"{stem}.{'2' * 16}.done"
    for path in (temp, unreadable, fresh):
        path.write_text("not a state file")
    old = time.time() - 60
    for path in (temp, unreadable):
        os.utime(path, (old, old))
    time.sleep(0.1)  # b's place in line (done_ttl 50 ms) expires: the expiry is under test
    manager.clean()
    assert not temp.exists() and not unreadable.exists()
    assert fresh.exists()  # unreadable, but within the grace: a writer may be at work
    assert manager.waiting(KEY) == []
    assert not (directory / f"{stem}.jobs").exists()
    assert manager.release(lease)


# ---------------------------------------------------------------------------- reservations


def test_a_reservation_expires_and_a_newcomer_takes_the_key(
    manager: FileLockManager, handed: Recorder
) -> None:
    """Reserved for reserve_ttl only; then the key is free, the line stays for later."""
    manager.reserve_ttl = 0.2  # type: ignore[misc]
    lease = held_by(manager, "a")
    manager.claim(KEY, task_id="b", waiter=b"B")
    manager.claim(KEY, task_id="c", waiter=b"C")
    assert manager.release(lease)
    assert manager.acquire(KEY) is None  # plain acquire respects the reservation
    time.sleep(0.3)
    plain = manager.acquire(KEY)
    assert plain is not None
    assert manager.waiting(KEY) == ["c"]
    assert manager.release(plain)  # the line matters at release time
    assert handed.ids == ["b", "c"]


def test_remove_waiter(manager: FileLockManager, handed: Recorder) -> None:
    """Leaving the line; giving up a reservation hands the key on."""
    lease = held_by(manager, "a")
    for task in "bcd":
        manager.claim(KEY, task_id=task, waiter=task.encode())
    assert manager.remove_waiter(KEY, "c") and manager.waiting(KEY) == ["b", "d"]
    assert not manager.remove_waiter(KEY, "c")
    assert not manager.remove_waiter("other", "c")
    assert manager.release(lease) and handed.ids == ["b"]
    assert manager.remove_waiter(KEY, "b")  # reserved for b: goes to d
    assert handed.ids == ["b", "d"] and manager.inspect(KEY).task_id == "d"  # type: ignore[union-attr]
    assert manager.remove_waiter(KEY, "d") and manager.inspect(KEY) is None
    assert held_by(manager, "e")


# ------------------------------------------------------------------------ other end paths


def test_break_lock_hands_off(manager: FileLockManager, handed: Recorder) -> None:
    held_by(manager, "a")
    manager.claim(KEY, task_id="b", waiter=b"B")
    assert manager.break_lock(KEY, task_id="a")
    assert handed.ids == ["b"] and manager.inspect(KEY).task_id == "b"  # type: ignore[union-attr]


def test_clean_of_an_expired_holder_hands_off(manager: FileLockManager, handed: Recorder) -> None:
    manager.claim(KEY, task_id="a", ttl=0.1)
    manager.claim(KEY, task_id="b", waiter=b"B")
    time.sleep(0.2)
    report = manager.clean()
    assert report.removed == 1
    assert handed.ids == ["b"] and manager.inspect(KEY).task_id == "b"  # type: ignore[union-attr]


def _claim_and_hold(directory: str, ready: Any, go: Any) -> None:
    child = FileLockManager(directory)
    assert child.claim(KEY, task_id="a").outcome == "granted"
    ready.set()
    go.wait(10)
    os._exit(0)  # dies holding the lock


@pytest.mark.parametrize("how", ["acquire", "claim", "break"])
def test_a_dead_holder_ends_like_a_release(
    manager: FileLockManager, handed: Recorder, how: str
) -> None:
    """Dead-holder breaking hands the key to the line, not to whoever found the corpse."""
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_claim_and_hold, args=(str(manager.directory), ready, go))
    proc.start()
    assert ready.wait(10)
    assert manager.claim(KEY, task_id="b", waiter=b"B").outcome == "queued"
    go.set()
    proc.join(10)
    if how == "acquire":
        assert manager.acquire(KEY) is None
    elif how == "claim":
        assert manager.claim(KEY, task_id="z", waiter=b"Z") == type(
            manager.claim(KEY, task_id="q")
        )("queued", None, "b")
    else:
        assert manager.break_lock(KEY, only_if_dead=True)
    assert handed.ids == ["b"]
    assert held_by(manager, "b")


# ------------------------------------------------------------------------ hostile state


@pytest.mark.parametrize(
    "kind", ["garbage", "symlink", "hardlink", "fifo", "wrong-key", "done-link"]
)
def test_planted_state_files_are_ignored_and_never_written_through(
    manager: FileLockManager, handed: Recorder, tmp_path: Path, kind: str
) -> None:
    path = state_path(manager)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    if kind == "garbage":
        path.write_bytes(b"\x00not json{")
    elif kind == "symlink":
        path.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "done-link":
        (manager.directory / done_name(file_name(KEY), "a")).symlink_to(victim)
    else:
        path.write_text(
            json.dumps({"v": 1, "key": "other", "line": [["x", ""]], "line_expires": 9e18})
        )
        done = manager.directory / done_name(file_name(KEY), "a")
        done.write_text(json.dumps({"v": 1, "key": "other", "task_id": "a", "expires": 9e18}))
    assert manager.waiting(KEY) == []
    lease = held_by(manager, "a")  # a planted done marker of another key does not count
    assert manager.claim(KEY, task_id="b", waiter=b"B").outcome == "queued"
    assert manager.waiting(KEY) == ["b"]
    assert manager.finish(lease)
    assert handed.ids == ["b"]
    assert victim.read_bytes() == b"precious"


def test_state_files_are_not_locks(manager: FileLockManager) -> None:
    lease = held_by(manager, "a")
    manager.claim(KEY, task_id="b", waiter=b"B")
    assert [i.key for i in manager.iter_locks()] == [KEY]
    assert manager.release(lease)
    assert [(i.key, i.task_id) for i in manager.iter_locks()] == [(KEY, "b")]


# ---------------------------------------------------------------------------- processes


def _queue_one(directory: str, task_id: str, out: Any) -> None:
    out.put(FileLockManager(directory).claim(KEY, task_id=task_id, waiter=task_id.encode()).outcome)


def test_fifo_order_across_processes(manager: FileLockManager, handed: Recorder) -> None:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    lease = held_by(manager, "holder")
    order = [f"w{i}" for i in range(6)]
    for task_id in order:
        proc = ctx.Process(target=_queue_one, args=(str(manager.directory), task_id, out))
        proc.start()
        proc.join(10)
        assert out.get(timeout=10) == "queued"
    assert manager.waiting(KEY) == order
    assert manager.finish(lease)
    for task_id in order:
        assert manager.finish(held_by(manager, task_id))
    assert handed.ids == order


def _worker(directory: str, worker: int, jobs: int) -> None:
    base = Path(directory).parent
    manager = FileLockManager(directory)

    def wake(key: str, task_id: str, payload: bytes) -> None:
        fd = os.open(base / "handoffs.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, task_id.encode() + b"\n")
        os.close(fd)
        (base / f"wake-{task_id}").touch()

    manager.set_handoff(wake)
    for job in range(jobs):
        task_id = f"t{worker}-{job}"
        claim = manager.claim(KEY, task_id=task_id, waiter=b"payload")
        if claim.outcome == "queued":
            deadline = time.monotonic() + 20
            while not (base / f"wake-{task_id}").exists():
                assert time.monotonic() < deadline, f"{task_id} never handed off"
                time.sleep(0.002)
            claim = manager.claim(KEY, task_id=task_id, waiter=b"payload")
        assert claim.outcome == "granted", (task_id, claim)
        marker = os.open(base / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # overlap check
        os.close(marker)
        fd = os.open(base / "ran.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{task_id} {int(claim.lease is not None)}\n".encode())
        os.close(fd)
        time.sleep(0.001)
        os.unlink(base / "inside")
        assert claim.lease is not None and manager.finish(claim.lease)
    os._exit(0)


def test_processes_never_overlap_and_each_waiter_is_handed_off_once(
    manager: FileLockManager, tmp_path: Path
) -> None:
    ctx = multiprocessing.get_context("fork")
    workers, jobs = 6, 25
    procs = [
        ctx.Process(target=_worker, args=(str(manager.directory), w, jobs)) for w in range(workers)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0] * workers
    ran = (tmp_path / "ran.log").read_text().split()[::2]
    assert sorted(ran) == sorted(f"t{w}-{j}" for w in range(workers) for j in range(jobs))
    handoffs = (
        (tmp_path / "handoffs.log").read_text().split()
        if (tmp_path / "handoffs.log").exists()
        else []
    )
    woken = {p.name[5:] for p in tmp_path.glob("wake-*")}
    assert handoffs, "no contention: the test proved nothing"
    assert len(handoffs) == len(set(handoffs)) == len(woken)  # each exactly once
    assert manager.waiting(KEY) == [] and manager.inspect(KEY) is None
