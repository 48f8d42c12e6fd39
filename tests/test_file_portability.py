"""The file backend where Linux extras are missing (macOS, the BSDs): issue 13.

A subprocess removes ``time.CLOCK_BOOTTIME``, makes every open of a ``/proc`` path fail and
hides libc's inotify functions from ``ctypes`` *before* importing celery_lock, then runs acquire, extend, QUEUE waits and expiry on a FileLockManager. An audit
hook records what was attempted: importing celery_lock may neither touch procfs nor load a
library (as ctypes does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys, threading, time

del time.CLOCK_BOOTTIME  # as on macOS
seen = []
phase = ["import"]

def no_proc(path):
    return isinstance(path, (str, bytes)) and os.fsdecode(path).startswith("/proc")

def hook(event, args):
    if event == "open" and no_proc(args[0]):
        seen.append([phase[0], "open", os.fsdecode(args[0])])
        raise FileNotFoundError(2, "no procfs here", args[0])
    if event == "ctypes.dlopen":
        seen.append([phase[0], "dlopen", str(args[0])])
    if event == "ctypes.dlsym" and "inotify" in str(args[1]):
        seen.append([phase[0], "dlsym", str(args[1])])
        raise AttributeError(args[1])  # a libc without inotify

sys.addaudithook(hook)
real_readlink = os.readlink

def readlink(path, *args, **kwargs):  # readlink raises no audit event
    if no_proc(path):
        seen.append([phase[0], "readlink", os.fsdecode(path)])
        raise FileNotFoundError(2, "no procfs here", path)
    return real_readlink(path, *args, **kwargs)

os.readlink = readlink

import celery_lock
from celery_lock import FileLockManager
from celery_lock.backends._filerecord import file_name

phase[0] = "run"
directory = sys.argv[1]
out = {}
manager, other = FileLockManager(directory), FileLockManager(directory)
manager.poll_max = other.poll_max = 0.02
out["inotify"] = manager._watches.take() != -1


def record(key):
    with open(os.path.join(directory, file_name(key)), "rb") as fh:
        return json.loads(fh.read())


lease = manager.acquire("k", ttl=30)
out["acquired"] = lease is not None
out["busy"] = other.acquire("k") is None
out["bt_expires_written"] = "bt_expires" in record("k")
renewed = manager.extend(lease, 60)
out["extended"] = renewed is not None and "bt_expires" not in record("k")
info = other.inspect("k")
out["inspected"] = info is not None and info.token_prefix == lease.token[:8]

# QUEUE: a waiter of another manager (as another process would) is served once the holder
# releases; a waiter of the same manager is handed the lock by the release in this process.
for waiting_manager in (other, manager):
    got = []
    thread = threading.Thread(
        target=lambda: got.append(waiting_manager.acquire("k", mode="queue", timeout=20))
    )
    thread.start()
    deadline = time.monotonic() + 10
    while waiting_manager._lines.wake("k") is None and time.monotonic() < deadline:
        time.sleep(0.001)  # until the waiter stands in line (its first attempt failed)
    started = time.monotonic()
    assert manager.release(lease) is True
    thread.join(30)
    out.setdefault("queue_ms", []).append(round((time.monotonic() - started) * 1000, 1))
    lease = got[0]
    assert lease is not None
    manager = waiting_manager  # the lease is released through the manager that got it
assert manager.release(lease)

# Expiry on the wall clock alone.
short = manager.acquire("e", ttl=0.3)
out["held_before_expiry"] = other.acquire("e") is None
deadline = time.monotonic() + 10
taken = None
while taken is None and time.monotonic() < deadline:
    taken = other.acquire("e", ttl=30)
    time.sleep(0.01)
out["taken_after_expiry"] = taken is not None and taken.fence > short.fence
out["stale_release"] = manager.release(short)
out["release"] = other.release(taken)
out["seen"] = seen
print(json.dumps(out))
"""


def test_file_backend_without_boottime_procfs_or_inotify(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "locks")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    at_import = [event for event in out["seen"] if event[0] == "import"]
    assert at_import == []  # nothing Linux-only runs when celery_lock is imported
    assert out["inotify"] is False  # no binding could be made: waiters poll
    assert out["acquired"] and out["busy"] and out["extended"] and out["inspected"]
    assert out["bt_expires_written"] is False  # no CLOCK_BOOTTIME: wall clock only
    assert len(out["queue_ms"]) == 2
    assert all(ms < 10_000 for ms in out["queue_ms"])
    assert out["held_before_expiry"] and out["taken_after_expiry"]
    assert out["stale_release"] is False and out["release"] is True
