"""Processes racing on one key, with a read-modify-write critical section and an occupancy marker.

Each contender builds its manager from an importable factory (``"module:function"`` plus JSON-able
keyword arguments), so the same harness drives the redis, file and hybrid backends in fresh
interpreters (``spawn``: no state inherited from the pytest process).
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class ContentionResult:
    overlaps: int
    acquired: int
    final_count: int
    fences_in_order: list[int]
    backends: list[str]
    seconds: float
    errors: list[str]

    @property
    def fences_increasing(self) -> bool:
        return all(a < b for a, b in zip(self.fences_in_order, self.fences_in_order[1:]))


def build(factory: str, kwargs: dict[str, Any]) -> Any:
    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _contender(
    factory: str,
    kwargs: dict[str, Any],
    key: str,
    iterations: int,
    workdir: str,
    start_at: float,
    queue: Any,
) -> None:
    overlaps = acquired = 0
    errors: list[str] = []
    try:
        manager = build(factory, kwargs)
        marker = Path(workdir, "occupied")
        counter = Path(workdir, "counter")
        journal = Path(workdir, "journal")
        while time.time() < start_at:  # line everybody up for a thundering start
            time.sleep(0.001)
        deadline = time.monotonic() + 120  # bounded: the test fails rather than hangs
        for _ in range(iterations):
            if time.monotonic() > deadline:
                errors.append("deadline reached")
                break
            lease = manager.acquire(key, mode="queue", timeout=60, ttl=30)
            if lease is None:
                errors.append("acquire timed out")
                continue
            acquired += 1
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                os.close(fd)
            except FileExistsError:
                overlaps += 1
            value = int(counter.read_text() or "0")
            with journal.open("a") as fh:
                fh.write(f"{lease.fence} {lease.backend}\n")
            counter.write_text(str(value + 1))
            try:
                marker.unlink()
            except FileNotFoundError:
                overlaps += 1
            if not manager.release(lease):
                errors.append(f"release returned False for fence {lease.fence}")
    except Exception as exc:  # reported to the parent, which fails the test
        errors.append(f"{type(exc).__name__}: {exc}")
    queue.put((overlaps, acquired, errors))


def run_contention(
    factory: str,
    kwargs: dict[str, Any],
    *,
    workdir: Path,
    processes: int = 6,
    iterations: int = 150,
    key: str = "contended",
    timeout: float = 180.0,
) -> ContentionResult:
    """Run ``processes`` contenders of ``iterations`` acquisitions each and collect the facts."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "counter").write_text("0")
    (workdir / "journal").write_text("")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 1.5  # spawn start-up is ~0.2 s per interpreter
    procs = [
        ctx.Process(
            target=_contender,
            args=(factory, kwargs, key, iterations, str(workdir), start_at, queue),
        )
        for _ in range(processes)
    ]
    began = time.monotonic()
    for proc in procs:
        proc.start()
    results = []
    errors: list[str] = []
    for _ in procs:
        try:
            results.append(queue.get(timeout=timeout))
        except Exception:  # noqa: BLE001
            errors.append("a contender did not report in time")
            break
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            errors.append("a contender had to be killed")
    seconds = time.monotonic() - began
    lines = (workdir / "journal").read_text().split()
    fences = [int(x) for x in lines[0::2]]
    backends = lines[1::2]
    return ContentionResult(
        overlaps=sum(r[0] for r in results),
        acquired=sum(r[1] for r in results),
        final_count=int((workdir / "counter").read_text()),
        fences_in_order=fences,
        backends=backends,
        seconds=seconds,
        errors=errors + [e for r in results for e in r[2]],
    )
