"""Lock-layer benchmark: uncontended acquire+release cycles and QUEUE hand-off latency.

Everything is measured in one run against a redis-server this script starts on a free loopback
port (never the machine's own Redis), and printed as ops/s plus ratios to baselines measured in the
same run: the raw redis-py ``SET NX PX`` + ``EVALSHA`` compare-and-delete cycle for Redis locks,
``filelock.FileLock`` for file locks.

    python -m benchmarks.bench_locks [--seconds 0.25] [--rounds 15] [--handoffs 40]
                                     [--pin same|split]

``--pin`` (Linux) puts this process and the redis-server on one CPU (``same``: every
microsecond of client and server work adds up, so the Redis ratios compare total CPU cost) or
on two (``split``); unpinned, the scheduler decides, and how much client and server work
overlaps on the two cores moves the Redis ratios by about 0.1.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._env import versions
from tests._redis_server import RedisServer

#: Packages whose versions the figures depend on (baselines move with them).
PACKAGES = ("redis", "hiredis", "filelock", "python-redis-lock")
#: (implementation, baseline, target ratio): the goals docs/performance.md reports against.
TARGETS = (
    ("RedisLockManager", "raw redis-py SET NX PX + EVALSHA", 0.85),
    ("RedisLockManager", "redis-py Lock", 0.9),
    ("FileLockManager", "filelock FileLock", 2.5),
)

RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def rate(cycle: Callable[[], None], seconds: float) -> float:
    """Cycles per second of ``cycle`` over about ``seconds``."""
    for _ in range(50):  # warm-up (script load, connection, caches)
        cycle()
    n = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(50):
            cycle()
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - started)


def cycles(url: str, lock_dir: Path) -> dict[str, Callable[[], None]]:
    import redis

    from celery_lock import FileLockManager, HybridLockManager, RedisLockManager

    client = redis.Redis.from_url(url)
    release = client.register_script(RELEASE_LUA)

    def raw() -> None:
        token = uuid.uuid4().hex
        assert client.set("bench:raw", token, nx=True, px=30000)
        assert release(keys=["bench:raw"], args=[token]) == 1

    rlm = RedisLockManager(client, prefix="bench")

    def ours_redis() -> None:
        lease = rlm.acquire("k")
        assert lease is not None
        assert rlm.release(lease)

    hybrid = HybridLockManager(
        RedisLockManager(client, prefix="bench-hybrid"), FileLockManager(lock_dir / "hybrid")
    )

    def ours_hybrid() -> None:
        lease = hybrid.acquire("k")
        assert lease is not None
        assert hybrid.release(lease)

    def redis_py() -> None:
        lock = client.lock("bench:redis-py", timeout=30)
        assert lock.acquire(blocking=False)
        lock.release()

    out: dict[str, Callable[[], None]] = {
        "raw redis-py SET NX PX + EVALSHA": raw,
        "RedisLockManager": ours_redis,
        "HybridLockManager (Redis up)": ours_hybrid,
        "redis-py Lock": redis_py,
    }
    try:
        import redis_lock  # python-redis-lock

        def prl() -> None:
            lock = redis_lock.Lock(client, "bench-prl", expire=30)
            assert lock.acquire(blocking=False)
            lock.release()

        out["python-redis-lock"] = prl
    except ImportError:
        print("(python-redis-lock not installed: skipped)")

    flm = FileLockManager(lock_dir / "ours")

    def ours_file() -> None:
        lease = flm.acquire("k")
        assert lease is not None
        assert flm.release(lease)

    out["FileLockManager"] = ours_file
    try:
        import filelock

        fl = filelock.FileLock(str(lock_dir / "filelock.lock"))

        def flk() -> None:
            fl.acquire(timeout=0)
            fl.release()

        out["filelock FileLock"] = flk
    except ImportError:
        print("(filelock not installed: skipped)")
    return out


# ------------------------------------------------------------------ hand-off


def _build(kind: str, url: str, directory: str) -> Any:
    from celery_lock import FileLockManager, RedisLockManager

    if kind == "redis":
        return RedisLockManager.from_url(url, prefix="bench-handoff")
    return FileLockManager(directory)


def _waiter(kind: str, url: str, directory: str, rounds: int, go: Any, out: Any) -> None:
    manager = _build(kind, url, directory)
    for _ in range(rounds + 1):
        if not go.wait(timeout=30):  # set by the holder once it holds the lock
            return
        go.clear()
        lease = manager.acquire("handoff", mode="queue", timeout=10, ttl=30)
        acquired = time.monotonic()  # CLOCK_MONOTONIC is system-wide on Linux
        out.put(acquired if lease is not None else None)
        if lease is not None:
            manager.release(lease)


def handoff(kind: str, url: str, directory: str, rounds: int) -> list[float]:
    """Milliseconds from the holder's release() returning to the waiter's acquire() returning."""
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_waiter, args=(kind, url, directory, rounds, go, out))
    proc.start()
    manager = _build(kind, url, directory)
    latencies: list[float] = []
    try:
        for i in range(rounds + 1):  # round 0 warms up the waiter (spawn, imports)
            deadline = time.monotonic() + 10
            lease = None
            while lease is None and time.monotonic() < deadline:
                lease = manager.acquire("handoff", ttl=30)  # the waiter may still hold it
            assert lease is not None, "holder could not take the lock"
            go.set()
            # A random hold so the waiter is parked and polling phases are not aligned.
            time.sleep(random.uniform(0.02, 0.05) if i else 2.0)
            manager.release(lease)
            released = time.monotonic()
            acquired = out.get(timeout=30)
            assert acquired is not None, "waiter timed out"
            if i:
                latencies.append((acquired - released) * 1000)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def pin(server: RedisServer, how: str) -> None:
    """Pin this process to the first CPU it may use, and the server to that one (``same``) or
    the next (``split``)."""
    if not hasattr(os, "sched_setaffinity") or server.proc is None:
        raise SystemExit("--pin needs os.sched_setaffinity (Linux)")
    cpus = sorted(os.sched_getaffinity(0))
    if how == "split" and len(cpus) < 2:
        raise SystemExit("--pin split needs two CPUs")
    os.sched_setaffinity(0, {cpus[0]})
    os.sched_setaffinity(server.proc.pid, {cpus[0] if how == "same" else cpus[1]})
    print(
        f"pinned: this process on CPU {cpus[0]}, redis-server on "
        f"CPU {cpus[0] if how == 'same' else cpus[1]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.25, help="per sample")
    parser.add_argument("--rounds", type=int, default=15, help="samples per implementation")
    parser.add_argument("--handoffs", type=int, default=40)
    parser.add_argument("--pin", choices=("same", "split"), help="CPU placement (Linux)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="celery_lock-bench-") as tmp:
        server = RedisServer(Path(tmp, "redis"))
        server.start()
        try:
            if args.pin:
                pin(server, args.pin)
            impls = cycles(server.url, Path(tmp))
            samples: dict[str, list[float]] = {name: [] for name in impls}
            names = list(impls)
            for r in range(args.rounds):
                # Short rounds, each implementation once per round in a rotating order: a ratio
                # is the median of per-round ratios, so drift of a noisy machine (which moves
                # every implementation of a round alike) cancels out.
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    samples[name].append(rate(impls[name], args.seconds))
            raw_name, file_name = "raw redis-py SET NX PX + EVALSHA", "filelock FileLock"

            def per_round(name: str, base: str) -> list[float]:
                return [a / b for a, b in zip(samples[name], samples[base], strict=True)]

            def paired(name: str, base: str) -> float:
                return statistics.median(per_round(name, base))

            print("\n" + versions(PACKAGES, server.client()))
            print(
                f"uncontended acquire+release, {args.rounds} rounds x {args.seconds:g} s; "
                "ratios: median of per-round ratios"
            )
            header = ("implementation", "ops/s", "us/op", "vs raw", "vs filelock")
            print("{:36} {:>9} {:>8} {:>7} {:>11}".format(*header))
            for name, values in samples.items():
                value = statistics.median(values)
                vs_file = f"{paired(name, file_name):11.2f}" if file_name in samples else "-"
                print(
                    f"{name:36} {value:9.0f} {1e6 / value:8.1f} "
                    f"{paired(name, raw_name):7.2f} {vs_file:>11}"
                )
            print("\ntargets: median of per-round ratios [quartiles of them], rounds at or above")
            for name, base, goal in TARGETS:
                if base not in samples:
                    print(f"{name} vs {base}: baseline not installed")
                    continue
                ratios = per_round(name, base)
                low = high = ratios[0]
                if len(ratios) > 1:
                    low, _, high = statistics.quantiles(ratios, n=4)
                met = sum(r >= goal for r in ratios)
                print(
                    f"{name} vs {base} >= {goal:g}: {statistics.median(ratios):.2f} "
                    f"[{low:.2f}-{high:.2f}], {met} of {len(ratios)} rounds"
                )

            print(
                f"\nQUEUE hand-off latency (release -> waiting process acquires), n={args.handoffs}"
            )
            print(f"{'backend':36} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8}")
            for kind in ("redis", "file"):
                lat = handoff(kind, server.url, str(Path(tmp, "handoff")), args.handoffs)
                print(f"{kind:36} {pct(lat, 0.5):8.2f} {pct(lat, 0.9):8.2f} {max(lat):8.2f}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
