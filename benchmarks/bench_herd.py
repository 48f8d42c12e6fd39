"""Thundering herd on one file lock: T threads x C acquire+release cycles on one key.

filelock's own stress test (``test_threaded_shared_lock_obj``: 100 threads x 100 cycles of
``with lock: assert lock.is_locked`` on one shared ``FileLock``), run in the same process
against ``FileLockManager.acquire(key, mode="queue")``, ``is_locked(key)``, ``release`` on one
shared manager. Prints both wall times and their ratio, plus the number of times two holders
overlapped (must be 0). Every run is bounded: a side that has not finished after ``--limit``
seconds is reported as such with the cycles it completed.

``--body`` is what a holder does: ``is_locked`` (as filelock's test), ``yield`` (``sleep(0)``:
the other threads run while the lock is held, the worst case for a herd) or ``none``.

    python -m benchmarks.bench_herd [--threads 100] [--cycles 100] [--rounds 3] [--limit 120]
                                    [--body is_locked|yield|none]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path


class Outcome:
    """What one herd run did: wall seconds, cycles completed, overlaps seen, errors."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cycles = 0
        self.overlaps = 0
        self.errors: list[str] = []
        self.finished = False


def herd(
    make_cycle: Callable[[], Callable[[Callable[[], None]], bool]],
    threads: int,
    cycles: int,
    limit: float,
) -> Outcome:
    """Run ``threads`` threads doing ``cycles`` cycles each; ``make_cycle()`` returns, per
    thread, a function that takes the lock, calls its argument while holding it, releases it
    and returns whether it got the lock."""
    out = Outcome()
    count = threading.Lock()
    holders = [0]
    deadline = time.monotonic() + limit
    start = threading.Barrier(threads + 1)

    def inside() -> None:
        # Overlap detector: two holders at once would see each other's mark.
        holders[0] += 1
        if holders[0] != 1:
            out.overlaps += 1
        holders[0] -= 1

    def work() -> None:
        cycle = make_cycle()
        start.wait(30)
        for _ in range(cycles):
            if time.monotonic() > deadline:
                return
            try:
                got = cycle(inside)
            except Exception as exc:
                out.errors.append(repr(exc))
                return
            if not got:
                out.errors.append("timed out")
                continue
            with count:
                out.cycles += 1

    pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    start.wait(30)
    started = time.perf_counter()
    for thread in pool:
        thread.join(max(0.0, deadline - time.monotonic()) + 5)
    out.seconds = time.perf_counter() - started
    out.finished = out.cycles == threads * cycles
    return out


def ours(
    directory: Path, limit: float, body: str
) -> Callable[[], Callable[[Callable[[], None]], bool]]:
    from celery_lock import FileLockManager

    manager = FileLockManager(directory)

    def make() -> Callable[[Callable[[], None]], bool]:
        def cycle(inside: Callable[[], None]) -> bool:
            lease = manager.acquire("herd", mode="queue", timeout=limit, ttl=60)
            if lease is None:
                return False
            try:
                inside()
                if body == "is_locked":
                    assert manager.is_locked("herd")
                elif body == "yield":
                    time.sleep(0)
            finally:
                manager.release(lease)
            return True

        return cycle

    return make


def theirs(directory: Path, body: str) -> Callable[[], Callable[[Callable[[], None]], bool]]:
    import filelock

    directory.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(directory / "herd.lock"))  # one object, as in filelock's test

    def make() -> Callable[[Callable[[], None]], bool]:
        def cycle(inside: Callable[[], None]) -> bool:
            with lock:
                inside()
                if body == "is_locked":
                    assert lock.is_locked
                elif body == "yield":
                    time.sleep(0)
            return True

        return cycle

    return make


def describe(name: str, out: Outcome, total: int) -> str:
    state = "" if out.finished else f"  (NOT finished: {out.cycles}/{total} cycles)"
    per = out.seconds / out.cycles * 1000 if out.cycles else float("nan")
    return (
        f"{name:24} {out.seconds:8.2f} s {per:8.3f} ms/cycle  overlaps {out.overlaps}"
        f"  errors {len(out.errors)}{state}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=100)
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=float, default=120.0, help="seconds per run, at most")
    parser.add_argument("--body", choices=("is_locked", "yield", "none"), default="is_locked")
    args = parser.parse_args()
    total = args.threads * args.cycles
    times: dict[str, list[float]] = {"FileLockManager": [], "filelock FileLock": []}
    print(
        f"{args.threads} threads x {args.cycles} cycles on one key, body {args.body}, "
        f"{args.rounds} rounds"
    )
    with tempfile.TemporaryDirectory(prefix="celery_lock-herd-") as tmp:
        for round_no in range(args.rounds):  # interleaved so drift hits both sides
            for name, make in (
                ("FileLockManager", ours(Path(tmp, f"ours{round_no}"), args.limit, args.body)),
                ("filelock FileLock", theirs(Path(tmp, f"theirs{round_no}"), args.body)),
            ):
                out = herd(make, args.threads, args.cycles, args.limit)
                print(describe(name, out, total))
                times[name].append(out.seconds if out.finished else float("inf"))
    med = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"\nmedian: FileLockManager {med['FileLockManager']:.2f} s, "
        f"filelock {med['filelock FileLock']:.2f} s, "
        f"ratio {med['FileLockManager'] / med['filelock FileLock']:.2f}x (target <= 3)"
    )


if __name__ == "__main__":
    main()
