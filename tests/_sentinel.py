"""A real Redis Sentinel group on loopback ports: one master, one replica, three sentinels.

Each sentinel gets a config file of its own in a temporary folder (sentinels rewrite their
config). ``down-after-milliseconds`` is 1000 and ``failover-timeout`` 3000, so a killed master
is replaced within a few seconds and ``SENTINEL FAILOVER`` switches within about one. Optional
passwords: ``password`` protects master and replica (sentinels get ``auth-pass``),
``sentinel_password`` the sentinels themselves (``requirepass`` plus ``sentinel-pass``).
Helpers fail over gracefully, kill the master and pause (SIGSTOP) a node; :meth:`stop` and a
failed :meth:`start` leave no process behind.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests._redis_server import free_port, require_binary


class Process:
    """One ``redis-server`` (data node or sentinel) on 127.0.0.1."""

    def __init__(self, kind: str, port: int, workdir: Path, password: str | None) -> None:
        self.kind = kind
        self.port = port
        self.workdir = workdir
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        #: Command line of the last start (a restart reuses it: same port, same config file).
        self.argv: list[str] = []

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        """An admin client of this process (bounded timeouts, no retries)."""
        kwargs.setdefault("socket_timeout", 2.0)
        kwargs.setdefault("socket_connect_timeout", 1.0)
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        kwargs.setdefault("decode_responses", True)
        kwargs.setdefault("password", self.password)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def call(self, *args: Any) -> Any:
        client = self.client()
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def role(self) -> str:
        return str(self.call("ROLE")[0])

    def kill(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a paused process dies too
            proc.kill()
        proc.wait(timeout=10)
        self.paused = False

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def __repr__(self) -> str:
        return f"{self.kind}({self.port})"


class SentinelGroup:
    """Master + replica + ``sentinels`` sentinels monitoring them as ``name``."""

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "mymaster",
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self.binary = require_binary("redis-server")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.n_sentinels = sentinels
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.sentinel_password = sentinel_password
        #: Data nodes: the first master and its replica (their roles change on failover).
        self.data: list[Process] = []
        self.sentinels: list[Process] = []
        #: Seconds :meth:`start` took (reported by the tests).
        self.start_seconds = 0.0

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 30.0) -> None:
        """Start master, replica and sentinels; wait until every sentinel knows the replica and
        the other sentinels and the replica is in sync."""
        began = time.monotonic()
        deadline = began + timeout
        try:
            master = self._start_data(deadline, replica_of=None)
            self._start_data(deadline, replica_of=master)
            for _ in range(self.n_sentinels):
                self._start_sentinel(deadline, master)
            self.wait_settled(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began

    def _start_data(self, deadline: float, replica_of: Process | None) -> Process:
        node = Process("replica" if replica_of else "master", 0, self.workdir, self.password)
        args = [
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--repl-diskless-sync-delay", "0",  # Redis 7 waits 5 s for more replicas
            "--enable-debug-command", "local",
        ]  # fmt: skip
        if self.password:
            # The replica may become master: both ask for and give the same password.
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of.port)]
        self._spawn(node, deadline, args, sentinel=False)
        self.data.append(node)
        return node

    def _start_sentinel(self, deadline: float, master: Process) -> Process:
        node = Process("sentinel", 0, self.workdir, self.sentinel_password)
        self._spawn(node, deadline, [], sentinel=True, master=master)
        self.sentinels.append(node)
        return node

    def _spawn(
        self,
        node: Process,
        deadline: float,
        args: list[str],
        *,
        sentinel: bool,
        master: Process | None = None,
    ) -> None:
        for _ in range(5):  # the port may be taken between free_port() and the bind
            node.port = free_port()
            node.workdir = self.workdir / f"{node.kind}-{node.port}"
            node.workdir.mkdir()
            logfile = str(node.workdir / "redis.log")
            if sentinel:
                assert master is not None
                conf = node.workdir / "sentinel.conf"
                lines = [
                    f"port {node.port}",
                    "bind 127.0.0.1",
                    f'dir "{node.workdir}"',
                    f'logfile "{logfile}"',
                    f"sentinel monitor {self.name} 127.0.0.1 {master.port} 2",
                    f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {self.name} 1",
                ]
                if self.password:
                    lines.append(f"sentinel auth-pass {self.name} {self.password}")
                if self.sentinel_password:
                    lines += [
                        f"requirepass {self.sentinel_password}",
                        f"sentinel sentinel-pass {self.sentinel_password}",
                    ]
                conf.write_text("\n".join(lines) + "\n")
                argv = [self.binary, str(conf), "--sentinel"]
            else:
                argv = [
                    self.binary,
                    "--port", str(node.port),
                    "--dir", str(node.workdir),
                    "--logfile", logfile,
                    *args,
                ]  # fmt: skip
            node.argv = argv
            node.proc = _popen(argv)
            if self._wait_ping(node, deadline):
                return
            node.kill()
        raise RuntimeError(f"could not start a {node.kind}")

    @staticmethod
    def _wait_ping(node: Process, deadline: float) -> bool:
        client = node.client(socket_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if not node.running:
                    return False
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return True
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def restart(self, node: Process, timeout: float = 10.0) -> None:
        """Start a stopped process again on its port, with its (possibly rewritten) config."""
        assert not node.running, f"{node} is still running"
        node.proc = _popen(node.argv)
        if not self._wait_ping(node, time.monotonic() + timeout):
            node.kill()
            raise RuntimeError(f"{node} did not come back on its port")

    def wait_settled(self, timeout: float = 30.0) -> None:
        """Wait until every running sentinel names the same master, sees the other sentinels
        and one healthy replica, and that replica is in sync (what ``SENTINEL FAILOVER``
        needs to pick it)."""
        _wait(self._settled, time.monotonic() + timeout, "the sentinel group to settle")

    def _settled(self) -> bool:
        sentinels = [s for s in self.sentinels if s.running and not s.paused]
        addresses = set()
        for sentinel in sentinels:
            state = _pairs(sentinel.call("SENTINEL", "MASTER", self.name))
            if state["flags"] != "master":
                return False
            if int(state["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
            replicas = [_pairs(r) for r in sentinel.call("SENTINEL", "REPLICAS", self.name)]
            healthy = [
                r for r in replicas if r["flags"] == "slave" and r["master-link-status"] == "ok"
            ]
            if len(healthy) < len(self.data) - 1:
                return False
            addresses.add((state["ip"], int(state["port"])))
        if len(addresses) != 1:
            return False
        master = self.node_at(addresses.pop())
        if master.role() != "master":
            return False
        for node in self.data:
            if node is master or not node.running:
                continue
            info = node.call("INFO", "replication")
            if info.get("master_link_status") != "up" or info.get("master_sync_in_progress"):
                return False
        return True

    def stop(self) -> None:
        """SIGKILL every process (paused ones too); idempotent."""
        for node in self.sentinels + self.data:
            node.kill()

    # ------------------------------------------------------------------ topology

    def node_at(self, address: tuple[str, int]) -> Process:
        return next(n for n in self.data if n.port == int(address[1]))

    def master_address(self, sentinel: Process | None = None) -> tuple[str, int]:
        """``SENTINEL GET-MASTER-ADDR-BY-NAME`` from ``sentinel`` (default: the first that
        answers)."""
        candidates = [sentinel] if sentinel else self.sentinels
        for node in candidates:
            if not node.running or node.paused:
                continue
            with contextlib.suppress(redis.RedisError):
                host, port = node.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
                return str(host), int(port)
        raise RuntimeError("no sentinel answered")

    def master(self) -> Process:
        return self.node_at(self.master_address())

    def replica(self) -> Process:
        master = self.master()
        return next(n for n in self.data if n is not master)

    def all_report(self, address: tuple[str, int]) -> bool:
        """Whether every running sentinel names ``address`` as the master."""
        return all(
            self.master_address(s) == address for s in self.sentinels if s.running and not s.paused
        )

    # ------------------------------------------------------------------ faults

    def failover(self, timeout: float = 20.0) -> tuple[Process, Process]:
        """``SENTINEL FAILOVER``: the replica is promoted while the old master keeps running.
        Waits until every sentinel names the new master; returns (old, new)."""
        old = self.master()
        new = self.replica()
        self.sentinels[0].call("SENTINEL", "FAILOVER", self.name)
        _wait(
            lambda: self.all_report(new.address),
            time.monotonic() + timeout,
            f"every sentinel to name {new} after SENTINEL FAILOVER",
        )
        return old, new

    def kill_master(self, timeout: float = 20.0) -> tuple[Process, Process]:
        """SIGKILL the master; wait until every sentinel names the replica. Returns (old, new)."""
        old = self.master()
        new = self.replica()
        old.kill()
        _wait(
            lambda: self.all_report(new.address),
            time.monotonic() + timeout,
            f"every sentinel to name {new} after the master was killed",
        )
        return old, new

    def url(self, *, with_password: bool = True) -> str:
        """kombu's form: ``sentinel://[:password@]host:port;sentinel://host:port;...``."""
        auth = f":{self.password}@" if with_password and self.password else ""
        return ";".join(
            f"sentinel://{auth if i == 0 else ''}127.0.0.1:{s.port}"
            for i, s in enumerate(self.sentinels)
        )

    def transport_options(self) -> dict[str, Any]:
        """``broker_transport_options`` a kombu user would write for this group."""
        options: dict[str, Any] = {"master_name": self.name}
        if self.sentinel_password:
            options["sentinel_kwargs"] = {"password": self.sentinel_password}
        return options


def _popen(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _pairs(reply: Any) -> dict[str, str]:
    """A flat [k1, v1, k2, v2, ...] reply (SENTINEL MASTER) as a dict."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    items = list(reply)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items), 2)}


def _wait(condition: Any, deadline: float, what: str) -> None:
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, RuntimeError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"sentinel: timed out waiting for {what}")
        time.sleep(0.05)
