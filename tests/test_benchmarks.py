"""The benchmarks still run: a tiny run of each, checked for its readouts.

No timing is asserted here (speed is for the benchmarks themselves to report, as ratios); these
tests catch a benchmark broken by a change of the library or of a dependency, which nobody
would otherwise notice until the next time someone measures. The rival libraries of the
``bench`` extra are optional: without them the benchmarks leave their rows out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests._redis_server import require_binary

REPO = Path(__file__).resolve().parent.parent


def run_benchmark(module: str, *args: str) -> str:
    """Run ``python -m benchmarks.<module> *args`` from the repository; its standard output."""
    require_binary("redis-server")
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{module} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.redis
@pytest.mark.slow
def test_bench_locks_reports_every_readout() -> None:
    out = run_benchmark("bench_locks", "--rounds", "2", "--seconds", "0.05", "--handoffs", "3")
    # The results table: from its header line to the first blank line (the targets lines
    # below it start with the same names).
    table = out.split("\nimplementation ", 1)[1].split("\n\n", 1)[0]
    names = ("raw redis-py SET NX PX + EVALSHA", "RedisLockManager", "FileLockManager")
    for name in names:
        row = re.search(rf"^{re.escape(name)} +(\d+) +([\d.]+) +([\d.]+) +\S+$", table, re.M)
        assert row is not None, f"no row for {name}:\n{table}"
        assert int(row.group(1)) > 0, row.group(0)  # ops/s
    assert re.search(
        r"^RedisLockManager vs raw redis-py SET NX PX \+ EVALSHA >= 0\.85: \d+\.\d\d "
        r"\[[\d.]+-[\d.]+\], \d of 2 rounds$",
        out,
        re.MULTILINE,
    ), out
    handoffs = re.findall(r"^(redis|file) +([\d.]+) +([\d.]+) +([\d.]+)$", out, re.MULTILINE)
    assert [kind for kind, *_ in handoffs] == ["redis", "file"], out


@pytest.mark.redis
@pytest.mark.celery
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--cpu reads Linux's /proc")
@pytest.mark.parametrize(
    ("layout", "how"),
    [
        ((), "published to a paused worker, then drained"),
        (("--steady",), "published to a running worker"),
        (("--cold",), "published, then a worker started"),
    ],
    ids=["default", "steady", "cold"],
)
def test_bench_celery_judges_the_goal_and_finds_the_pool_children(
    layout: tuple[str, ...], how: str
) -> None:
    cpu = () if "--cold" in layout else ("--cpu",)
    out = run_benchmark(
        "bench_celery",
        *layout,
        *cpu,
        "--tasks",  # enough for the pool's CPU to show in /proc's 10 ms ticks (~60 ms here)
        "80",
        "--repeats",
        "1",
        "--flavours",
        "plain,execution" if layout else "plain,bare,execution",
    )
    assert f"80 no-op tasks, {how};" in out, out
    which = f"{layout[0]}; the goal is set for the default layout" if layout else "default layout"
    assert f"targets ({which}):" in out, out
    assert re.search(
        r"^execution vs plain >= 0\.85: \d+\.\d\d \[\d+\.\d\d\], [01] of 1 repeats$",
        out,
        re.MULTILINE,
    ), out
    # The rivals did not run: the goal's comparison with them is not made up.
    assert "the whole goal: not judged" in out
    assert "ahead of" not in out
    # The floor of two bare round trips is printed when (and only when) it ran.
    floor = re.search(
        r"^for reference, two bare redis-py calls around each task \(bare\): "
        r"\d+\.\d\d \[\d+\.\d\d\]$",
        out,
        re.MULTILINE,
    )
    assert (floor is None) == bool(layout), out
    if not cpu:
        assert "CPU per task" not in out
        return
    table = out.split("CPU per task", 1)[1]
    row = re.search(r"^execution +(\d+) \[ *[-+]\d+\] +(\d+) \[", table, re.MULTILINE)
    assert row is not None, out
    # The pool children ran the tasks: their CPU is found, whichever thread forked them.
    assert int(row.group(2)) > 0, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--cpu reads Linux's /proc")
def test_cpu_readout_counts_children_forked_by_any_thread() -> None:
    from benchmarks.bench_celery import children  # noqa: PLC0415 - the benchmark's own helper

    forked: list[subprocess.Popen[bytes]] = []
    done = threading.Event()

    def fork() -> None:  # Linux lists this child under this thread, not the main one
        forked.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]))
        done.wait(30)

    thread = threading.Thread(target=fork)
    thread.start()
    try:
        for _ in range(100):
            if forked:
                break
            time.sleep(0.05)
        assert forked, "the thread did not start its child"
        assert forked[0].pid in children(os.getpid())
    finally:
        done.set()
        thread.join(30)
        for proc in forked:
            proc.kill()
            proc.wait(10)
