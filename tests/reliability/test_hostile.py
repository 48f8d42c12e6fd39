"""Scenario 6: a catalogue of hostile inputs and environments, one parametrised table.

Every case gets a clear error (``TypeError`` / ``ValueError`` for bad arguments, a
:class:`~celery_lock.LockError` naming the path or key for a bad environment) or a safe,
logged behaviour; nothing crashes, nothing hangs and no live lock is lost. Cases that need root
powers use them the way root can be stopped: permission bits do not stop root, so the
read-only directory is made immutable (``chattr +i``, or a read-only bind mount where the file
system has no immutable flag) and the full disk is a 64 KiB tmpfs mounted by the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from celery import Celery

from celery_lock import (
    FileLockManager,
    HybridLockManager,
    Lease,
    LockBackendUnavailable,
    LockCleaner,
    LockError,
    LockManager,
    RedisLockManager,
)
from celery_lock.backends import _filerecord, _lockdir
from celery_lock.config import get_manager
from celery_lock.keys import LockKeyError
from celery_lock.task import LockedTask
from tests._redis_server import in_ci

pytestmark = pytest.mark.reliability


@dataclasses.dataclass
class Env:
    """What a case works with: a private temp dir, log capture and a fakeredis server."""

    tmp: Path
    caplog: pytest.LogCaptureFixture
    server: fakeredis.FakeServer

    @property
    def lock_dir(self) -> Path:
        return self.tmp / "locks"

    def file(self, directory: Path | None = None) -> FileLockManager:
        return FileLockManager(directory or self.lock_dir)

    def redis(self) -> RedisLockManager:
        return RedisLockManager(fakeredis.FakeRedis(server=self.server))

    def hybrid(self) -> HybridLockManager:
        return HybridLockManager(self.redis(), self.file(), retry_interval=30.0)

    def managers(self) -> list[LockManager]:
        return [self.file(), self.redis(), self.hybrid()]

    def lock_file(self, key: str) -> Path:
        return self.lock_dir / _filerecord.file_name(key)

    def messages(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.caplog.records if r.levelno == level]


CASES: list[Any] = []


def case(
    case_id: str, *marks: pytest.MarkDecorator
) -> Callable[[Callable[[Env], None]], Callable[[Env], None]]:
    def register(func: Callable[[Env], None]) -> Callable[[Env], None]:
        CASES.append(pytest.param(func, id=case_id, marks=marks))
        return func

    return register


def age(path: Path, seconds: float = 10.0) -> None:
    """Make ``path`` (itself, not a symlink's target) look ``seconds`` old."""
    old = time.time() - seconds
    os.utime(path, (old, old), follow_symlinks=False)


def roundtrip(manager: LockManager, key: str) -> Lease:
    """Acquire, inspect and release ``key``; the lock must behave like any other."""
    lease = manager.acquire(key, ttl=30)
    assert lease is not None, key
    info = manager.inspect(key)
    assert info is not None and info.token_prefix == lease.token[:8]
    assert manager.release(lease)
    assert not manager.is_locked(key)
    return lease


# ------------------------------------------------------------------------------- arguments

BAD_ACQUIRE = [
    ("ttl-zero", {"ttl": 0}, ValueError, "positive"),
    ("ttl-negative", {"ttl": -5}, ValueError, "positive"),
    ("ttl-nan", {"ttl": math.nan}, ValueError, "finite"),
    ("ttl-infinite", {"ttl": math.inf}, ValueError, "finite"),
    ("ttl-string", {"ttl": "30"}, ValueError, "number"),
    ("ttl-bool", {"ttl": True}, ValueError, "number"),
    ("ttl-below-1ms", {"ttl": 1e-6}, ValueError, "0.001"),
    ("ttl-too-long", {"ttl": 1e16}, ValueError, "at most 2147483648 seconds"),
    ("timeout-negative", {"mode": "queue", "timeout": -1}, ValueError, "timeout"),
    ("timeout-nan", {"mode": "queue", "timeout": math.nan}, ValueError, "timeout"),
    ("mode-unknown", {"mode": "sometimes"}, ValueError, "'queue'"),
    ("mode-none", {"mode": None}, ValueError, "'execution'"),
]


def _bad_acquire(
    kwargs: dict[str, Any], error: type[Exception], words: str
) -> Callable[[Env], None]:
    def run(env: Env) -> None:
        for manager in env.managers():
            with pytest.raises(error, match=words):
                manager.acquire("k", **kwargs)
            assert not manager.is_locked("k")

    return run


for _id, _kwargs, _error, _words in BAD_ACQUIRE:
    case(_id)(_bad_acquire(_kwargs, _error, _words))

BAD_KEYS = [
    ("key-none", None, TypeError),
    ("key-bytes", b"k", TypeError),
    ("key-int", 42, TypeError),
    ("key-empty", "", ValueError),
    ("key-nul", "a\x00b", ValueError),
    ("key-too-long", "k" * 65537, ValueError),
]


def _bad_key(key: Any, error: type[Exception]) -> Callable[[Env], None]:
    def run(env: Env) -> None:
        for manager in env.managers():
            for call in (manager.acquire, manager.is_locked, manager.inspect, manager.break_lock):
                with pytest.raises(error):
                    call(key)
        assert not any(env.lock_dir.glob("*.lock"))

    return run


for _id, _key, _error in BAD_KEYS:
    case(_id)(_bad_key(_key, _error))


@case("key-path-traversal")
def _(env: Env) -> None:
    managers = env.managers()
    outside = sorted(p.name for p in env.tmp.iterdir())
    for manager in managers:
        roundtrip(manager, "../../../../etc/passwd")
        roundtrip(manager, "/absolute/path")
    assert sorted(p.name for p in env.tmp.iterdir()) == outside
    assert all(p.parent == env.lock_dir for p in env.lock_dir.rglob("*"))


@case("key-braces-and-glob")
def _(env: Env) -> None:
    for manager in env.managers():
        held = manager.acquire("{a}", ttl=30)
        assert held is not None
        for other in ("{b}", "a", "}{", "*", "[a]", "?"):
            roundtrip(manager, other)  # no collision with "{a}", no SCAN pattern leak
        assert manager.release(held)


@case("key-lone-surrogate")
def _(env: Env) -> None:
    for manager in env.managers():
        roundtrip(manager, "caf\udce9")


@case("key-longest-unicode")
def _(env: Env) -> None:
    key = "é" * 65536
    for manager in env.managers():
        held = manager.acquire(key, ttl=30)
        assert held is not None
        roundtrip(manager, key[:-1] + "e")  # a distinct key, not a collision
        assert manager.release(held)


@case("lease-forged-token")
def _(env: Env) -> None:
    for manager in env.managers():
        real = manager.acquire("k", ttl=30)
        assert real is not None
        forged = dataclasses.replace(real, token="0" * 32)
        assert manager.release(forged) is False
        assert manager.extend(forged) is None
        assert manager.release(real)


@case("lease-wrong-type-or-backend")
def _(env: Env) -> None:
    file, redis = env.file(), env.redis()
    lease = redis.acquire("k", ttl=30)
    assert lease is not None
    with pytest.raises(TypeError):
        file.release("k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="redis"):
        file.release(lease)
    with pytest.raises(ValueError, match="memory"):
        env.hybrid().release(dataclasses.replace(lease, backend="memory"))
    with pytest.raises(ValueError):
        redis.extend(lease, ttl=-1)
    assert redis.is_locked("k") and redis.release(lease)


# ------------------------------------------------------------------------------- settings


@case("settings-bad-default-ttl")
def _(env: Env) -> None:
    for bad in (0, -1, math.nan, "300", None):
        with pytest.raises(ValueError, match="default_ttl"):
            FileLockManager(env.lock_dir, default_ttl=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="default_ttl"):
            RedisLockManager(fakeredis.FakeRedis(server=env.server), default_ttl=bad)  # type: ignore[arg-type]


@case("settings-bad-prefix")
def _(env: Env) -> None:
    client = fakeredis.FakeRedis(server=env.server)
    for bad, error in (("", ValueError), ("a{b", ValueError), ("a}", ValueError), (5, TypeError)):
        with pytest.raises(error, match="prefix"):
            RedisLockManager(client, prefix=bad)  # type: ignore[arg-type]


@case("settings-bad-hybrid")
def _(env: Env) -> None:
    with pytest.raises(ValueError, match="retry_interval"):
        HybridLockManager(env.redis(), env.file(), retry_interval=-1)
    with pytest.raises(ValueError, match="needs"):
        HybridLockManager(None, None)


# ------------------------------------------------------------------------------- lock files


def _corrupt(content: bytes) -> Callable[[Env], None]:
    """A lock file with ``content`` is held while fresh (2 s grace, WARNING), then stale."""

    def run(env: Env) -> None:
        manager = env.file()
        path = env.lock_file("k")
        path.write_bytes(content)
        path.chmod(0o600)
        assert manager.acquire("k", ttl=30) is None  # fresh: might be a writer we do not know
        assert manager.is_locked("k")
        assert any("unreadable lock file" in m for m in env.messages(logging.WARNING))
        age(path)
        assert not manager.is_locked("k")
        roundtrip(manager, "k")

    return run


CORRUPT = [
    ("lockfile-garbage", b"\x00\xff\xfegarbage\n"),
    ("lockfile-truncated-json", b'{"v":1,"key":"k","token":"abc'),
    ("lockfile-json-list", b"[1, 2, 3]"),
    ("lockfile-json-wrong-types", b'{"key": 1, "token": 5, "fence": "7", "expires": "soon"}'),
    ("lockfile-json-nan-expiry", b'{"key": "k", "token": "t", "fence": 1, "expires": NaN}'),
    ("lockfile-deeply-nested", b"[" * 100_000),
]
for _id, _content in CORRUPT:
    case(_id)(_corrupt(_content))


@case("lockfile-huge")
def _(env: Env) -> None:
    manager = env.file()
    path = env.lock_file("k")
    with path.open("wb") as fh:
        fh.truncate(512 * 1024 * 1024)  # sparse: 512 MiB that must never be read whole
    started = time.monotonic()
    assert manager.acquire("k", ttl=30) is None
    assert time.monotonic() - started < 1.0
    age(path)
    roundtrip(manager, "k")


@case("lockfile-huge-fence")
def _(env: Env) -> None:
    manager = env.file()
    env.lock_file("k").write_text(
        f'{{"key":"k","token":"t","fence":{2**70},"expires":1.0,"bt_expires":null}}'
    )
    first = manager.acquire("k", ttl=30)  # expired: replaced
    assert first is not None and first.fence < 2**62
    assert manager.release(first)
    second = manager.acquire("k", ttl=30)
    assert second is not None and second.fence > first.fence


@case("lockfile-symlink")
def _(env: Env) -> None:
    manager = env.file()
    victim = env.tmp / "victim"
    victim.write_text("precious")
    env.lock_file("k").symlink_to(victim)
    assert manager.acquire("k", ttl=30) is None  # not followed; fresh entry: held
    age(env.lock_file("k"))
    roundtrip(manager, "k")
    assert LockCleaner(manager).clean().errors == 0
    assert victim.read_text() == "precious"


@case("lockfile-fifo")
def _(env: Env) -> None:
    manager = env.file()
    os.mkfifo(env.lock_file("k"), 0o600)
    started = time.monotonic()
    assert manager.acquire("k", ttl=30) is None  # never blocks on the FIFO
    assert LockCleaner(manager).clean().removed == 0
    age(env.lock_file("k"))
    roundtrip(manager, "k")
    assert time.monotonic() - started < 2.0


@case("lockfile-directory")
def _(env: Env) -> None:
    manager = env.file()
    env.lock_file("k").mkdir()
    age(env.lock_file("k"))
    assert manager.acquire("k", ttl=30) is None
    assert any("directory is in its place" in m for m in env.messages(logging.WARNING))
    report = LockCleaner(manager).clean()
    assert report.removed == 0 and report.errors == 1
    roundtrip(manager, "other")


@case("lockfile-empty")
def _(env: Env) -> None:
    # What O_CREAT leaves when its creator dies before its first write: never a holder's, since
    # every holder writes its record under the exclusive flock before anybody else can look.
    manager = env.file()
    env.lock_file("k").write_bytes(b"")
    assert not manager.is_locked("k")
    roundtrip(manager, "k")


@case("fencesfile-fifo")
def _(env: Env) -> None:
    manager = env.file()
    os.mkfifo(env.lock_dir / ".fences", 0o600)
    started = time.monotonic()
    with pytest.raises(LockBackendUnavailable, match="not a regular file"):
        manager.acquire("k", ttl=30)  # a new lock file starts its fence from .fences
    assert time.monotonic() - started < 2.0  # never blocks on the FIFO
    assert not manager.is_locked("k")


@case("guardfile-fifo")
def _(env: Env) -> None:
    manager = env.file()
    env.lock_file("k").symlink_to("/etc/passwd")
    age(env.lock_file("k"))
    os.mkfifo(env.lock_dir / ".guard", 0o600)
    with pytest.raises(LockBackendUnavailable, match="not a regular file"):
        manager.acquire("k", ttl=30)  # removing the stale symlink takes the guard
    assert os.readlink(env.lock_file("k")) == "/etc/passwd"


# ------------------------------------------------------------------------------- directories


def _bad_directory(prepare: Callable[[Path], None], words: str) -> Callable[[Env], None]:
    def run(env: Env) -> None:
        prepare(env.lock_dir)
        with pytest.raises(LockError, match=words) as caught:
            FileLockManager(env.lock_dir)
        assert str(env.lock_dir) in str(caught.value)
        # A hybrid cannot be built on it either: the file part checks the same directory.
        with pytest.raises(LockError):
            HybridLockManager(env.redis(), FileLockManager(env.lock_dir))

    return run


def _owned_by_nobody(path: Path) -> None:
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)


def _mode(mode: int) -> Callable[[Path], None]:
    def prepare(path: Path) -> None:
        path.mkdir()
        path.chmod(mode)

    return prepare


def _symlink(path: Path) -> None:
    real = path.with_name("real-locks")
    real.mkdir(mode=0o700)
    path.symlink_to(real)


case("dir-owned-by-another-user")(_bad_directory(_owned_by_nobody, "owned by uid 65534"))
case("dir-world-writable")(_bad_directory(_mode(0o777), "writable"))
case("dir-group-writable")(_bad_directory(_mode(0o770), "writable"))
case("dir-is-a-symlink")(_bad_directory(_symlink, "symbolic link"))
case("dir-is-a-file")(_bad_directory(lambda p: p.write_text("x"), "not a directory"))


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[str]:
    """Make directory ``path`` unwritable even for root; yields how it was done."""
    if (
        shutil.which("chattr")
        and subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode
        == 0
    ):
        try:
            yield "chattr +i"
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=False)
        return
    if (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "--bind", str(path), str(path)], capture_output=True, check=False
        ).returncode
        == 0
    ):
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
            yield "read-only bind mount"
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
        return
    reason = "cannot make a directory read-only for root here (no chattr +i, no bind mount)"
    if in_ci() and os.geteuid() == 0:
        pytest.fail(reason)
    pytest.skip(reason)


@case("dir-read-only")
def _(env: Env) -> None:
    manager = env.file()
    held = manager.acquire("held", ttl=30)
    assert held is not None
    with read_only(env.lock_dir) as how:
        with pytest.raises(LockBackendUnavailable, match=str(env.lock_dir)):
            manager.acquire("new", ttl=30)  # no new file can be created
        assert manager.is_locked("held")  # reads still work; nothing was lost
        assert LockCleaner(manager).clean().removed == 0
        if how == "chattr +i":
            # An immutable directory still lets its files change: existing locks keep working.
            assert manager.release(held)
            again = manager.acquire("held", ttl=30)
            assert again is not None
            held = again
        else:
            with pytest.raises(LockBackendUnavailable):
                manager.release(held)
    assert manager.release(held)
    roundtrip(manager, "new")


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "64k") -> Iterator[None]:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here: {done.stderr.decode().strip()}"
        if in_ci() and os.geteuid() == 0:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@case("disk-full")
def _(env: Env) -> None:
    mount = env.tmp / "small"
    with tiny_tmpfs(mount):
        manager = env.file(mount / "locks")
        held = manager.acquire("held", ttl=30)
        assert held is not None
        ballast = mount / "ballast"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(1024):  # 4 MiB at most: far more than the 64 KiB there is
                os.write(fd, b"x" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)
        with pytest.raises(LockBackendUnavailable, match="No space left"):
            manager.acquire("new", ttl=30)
        assert not list((mount / "locks").glob(".tmp.*"))  # no half-written leftovers
        assert manager.is_locked("held")
        assert manager.release(held)  # unlinking needs no space
        ballast.unlink()
        roundtrip(manager, "new")


@case("dir-on-network-filesystem")
def _(env: Env) -> None:
    env.lock_dir.mkdir(mode=0o700)
    table = env.tmp / "mountinfo"
    table.write_text(
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"88 22 0:55 / {env.lock_dir} rw,relatime shared:9 - nfs4 fileserver:/locks rw,vers=4.2\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_lockdir, "MOUNT_TABLES", (str(table),))
        patch.setattr(_lockdir, "_warned", set())
        manager = env.file()
        env.file()  # a second manager on the same directory does not warn again
    warnings = [m for m in env.messages(logging.WARNING) if "network file system" in m]
    assert len(warnings) == 1 and "nfs4" in warnings[0] and str(env.lock_dir) in warnings[0]
    roundtrip(manager, "k")


# ------------------------------------------------------------------------------- Redis values


@case("redis-value-garbage")
def _(env: Env) -> None:
    manager = env.redis()
    manager.client.set("celery_lock:{k}", b"\xff\x00 not a lock")
    assert manager.acquire("k", ttl=30) is None  # held by something we cannot judge
    info = manager.inspect("k")
    assert info is not None and info.token_prefix is None and info.pid is None
    report = LockCleaner(manager).clean()
    assert report.removed == 0 and report.kept == 1 and report.errors == 1
    assert manager.client.get("celery_lock:{k}") == b"\xff\x00 not a lock"


@case("redis-value-wrong-type")
def _(env: Env) -> None:
    manager = env.redis()
    manager.client.rpush("celery_lock:{k}", "x")
    with pytest.raises(LockBackendUnavailable, match="WRONGTYPE"):
        manager.acquire("k", ttl=30)
    hybrid = env.hybrid()
    lease = hybrid.acquire("k", ttl=30)
    assert lease is not None and lease.backend == "file"
    assert hybrid.release(lease)


@case("redis-fence-overflow")
def _(env: Env) -> None:
    manager = env.redis()
    manager.client.set("celery_lock:{k}:fence", str(2**63 - 1))
    with pytest.raises(LockBackendUnavailable):
        manager.acquire("k", ttl=30)
    assert not manager.is_locked("k")
    roundtrip(manager, "other")


# ------------------------------------------------------------------------------- Celery layer


def celery_app(env: Env, **settings: Any) -> Celery:
    """An eager-capable app with file locks in the case's private folder (no broker needed)."""
    app = Celery(f"hostile-{id(env)}", set_as_current=False)
    app.conf.update(lock_directory=str(env.tmp / "celery-locks"), **settings)
    return app


def _deeply_nested(depth: int) -> list[Any]:
    top: list[Any] = []
    current = top
    for _ in range(depth):
        current.append([])
        current = current[0]
    return top


@case("celery-args-huge")
def _(env: Env) -> None:
    app = celery_app(env)

    @app.task(base=LockedTask, name="h.huge", shared=False)
    def huge(blob: str) -> int:
        return len(blob)

    result = huge.apply(("x" * 5_000_000,))  # the key is a hash, not the argument
    assert result.state == "SUCCESS" and result.result == 5_000_000
    assert not any(get_manager(app).iter_locks())


@case("celery-args-deeply-nested")
def _(env: Env) -> None:
    app = celery_app(env)

    @app.task(base=LockedTask, name="h.nested", shared=False)
    def nested(tree: Any) -> str:
        return "ran"

    result = nested.apply((_deeply_nested(20_000),))
    assert result.state == "FAILURE" and isinstance(result.result, LockKeyError)
    assert "h.nested" in str(result.result) and "lock_key" in str(result.result)
    assert not any(get_manager(app).iter_locks())


@case("celery-args-do-not-match-signature")
def _(env: Env) -> None:
    app = celery_app(env)

    @app.task(base=LockedTask, name="h.sig", shared=False)
    def sig(account_id: int) -> str:
        return "ran"

    result = sig.apply((), {"acount_id": 1})
    assert result.state == "FAILURE" and isinstance(result.result, LockKeyError)
    assert "h.sig" in str(result.result)


@case("celery-lock-key-callable-misbehaves")
def _(env: Env) -> None:
    app = celery_app(env)

    @app.task(base=LockedTask, name="h.raises", shared=False, lock_key=lambda x: 1 / 0)
    def raises(x: int) -> str:
        return "ran"

    @app.task(base=LockedTask, name="h.nonstr", shared=False, lock_key=lambda x: 42)
    def nonstr(x: int) -> str:
        return "ran"

    for task, name in ((raises, "h.raises"), (nonstr, "h.nonstr")):
        result = task.apply((1,))
        assert result.state == "FAILURE" and isinstance(result.result, LockKeyError)
        assert name in str(result.result)


@case("celery-bad-option-and-setting")
def _(env: Env) -> None:
    app = celery_app(env)
    app.finalize()
    with pytest.raises(ValueError, match=r"h\.mode.*lock_mode.*'sometimes'"):

        @app.task(base=LockedTask, name="h.mode", shared=False, lock_mode="sometimes")
        def mode() -> None: ...

    bad = celery_app(env, lock_default_ttl=-1)

    @bad.task(base=LockedTask, name="h.ttl", shared=False)
    def ttl() -> None: ...

    with pytest.raises(ValueError, match="lock_default_ttl"):
        bad.finalize()
        ttl.apply()


@case("celery-format-key-from-hostile-argument")
def _(env: Env) -> None:
    app = celery_app(env)

    @app.task(base=LockedTask, name="h.fmt", shared=False, lock_key="account:{account_id}")
    def fmt(account_id: str) -> str:
        return "ran"

    for hostile in ("y" * 100_000, "a\x00b"):
        result = fmt.apply((hostile,))
        assert result.state == "FAILURE" and isinstance(result.result, LockKeyError), result.result
        assert "h.fmt" in str(result.result) and "lock_key" in str(result.result)


@pytest.fixture
def env(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Env:
    caplog.set_level(logging.INFO, logger="celery_lock")
    return Env(tmp_path, caplog, fakeredis.FakeServer())


@pytest.mark.parametrize("scenario", CASES)
def test_hostile_input(scenario: Callable[[Env], None], env: Env) -> None:
    """Each hostile input or environment of the catalogue (see the case ids) gets a clear error
    or a safe, logged behaviour: no crash, no hang, no live lock lost."""
    scenario(env)


def test_catalogue_size() -> None:
    """The catalogue keeps at least 25 distinct cases."""
    assert len(CASES) >= 25
    assert len({p.id for p in CASES}) == len(CASES)
