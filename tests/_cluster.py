"""A real Redis Cluster (3 masters, 1 replica each) on loopback ports, built without redis-cli.

Six ``redis-server --cluster-enabled yes`` processes in a temporary folder; the cluster is
formed from Python the way ``redis-cli --cluster create`` does it (distinct config epochs,
``CLUSTER ADDSLOTSRANGE``, ``CLUSTER MEET``, ``CLUSTER REPLICATE``), so CI needs only the
``redis-server`` package. Helpers kill, pause (SIGSTOP/SIGCONT) and fail over single nodes; a
failed :meth:`LocalCluster.start` and :meth:`LocalCluster.stop` leave no process behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.retry import Retry

from tests._redis_server import require_binary

#: Highest client port: the cluster bus listens on port + 10000, which must stay <= 65535.
MAX_PORT = 55535
#: Slots of a Redis Cluster.
SLOTS = 16384


def free_port_pair(offset: int = 10000, low: int = 20000, high: int = MAX_PORT) -> int:
    """A loopback port P such that P and P + ``offset`` are both free right now."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(low, high)
        if _bindable(port) and _bindable(port + offset):
            return port
    raise RuntimeError("no free loopback port pair found")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _client(port: int, **kwargs: Any) -> redis.Redis:
    """A plain client of one node, for administration (bounded, no retries)."""
    kwargs.setdefault("socket_timeout", 2.0)
    kwargs.setdefault("socket_connect_timeout", 1.0)
    kwargs.setdefault("retry", Retry(NoBackoff(), 0))
    kwargs.setdefault("decode_responses", True)
    return redis.Redis(host="127.0.0.1", port=port, **kwargs)


@dataclasses.dataclass(eq=False)
class Node:
    """One ``redis-server`` of the cluster."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    paused: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        return _client(self.port, **kwargs)

    def call(self, *args: Any) -> Any:
        """One admin command on this node (own short-lived connection)."""
        client = self.client()
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def role(self) -> str:
        """``master`` or ``slave`` as the node itself says (ROLE)."""
        return str(self.call("ROLE")[0])

    def log_tail(self, lines: int = 15) -> str:
        """The end of this node's log (for failure messages)."""
        try:
            text = (self.workdir / "redis.log").read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"Node({self.port}, {self.node_id[:8]})"


class LocalCluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, on loopback."""

    def __init__(
        self,
        workdir: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
    ) -> None:
        self.binary = require_binary("redis-server")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.n_masters = masters
        self.n_replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[Node] = []
        #: Seconds :meth:`start` took (reported by the tests).
        self.start_seconds = 0.0

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, form the cluster and wait until it is ``ok`` and in sync."""
        began = time.monotonic()
        deadline = began + timeout
        try:
            for _ in range(self.n_masters * (1 + self.n_replicas)):
                self._start_node(deadline)
            self._form(deadline)
            self.wait_ok(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began

    def _start_node(self, deadline: float) -> Node:
        for _ in range(5):  # a port pair may be taken between the check and the bind
            port = free_port_pair()
            node = Node(port, self.workdir / str(port))
            node.workdir.mkdir()
            node.proc = self._spawn(node)
            if self._wait_ping(node, deadline):
                self.nodes.append(node)
                return node
            self._reap(node)
        raise RuntimeError("could not start a cluster node")

    def _spawn(self, node: Node) -> subprocess.Popen[bytes]:
        args = [
            self.binary,
            "--port", str(node.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(node.workdir),
            "--logfile", str(node.workdir / "redis.log"),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(node.workdir / f"nodes-{node.port}.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica takes over however long it was cut off from its master: fault tests
            # pause replicas on purpose and still expect a failover.
            "--cluster-replica-validity-factor", "0",
            "--cluster-allow-replica-migration", "no",
            # Full syncs start at once (Redis 7 waits 5 s by default for more replicas).
            "--repl-diskless-sync-delay", "0",
            "--enable-debug-command", "local",
        ]  # fmt: skip
        return subprocess.Popen(  # noqa: S603
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @staticmethod
    def _wait_ping(node: Node, deadline: float) -> bool:
        client = node.client(socket_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if node.proc is None or node.proc.poll() is not None:
                    return False  # e.g. the port was taken meanwhile
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        node.node_id = str(client.execute_command("CLUSTER", "MYID"))
                        return True
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def _form(self, deadline: float) -> None:
        masters = self.nodes[: self.n_masters]
        replicas = self.nodes[self.n_masters :]
        # Distinct config epochs before the nodes meet, as redis-cli does: otherwise they
        # start equal and the nodes spend extra rounds resolving the collision.
        for epoch, node in enumerate(self.nodes, start=1):
            node.call("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        per = SLOTS // len(masters)
        for i, node in enumerate(masters):
            first = i * per
            last = SLOTS - 1 if i == len(masters) - 1 else first + per - 1
            node.call("CLUSTER", "ADDSLOTSRANGE", first, last)
        for node in self.nodes[1:]:
            self.nodes[0].call("CLUSTER", "MEET", "127.0.0.1", node.port)
        # A replica can follow a master only once it knows that master's node id.
        for i, replica in enumerate(replicas):
            master = masters[i % len(masters)]
            _wait(
                lambda r=replica, m=master: m.node_id in r.call("CLUSTER", "NODES"),
                deadline,
                f"{replica} to learn of {master}",
            )
            replica.call("CLUSTER", "REPLICATE", master.node_id)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node says ``cluster_state:ok``, sees every slot served by a
        master it considers up, and every running replica is in sync with its master."""
        _wait(self._all_ok, time.monotonic() + timeout, "cluster_state:ok on every node")

    def _all_ok(self) -> bool:
        running = [n for n in self.nodes if n.running and not n.paused]
        try:
            for node in running:
                info = _fields(node.call("CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    return False
                if int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                    return False
                replication = node.call("INFO", "replication")
                if replication.get("role") == "slave" and (
                    replication.get("master_link_status") != "up"
                    or int(replication.get("master_sync_in_progress", 1)) != 0
                ):
                    return False
            # Every running node agrees on who the masters are.
            views = {frozenset(self._masters_seen_by(node)) for node in running}
        except redis.RedisError:
            return False
        return len(views) == 1

    @staticmethod
    def _masters_seen_by(node: Node) -> set[str]:
        masters = set()
        for line in node.call("CLUSTER", "NODES").splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            if "master" in flags and "fail" not in flags and len(fields) > 8:
                masters.add(fields[0])
        return masters

    def stop(self) -> None:
        """SIGKILL every node (after SIGCONT, so a paused one dies too); idempotent."""
        for node in self.nodes:
            self._reap(node)

    @staticmethod
    def _reap(node: Node) -> None:
        proc = node.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)
        node.paused = False

    # ------------------------------------------------------------------ topology

    def by_id(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    def masters(self) -> list[Node]:
        """Current masters (serving slots), as a running node sees them."""
        viewer = next(n for n in self.nodes if n.running and not n.paused)
        return [self.by_id(i) for i in sorted(self._masters_seen_by(viewer))]

    def replicas_of(self, master: Node) -> list[Node]:
        """Replicas connected to ``master``, as the master itself reports them (INFO)."""
        info = master.call("INFO", "replication")
        ports = {
            int(value["port"])
            for key, value in info.items()
            if key.startswith("slave") and isinstance(value, dict)
        }
        return [n for n in self.nodes if n.port in ports]

    def slot_map(self) -> list[tuple[int, int, Node]]:
        """(first slot, last slot, master) of every served range (CLUSTER SLOTS)."""
        viewer = next(n for n in self.nodes if n.running and not n.paused)
        return [
            (int(start), int(end), self.by_id(str(master[2])))
            for start, end, master, *_ in viewer.call("CLUSTER", "SLOTS")
        ]

    def master_of_slot(self, slot: int) -> Node:
        for start, end, master in self.slot_map():
            if start <= slot <= end:
                return master
        raise LookupError(f"slot {slot} is not served")

    # ------------------------------------------------------------------ faults

    def kill(self, node: Node) -> None:
        """SIGKILL one node (its peers mark it failed after ``node_timeout_ms``)."""
        self._reap(node)

    def pause(self, node: Node) -> None:
        """SIGSTOP one node: hung, not refusing connections."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        node.paused = True

    def resume(self, node: Node) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)
        node.paused = False

    def failover(self, replica: Node, mode: str = "", timeout: float = 30.0) -> None:
        """``CLUSTER FAILOVER [FORCE|TAKEOVER]`` on ``replica``; wait until it is a master and
        the cluster is ``ok`` again. The default (graceful) mode needs the old master up.

        A manual failover that does not finish within Redis's own limit (5 s, e.g. on a busy
        machine) is abandoned by Redis without a word: it is asked for again then.
        """
        deadline = time.monotonic() + timeout
        self.wait_ok(deadline - time.monotonic())
        args = ["CLUSTER", "FAILOVER"] + ([mode] if mode else [])
        while True:
            replica.call(*args)
            attempt_end = min(deadline, time.monotonic() + 6.0)
            try:
                _wait(lambda: replica.role() == "master", attempt_end, f"{replica} to be master")
                break
            except RuntimeError as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{exc}; its log ends:\n{replica.log_tail()}") from None
        self.wait_ok(deadline - time.monotonic())

    def kill_master(self, master: Node, timeout: float = 20.0) -> Node:
        """SIGKILL ``master`` and wait until one of its replicas took over and the cluster is
        ``ok`` again (about ``node_timeout_ms`` plus an election); return the new master."""
        replicas = self.replicas_of(master)
        assert replicas, f"{master} has no replica to fail over to"
        self.kill(master)
        deadline = time.monotonic() + timeout

        def promoted() -> Node | None:
            for node in replicas:
                if node.running and not node.paused and node.role() == "master":
                    return node
            return None

        _wait(promoted, deadline, f"a replica of {master} to take over")
        new = promoted()
        assert new is not None
        self.wait_ok(deadline - time.monotonic())
        return new

    # ------------------------------------------------------------------ clients

    def startup_nodes(self) -> list[ClusterNode]:
        return [ClusterNode("127.0.0.1", n.port) for n in self.nodes]

    def url(self, *, all_nodes: bool = True) -> str:
        """A ``redis+cluster://`` URL of this cluster (every node, or the first only)."""
        nodes = self.nodes if all_nodes else self.nodes[:1]
        return ";".join(f"redis+cluster://127.0.0.1:{n.port}" for n in nodes)

    def client(self, **kwargs: Any) -> RedisCluster:
        """A ``RedisCluster`` client with bounded timeouts (at most ~1 s per node attempt)."""
        kwargs.setdefault("socket_timeout", 1.0)
        kwargs.setdefault("socket_connect_timeout", 0.5)
        kwargs.setdefault("retry", Retry(NoBackoff(), 1))
        return RedisCluster(startup_nodes=self.startup_nodes(), **kwargs)


def key_on(cluster: LocalCluster, master: Node) -> str:
    """A lock key whose slot (the hash tag of ``<prefix>:{<key>}``) a given master serves."""
    ranges = [(a, b) for a, b, node in cluster.slot_map() if node is master]
    for i in range(100_000):
        key = f"job-{i}"
        slot = key_slot(key.encode())
        if any(a <= slot <= b for a, b in ranges):
            return key
    raise AssertionError(f"no key found for {master}")


def _fields(text: str) -> dict[str, str]:
    """``key:value`` lines (CLUSTER INFO) as a dict."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _wait(condition: Any, deadline: float, what: str) -> None:
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster: timed out waiting for {what}")
        time.sleep(0.05)
