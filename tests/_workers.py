"""``celery worker`` subprocesses for tests (prefork, so SIGKILL, revoke-terminate and shutdown
behave as in production), and bounded polling helpers.

Workers log to a file (never an undrained pipe: a full pipe blocks the worker) and are ready
when the log says ``ready.``; ``stop()`` is a warm shutdown bounded in time, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent

#: Result backend transport options for test apps: an AsyncResult collected after its Redis
#: stopped unsubscribes once instead of retrying for ~20 s (Celery's default policy).
NO_RETRIES = {"retry_policy": {"max_retries": 1}}


@contextlib.contextmanager
def root_log_level_kept() -> Iterator[None]:
    """Around an embedded worker: celery.contrib.testing's ``start_worker`` runs
    ``app.log.setup(loglevel="error")``, which leaves the root logger at ERROR for every later
    test (a test that reads WARNING records from ``caplog`` then finds none)."""
    root = logging.getLogger()
    level = root.level
    try:
        yield
    finally:
        root.setLevel(level)


def drop_results() -> None:
    """Collect unreferenced AsyncResults while their result Redis still runs (their
    ``__del__`` unsubscribes from it)."""
    gc.collect()


def wait_for(
    condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


class WorkerProcess:
    """One ``celery -A <app> worker`` process (prefork) with its own log file."""

    def __init__(
        self,
        app: str,
        workdir: Path,
        env: dict[str, str],
        *,
        name: str = "w",
        concurrency: int = 2,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.logfile = workdir / f"{name}.log"
        self.args = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "--pool=prefork", f"--concurrency={concurrency}", "--loglevel=INFO",
            "--without-mingle", "--without-gossip", "--without-heartbeat",
            "-n", f"{name}-{os.getpid()}@%h", "--logfile", str(self.logfile), *extra_args,
        ]  # fmt: skip
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.logfile.unlink(missing_ok=True)
        self.proc = subprocess.Popen(  # noqa: S603
            self.args,
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited early:\n{self.log()}")
            return " ready." in self.log()

        wait_for(ready, timeout, 0.05, f"worker {self.name} to be ready")

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM); SIGKILL the whole process group of children if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
