"""End-to-end throughput of no-op Celery tasks with unique arguments, per lock flavour.

One run, one redis-server started here on a free loopback port (broker DB 0, locks DB 2), a real
``celery worker`` (prefork, concurrency 2). For each flavour: publish N tasks with unique
arguments, then start the worker and time until the queue, kombu's unacked hash and every lock
key are empty; the worker's own count must equal N. Printed as tasks/s and as ratios to the plain
task measured in the same run (TESTING.md §7 measured celery-once and celery-singleton at 0.86x
plain end to end).

    python -m benchmarks.bench_celery [--tasks 2000] [--repeats 3] [--flavours plain,execution]

``BENCH_LOCK_FALLBACK=none`` runs celery_lock on Redis alone (``lock_fallback=None``), without
the same-host shadow file lock the default hybrid keeps beside every Redis lease.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from celery import Celery

from benchmarks._env import versions
from tests._redis_server import RedisServer

#: ``*_co``: the same task with ``lock_coalesce=True`` (unique arguments: nothing to share, so
#: this is the cost of looking, paid at publish time).
#: Packages whose versions the figures depend on.
PACKAGES = ("celery", "kombu", "redis", "hiredis", "celery-once", "celery-singleton")
FLAVOURS = ["plain", "execution", "queue", "execution_co", "queue_co", "once", "singleton"]


def publish(app: Celery, name: str, n: int) -> float:
    task = app.tasks[f"bench.{name}"]
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for i in range(n):
            task.apply_async((f"{name}-{i}-{time.time_ns()}",), producer=producer)
    return time.perf_counter() - started


def drain(
    app: Celery, env: dict[str, str], workdir: Path, broker: redis.Redis, flavour: str, n: int
) -> float:
    log = workdir / "worker.log"
    log.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "celery", "-A", "benchmarks.celery_app", "worker",
        "--pool=prefork", "--concurrency=2", "--loglevel=WARNING",
        "--without-mingle", "--without-gossip", "--without-heartbeat",
        "-n", f"bench{os.getpid()}@%h", "--logfile", str(log),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            # acks_late: a message leaves kombu's unacked hash only after its task ran.
            if broker.llen("celery") == 0 and broker.hlen("unacked") == 0:
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("worker did not drain the queue in time")
        elapsed = time.perf_counter() - started
        stats = app.control.inspect(timeout=3).stats() or {}
        done = sum(w.get("total", {}).get(f"bench.{flavour}", 0) for w in stats.values())
        if done != n:
            raise RuntimeError(f"{flavour}: the worker ran {done} tasks, expected {n}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--flavours", default=",".join(FLAVOURS), help="comma-separated; plain is always run"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="celery_lock-bench-") as tmp:
        server = RedisServer(Path(tmp, "redis"))
        server.start()
        env = dict(os.environ)
        env["BENCH_BROKER_URL"] = server.url_db(0)
        env["BENCH_LOCK_URL"] = server.url_db(2)
        os.environ.update({k: env[k] for k in ("BENCH_BROKER_URL", "BENCH_LOCK_URL")})
        from benchmarks.celery_app import app

        broker = server.client(db=0)
        locks = server.client(db=2)
        wanted = {"plain", *args.flavours.split(",")}
        flavours = [f for f in FLAVOURS if f in wanted and f"bench.{f}" in app.tasks]
        results: dict[str, list[tuple[float, float]]] = {f: [] for f in flavours}
        ran_on = versions(PACKAGES, broker)
        try:
            for repeat in range(args.repeats):
                # Interleaved so drift hits every flavour, and rotated so that no flavour is
                # always the one measured right after the previous repeat's worker stopped.
                shift = repeat % len(flavours)
                for flavour in flavours[shift:] + flavours[:shift]:
                    broker.flushdb()
                    locks.flushdb()
                    pub = publish(app, flavour, args.tasks)
                    drained = drain(app, env, Path(tmp), broker, flavour, args.tasks)
                    results[flavour].append((pub, drained))
        finally:
            server.stop()

    n = args.tasks
    base = results["plain"]
    base_pub = statistics.median(n / p for p, _ in base)
    base_drain = statistics.median(n / d for _, d in base)
    base_e2e = statistics.median(n / (p + d) for p, d in base)
    print(f"\n{ran_on}\n{n} no-op tasks, prefork -c 2, Redis broker; median of {args.repeats}")
    print("{:12} {:>10} {:>10} {:>10}   {:>22}".format(
        "flavour", "publish/s", "drain/s", "e2e/s", "vs plain (pub/drain/e2e)"))  # fmt: skip
    for flavour, runs in results.items():
        pub = statistics.median(n / p for p, _ in runs)
        drn = statistics.median(n / d for _, d in runs)
        e2e = statistics.median(n / (p + d) for p, d in runs)
        print(
            f"{flavour:12} {pub:10.0f} {drn:10.0f} {e2e:10.0f}   "
            f"{pub / base_pub:6.2f} {drn / base_drain:6.2f} {e2e / base_e2e:6.2f}"
        )


if __name__ == "__main__":
    main()
