"""Fault-injection scenarios shared by ``tests/reliability`` and ``benchmarks/bench_faults.py``.

Each scenario is a function that runs real processes (or threads) against a backend, injects one
kind of fault and returns the facts (counts, overlaps, lost updates, recovery times) without
judging them: the tests assert on small runs, the benchmark prints larger ones. Every loop here
is bounded in count and in time and stops by itself.

Backends are named ``redis``, ``file``, ``hybrid`` (Redis answering) and ``hybrid-down`` (Redis
unreachable: the hybrid serves from files); :func:`spec` turns a name into an importable factory
and its keyword arguments so that spawned processes can build the same manager.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from celery_lock import (
    FileLockManager,
    HybridLockManager,
    LockCleaner,
    LockManager,
    RedisLockManager,
)
from celery_lock.backends import _hostlocks
from tests._contention import build
from tests._redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
#: Message templates of the hybrid's circuit transitions (one WARNING down, one INFO up).
DOWN = "Redis is unreachable for locks"
UP = "Redis answers again"
BACKENDS = ("redis", "file", "hybrid", "hybrid-down")

# ------------------------------------------------------------------------------- factories


def redis_manager(url: str, prefix: str = "rel", socket_timeout: float = 1.0) -> RedisLockManager:
    """A Redis manager with the library's bounded client (importable by spawned processes)."""
    return RedisLockManager.from_url(url, prefix=prefix, socket_timeout=socket_timeout)


def file_manager(directory: str) -> FileLockManager:
    return FileLockManager(directory)


def hybrid_manager(
    url: str,
    directory: str,
    retry_interval: float = 0.5,
    socket_timeout: float = 0.5,
    prefix: str = "rel",
) -> HybridLockManager:
    """Redis first, files in ``directory`` while Redis does not answer."""
    redis = RedisLockManager.from_url(
        url, prefix=prefix, socket_timeout=socket_timeout, socket_connect_timeout=0.25
    )
    return HybridLockManager(redis, FileLockManager(directory), retry_interval=retry_interval)


def dead_url() -> str:
    """A loopback URL nobody listens on (connection refused at once)."""
    return f"redis://127.0.0.1:{free_port()}/0"


def entries_per_lock(backend_spec: tuple[str, dict[str, Any]]) -> int:
    """Store entries one held lock makes: 1, or 2 for a hybrid whose Redis answers where byte
    locks of open file descriptions do not exist (the Redis lock and its same-token shadow file
    lock; elsewhere the same-host mark is a byte lock, no entry)."""
    factory, kwargs = backend_spec
    # spec() gives the answering hybrid a key prefix and the hybrid-down one a dead URL only.
    answering = factory.endswith(":hybrid_manager") and "prefix" in kwargs
    return 2 if answering and not _hostlocks._SUPPORTED else 1


def spec(
    backend: str, url: str, directory: Path, prefix: str = "rel"
) -> tuple[str, dict[str, Any]]:
    """``(factory, kwargs)`` of ``backend`` for :func:`tests._contention.build`."""
    here = "tests.reliability._harness"
    if backend == "redis":
        return f"{here}:redis_manager", {"url": url, "prefix": prefix}
    if backend == "file":
        return f"{here}:file_manager", {"directory": str(directory)}
    if backend == "hybrid":
        return f"{here}:hybrid_manager", {"url": url, "directory": str(directory), "prefix": prefix}
    if backend == "hybrid-down":
        return f"{here}:hybrid_manager", {"url": dead_url(), "directory": str(directory)}
    raise ValueError(f"unknown backend {backend!r}")


# ------------------------------------------------------------------------------- small tools


def poll_until(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.01
) -> tuple[Any, float]:
    """Call ``condition`` until it returns something truthy or ``timeout`` passes.

    :returns: ``(last value, seconds waited)``; the value is falsy on a timeout.
    """
    started = time.monotonic()
    while True:
        value = condition()
        waited = time.monotonic() - started
        if value or waited >= timeout:
            return value, waited
        time.sleep(interval)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class LogCounter(logging.Handler):
    """Counts celery_lock records per (logger, level) in this process."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.name, record.levelname, str(record.msg)] += 1

    def count(self, logger: str, level: str, startswith: str = "") -> int:
        """Records of ``logger`` at ``level`` whose message template starts with ``startswith``."""
        return sum(
            n
            for (name, lvl, template), n in self.counts.items()
            if name == logger and lvl == level and template.startswith(startswith)
        )


@contextlib.contextmanager
def counting_logs(level: int = logging.INFO) -> Iterator[LogCounter]:
    """Attach a :class:`LogCounter` to the ``celery_lock`` logger for the block."""
    logger = logging.getLogger("celery_lock")
    counter = LogCounter()
    old = logger.level
    logger.setLevel(min(level, old) if old else level)
    logger.addHandler(counter)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(old)


# ------------------------------------------------------------------------------- child holders


class Child:
    """A :mod:`tests.reliability._child` process; events are read with bounded waits.

    Its stdout is read with ``os.read`` on the raw descriptor (a buffered reader would hide
    lines already read ahead from ``select``).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            [sys.executable, "-m", "tests.reliability._child", json.dumps(config)],
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buffer = b""
        self._eof = False
        self.events: list[dict[str, Any]] = []
        self._unseen: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_some(self, timeout: float) -> None:
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not ready:
            return
        chunk = os.read(self._fd, 65536)
        if not chunk:
            self._eof = True
            return
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                event = json.loads(line)
                self.events.append(event)
                self._unseen.append(event)

    def expect(self, *names: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next not yet returned event named one of ``names``.

        :raises AssertionError: when none arrives within ``timeout`` or the child exits.
        """
        deadline = time.monotonic() + timeout
        while True:
            for event in self._unseen:
                if event["event"] in names:
                    self._unseen.remove(event)
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {names} event within {timeout} s; saw {self.events}")
            if self._eof:
                raise AssertionError(f"child exited before {names}; saw {self.events}")
            self._read_some(left)

    def drain(self, timeout: float = 0.2) -> None:
        """Read whatever events arrive within ``timeout`` (bounded)."""
        deadline = time.monotonic() + timeout
        while not self._eof and time.monotonic() < deadline:
            self._read_some(deadline - time.monotonic())

    def logs(self, level: str) -> list[str]:
        return [e["msg"] for e in self.events if e["event"] == "log" and e["level"] == level]

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        """End the child (SIGCONT first, in case a test left it stopped) and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def child_config(
    backend_spec: tuple[str, dict[str, Any]], key: str, **options: Any
) -> dict[str, Any]:
    factory, kwargs = backend_spec
    return {"factory": factory, "kwargs": kwargs, "key": key, **options}


# ------------------------------------------------------------------------------- critical section


class Section:
    """A critical section with an occupancy marker, a read-modify-write counter and a journal.

    The marker is created with ``O_EXCL`` and holds the backend of the lease inside, so an
    overlap is classified by (occupant backend, newcomer backend). Works across processes.
    """

    def __init__(self, workdir: Path, name: str = "section") -> None:
        self.marker = workdir / f"{name}.occupied"
        self.counter = workdir / f"{name}.counter"
        self.journal = workdir / f"{name}.journal"

    def reset(self) -> None:
        self.counter.write_text("0")
        self.journal.write_text("")
        with contextlib.suppress(FileNotFoundError):
            self.marker.unlink()

    def run(self, backend: str, fence: int, hold: float = 0.0) -> tuple[str, str] | None:
        """Enter, count, leave; return ``(occupant, newcomer)`` backends on an overlap."""
        overlap = None
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            occupant = "?"
            with contextlib.suppress(OSError):
                occupant = self.marker.read_text() or "?"
            overlap = (occupant, backend)
        else:
            os.write(fd, backend.encode())
            os.close(fd)
        value = int(self.counter.read_text() or "0")
        if hold:
            time.sleep(hold)  # the work itself: long enough for an overlap to be seen
        with self.journal.open("a") as fh:
            fh.write(f"{fence} {backend} {os.getpid()}\n")
        # Atomic replace: an overlapping reader never sees a truncated counter (which would
        # turn one overlap into thousands of "lost" updates).
        temp = self.counter.with_name(f"{self.counter.name}.{os.getpid()}.{threading.get_ident()}")
        temp.write_text(str(value + 1))
        os.replace(temp, self.counter)
        try:
            self.marker.unlink()
        except FileNotFoundError:
            overlap = overlap or ("?", backend)
        return overlap

    def count(self) -> int:
        return int(self.counter.read_text() or "0")

    def entries(self) -> list[tuple[int, str, int]]:
        """``(fence, backend, pid)`` of every pass through the section, in order."""
        rows = (line.split() for line in self.journal.read_text().splitlines())
        # A line being appended right now may be read half-written: it is counted next time.
        return [(int(row[0]), row[1], int(row[2])) for row in rows if len(row) == 3]

    def fences(self) -> list[tuple[int, str]]:
        return [(f, b) for f, b, _ in self.entries()]


# ------------------------------------------------------------------------------- contention


@dataclasses.dataclass
class LoopStats:
    """What one contender (process or thread) saw."""

    acquired: int = 0
    busy: int = 0
    overlaps: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    backends: Counter[str] = dataclasses.field(default_factory=Counter)
    release_false: int = 0
    logs: Counter[str] = dataclasses.field(default_factory=Counter)
    grants: list[tuple[float, str]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a multiprocessing queue (``dataclasses.asdict`` mangles Counters)."""
        return {
            field.name: dict(value) if isinstance(value, Counter) else value
            for field in dataclasses.fields(self)
            for value in [getattr(self, field.name)]
        }

    def merge(self, other: LoopStats) -> None:
        self.acquired += other.acquired
        self.busy += other.busy
        self.overlaps += other.overlaps
        self.errors += other.errors
        self.backends.update(other.backends)
        self.release_false += other.release_false
        self.logs.update(other.logs)
        self.grants += other.grants


def lock_loop(
    manager: LockManager,
    keys: list[str],
    workdir: Path,
    *,
    mode: str,
    iterations: int,
    duration: float,
    hold: float = 0.0,
    ttl: float = 30.0,
    timeout: float = 5.0,
    stop: threading.Event | None = None,
    stop_file: Path | None = None,
) -> LoopStats:
    """Acquire/work/release in a loop over ``keys`` until ``iterations`` or ``duration`` is used up
    (or ``stop`` is set, or ``stop_file`` exists). Exceptions are recorded, never raised."""
    stats = LoopStats()
    sections = {key: Section(workdir, f"key-{i}") for i, key in enumerate(keys)}
    deadline = time.monotonic() + duration
    for i in range(iterations):
        if time.monotonic() > deadline:
            break
        if stop is not None and stop.is_set():
            break
        if stop_file is not None and i % 8 == 0 and stop_file.exists():
            break
        key = keys[i % len(keys)]
        try:
            lease = manager.acquire(key, ttl=ttl, mode=mode, timeout=timeout)
            if lease is None:
                stats.busy += 1
                continue
            stats.acquired += 1
            stats.backends[lease.backend] += 1
            stats.grants.append((time.monotonic(), lease.backend))
            overlap = sections[key].run(lease.backend, lease.fence, hold)
            if overlap is not None:
                stats.overlaps.append(overlap)
            if not manager.release(lease):
                stats.release_false += 1
        except Exception as exc:  # counted as a crashed task
            stats.errors.append(f"{type(exc).__name__}: {exc}")
    return stats


def _loop_process(
    factory: str,
    kwargs: dict[str, Any],
    keys: list[str],
    workdir: str,
    options: dict[str, Any],
    start_at: float,
    queue: Any,
) -> None:
    stats = LoopStats()
    counter = LogCounter()
    try:
        logger = logging.getLogger("celery_lock")
        logger.setLevel(logging.INFO)
        logger.addHandler(counter)
        manager = build(factory, kwargs)
        while time.time() < start_at:  # line everybody up
            time.sleep(0.001)
        stop_file = options.pop("stop_file", None)
        stats = lock_loop(
            manager,
            keys,
            Path(workdir),
            stop_file=Path(stop_file) if stop_file else None,
            **options,
        )
    except Exception as exc:
        stats.errors.append(f"{type(exc).__name__}: {exc}")
    stats.logs = Counter({"|".join(k): c for k, c in counter.counts.items()})
    queue.put(stats.to_dict())


class Contenders:
    """``processes`` spawned interpreters running :func:`lock_loop` (bounded, joined by
    :meth:`result`)."""

    def __init__(
        self,
        factory: str,
        kwargs: dict[str, Any],
        keys: list[str],
        workdir: Path,
        *,
        processes: int,
        **options: Any,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._queue = ctx.Queue()
        self.start_at = time.time() + 0.3 + 0.25 * processes
        self._procs = [
            ctx.Process(
                target=_loop_process,
                args=(
                    factory,
                    kwargs,
                    keys,
                    str(workdir),
                    dict(options),
                    self.start_at,
                    self._queue,
                ),
            )
            for _ in range(processes)
        ]
        for proc in self._procs:
            proc.start()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs if proc.pid is not None]

    def result(self, timeout: float = 120.0) -> LoopStats:
        total = LoopStats()
        deadline = time.monotonic() + timeout
        for _ in self._procs:
            try:
                raw = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                total.errors.append("a contender did not report in time")
                break
            raw["overlaps"] = [tuple(o) for o in raw["overlaps"]]
            raw["grants"] = [tuple(g) for g in raw["grants"]]
            raw["backends"] = Counter(raw["backends"])
            raw["logs"] = Counter(raw["logs"])
            total.merge(LoopStats(**raw))
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
                total.errors.append("a contender had to be killed")
        return total


@dataclasses.dataclass
class ContentionFacts:
    stats: LoopStats
    count: int
    fences: list[tuple[int, str]]
    seconds: float

    @property
    def lost(self) -> int:
        """Updates lost by the read-modify-write counter (two holders at once)."""
        return self.stats.acquired - self.count

    @property
    def fences_increasing(self) -> bool:
        values = [f for f, _ in self.fences]
        return all(a < b for a, b in zip(values, values[1:]))


def execution_contention(
    backend_spec: tuple[str, dict[str, Any]],
    workdir: Path,
    *,
    processes: int,
    iterations: int,
    hold: float = 0.001,
    key: str = "exec-contended",
) -> ContentionFacts:
    """EXECUTION mode: every process tries ``iterations`` times; a busy lock is a skip."""
    workdir.mkdir(parents=True, exist_ok=True)
    section = Section(workdir, "key-0")
    section.reset()
    began = time.monotonic()
    contenders = Contenders(
        *backend_spec,
        [key],
        workdir,
        processes=processes,
        mode="execution",
        iterations=iterations,
        duration=90.0,
        hold=hold,
    )
    stats = contenders.result()
    return ContentionFacts(stats, section.count(), section.fences(), time.monotonic() - began)


# ------------------------------------------------------------------------------- crashes


@dataclasses.dataclass
class CrashFacts:
    recoveries: list[float]
    errors: list[str]
    cleaner_removed: int
    left_locked: bool


def kill_chain(
    backend_spec: tuple[str, dict[str, Any]],
    manager: LockManager,
    *,
    rounds: int,
    key: str = "crash",
    ttl: float = 300.0,
) -> CrashFacts:
    """SIGKILL a holder while another process waits on the key (QUEUE), ``rounds`` times.

    Each round measures the time from the kill to the waiter's grant (``CLOCK_MONOTONIC``,
    system-wide); even rounds reap the killed process at once, odd rounds leave it a zombie.
    Then the last holder is killed with nobody waiting and ``manager``'s cleaner must remove the
    orphan lock.
    """
    recoveries: list[float] = []
    errors: list[str] = []
    options = {"ttl": ttl, "mode": "queue", "timeout": 20.0}
    holder = Child(child_config(backend_spec, key, **options))
    children = [holder]
    try:
        first = holder.expect("acquired", "busy", timeout=20)
        if first["event"] != "acquired":
            return CrashFacts([], ["first holder could not acquire"], 0, True)
        for round_no in range(rounds):
            waiter = Child(child_config(backend_spec, key, **options))
            children.append(waiter)
            waiter.expect("waiting", timeout=20)
            killed_at = time.monotonic()
            holder.signal(signal.SIGKILL)
            if round_no % 2 == 0:
                holder.proc.wait(timeout=5)
            try:
                got = waiter.expect("acquired", "busy", timeout=15)
            except AssertionError as exc:
                errors.append(f"round {round_no}: {exc}")
                break
            if got["event"] != "acquired":
                errors.append(f"round {round_no}: waiter gave up")
                break
            recoveries.append(got["t"] - killed_at)
            holder = waiter
        holder.signal(signal.SIGKILL)
        holder.proc.wait(timeout=5)
        report = LockCleaner(manager).clean()
        return CrashFacts(recoveries, errors, report.removed, manager.is_locked(key))
    finally:
        for child in children:
            child.close()


# ------------------------------------------------------------------------------- stalls


@dataclasses.dataclass
class StallFacts:
    first_fence: int
    successor_fence: int
    free_after: float
    lost_reported: bool
    error_logged: bool
    stale_release: Any
    stale_extend: Any
    successor_intact: bool
    successor_released: bool


def stall(
    backend_spec: tuple[str, dict[str, Any]],
    manager: LockManager,
    *,
    ttl: float = 1.0,
    key: str = "stall",
) -> StallFacts:
    """SIGSTOP a renewing holder past its TTL, let ``manager`` take the lock, then SIGCONT."""
    child = Child(child_config(backend_spec, key, ttl=ttl, renew=True))
    try:
        got = child.expect("acquired", "busy", timeout=20)
        assert got["event"] == "acquired", got
        # One renewal must have gone through before the stop, so the stop really is what
        # makes the lease run out (not a renewer that never ran).
        before = manager.inspect(key)
        assert before is not None and before.expires_at is not None

        def renewed() -> bool:
            info = manager.inspect(key)
            return bool(info and info.expires_at and info.expires_at > before.expires_at + 0.05)

        assert poll_until(renewed, timeout=ttl * 2)[0], "the renewer never extended the lease"
        # Stop between renewals, not inside one: a hybrid's renewal extends Redis (what we just
        # saw) and then its shadow file, whose flock a process stopped right there would keep
        # (everybody else then waits the file backend's bounded 5 s: tested on its own).
        time.sleep(ttl / 10)
        child.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        successor, _ = poll_until(
            lambda: manager.acquire(key, ttl=30.0), timeout=ttl * 4 + 3, interval=0.02
        )
        free_after = time.monotonic() - stopped_at
        assert successor is not None, f"lock still held {free_after:.2f} s after SIGSTOP"
        child.signal(signal.SIGCONT)
        lost = True
        try:
            child.expect("lost", timeout=ttl * 3 + 3)
        except AssertionError:
            lost = False
        child.drain(0.1)
        error_logged = any("lock lost" in m for m in child.logs("ERROR"))
        child.send("release")
        released = child.expect("released", "error", timeout=10)
        child.send("extend")
        extended = child.expect("extended", "error", timeout=10)
        info = manager.inspect(key)
        intact = info is not None and info.token_prefix == successor.token[:8]
        return StallFacts(
            first_fence=got["fence"],
            successor_fence=successor.fence,
            free_after=free_after,
            lost_reported=lost,
            error_logged=error_logged,
            stale_release=released.get("result", released.get("error")),
            stale_extend=extended.get("result", extended.get("error")),
            successor_intact=intact,
            successor_released=manager.release(successor),
        )
    finally:
        child.close()


# ------------------------------------------------------------------------------- Redis outages


@dataclasses.dataclass
class OutageFacts:
    stats: LoopStats
    lost: int
    outages: int
    warnings: dict[str, int]
    infos: dict[str, int]
    recoveries: list[float]
    fallback_after: list[float]


def redis_outage(
    server: Any,
    workdir: Path,
    *,
    threads: int,
    processes: int,
    outages: int,
    keys: int = 3,
    retry_interval: float = 0.5,
    kill: bool = False,
    grants_per_phase: int = 20,
) -> OutageFacts:
    """Stop (or SIGKILL) and restart ``server`` ``outages`` times while hybrid managers in
    ``threads`` threads of this process and in ``processes`` other processes acquire a few keys.

    Each phase lasts until every participating process has been granted locks from the expected
    backend (files while down, Redis after the restart) and this process got
    ``grants_per_phase`` of them. Measures, per outage, how long until the first file grant and,
    after the restart, until the first Redis grant; counts WARNING/INFO records of every hybrid.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    lock_dir = workdir / "locks"
    key_names = [f"outage-{i}" for i in range(keys)]
    sections = [Section(workdir, f"key-{i}") for i in range(keys)]
    for section in sections:
        section.reset()
    stop_file = workdir / "stop"
    kwargs = {"url": server.url, "directory": str(lock_dir), "retry_interval": retry_interval}
    options = {
        "mode": "queue",
        "iterations": 1_000_000,
        "duration": 60.0,
        "hold": 0.002,
        "ttl": 10.0,
        "timeout": 2.0,
    }
    stats = LoopStats()
    recoveries: list[float] = []
    fallback_after: list[float] = []
    stop = threading.Event()
    results: list[LoopStats] = []

    def offsets() -> list[int]:
        return [len(section.entries()) for section in sections]

    def everybody_on(backend: str, offset: list[int], pids: set[int], since: float) -> bool:
        seen = {
            pid
            for section, start in zip(sections, offset)
            for _, b, pid in section.entries()[start:]
            if b == backend
        }
        mine = sum(1 for when, b in list(live_grants) if when >= since and b == backend)
        return pids <= seen and mine >= grants_per_phase

    def first_grant(since: float, backend: str) -> float | None:
        for when, which in list(live_grants):
            if when >= since and which == backend:
                return when
        return None

    live_grants: list[tuple[float, str]] = []
    with counting_logs() as logs:
        hybrid = hybrid_manager(**kwargs)
        original_acquire = hybrid.acquire

        def recording_acquire(*args: Any, **kw: Any) -> Any:
            lease = original_acquire(*args, **kw)
            if lease is not None:
                live_grants.append((time.monotonic(), lease.backend))
            return lease

        hybrid.acquire = recording_acquire  # type: ignore[method-assign]
        contenders = (
            Contenders(
                "tests.reliability._harness:hybrid_manager",
                kwargs,
                key_names,
                workdir,
                processes=processes,
                stop_file=str(stop_file),
                **options,
            )
            if processes
            else None
        )
        pids = {os.getpid(), *(contenders.pids if contenders is not None else [])}
        workers = [
            threading.Thread(
                target=lambda: results.append(
                    lock_loop(hybrid, key_names, workdir, stop=stop, **options)
                ),
                daemon=True,
            )
            for _ in range(threads)
        ]
        for worker in workers:
            worker.start()
        try:
            poll_until(lambda: everybody_on("redis", [0] * keys, pids, 0.0), timeout=30)
            for _ in range(outages):
                offset = offsets()
                down_at = time.monotonic()
                if kill:
                    server.kill()
                else:
                    server.stop()
                poll_until(lambda: everybody_on("file", offset, pids, down_at), timeout=15)
                got = first_grant(down_at, "file")
                fallback_after.append(got - down_at if got else float("inf"))
                offset = offsets()
                server.start()
                up_at = time.monotonic()
                poll_until(
                    lambda: everybody_on("redis", offset, pids, up_at),
                    timeout=retry_interval + 15,
                )
                got = first_grant(up_at, "redis")
                recoveries.append(got - up_at if got else float("inf"))
        finally:
            stop.set()
            stop_file.write_text("stop")
            for worker in workers:
                worker.join(timeout=30)
            if contenders is not None:
                stats.merge(contenders.result())
        for result in results:
            stats.merge(result)
        warnings = {"main": logs.count("celery_lock.hybrid", "WARNING", DOWN)}
        infos = {"main": logs.count("celery_lock.hybrid", "INFO", UP)}
    if processes:
        # Summed over the other processes by merge(): each has a hybrid of its own.
        children = LogCounter()
        children.counts.update({tuple(k.split("|", 2)): n for k, n in stats.logs.items()})  # type: ignore[misc]
        warnings["children"] = children.count("celery_lock.hybrid", "WARNING", DOWN)
        infos["children"] = children.count("celery_lock.hybrid", "INFO", UP)
    count = sum(section.count() for section in sections)
    return OutageFacts(
        stats=stats,
        lost=stats.acquired - count,
        outages=outages,
        warnings=warnings,
        infos=infos,
        recoveries=recoveries,
        fallback_after=fallback_after,
    )


# ------------------------------------------------------------------------------- cleaner races


@dataclasses.dataclass
class CleanerRaceFacts:
    contention: ContentionFacts
    passes: int
    removed_live: int
    dead_removed: int
    dead_left: int
    clean_errors: int


def cleaner_race(
    backend_spec: tuple[str, dict[str, Any]],
    manager: LockManager,
    workdir: Path,
    *,
    processes: int,
    iterations: int,
    dead: int,
    key: str = "cleaner-race",
) -> CleanerRaceFacts:
    """Run the cleaner in a loop while ``processes`` contend on ``key`` (QUEUE mode) and
    ``dead`` SIGKILLed holders left orphan locks on other keys.

    Live locks: every release must still find its lock (``release_false`` counts the ones the
    cleaner stole). Dead ones: gone once the contenders finish.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    dead_keys = [f"dead-{i}" for i in range(dead)]
    for dead_key in dead_keys:
        child = Child(child_config(backend_spec, dead_key, ttl=300.0))
        try:
            assert child.expect("acquired", "busy", timeout=20)["event"] == "acquired"
            child.signal(signal.SIGKILL)
            child.proc.wait(timeout=5)
        finally:
            child.close()
    section = Section(workdir, "key-0")
    section.reset()
    cleaner = LockCleaner(manager)
    passes = removed = errors = 0
    began = time.monotonic()
    contenders = Contenders(
        *backend_spec,
        [key],
        workdir,
        processes=processes,
        mode="queue",
        iterations=iterations,
        duration=90.0,
        hold=0.0005,
        timeout=30.0,
    )
    result: list[LoopStats] = []
    collector = threading.Thread(target=lambda: result.append(contenders.result()), daemon=True)
    collector.start()
    deadline = time.monotonic() + 120
    while collector.is_alive() and time.monotonic() < deadline and passes < 100_000:
        report = cleaner.clean()
        passes += 1
        removed += report.removed
        errors += report.errors
    collector.join(timeout=30)
    stats = result[0] if result else LoopStats(errors=["contenders did not finish"])
    left = sum(manager.is_locked(k) for k in dead_keys)
    facts = ContentionFacts(stats, section.count(), section.fences(), time.monotonic() - began)
    # Where a hybrid serving from Redis holds a shadow file lock beside each Redis lock, a dead
    # holder leaves two entries, and the cleaner's report counts entries per store.
    per_holder = entries_per_lock(backend_spec)
    return CleanerRaceFacts(
        contention=facts,
        passes=passes,
        removed_live=max(0, removed - dead * per_holder),
        dead_removed=min(removed, dead * per_holder) // per_holder,
        dead_left=left,
        clean_errors=errors,
    )


def summary(values: list[float]) -> str:
    """``p50/max`` in milliseconds."""
    if not values:
        return "-"
    return f"{statistics.median(values) * 1e3:.1f}/{max(values) * 1e3:.1f} ms"
