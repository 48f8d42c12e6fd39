"""Fault-injection figures: the reliability scenarios of ``tests/reliability`` with larger counts.

Runs every scenario against a redis-server this script starts on a free loopback port (never the
machine's own Redis) and lock directories in a temporary folder, and prints one line per
scenario and backend: counts, overlaps (two holders in the critical section at once), lost
updates (read-modify-write counter), and times (p50/max). The scenarios themselves live in
``tests/reliability/_harness.py`` and are shared with the tests; nothing here asserts.

    python -m benchmarks.bench_faults [--processes 6] [--iterations 200] [--rounds 10]
        [--outages 3] [--threads 4] [--dead 5] [--backends redis,file,hybrid,hybrid-down]
        [--only queue,exec,kill,stall,outage,cleaner]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests._contention import build, run_contention
from tests._redis_server import RedisServer
from tests.reliability._harness import (
    BACKENDS,
    cleaner_race,
    execution_contention,
    kill_chain,
    redis_outage,
    spec,
    stall,
    summary,
)

SCENARIOS = ("queue", "exec", "kill", "stall", "outage", "cleaner")


def line(scenario: str, backend: str, **figures: object) -> None:
    cells = " ".join(f"{name}={value}" for name, value in figures.items())
    print(f"{scenario:<16} {backend:<12} {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=6, help="contending processes")
    parser.add_argument("--iterations", type=int, default=200, help="acquisitions per process")
    parser.add_argument("--rounds", type=int, default=10, help="SIGKILL rounds per backend")
    parser.add_argument("--stalls", type=int, default=3, help="SIGSTOP rounds per backend")
    parser.add_argument("--outages", type=int, default=3, help="Redis outages per run")
    parser.add_argument("--threads", type=int, default=4, help="threads in the outage run")
    parser.add_argument("--dead", type=int, default=5, help="orphan locks in the cleaner race")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios to run")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    only = set(args.only.split(","))
    logging.getLogger("celery_lock").addHandler(logging.NullHandler())
    logging.getLogger("celery_lock").propagate = False  # fallback WARNINGs are expected here

    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        root = Path(tmp)
        server = RedisServer(root / "redis")
        server.start()
        try:
            run(args, backends, only, server, root)
        finally:
            server.kill()


def run(
    args: argparse.Namespace, backends: list[str], only: set[str], server: RedisServer, root: Path
) -> None:
    counter = iter(range(1_000_000))

    def fresh(backend: str) -> tuple[tuple[str, dict[str, object]], object, Path]:
        work = root / f"{backend}-{next(counter)}"
        backend_spec = spec(backend, server.url_db(1), work / "locks", prefix=work.name)
        return backend_spec, build(*backend_spec), work

    total = args.processes * args.iterations
    for backend in backends:
        if "queue" in only:
            backend_spec, _, work = fresh(backend)
            result = run_contention(
                *backend_spec,
                workdir=work / "q",
                processes=args.processes,
                iterations=args.iterations,
                timeout=600,
            )
            line(
                "queue-contention",
                backend,
                procs=args.processes,
                acquired=f"{result.acquired}/{total}",
                overlaps=result.overlaps,
                lost=result.acquired - result.final_count,
                errors=len(result.errors),
                fences_ok=result.fences_increasing,
                seconds=f"{result.seconds:.1f}",
            )
        if "exec" in only:
            backend_spec, _, work = fresh(backend)
            facts = execution_contention(
                backend_spec,
                work / "x",
                processes=args.processes,
                iterations=args.iterations,
            )
            line(
                "exec-contention",
                backend,
                procs=args.processes,
                ran=facts.stats.acquired,
                skipped=facts.stats.busy,
                overlaps=len(facts.stats.overlaps),
                lost=facts.lost,
                errors=len(facts.stats.errors),
                fences_ok=facts.fences_increasing,
            )
        if "kill" in only:
            backend_spec, manager, _ = fresh(backend)
            crash = kill_chain(backend_spec, manager, rounds=args.rounds)  # type: ignore[arg-type]
            line(
                "sigkill-holder",
                backend,
                rounds=len(crash.recoveries),
                recovery=summary(crash.recoveries),
                cleaned=crash.cleaner_removed,
                left=crash.left_locked,
                errors=len(crash.errors),
            )
        if "stall" in only:
            frees, ok = [], Counter[str]()
            for _ in range(args.stalls):
                backend_spec, manager, _ = fresh(backend)
                facts_s = stall(backend_spec, manager, ttl=1.0)  # type: ignore[arg-type]
                frees.append(facts_s.free_after)
                ok["fence_up"] += facts_s.successor_fence > facts_s.first_fence
                ok["lost_told"] += facts_s.lost_reported and facts_s.error_logged
                ok["stale_refused"] += (
                    facts_s.stale_release is False and facts_s.stale_extend is None
                )
                ok["successor_intact"] += facts_s.successor_intact
            line(
                "sigstop-holder",
                backend,
                rounds=args.stalls,
                free_after=summary(frees),
                **{k: f"{v}/{args.stalls}" for k, v in ok.items()},
            )
        if "cleaner" in only:
            backend_spec, manager, work = fresh(backend)
            race = cleaner_race(
                backend_spec,
                manager,  # type: ignore[arg-type]
                work / "c",
                processes=args.processes,
                iterations=args.iterations // 2,
                dead=args.dead,
            )
            stats = race.contention.stats
            line(
                "cleaner-race",
                backend,
                acquired=stats.acquired,
                passes=race.passes,
                overlaps=len(stats.overlaps),
                lost=race.contention.lost,
                stolen=stats.release_false + race.removed_live,
                dead_removed=f"{race.dead_removed}/{args.dead}",
                errors=len(stats.errors),
            )
    if "outage" in only:
        for how in ("stop", "kill"):
            outage_server = RedisServer(root / f"outage-{how}")
            outage_server.start()
            started = time.monotonic()
            try:
                facts_o = redis_outage(
                    outage_server,
                    root / f"outage-work-{how}",
                    threads=args.threads,
                    processes=max(1, args.processes // 2),
                    outages=args.outages,
                    kill=how == "kill",
                )
            finally:
                outage_server.kill()
            kinds = Counter(f"{a}>{b}" for a, b in facts_o.stats.overlaps)
            line(
                f"redis-{how}",
                "hybrid",
                outages=args.outages,
                acquired=facts_o.stats.acquired,
                by_backend=dict(facts_o.stats.backends),
                crashed=len(facts_o.stats.errors),
                overlaps=dict(kinds) or 0,
                lost=facts_o.lost,
                warnings=facts_o.warnings,
                to_files=summary(facts_o.fallback_after),
                back_on_redis=summary(facts_o.recoveries),
                seconds=f"{time.monotonic() - started:.1f}",
            )


if __name__ == "__main__":
    main()
