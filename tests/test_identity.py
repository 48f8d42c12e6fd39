"""Proof of death: only a same-host, same-boot, same-pid-namespace holder that is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fakeredis
import pytest

from celery_lock import RedisLockManager, _identity


def meta_for(pid: int, **overrides: object) -> dict[str, object]:
    me = _identity.current()
    found = _identity.process_start(pid)
    meta: dict[str, object] = {
        "host": me.host,
        "boot": me.boot_id,
        "pidns": me.pid_ns,
        "pid": pid,
        "start": found[0] if found else 12345,
    }
    meta.update(overrides)
    return meta


@pytest.fixture
def sleeper():  # type: ignore[no-untyped-def]
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_current_identity_is_cached_and_complete() -> None:
    me = _identity.current()
    assert me is _identity.current()
    assert me.pid == os.getpid()
    assert me.boot_id and me.pid_ns and isinstance(me.start, int)
    assert me.fields == {
        "host": me.host,
        "pid": me.pid,
        "start": me.start,
        "boot": me.boot_id,
        "pidns": me.pid_ns,
    }


def test_live_process_is_not_dead(sleeper: subprocess.Popen[bytes]) -> None:
    assert not _identity.holder_is_dead(meta_for(sleeper.pid))
    assert not _identity.holder_is_dead(meta_for(os.getpid()))


def test_reaped_process_is_dead(sleeper: subprocess.Popen[bytes]) -> None:
    meta = meta_for(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    assert _identity.holder_is_dead(meta)


def test_zombie_is_dead(sleeper: subprocess.Popen[bytes]) -> None:
    meta = meta_for(sleeper.pid)
    os.kill(sleeper.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # wait until it is a zombie, but do not reap it
        found = _identity.process_start(sleeper.pid)
        if found is None or found[1] == "Z":
            break
        time.sleep(0.01)
    assert _identity.holder_is_dead(meta)


def test_recycled_pid_is_dead(sleeper: subprocess.Popen[bytes]) -> None:
    assert _identity.holder_is_dead(meta_for(sleeper.pid, start=1))


@pytest.mark.parametrize(
    "overrides",
    [
        {"host": "another-host"},
        {"boot": "00000000-0000-0000-0000-000000000000"},
        {"pidns": "pid:[1]"},
        {"pid": "12"},
        {"pid": True},
        {"pid": -4},
        {"pid": None},
    ],
)
def test_no_proof_no_death(sleeper: subprocess.Popen[bytes], overrides: dict[str, object]) -> None:
    meta = meta_for(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    meta.update(overrides)
    assert not _identity.holder_is_dead(meta)


def test_process_start_parses_names_with_parentheses() -> None:
    assert _identity.process_start(os.getpid()) is not None
    assert _identity.process_start(2**22 + 7) is None


def test_forked_child_has_its_own_identity() -> None:
    parent = _identity.current()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        child = _identity.current()
        os.write(write, b"1" if child.pid == os.getpid() and child is not parent else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.waitpid(pid, 0)


def test_without_procfs_nothing_is_proved_and_nothing_fails(
    sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As on macOS or a BSD: no procfs. The identity has no boot id, pid namespace or start
    time, no holder is ever proved dead (its lock ends by expiry), and locks still work."""
    meta = meta_for(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    assert _identity.holder_is_dead(meta)  # with procfs: proved
    monkeypatch.setattr(_identity, "_PROC", str(tmp_path / "no-procfs"))
    monkeypatch.setattr(_identity, "_current", None)
    me = _identity.current()
    assert (me.boot_id, me.pid_ns, me.start) == (None, None, None)
    assert me.pid == os.getpid()
    assert _identity.process_start(sleeper.pid) is None
    assert not _identity.holder_is_dead(meta)
    # A holder recorded on such a system, on this host, that is gone: still no proof.
    assert not _identity.holder_is_dead(dict(meta, boot=None, pidns=None, start=None))

    manager = RedisLockManager(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    lease = manager.acquire("k", ttl=30)
    assert lease is not None
    info = manager.inspect("k")
    assert info is not None and info.pid == os.getpid()
    assert manager.break_lock("k", only_if_dead=True) is False
    assert manager.clean().removed == 0
    assert manager.release(lease) is True
