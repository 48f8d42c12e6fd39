"""Run the example end to end: two workers and beat, duplicates on purpose, then a timeline.

``python -m example_project.demo [--run-dir DIR] [--timeout SECONDS]`` starts two real
``celery worker`` processes (prefork, two children each) and ``celery beat``, then sends:

- six ``sync_account`` calls for account 1 at once, spelled three ways (QUEUE: they must run
  one after another, each exactly once) and one for account 2 (another key: runs alongside);
- three invoices of customer 7 and one of customer 8 (QUEUE, keyed on the customer);
- three ``nightly_report()`` calls while a beat-started report is running (EXECUTION: skipped,
  like beat's own next tick: the report takes 4 s and beat fires it every 2 s in the demo).

It prints one line per event while they run, then a table and a timeline of what ran, what was
skipped and what was re-queued, and checks the facts. Exit status: 0 when every fact holds, 1
when one fails, 2 when a process could not start or died. Every process it started is stopped
(SIGTERM, bounded waits, SIGKILL of its process group after that).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, TextIO

from example_project.events import EventReader

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKERS = ("demo-a", "demo-b")
#: Bounds: process start, waiting for the scenario, stopping each process.
READY_TIMEOUT = 20.0
DEFAULT_TIMEOUT = 40.0
STOP_TIMEOUT = 15.0
POLL = 0.1

SYNC = "example_project.tasks.sync_account"
INVOICE = "example_project.tasks.send_invoice"
REPORT = "example_project.tasks.nightly_report"
CLEANUP = "celery_lock.cleanup"


class DemoError(Exception):
    """The demo could not run (a process did not start, or died)."""


# ------------------------------------------------------------------------------- processes


@dataclass
class Process:
    """One ``celery`` process started by the demo (its own session: one process group)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    output: Path

    def tail(self, lines: int = 15) -> str:
        text = []
        for path in (self.output, self.log):
            if path.exists():
                content = path.read_text(errors="replace").splitlines()[-lines:]
                text += [f"    {path.name}: {line}" for line in content]
        return "\n".join(text) or "    (no output)"


def start_process(name: str, args: list[str], run_dir: Path, env: dict[str, str]) -> Process:
    log, output = run_dir / f"{name}.log", run_dir / f"{name}.out"
    command = [sys.executable, "-m", "celery", "-A", "example_project.celery_app", *args]
    command += ["--loglevel=INFO", f"--logfile={log}"]
    with output.open("wb") as out:
        # Output goes to a file, never to an undrained pipe (a worker blocks once it fills).
        # A session of its own lets the demo kill the worker with its pool children at once.
        popen = subprocess.Popen(
            command,
            cwd=run_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(name, popen, log, output)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the group id was reused by another user's processes
        return False
    return True


def stop_processes(procs: list[Process], timeout: float = STOP_TIMEOUT) -> list[str]:
    """SIGTERM every process, wait (bounded), SIGKILL what is left; returns notes on trouble."""
    notes: list[str] = []
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            notes.append(f"{proc.name} ignored SIGTERM for {timeout:.0f} s: killed")
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(timeout=5)
    # The pool children share the worker's process group; one still alive is an orphan.
    for proc in procs:
        if group_alive(proc.popen.pid):
            notes.append(f"{proc.name} left processes behind: killed")
            os.killpg(proc.popen.pid, signal.SIGKILL)
    return notes


# ------------------------------------------------------------------------------ bookkeeping


@dataclass
class Call:
    """One task call: sent by the demo, or seen in the events (beat, earlier runs)."""

    task_id: str
    task: str
    label: str
    sender: str
    sent_at: float | None = None
    starts: list[dict[str, Any]] = field(default_factory=list)
    ends: list[dict[str, Any]] = field(default_factory=list)
    skips: list[dict[str, Any]] = field(default_factory=list)
    requeues: list[dict[str, Any]] = field(default_factory=list)
    acquired: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None
    state: str | None = None

    @property
    def run(self) -> tuple[float, float | None] | None:
        """(start, end) of the first run; end None while running."""
        if not self.starts:
            return None
        return self.starts[0]["ts"], self.ends[0]["ts"] if self.ends else None

    @property
    def outcome(self) -> str:
        if len(self.starts) > 1:
            return f"ran {len(self.starts)} TIMES"
        if self.starts:
            if not self.ends:
                return "still running"
            if not self.ends[0].get("ok"):
                return "failed"
            n = len(self.requeues)
            return f"ran after {plural(n, 're-queue')}" if n else "ran"
        if self.skips:
            return "skipped (lock held)"
        return "not run"

    @property
    def first_start(self) -> float:
        return self.starts[0]["ts"] if self.starts else math.inf

    @property
    def first_seen(self) -> float:
        times = [e["ts"] for e in (*self.starts, *self.skips, *self.requeues)]
        if self.sent_at is not None:
            times.append(self.sent_at)
        return min(times, default=math.inf)


def short_name(task: str) -> str:
    return task.rsplit(".", 1)[-1]


def call_label(task: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in (kwargs or {}).items()]
    return f"{short_name(task)}({', '.join(parts)})"


class Scenario:
    """Sends the calls and folds the events into :class:`Call` records."""

    def __init__(self, tasks: ModuleType, say: Callable[[str], None]) -> None:
        self.tasks = tasks
        self.say = say
        self.calls: dict[str, Call] = {}
        self.cleanups: list[dict[str, Any]] = []
        self.lost: list[dict[str, Any]] = []
        self.t0 = self.t_end = time.time()
        self.reports_sent = False

    def send(self, task_name: str, *args: Any, **kwargs: Any) -> Call:
        task = getattr(self.tasks, short_name(task_name))
        result = task.apply_async(args, kwargs)
        call = Call(result.id, task_name, call_label(task_name, args, kwargs), "demo", time.time())
        self.calls[call.task_id] = call
        return call

    def send_burst(self) -> None:
        # Six calls of one job at once, spelled three ways (one lock key), and another account.
        for _ in range(2):
            self.send(SYNC, 1)
            self.send(SYNC, account_id=1)
            self.send(SYNC, 1, full=False)
        self.send(SYNC, 2)
        for invoice, customer in ((1001, 7), (1002, 7), (1003, 7), (1004, 8)):
            self.send(INVOICE, invoice, customer)
        self.say(f"  +{self.at(time.time())}  sent 7 x sync_account, 4 x send_invoice")

    def send_duplicate_reports(self) -> None:
        for _ in range(3):
            self.send(REPORT)
        self.reports_sent = True
        self.say(f"  +{self.at(time.time())}  sent 3 x nightly_report() while one is running")

    def at(self, ts: float) -> str:
        return f"{ts - self.t0:5.2f}s"

    def call_for(self, event: dict[str, Any]) -> Call:
        task_id = str(event.get("task_id"))
        call = self.calls.get(task_id)
        if call is None:
            task = str(event.get("task"))
            args = event.get("args") or {}
            sender = "beat" if task == REPORT else "other"
            call = Call(task_id, task, call_label(task, kwargs=args), sender)
            self.calls[task_id] = call
        return call

    def take(self, event: dict[str, Any]) -> None:
        """Fold one event in and print its progress line."""
        kind = event["event"]
        when = f"  +{self.at(event['ts'])}  "
        if kind == "cleanup":
            self.cleanups.append(event)
            self.say(f"{when}{CLEANUP} ran from beat: {fmt_clean(event.get('result'))}")
            return
        if kind not in ("acquired", "start", "end", "skipped", "requeued", "lost"):
            return
        call = self.call_for(event)
        name = f"{call.label} [{call.sender}]" if call.sender != "demo" else call.label
        if kind == "acquired":
            call.acquired.append(event)  # printed with the start that follows
        elif kind == "start":
            call.starts.append(event)
            worker = short_worker(event.get("worker"))
            took = f", lock taken in {call.acquired[-1]['wait_ms']:.1f} ms" if call.acquired else ""
            self.say(f"{when}{name:34} started on {worker} (fence {event.get('fence')}{took})")
        elif kind == "lost":
            self.lost.append(event)
            self.say(f"{when}{name:34} LOST ITS LOCK while running")
        elif kind == "end":
            call.ends.append(event)
            self.say(f"{when}{name:34} finished" + ("" if event.get("ok") else " WITH AN ERROR"))
        elif kind == "skipped":
            call.skips.append(event)
            self.say(f"{when}{name:34} skipped: held by {short_id(event.get('holder'))}")
        else:
            call.requeues.append(event)
            self.say(
                f"{when}{name:34} re-queued (#{event.get('requeues')}, again in "
                f"{float(event.get('countdown') or 0):.2f} s; held by "
                f"{short_id(event.get('holder'))})"
            )

    def of(self, task: str, sender: str | None = None) -> list[Call]:
        calls = [c for c in self.calls.values() if c.task == task]
        return [c for c in calls if sender is None or c.sender == sender]

    def pending(self) -> list[str]:
        """What the scenario still waits for (empty: done)."""
        waiting = []
        unfinished = [c for c in self.of(SYNC, "demo") + self.of(INVOICE, "demo") if not c.ends]
        if unfinished:
            waiting.append(f"{len(unfinished)} syncs/invoices to finish")
        if not self.reports_sent:
            waiting.append("a nightly_report run started by beat")
        elif any(not c.skips and not c.ends for c in self.of(REPORT, "demo")):
            waiting.append("the duplicate nightly_report calls to be decided")
        if not any(c.skips for c in self.of(REPORT, "beat")):
            waiting.append("beat to fire nightly_report while it runs")
        if not self.cleanups:
            waiting.append(f"a {CLEANUP} run from beat")
        return waiting

    def running(self) -> list[Call]:
        return [c for c in self.calls.values() if len(c.ends) < len(c.starts)]

    def ordered(self) -> list[Call]:
        """Reports, then syncs, then invoices; each in the order they ran (or were decided)."""
        order = {REPORT: 0, SYNC: 1, INVOICE: 2}
        return sorted(
            self.calls.values(), key=lambda c: (order.get(c.task, 9), c.first_start, c.first_seen)
        )


def short_worker(hostname: Any) -> str:
    return str(hostname).split("@", 1)[0]


def short_id(task_id: Any) -> str:
    return str(task_id)[:8] if task_id else "?"


def fmt_clean(result: Any) -> str:
    if isinstance(result, dict):
        return ", ".join(f"{k} {v}" for k, v in result.items())
    return str(result)


# ---------------------------------------------------------------------------------- report


def fetch_results(scenario: Scenario, app: Any) -> None:
    """Read the stored state and result of every call the demo sent."""
    for call in scenario.calls.values():
        if call.sender != "demo":
            continue
        result = app.AsyncResult(call.task_id)
        try:
            call.result = result.get(timeout=5, interval=0.05, propagate=False)
        except Exception as exc:  # a timeout here is reported as the state, checked below
            call.result = exc
        call.state = result.state


def timeline(calls: list[Call], t0: float, t_end: float, width: int = 48) -> list[str]:
    """One row per call: a table on the left, its life on a time axis on the right."""
    span = max(t_end - t0, 1.0)
    steps = (0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
    step = next((s for s in steps if span / s <= width), float(math.ceil(span / width)))
    cols = math.ceil(span / step) + 1

    def col(ts: float) -> int:
        return min(cols - 1, max(0, int((ts - t0) / step)))

    axis = [" "] * cols
    every = max(1, math.ceil(4 * step))  # a label every `every` seconds, at least 4 cols apart
    for second in range(0, int(span) + 1, every):
        label = f"{second}s"
        pos = col(t0 + second)
        if pos + len(label) <= cols and all(c == " " for c in axis[max(0, pos - 1) : pos]):
            axis[pos : pos + len(label)] = label
    # Fences are seeded from the clock (so they keep increasing when a fence counter expires):
    # long numbers, of which the last digits tell successive runs apart.
    long_fences = any(len(str(c.starts[0].get("fence"))) > 8 for c in calls if c.starts)
    header = f"  {'call':30} {'by':5} {'outcome':22} {'fence':>8}  {'worker':7} |"
    rows = [header + "".join(axis).rstrip(), "  " + "-" * (len(header) + cols - 2)]
    for call in calls:
        bar = [" "] * cols
        run = call.run
        if call.sent_at is not None and run is not None:
            for i in range(col(call.sent_at), col(run[0])):
                bar[i] = "."
        for event in call.requeues:
            bar[col(event["ts"])] = "r"
        for event in call.skips:
            bar[col(event["ts"])] = "x"
        if run is not None:
            start, end = run
            for i in range(col(start), col(end if end is not None else t_end) + 1):
                bar[i] = "#"
        fence = str(call.starts[0].get("fence")) if call.starts else ""
        if long_fences and fence:
            fence = "..." + fence[-5:]
        worker = short_worker(call.starts[0].get("worker")) if call.starts else ""
        if not worker and call.skips:
            worker = "-"
        rows.append(
            f"  {call.label[:30]:30} {call.sender:5} {call.outcome:22} "
            f"{fence:>8}  {worker:7} |{''.join(bar).rstrip()}"
        )
    rows.append(
        f"  one column = {step:g} s;  # running   . waiting (sent, not yet run)   "
        "r re-queued   x skipped"
    )
    if long_fences:
        rows.append("  fence: the last digits of the run's fencing token (self.request.lock_lease)")
    return rows


@dataclass
class Fact:
    """A statement the demo checks, with the figures behind it."""

    text: str
    ok: bool
    detail: str


def overlaps(calls: list[Call]) -> list[tuple[Call, Call]]:
    """Neighbours in start order whose runs overlapped: empty exactly when no two runs did.

    (If X and Y overlap, X and the run that starts next after X overlap too.) A run that never
    ended counts as endless.
    """
    runs = sorted((c for c in calls if c.run is not None), key=lambda c: c.first_start)
    found = []
    for before, after in itertools.pairwise(runs):
        _, end = before.run or (0.0, None)
        if end is None or after.first_start < end:
            found.append((before, after))
    return found


def fences_increase(calls: list[Call]) -> bool:
    """Whether the runs' fencing tokens strictly increase in the order the runs started."""
    runs = sorted((c for c in calls if c.run is not None), key=lambda c: c.first_start)
    fences = [c.starts[0].get("fence") for c in runs]
    numbers = [f for f in fences if isinstance(f, int)]
    return len(numbers) == len(fences) and all(a < b for a, b in itertools.pairwise(numbers))


def ran_once(call: Call) -> bool:
    return (
        len(call.starts) == 1
        and len(call.ends) == 1
        and bool(call.ends[0].get("ok"))
        and call.state == "SUCCESS"
    )


def check_facts(scenario: Scenario) -> list[Fact]:
    """The demo's claims, checked against the events and the stored results."""
    facts = []

    syncs = scenario.of(SYNC, "demo")
    account1 = [c for c in syncs if c.starts and c.starts[0]["args"].get("account_id") == 1]
    keys = {c.starts[0].get("key") for c in account1}
    clash = overlaps(account1)
    increasing = fences_increase(account1)
    if clash:
        how = f"{clash[0][0].label} and {clash[0][1].label} overlapped"
    else:
        how = "one after another" + (", fences increasing" if increasing else ", fences NOT")
    facts.append(
        Fact(
            "no two sync_account(1) runs overlapped",
            len(account1) == 6 and len(keys) == 1 and not clash and increasing,
            f"{plural(len(account1), 'run')} of 6 calls spelled 3 ways, "
            f"{plural(len(keys), 'lock key')}, {how}",
        )
    )

    once = [c for c in syncs if ran_once(c) and c.result == expected_sync(c)]
    facts.append(
        Fact(
            "every sync_account call ran exactly once",
            len(once) == len(syncs) == 7,
            f"{len(once)} of {len(syncs)} ran once, under their own task id, with their result, "
            f"after {plural(sum(len(c.requeues) for c in syncs), 're-queue')} in all",
        )
    )

    reports = scenario.of(REPORT)
    duplicates = scenario.of(REPORT, "demo")
    skipped = [
        c
        for c in duplicates
        if c.skips and not c.starts and c.state == "SUCCESS" and c.result is None
    ]
    runs = [c for c in reports if c.starts]
    beat_skips = [c for c in reports if c.sender == "beat" and c.skips]
    facts.append(
        Fact(
            "duplicate nightly_report calls were skipped",
            len(skipped) == len(duplicates) == 3
            and bool(beat_skips)
            and bool(runs)
            and not overlaps(reports),
            f"{len(skipped)} of {len(duplicates)} sent during a run were skipped (SUCCESS, None),"
            f" and {len(beat_skips)} fired by beat; {plural(len(runs), 'run')}, never two at once",
        )
    )

    invoices = scenario.of(INVOICE, "demo")
    customer7 = [c for c in invoices if c.starts and c.starts[0]["args"].get("customer_id") == 7]
    sent_once = [c for c in invoices if ran_once(c)]
    facts.append(
        Fact(
            "one customer's invoices never overlapped",
            len(customer7) == 3 and not overlaps(customer7) and len(sent_once) == len(invoices),
            f"customer 7: {plural(len(customer7), 'run')}, one at a time; "
            f"{len(sent_once)} of {len(invoices)} invoices sent exactly once",
        )
    )

    facts.append(
        Fact(
            "the lock cleaner ran from beat",
            bool(scenario.cleanups),
            f"{CLEANUP} ran {plural(len(scenario.cleanups), 'time')}"
            + "".join(f", last: {fmt_clean(e.get('result'))}" for e in scenario.cleanups[-1:]),
        )
    )
    return facts


def expected_sync(call: Call) -> dict[str, Any]:
    args = call.starts[0]["args"] if call.starts else {}
    return {**args, "task_id": call.task_id}


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def acquire_times(scenario: Scenario) -> str:
    """How long taking a free lock took in the workers (from the ``lock_acquired`` signal)."""
    waits = sorted(
        float(e["wait_ms"])
        for c in scenario.calls.values()
        for e in c.acquired
        if isinstance(e.get("wait_ms"), (int, float))
    )
    if not waits:
        return "no lock_acquired signal seen"
    median = waits[len(waits) // 2]
    return f"acquire took {median:.2f} ms (median of {len(waits)}), at most {waits[-1]:.2f} ms"


def summary(scenario: Scenario) -> list[str]:
    """Counts per task."""

    def counts(calls: list[Call]) -> str:
        runs = sum(bool(c.starts) for c in calls)
        requeues = sum(len(c.requeues) for c in calls)
        return (
            f"{plural(len(calls), 'call')}, {plural(runs, 'run')}, {plural(requeues, 're-queue')}"
        )

    reports = scenario.of(REPORT)
    skips = [sum(bool(c.skips) for c in reports if c.sender == s) for s in ("demo", "beat")]
    backends = {str(e.get("backend")) for c in scenario.calls.values() for e in c.starts}
    return [
        f"  sync_account:   {counts(scenario.of(SYNC, 'demo'))} (a re-queued call keeps its id)",
        f"  send_invoice:   {counts(scenario.of(INVOICE, 'demo'))} (keyed on the customer)",
        f"  nightly_report: {plural(sum(bool(c.starts) for c in reports), 'run')}, "
        f"{sum(skips)} skipped ({skips[0]} sent by the demo, {skips[1]} by beat)",
        f"  {CLEANUP}: {plural(len(scenario.cleanups), 'run')} from beat",
        f"  locks: {', '.join(sorted(backends)) or 'none'}; {acquire_times(scenario)}",
    ]


# ------------------------------------------------------------------------------------ main


class Demo:
    """One run: start the processes, play the scenario, stop everything, report."""

    def __init__(self, run_dir: Path, timeout: float, out: TextIO) -> None:
        self.run_dir = run_dir
        self.timeout = timeout
        self.out = out
        self.procs: list[Process] = []
        self.notes: list[str] = []
        self.started = time.monotonic()
        # The app reads its configuration from the environment when it is first imported.
        os.environ["EXAMPLE_RUN_DIR"] = str(run_dir)
        os.environ["EXAMPLE_SCHEDULE"] = "demo"
        self.celery_app = importlib.import_module("example_project.celery_app")
        self.tasks = importlib.import_module("example_project.tasks")
        self.reader = EventReader(self.celery_app.EVENTS_FILE)
        self.scenario = Scenario(self.tasks, self.say)
        self.report_running = False
        self.ready: set[str] = set()
        self.expected: set[str] = set()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = [str(REPO_ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        # Decided once, here: the workers and beat must not each probe Redis and disagree.
        redis_url = self.celery_app.REDIS_URL
        env["EXAMPLE_REDIS"] = "on" if redis_url else "off"
        if redis_url:
            env["REDIS_URL"] = redis_url
        return env

    def wait_until(self, condition: Callable[[], bool], deadline: float) -> bool:
        """Fold events in until ``condition`` holds (True) or ``deadline`` passes (False)."""
        while True:
            for event in self.reader.read_new():
                self.on_event(event)
            if self.report_running and not self.scenario.reports_sent:
                # After the whole batch, so that the progress lines stay in time order.
                self.scenario.send_duplicate_reports()
            if condition():
                return True
            for proc in self.procs:
                if proc.popen.poll() is not None and proc.name in self.expected:
                    raise DemoError(
                        f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.tail()}"
                    )
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)

    # -- phases

    def start(self) -> None:
        self.say(f"Mode: {self.celery_app.describe_mode()}")
        self.say(f"Run directory: {self.run_dir} (worker and beat logs, events.jsonl)")
        self.say("Starting 2 workers (prefork, 2 processes each) and beat ...")
        env = self.child_env()
        self.expected = {*WORKERS, "beat"}
        for name in WORKERS:
            args = ["worker", "--pool=prefork", "--concurrency=2", "--without-mingle"]
            args += ["--without-gossip", "--without-heartbeat", f"--hostname={name}@%h"]
            self.procs.append(start_process(name, args, self.run_dir, env))
        self.procs.append(start_process("beat", ["beat"], self.run_dir, env))
        if not self.wait_until(
            lambda: self.ready >= self.expected, time.monotonic() + READY_TIMEOUT
        ):
            missing = ", ".join(sorted(self.expected - self.ready))
            tails = "\n".join(p.tail() for p in self.procs)
            raise DemoError(f"not ready after {READY_TIMEOUT:.0f} s: {missing}\n{tails}")
        self.say(f"Ready after {time.monotonic() - self.started:.1f} s.")

    def play(self) -> None:
        scenario = self.scenario
        self.say("Events (seconds since the first call was sent):")
        scenario.t0 = time.time()
        scenario.send_burst()
        deadline = time.monotonic() + self.timeout
        finished = self.wait_until(lambda: not scenario.pending(), deadline)
        # Beat goes first so that no new report starts, then the running tasks may end.
        self.say("Stopping beat, letting running tasks finish ...")
        self.expected.discard("beat")
        self.notes += stop_processes([p for p in self.procs if p.name == "beat"])
        self.wait_until(lambda: not scenario.running(), deadline)
        if not finished:
            waiting = "; ".join(scenario.pending())
            self.notes.append(f"timed out after {self.timeout:g} s waiting for: {waiting}")
        scenario.t_end = time.time()

    def stop(self) -> None:
        if not self.procs:
            return
        self.expected = set()
        stopping = time.monotonic()
        self.notes += stop_processes(self.procs)
        self.say(f"Stopped the workers in {time.monotonic() - stopping:.1f} s.")
        for event in self.reader.read_new():  # what they wrote while stopping
            self.on_event(event)

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "worker_ready":
            self.ready.add(short_worker(event.get("worker")))
            self.say(f"  worker {event.get('worker')} ready ({event.get('mode')} mode)")
        elif kind == "beat_ready":
            self.ready.add("beat")
            self.say("  beat ready")
        else:
            self.scenario.take(event)
            self.report_running |= kind == "start" and event.get("task") == REPORT

    def report(self) -> int:
        scenario = self.scenario
        fetch_results(scenario, self.celery_app.app)
        self.say("")
        self.say("What happened")
        for row in timeline(scenario.ordered(), scenario.t0, scenario.t_end):
            self.say(row)
        self.say("")
        for line in summary(scenario):
            self.say(line)
        self.say("")
        self.say("Facts")
        facts = check_facts(scenario)
        for fact in facts:
            self.say(f"  {'PASS' if fact.ok else 'FAIL'}  {fact.text}: {fact.detail}")
        self.notes += [
            f"task {e.get('task_id')} lost its lock while running" for e in scenario.lost
        ]
        for note in self.notes:
            self.say(f"  note: {note}")
        took = time.monotonic() - self.started
        problems = sum(not f.ok for f in facts) + len(self.notes)
        if problems:
            self.say(f"{problems} problem(s); the demo took {took:.1f} s. Logs: {self.run_dir}")
            return 1
        self.say(f"All {len(facts)} facts hold; the demo took {took:.1f} s.")
        return 0

    def run(self) -> int:
        try:
            self.start()
            self.play()
        except DemoError as exc:
            self.say(f"ERROR: {exc}")
            return 2
        finally:
            self.stop()
        return self.report()


@contextmanager
def signals_stop_the_demo() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo like Ctrl-C: its processes are stopped on the way out."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def prepare_run_dir(option: str | None) -> tuple[Path, bool]:
    """The run directory, and whether the demo made it (a temp dir, removed on success)."""
    if option is None:
        return Path(tempfile.mkdtemp(prefix="celery_lock_demo-")).resolve(), True
    run_dir = Path(option).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise DemoError(f"--run-dir {run_dir} is not empty: choose a new or empty directory")
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return run_dir, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m example_project.demo",
        description="Run the celery_lock example: real workers and beat, duplicates, a timeline.",
    )
    parser.add_argument(
        "--run-dir",
        help="new or empty directory for logs, events, lock files and the file broker "
        "(default: a temp dir, removed when every fact holds)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds the scenario may take (default {DEFAULT_TIMEOUT:g})",
    )
    options = parser.parse_args(argv)
    try:
        run_dir, temporary = prepare_run_dir(options.run_dir)
    except DemoError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    with signals_stop_the_demo():
        try:
            status = Demo(run_dir, options.timeout, sys.stdout).run()
        except KeyboardInterrupt:
            print("Interrupted; the processes the demo started were stopped.", flush=True)
            status = 130
    if temporary and status == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
