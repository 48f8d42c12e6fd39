"""File-backend job API benchmark: uncontended claim+finish and acquire+release cycles against
``filelock.FileLock``, measured in the same run.

    python -m benchmarks.bench_file_jobs [--seconds 1.0] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from benchmarks.bench_locks import rate


def cycles(lock_dir: Path) -> dict[str, Callable[[], None]]:
    import filelock

    from celery_lock import FileLockManager

    flm = FileLockManager(lock_dir / "ours")

    def acquire_release() -> None:
        lease = flm.acquire("k")
        assert lease is not None
        assert flm.release(lease)

    def claim_finish_nomark() -> None:
        claim = flm.claim("j", task_id="t")
        assert claim.lease is not None
        assert flm.finish(claim.lease, mark=False)

    def claim_finish() -> None:
        # A new task id per cycle (as Celery has): the done marker is written every time.
        claim = flm.claim("m", task_id=uuid.uuid4().hex)
        assert claim.lease is not None
        assert flm.finish(claim.lease)

    fl = filelock.FileLock(str(lock_dir / "filelock.lock"))

    def flk() -> None:
        fl.acquire(timeout=0)
        fl.release()

    return {
        "FileLockManager acquire+release": acquire_release,
        "FileLockManager claim+finish(mark=False)": claim_finish_nomark,
        "FileLockManager claim+finish": claim_finish,
        "filelock FileLock": flk,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per sample")
    parser.add_argument("--rounds", type=int, default=5, help="samples per implementation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="celery_lock-bench-") as tmp:
        impls = cycles(Path(tmp))
        samples: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.rounds):  # interleaved so drift hits every implementation
            for name, cycle in impls.items():
                samples[name].append(rate(cycle, args.seconds))
        med = {name: statistics.median(v) for name, v in samples.items()}
        flk = med["filelock FileLock"]
        print(f"\nuncontended cycles, median of {args.rounds} x {args.seconds:g} s")
        print(f"{'implementation':42} {'ops/s':>9} {'us/op':>8} {'vs filelock':>11}")
        for name, value in med.items():
            print(f"{name:42} {value:9.0f} {1e6 / value:8.1f} {value / flk:11.2f}")


if __name__ == "__main__":
    main()
