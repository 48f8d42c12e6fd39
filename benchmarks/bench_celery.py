"""End-to-end throughput of no-op Celery tasks with unique arguments, per lock flavour.

One run, one redis-server started here on a free loopback port (broker DB 0, locks DB 2), one
real ``celery worker`` (prefork, concurrency 2), started and answering a ping before anything is
timed. In each of ten repeats, every flavour in turn: pause the worker (``SIGSTOP``), publish
1,000 tasks with unique arguments, let it go (``SIGCONT``) and time until the queue and kombu's
unacked hash are empty. End to end is the publish time plus that drain time. The worker's own
counts must equal what was published. Printed as tasks/s and as ratios to the plain task of the
same repeat (TESTING.md §7 measured celery-once and celery-singleton at 0.86x plain end to end).
The ``bare`` flavour makes two bare redis-py calls around each task (``SET NX PX``, ``DEL``): the
floor of a lock taken when the task starts and freed when it ends, against which the rest of a
lock's cost (its scripts, its Python, its fallback) can be read.

    python -m benchmarks.bench_celery [--tasks 1000] [--repeats 10] [--flavours plain,execution]
                                      [--steady | --cold] [--cpu]

Wall-clock rates of 2-core VMs drift by tens of percent from one minute to the next. So the
flavours of a repeat run within seconds of each other, and the goal is judged on the median of
per-repeat ratios. Two other layouts start a worker for every flavour and repeat (defaults: 3
repeats of 2,000 tasks): ``--steady`` publishes while it consumes, which is closer to what a
busy deployment sees; ``--cold`` publishes, then starts it, timing its start-up with the drain
(the first version of this benchmark; the start-up, about a second, pulls every ratio toward
1.0).

``--cpu`` (Linux; not with ``--cold``) also prints the CPU time each process spent per task: the
worker's main process, its pool children, the redis-server (broker and locks) and this publisher.
CPU per task says where a lock's cost lands (a round trip in the pool child, script time in the
server).

``BENCH_LOCK_FALLBACK=none`` runs celery_lock on Redis alone (``lock_fallback=None``), without
the same-host shadow file lock the default hybrid keeps beside every Redis lease.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import redis
from celery import Celery

from benchmarks._env import versions
from tests._redis_server import RedisServer

#: Packages whose versions the figures depend on.
PACKAGES = ("celery", "kombu", "redis", "hiredis", "celery-once", "celery-singleton")
#: ``*_co``: the same task with ``lock_coalesce=True`` (unique arguments: nothing to share, so
#: this is the cost of looking, paid at publish time).
#: ``bare``: two bare redis-py calls around the run (``SET NX PX``, ``DEL``), the floor of any
#: lock taken when the task starts; not a lock to use (see ``celery_app.BareCalls``).
FLAVOURS = ["plain", "bare", "execution", "queue", "execution_co", "queue_co", "once", "singleton"]
#: Per flavour, one entry per repeat: seconds to publish and to drain.
Results = dict[str, list[tuple[float, float]]]
#: Per flavour, one entry per repeat: CPU seconds per process (see ``cpu_snapshot``), or ().
Usage = dict[str, list[tuple[float, ...]]]
#: Tasks of each flavour run before the default layout's clock starts.
WARM_UP = 20
#: docs/performance.md's task goal: EXECUTION end to end at this fraction of plain, or more.
TASK_GOAL = 0.85


def publish(app: Celery, name: str, n: int) -> float:
    task = app.tasks[f"bench.{name}"]
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for i in range(n):
            task.apply_async((f"{name}-{i}-{time.time_ns()}",), producer=producer)
    return time.perf_counter() - started


def start_worker(env: dict[str, str], workdir: Path) -> subprocess.Popen[bytes]:
    log = workdir / "worker.log"
    log.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "celery", "-A", "benchmarks.celery_app", "worker",
        "--pool=prefork", "--concurrency=2", "--loglevel=WARNING",
        "--without-mingle", "--without-gossip", "--without-heartbeat",
        "-n", f"bench{os.getpid()}@%h", "--logfile", str(log),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_ready(app: Celery, proc: subprocess.Popen[bytes]) -> None:
    """Return once the worker answers a ping (it consumes from then on)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode} while starting")
        if app.control.ping(timeout=0.5):
            return
    raise RuntimeError("the worker did not answer a ping within 60 s")


def wait_drained(broker: redis.Redis) -> None:
    deadline = time.monotonic() + 300
    empty = 0
    while time.monotonic() < deadline:
        # acks_late: a message leaves kombu's unacked hash only after its task ran. Between
        # the worker's BRPOP and its write to that hash a message is in neither, so "empty"
        # must be seen twice in a row.
        empty = empty + 1 if broker.llen("celery") == 0 and broker.hlen("unacked") == 0 else 0
        if empty == 2:
            return
        time.sleep(0.005)
    raise RuntimeError("worker did not drain the queue in time")


def check_ran(app: Celery, flavour: str, n: int) -> None:
    stats = app.control.inspect(timeout=3).stats() or {}
    done = sum(w.get("total", {}).get(f"bench.{flavour}", 0) for w in stats.values())
    if done != n:
        raise RuntimeError(f"{flavour}: the worker ran {done} tasks, expected {n}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads forked them (Linux lists children
    per thread)."""
    found: list[int] = []
    for thread in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (thread / "children").read_text("ascii").split()]
        except (FileNotFoundError, ProcessLookupError):
            if thread.name == str(pid):  # no such file for the main thread: not this kernel's
                raise
            continue  # the thread ended meanwhile
    return found


def cpu_snapshot(worker: int, server: int) -> tuple[float, float, float, float]:
    """CPU seconds so far of: the worker's main process, its pool children, the redis-server,
    and this process (the publisher)."""
    return (
        cpu_seconds(worker),
        sum(cpu_seconds(child) for child in children(worker)),
        cpu_seconds(server),
        time.process_time(),
    )


def cpu_used(before: tuple[float, ...], after: tuple[float, ...]) -> tuple[float, ...]:
    """CPU seconds per process between two :func:`cpu_snapshot` calls (() without them)."""
    return tuple(b - a for a, b in zip(before, after, strict=True))


def drain(
    app: Celery, env: dict[str, str], workdir: Path, broker: redis.Redis, flavour: str, n: int
) -> float:
    """Seconds from starting a worker until the published tasks ran (its start-up included)."""
    started = time.perf_counter()
    proc = start_worker(env, workdir)
    try:
        wait_drained(broker)
        elapsed = time.perf_counter() - started
        check_ran(app, flavour, n)
    finally:
        stop_worker(proc)
    return elapsed


@dataclass(frozen=True)
class Rig:
    """What every layout runs on: the app, the worker's environment and folder, clients of the
    broker's and the locks' databases, and the redis-server's pid (None: no CPU readout)."""

    app: Celery
    env: dict[str, str]
    workdir: Path
    broker: redis.Redis
    locks: redis.Redis
    server_pid: int | None


def order(flavours: list[str], repeat: int) -> list[str]:
    """The flavours of one repeat: each repeat runs every flavour, rotated so that none is
    always measured first (right after a worker started, or after a given other one)."""
    shift = repeat % len(flavours)
    return flavours[shift:] + flavours[:shift]


def paused(rig: Rig, flavours: list[str], n: int, repeats: int) -> tuple[Results, Usage]:
    """The default layout, with one worker for the whole run: per repeat and flavour, pause it,
    publish ``n`` tasks, let it go and time until all of them ran. Returns, per flavour and
    repeat, the seconds to publish and to drain, and (with ``rig.server_pid``) each process's CPU
    seconds over both (see :func:`cpu_snapshot`)."""
    app, broker, server_pid = rig.app, rig.broker, rig.server_pid
    results: Results = {f: [] for f in flavours}
    cpu: Usage = {f: [] for f in flavours}
    proc = start_worker(rig.env, rig.workdir)
    try:
        wait_ready(app, proc)
        # Untimed: each pool child's first locked task makes its manager and connections.
        for flavour in flavours:
            publish(app, flavour, WARM_UP)
        wait_drained(broker)
        for repeat in range(repeats):
            for flavour in order(flavours, repeat):
                rig.locks.flushdb()  # nothing runs now (the broker's DB keeps kombu's bindings)
                before = cpu_snapshot(proc.pid, server_pid) if server_pid else ()
                # Only the main process stops: it holds the broker connection and feeds the
                # pool, whose idle children wait for it. Its sockets stay open: nothing is lost.
                os.kill(proc.pid, signal.SIGSTOP)
                try:
                    pub = publish(app, flavour, n)
                    started = time.perf_counter()
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
                wait_drained(broker)
                drained = time.perf_counter() - started
                after = cpu_snapshot(proc.pid, server_pid) if server_pid else ()
                results[flavour].append((pub, drained))
                cpu[flavour].append(cpu_used(before, after))
        for flavour in flavours:
            check_ran(app, flavour, WARM_UP + n * repeats)
    finally:
        stop_worker(proc)
    return results, cpu


def restarting(
    rig: Rig, flavours: list[str], n: int, repeats: int, *, cold: bool
) -> tuple[Results, Usage]:
    """``--steady`` and ``--cold``: a new worker for every flavour and repeat (see
    :func:`steady` and :func:`drain`); returns what :func:`paused` does."""
    results: Results = {f: [] for f in flavours}
    cpu: Usage = {f: [] for f in flavours}
    app, env, workdir, broker = rig.app, rig.env, rig.workdir, rig.broker
    for repeat in range(repeats):
        for flavour in order(flavours, repeat):
            broker.flushdb()
            rig.locks.flushdb()
            if cold:
                pub = publish(app, flavour, n)
                drained = drain(app, env, workdir, broker, flavour, n)
            else:
                pub, total, used = steady(app, env, workdir, broker, flavour, n, rig.server_pid)
                drained = total - pub
                cpu[flavour].append(used)
            results[flavour].append((pub, drained))
    return results, cpu


def steady(
    app: Celery,
    env: dict[str, str],
    workdir: Path,
    broker: redis.Redis,
    flavour: str,
    n: int,
    server_pid: int | None = None,
) -> tuple[float, float, tuple[float, ...]]:
    """With a worker already consuming: seconds to publish ``n`` tasks, from the first publish
    until all of them ran, and (with ``server_pid``) each process's CPU seconds meanwhile (see
    :func:`cpu_snapshot`)."""
    proc = start_worker(env, workdir)
    try:
        wait_ready(app, proc)
        before = cpu_snapshot(proc.pid, server_pid) if server_pid else ()
        started = time.perf_counter()
        pub = publish(app, flavour, n)
        wait_drained(broker)
        elapsed = time.perf_counter() - started
        after = cpu_snapshot(proc.pid, server_pid) if server_pid else ()
        check_ran(app, flavour, n)
    finally:
        stop_worker(proc)
    return pub, elapsed, cpu_used(before, after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", type=int, help="per flavour and repeat (default 1000; 2000 with a layout option)"
    )
    parser.add_argument(
        "--repeats", type=int, help="of every flavour (default 10; 3 with a layout option)"
    )
    parser.add_argument(
        "--flavours", default=",".join(FLAVOURS), help="comma-separated; plain is always run"
    )
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument(
        "--steady",
        action="store_true",
        help="publish while a worker (started and answering pings) consumes; e2e is then "
        "from the first publish to the last task, without the worker's start-up",
    )
    layout.add_argument(
        "--cold",
        action="store_true",
        help="publish, then start the worker: the drain time includes its start-up",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="(Linux, not with --cold) also print each process's CPU time per task",
    )
    args = parser.parse_args()
    if args.cpu and (args.cold or not sys.platform.startswith("linux")):
        parser.error("--cpu needs Linux (/proc) and a worker started before the clock (not --cold)")
    # A worker per flavour and repeat costs seconds: those layouts take fewer, longer repeats.
    restarts = args.steady or args.cold
    if args.tasks is None:
        args.tasks = 2000 if restarts else 1000
    if args.repeats is None:
        args.repeats = 3 if restarts else 10
    if args.tasks < 1 or args.repeats < 1:
        parser.error("--tasks and --repeats must be at least 1")

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
        server_pid = server.proc.pid if args.cpu and server.proc is not None else None
        ran_on = versions(PACKAGES, broker)
        try:
            measure = partial(restarting, cold=args.cold) if restarts else paused
            rig = Rig(app, env, Path(tmp), broker, locks, server_pid)
            results, cpu = measure(rig, flavours, args.tasks, args.repeats)
        finally:
            server.stop()

    n = args.tasks
    base = results["plain"]
    base_pub = statistics.median(n / p for p, _ in base)
    base_drain = statistics.median(n / d for _, d in base)
    base_e2e = statistics.median(n / (p + d) for p, d in base)
    how = (
        "published to a running worker"
        if args.steady
        else "published, then a worker started"
        if args.cold
        else "published to a paused worker, then drained; one worker for the run"
    )
    print(
        f"\n{ran_on}\n{n} no-op tasks, {how}; prefork -c 2, Redis broker; median of {args.repeats}"
    )
    # steady: "drain" is the time from the last publish until every task ran.
    print("{:12} {:>10} {:>10} {:>10}   {:>22}".format(
        "flavour", "publish/s", "tail/s" if args.steady else "drain/s", "e2e/s",
        "vs plain (pub/drain/e2e)"))  # fmt: skip
    for flavour, runs in results.items():
        pub = statistics.median(n / p for p, _ in runs)
        drn = statistics.median(n / d for _, d in runs)
        e2e = statistics.median(n / (p + d) for p, d in runs)
        print(
            f"{flavour:12} {pub:10.0f} {drn:10.0f} {e2e:10.0f}   "
            f"{pub / base_pub:6.2f} {drn / base_drain:6.2f} {e2e / base_e2e:6.2f}"
        )
    print_targets(results, layout="--steady" if args.steady else "--cold" if args.cold else "")
    if args.cpu:
        print_cpu(cpu, n)


def print_targets(results: Results, *, layout: str) -> None:
    """The task goal of docs/performance.md, judged repeat by repeat: EXECUTION end to end at
    >= 0.85x plain, and ahead of celery-once and celery-singleton. Each flavour is compared with
    plain of the same repeat (measured minutes apart, not a whole run apart), so the drift of a
    noisy machine cancels in part, as in bench_locks' per-round ratios."""
    if "execution" not in results:
        return

    def ratios(flavour: str) -> list[float]:
        return [
            (p0 + d0) / (p + d)  # rates are n / time, so a rate ratio is a time ratio inverted
            for (p, d), (p0, d0) in zip(results[flavour], results["plain"], strict=True)
        ]

    ours = ratios("execution")
    repeats = len(ours)
    met = [r >= TASK_GOAL for r in ours]
    which = f"{layout}; the goal is set for the default layout" if layout else "default layout"
    print(f"\ntargets ({which}): end to end against plain of the same repeat; median [each repeat]")
    print(
        f"execution vs plain >= {TASK_GOAL:g}: {statistics.median(ours):.2f} "
        f"[{' '.join(f'{r:.2f}' for r in ours)}], {sum(met)} of {repeats} repeats"
    )
    rivals = [rival for rival in ("once", "singleton") if rival in results]
    for rival in rivals:
        theirs = ratios(rival)
        ahead = [a > b for a, b in zip(ours, theirs, strict=True)]
        met = [m and a for m, a in zip(met, ahead, strict=True)]
        print(
            f"execution ahead of {rival} ({' '.join(f'{r:.2f}' for r in theirs)}): "
            f"{sum(ahead)} of {repeats} repeats"
        )
    if len(rivals) == 2:
        print(f"the whole goal: {sum(met)} of {repeats} repeats")
    else:
        print("the whole goal: not judged (celery-once or celery-singleton did not run)")
    if "bare" in results:
        # Not part of the goal: what two round trips in the task cost with nothing else.
        floor = ratios("bare")
        print(
            f"for reference, two bare redis-py calls around each task (bare): "
            f"{statistics.median(floor):.2f} [{' '.join(f'{r:.2f}' for r in floor)}]"
        )


def print_cpu(cpu: Usage, n: int) -> None:
    """CPU µs per task by process (median over repeats), and the difference to plain."""
    print("\nCPU per task, µs (median of the repeats); in brackets: minus plain's")
    parts = ("worker", "pool", "redis", "publisher")
    print(f"{'flavour':12} " + " ".join(f"{p:>16}" for p in (*parts, "total")))
    base = [statistics.median(run[i] for run in cpu["plain"]) * 1e6 / n for i in range(4)]
    for flavour, runs in cpu.items():
        each = [statistics.median(run[i] for run in runs) * 1e6 / n for i in range(4)]
        cells = [f"{v:6.0f} [{v - b:+6.0f}]" for v, b in zip(each, base, strict=True)]
        cells.append(f"{sum(each):6.0f} [{sum(each) - sum(base):+6.0f}]")
        print(f"{flavour:12} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
