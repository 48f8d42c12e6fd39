"""QUEUE mode under contention: N calls of one QUEUE task on one key, each holding it H seconds.

Issue 11's scenario. Per run: a private redis-server on a free loopback port (broker, results,
locks and events on their own DB numbers) and a real ``celery worker`` (prefork ``-c 4``) serving
``tests._queue_app``. The first call of ``q.serial(n, H)`` is sent and waited for until it starts;
the other N-1 follow ``--spacing`` apart (a defined arrival order). Once every result is in, the
workers' own ``start``/``end`` events (wall-clock ``t``) and ``lock_requeued``/``lock_woken``
signals give one JSON line:

- ``makespan_s`` (first start to last end), ``ideal_s`` (N x H) and ``ratio`` (target <= 1.25);
- ``gap_ms``: idle time between one run's end and the next run's start, p50 / max / sum
  (targets p50 <= 20 ms, max <= 250 ms);
- ``publishes_per_waiter``: (requeued + woken events) / (N - 1) (target <= 2);
- ``overlaps``: pairs of runs whose intervals overlap (must be 0);
- ``order_fifo``: runs started in the order the calls were sent; ``order`` is the start order
  and ``order_inversions`` the pairs out of send order. The library's FIFO is the order calls
  join the key's line; calls sent a few ms apart can reach the lock store in another order (four
  children take them from the broker), so compare with a wider ``--spacing`` (the tests use 50 ms).

``targets_met`` (the exit status: 1 if any run missed) covers ratio, gaps, publishes and overlaps.

``--locks redis`` is the default hybrid (Redis, file fallback); ``redis-only`` is Redis with no
fallback; ``files`` points the lock Redis URL at a closed port so the hybrid serves every lock from
files (what ``EXAMPLE_REDIS=off`` does in the example project). Every wait is bounded in time.

    python -m benchmarks.bench_queue [--n 12] [--hold 0.3] [--locks redis|files|redis-only]
                                     [--repeats 1] [--spacing 0.01]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import Celery

from tests._redis_server import RedisServer, free_port
from tests._workers import NO_RETRIES, WorkerProcess, drop_results, wait_for

BROKER_DB, BACKEND_DB, LOCKS_DB, EVENTS_DB = 1, 2, 3, 4
TARGETS = {"ratio": 1.25, "gap_p50_ms": 20.0, "gap_max_ms": 250.0, "publishes_per_waiter": 2.0}


def events(client: Any) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange("events", 0, -1)]


def measure(found: list[dict[str, Any]], n: int, hold: float) -> dict[str, Any]:
    """The figures of one run from its events."""
    starts = [e for e in found if e["kind"] == "start"]
    ends = {e["task_id"]: e for e in found if e["kind"] == "end"}
    if sorted(e["n"] for e in starts) != list(range(n)) or len(ends) != n:
        raise RuntimeError(f"expected one run per call: starts {sorted(e['n'] for e in starts)}")
    runs = sorted((e["t"], ends[e["task_id"]]["t"], e["n"]) for e in starts)
    overlaps = sum(
        1 for i, a in enumerate(runs) for b in runs[i + 1 :] if b[0] < a[1]
    )  # sorted by start: b starts after a, overlapping when it starts before a ends
    gaps = [(b[0] - a[1]) * 1000 for a, b in itertools.pairwise(runs)]
    makespan = runs[-1][1] - runs[0][0]
    ideal = n * hold
    requeued = sum(1 for e in found if e["kind"] == "requeued")
    woken = sum(1 for e in found if e["kind"] == "woken")
    waiters = max(n - 1, 1)
    order = [r[2] for r in runs]
    figures = {
        "makespan_s": round(makespan, 3),
        "ideal_s": round(ideal, 3),
        "ratio": round(makespan / ideal, 3),
        "gap_p50_ms": round(statistics.median(gaps), 1) if gaps else 0.0,
        "gap_max_ms": round(max(gaps), 1) if gaps else 0.0,
        "gap_sum_ms": round(sum(gaps), 1),
        # [i, ms]: the idle time before run i+1 (start order), for gaps over 50 ms.
        "slow_gaps": [[i, round(g)] for i, g in enumerate(gaps) if g > 50],
        "requeued": requeued,
        "woken": woken,
        "publishes_per_waiter": round((requeued + woken) / waiters, 2),
        "overlaps": overlaps,
        "max_active": max(e["active"] for e in starts),
        "order_fifo": order == list(range(n)),
        "order_inversions": sum(1 for i, x in enumerate(order) for y in order[i + 1 :] if y < x),
        "order": order,
    }
    figures["targets_met"] = (
        all(figures[k] <= limit for k, limit in TARGETS.items()) and overlaps == 0
    )
    return figures


def run_once(args: argparse.Namespace, tmp: Path, index: int) -> dict[str, Any]:
    workdir = tmp / f"run{index}"
    server = RedisServer(workdir / "redis")
    server.start()
    env = {
        "CL_TEST_BROKER": server.url_db(BROKER_DB),
        "CL_TEST_BACKEND": server.url_db(BACKEND_DB),
        "CL_TEST_EVENTS": server.url_db(EVENTS_DB),
        "CL_TEST_LOCK_DIR": str(workdir / "locks"),
        # files: the lock Redis is a closed port, so the hybrid serves from lock files.
        "CL_TEST_LOCKS": (
            f"redis://127.0.0.1:{free_port()}/0"
            if args.locks == "files"
            else server.url_db(LOCKS_DB)
        ),
        "CL_TEST_FALLBACK": "" if args.locks == "redis-only" else "file",
    }
    worker = WorkerProcess(
        "tests._queue_app", workdir, env, name="bench-queue", concurrency=args.concurrency
    )
    producer = Celery(
        "bench-queue-producer",
        broker=server.url_db(BROKER_DB),
        backend=server.url_db(BACKEND_DB),
    )
    producer.conf.result_backend_transport_options = NO_RETRIES
    producer.conf.broker_connection_retry_on_startup = False
    events_client = server.client(EVENTS_DB)
    try:
        worker.start()
        worker.wait_ready(timeout=30)
        results = [producer.send_task("q.serial", args=(0, args.hold))]
        wait_for(
            lambda: any(e["kind"] == "start" for e in events(events_client)),
            20,
            what="the first call to start",
        )
        for n in range(1, args.n):
            time.sleep(args.spacing)
            results.append(producer.send_task("q.serial", args=(n, args.hold)))
        # Generous but bounded: 4x ideal plus one 30 s safety-net period and some slack.
        deadline = time.monotonic() + 4 * args.n * args.hold + 60
        for n, result in enumerate(results):
            got = result.get(timeout=max(deadline - time.monotonic(), 1))
            if got != n:
                raise RuntimeError(f"call {n} returned {got!r}")
        time.sleep(0.2)  # let the last signals land
        figures = measure(events(events_client), args.n, args.hold)
    finally:
        with contextlib.suppress(Exception):
            worker.stop(timeout=20)
        drop_results()
        producer.close()
        events_client.close()
        server.kill()
    return {
        "bench": "queue",
        "run": index,
        "n": args.n,
        "hold_s": args.hold,
        "locks": args.locks,
        "concurrency": args.concurrency,
        "spacing_s": args.spacing,
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="calls of one QUEUE key")
    parser.add_argument("--hold", type=float, default=0.3, help="seconds each call holds it")
    parser.add_argument("--locks", choices=["redis", "files", "redis-only"], default="redis")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--spacing", type=float, default=0.01, help="seconds between sends")
    parser.add_argument("--concurrency", type=int, default=4, help="worker prefork children")
    args = parser.parse_args()
    if args.n < 2 or args.hold <= 0:
        parser.error("need --n >= 2 and --hold > 0")

    failed = False
    with tempfile.TemporaryDirectory(prefix="celery_lock-bench-queue-") as tmp:
        for index in range(args.repeats):
            line = run_once(args, Path(tmp), index)
            failed |= not line["targets_met"]
            print(json.dumps(line), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
