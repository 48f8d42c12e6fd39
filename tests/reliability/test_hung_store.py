"""A store that hangs or a route that drops packets costs a task at most one timeout per
outage (issue 14, item 7): after the first timeout the hybrid's circuit is open and later
calls use files (or fail) at once; probes run in the background; recovery is noticed within
``retry_interval``."""

from __future__ import annotations

import datetime
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_lock import FileLockManager, HybridLockManager, LockBackendUnavailable
from celery_lock.backends.redis import RedisLockManager
from tests._redis_server import RedisServer
from tests._workers import WorkerProcess, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.redis, pytest.mark.timeout(90)]


class BlackHole:
    """A loopback port whose SYNs are dropped, like a route that black-holes packets: a
    listening socket with a backlog of 0 whose accept queue is filled by one connection that
    is never accepted (Linux then drops further SYNs; the client's connect times out)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


class Mute:
    """A TCP server that accepts and never answers (a hung server, or a proxy to one)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)  # the kernel accepts; nobody ever reads or writes
        self.port = self.listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(params=["black-holed", "mute"])
def dead_route(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, float]]:
    """(kind, URL, what the first call may cost: connect timeout 0.5 s / read timeout 1 s)."""
    if request.param == "black-holed":
        hole: BlackHole | Mute = BlackHole()
        budget = 0.5
    else:
        hole = Mute()
        budget = 1.0
    try:
        # Show the fault is real: a plain connect (black hole) or a read (mute) stalls.
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", hole.port))
            probe.sendall(b"*1\r\n$4\r\nPING\r\n")
            with pytest.raises(TimeoutError):
                probe.recv(1)
        except TimeoutError:
            assert request.param == "black-holed"
        finally:
            probe.close()
        yield request.param, hole.url, budget
    finally:
        hole.close()


@pytest.mark.parametrize("fallback", ["file", None])
def test_dead_route_costs_one_timeout_then_nothing(
    dead_route: tuple[str, str, float], fallback: str | None, tmp_path: Path
) -> None:
    kind, url, budget = dead_route
    files = FileLockManager(tmp_path / "locks") if fallback else None
    hybrid = HybridLockManager(RedisLockManager.from_url(url), files, retry_interval=60)

    def acquire(key: str) -> tuple[Any, float]:
        started = time.monotonic()
        try:
            lease: Any = hybrid.acquire(key, ttl=30)
        except LockBackendUnavailable as exc:
            lease = exc
        return lease, time.monotonic() - started

    first, first_cost = acquire("first")
    later = [acquire(f"k{i}") for i in range(20)]
    worst_later = max(cost for _, cost in later)
    print(f"{kind}, fallback={fallback}: first {first_cost:.3f} s, later max {worst_later:.4f} s")
    assert budget - 0.05 <= first_cost <= budget + 0.35, f"first acquire took {first_cost:.3f} s"
    assert worst_later < 0.05, f"a later acquire took {worst_later:.3f} s"
    if fallback:
        assert first.backend == "file"
        assert all(lease.backend == "file" for lease, _ in later)
    else:
        assert isinstance(first, LockBackendUnavailable)
        assert all(isinstance(error, LockBackendUnavailable) for error, _ in later)
    assert hybrid.using_fallback


# ------------------------------------------------------------------------- a real worker


RETRY_INTERVAL = 2.0


@pytest.fixture
def worker_stack(
    module_redis_server: RedisServer, own_redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[Celery, Any, WorkerProcess]]:
    """A prefork worker (-c 2) of tests._worker_app: broker and events on one server, locks
    on ``own_redis_server`` (the one the test stops)."""
    broker = module_redis_server
    events = broker.client(db=6)
    events.flushdb()
    env = {
        "CL_TEST_BROKER": broker.url_db(5),
        "CL_TEST_LOCKS": own_redis_server.url,
        "CL_TEST_EVENTS": broker.url_db(6),
        "CL_TEST_LOCK_DIR": str(tmp_path / "locks"),
        "CL_TEST_RETRY_INTERVAL": str(RETRY_INTERVAL),
    }
    producer = Celery("hung-producer", broker=broker.url_db(5), set_as_current=False)
    worker = WorkerProcess("tests._worker_app", tmp_path, env, name="hung", concurrency=2)
    worker.start()
    try:
        worker.wait_ready()
        yield producer, events, worker
    finally:
        own_redis_server.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        worker.stop()
        producer.close()
        events.close()


def event_of(events: Any, kind: str, tag: str) -> dict[str, Any] | None:
    for raw in events.lrange("events", 0, -1):
        event = json.loads(raw)
        if event.get("kind") == kind and event.get("tag") == tag:
            return dict(event)
    return None


def run(producer: Celery, events: Any, tag: str) -> dict[str, Any]:
    """Run ``w.hold(tag, 0.01)`` to its end; return its start event, with ``waited`` (seconds
    from sending it to the task holding its lock)."""
    sent = time.time()
    producer.send_task("w.hold", args=[tag, 0.01])
    event = wait_for(
        lambda: event_of(events, "start", tag), timeout=15, interval=0.005, what=f"{tag} start"
    )
    # Its release, too, is over before the next step (a stop meanwhile would hit it).
    wait_for(lambda: event_of(events, "end", tag), timeout=15, interval=0.005, what=f"{tag} end")
    time.sleep(0.02)  # the release follows the end event within the task's last lines
    event["waited"] = event["t"] - sent
    return event


def logged(log: str, text: str, after: float) -> dict[str, float]:
    """Seconds from ``after`` (wall clock) to each pool child's first log line with ``text``."""
    found: dict[str, float] = {}
    for line in log.splitlines():
        if text not in line or "/ForkPoolWorker-" not in line:
            continue
        stamp, _, rest = line.partition(": ")
        at = datetime.datetime.strptime(stamp.lstrip("["), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if at >= after:
            found.setdefault(rest.split("/", 1)[1].split("]", 1)[0], at - after)
    return found


def test_sigstopped_lock_redis_under_a_worker_costs_one_timeout_per_child(
    worker_stack: tuple[Celery, Any, WorkerProcess], own_redis_server: RedisServer
) -> None:
    """SIGSTOP the lock Redis under a prefork worker (-c 2): in each child the first task
    waits one read timeout (1 s), every later one not at all (files); after SIGCONT both
    children are back on Redis within ``lock_retry_interval`` (their background probes)."""
    producer, events, worker = worker_stack
    warm = [run(producer, events, f"warm{i}") for i in range(4)]
    assert all(e["backend"] == "redis" for e in warm)
    stopped_at = time.time()
    own_redis_server.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    stopped = [run(producer, events, f"stopped{i}") for i in range(10)]
    waits = [round(e["waited"], 3) for e in stopped]
    print("SIGSTOP: waits (s)", waits, "pids", [e["pid"] for e in stopped])
    slow = [e for e in stopped if e["waited"] > 0.3]
    per_child: dict[int, int] = {}
    for event in slow:
        per_child[event["pid"]] = per_child.get(event["pid"], 0) + 1
    assert all(e["backend"] == "file" for e in stopped)
    assert all(count == 1 for count in per_child.values()), per_child  # one timeout a child
    assert len(slow) == len({e["pid"] for e in stopped})  # every child that ran one: once
    assert max(e["waited"] for e in slow) < 1.0 + 0.7  # one 1 s read timeout, and margin
    assert all(e["waited"] < 0.3 for e in stopped[-4:])  # later tasks do not wait at all
    down = logged(worker.log(), "Redis is unreachable for locks", stopped_at)
    assert len(down) == len(slow), down  # one WARNING per child that met the outage

    resumed = time.time()
    own_redis_server.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    back = wait_for(
        lambda: (
            (found := logged(worker.log(), "Redis answers again", resumed)).keys() == down.keys()
            and found
        ),
        timeout=RETRY_INTERVAL + 10,
        what="every child that went down to log that Redis answers again",
    )
    print("back on Redis after SIGCONT (s):", {k: round(v, 2) for k, v in back.items()})
    assert max(back.values()) <= RETRY_INTERVAL + 0.5
    after = [run(producer, events, f"after{i}") for i in range(6)]
    assert all(e["backend"] == "redis" and e["waited"] < 0.3 for e in after)
