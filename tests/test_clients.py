"""Lock clients from URLs (backends/_clients.py): parsing, redaction, bounded timeouts, and the
Sentinel switch watcher's discovery and back-off, without a Redis server (fast).

Real Sentinel and Cluster servers are in tests/multi/.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import RedisClusterException
from redis.sentinel import MasterNotFoundError, SentinelManagedSSLConnection

from celery_lock.backends import _sentinel
from celery_lock.backends._clients import (
    DEFAULT_SOCKET_CONNECT_TIMEOUT,
    DEFAULT_SOCKET_TIMEOUT,
    Deferred,
    broker_lock_url,
    client_from_url,
    client_or_deferred,
    redact_url,
    url_kind,
)
from celery_lock.backends._sentinel import FollowingSentinel, MasterView, SwitchWatcher
from celery_lock.errors import LockConfigurationError
from tests._workers import wait_for

SECRET = "s3cr%40t"  # percent-encoded "s3cr@t"
PLAIN_SECRET = "s3cr@t"


def sentinel_of(client: redis.Redis) -> FollowingSentinel:
    sentinel = client.connection_pool.sentinel_manager  # type: ignore[attr-defined]
    assert isinstance(sentinel, FollowingSentinel)
    return sentinel


# ------------------------------------------------------------------------------ redaction


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:pw@h:1", "redis://user:***@h:1"),
        ("redis://user@h:1", "redis://user@h:1"),
        ("redis://h:1/0", "redis://h:1/0"),
        (
            "sentinel://:a@h1:1;sentinel://:b@h2:2",
            "sentinel://:***@h1:1;sentinel://:***@h2:2",
        ),
        (
            "rediss+cluster://u:p%40ss@h:1?ssl_cert_reqs=none",
            "rediss+cluster://u:***@h:1?ssl_cert_reqs=none",
        ),
        ("amqp://guest:guest@h:5672//", "amqp://guest:***@h:5672//"),
        ("not a url :pw@h", "not a url :***@h"),
        (":pw@h:1;u:pw2@h:2", ":***@h:1;u:***@h:2"),
        ("redis://:p/a?s@s@h:1/0", "redis://:***@h:1/0"),
        ("redis://h:1/0?x=a", "redis://h:1/0?x=a"),
    ],
)
def test_redact_url_hides_every_password(url: str, expected: str) -> None:
    assert redact_url(url) == expected


# ------------------------------------------------------------------------------ URL kinds


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://h:1/0", "redis"),
        ("REDISS://h:1/0", "redis"),
        ("unix:///tmp/r.sock", "redis"),
        ("redis+socket:///tmp/r.sock", "redis"),
        ("sentinel://h:1", "sentinel"),
        ("sentinel://h:1; sentinel://h:2 ;", "sentinel"),
        ("redis+cluster://h:1", "cluster"),
        ("rediss+cluster://h:1;rediss+cluster://h:2", "cluster"),
    ],
)
def test_url_kind(url: str, kind: str) -> None:
    assert url_kind(url) == kind


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (f"amqp://u:{SECRET}@h//", ["unsupported", "amqp://", "u:***@h"]),
        (f"redis://:{SECRET}@h:1;redis://h:2", ["failover list", ":***@h:1"]),
        (f"redis://:{SECRET}@h:1;sentinel://h:2", ["mixes schemes"]),
        ("", ["empty"]),
        (f":{SECRET}@h:1", ["no scheme"]),
    ],
)
def test_url_kind_rejects_with_a_redacted_url(url: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        client_from_url(url)
    message = str(info.value)
    for word in words:
        assert word in message
    assert SECRET not in message
    assert PLAIN_SECRET not in message


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        ("redis://h:1/2", "redis://h:1/2"),
        ("redis://h:1/2;redis://h2:1/2", "redis://h:1/2"),
        (["rediss://h:1/0", "rediss://h2:1/0"], "rediss://h:1/0"),
        ("redis+socket:///tmp/r.sock", "redis+socket:///tmp/r.sock"),
        ("sentinel://h:1;sentinel://h:2", "sentinel://h:1;sentinel://h:2"),
        (("sentinel://:pw@h:1", "sentinel://h:2"), "sentinel://:pw@h:1;sentinel://h:2"),
        ("amqp://guest@h//", None),
        ("filesystem://", None),
        ("localhost", None),
        ("sentinel://h:1;localhost", "sentinel://h:1"),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_broker_lock_url(broker: object, expected: str | None) -> None:
    assert broker_lock_url(broker) == expected


# ------------------------------------------------------------------------------ one server


def test_redis_url_gets_bounded_timeouts_and_one_retry() -> None:
    client = client_from_url("redis://:pw@127.0.0.1:1/3")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == DEFAULT_SOCKET_TIMEOUT == 1.0
    assert kwargs["socket_connect_timeout"] == DEFAULT_SOCKET_CONNECT_TIMEOUT == 0.5
    assert kwargs["password"] == "pw"
    assert kwargs["db"] == 3
    assert kwargs["client_name"] == "celery_lock"
    retry = kwargs["retry"]
    if hasattr(retry, "get_retries"):  # redis-py >= 5.1
        assert retry.get_retries() == 1
    client.close()


def test_kombu_socket_url_and_tls_options() -> None:
    unix = client_from_url("redis+socket:///tmp/celery-lock-test.sock")
    assert unix.connection_pool.connection_class is UnixDomainSocketConnection
    assert unix.connection_pool.connection_kwargs["path"] == "/tmp/celery-lock-test.sock"
    tls = client_from_url("redis://127.0.0.1:1/0", ssl={"ssl_cert_reqs": "none"})
    assert issubclass(tls.connection_pool.connection_class, SSLConnection)
    assert tls.connection_pool.connection_kwargs["ssl_cert_reqs"] == "none"
    with pytest.raises(ValueError, match="unix socket"):
        client_from_url("unix:///tmp/x.sock", ssl=True)
    with pytest.raises(ValueError, match="ssl_"):
        client_from_url("redis://127.0.0.1:1/0", ssl={"cert_reqs": "none"})
    with pytest.raises(ValueError, match="True or a dict"):
        client_from_url("redis://127.0.0.1:1/0", ssl="yes")  # type: ignore[arg-type]


def test_malformed_urls_are_value_errors_without_the_password() -> None:
    with pytest.raises(ValueError, match="must be a str"):
        client_from_url(b"redis://h:1/0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="socket_timeout") as info:
        client_from_url(f"redis://:{SECRET}@127.0.0.1:1/0?socket_timeout=abc")
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError, match="only db 0") as info:
        client_from_url(f"redis+cluster://:{SECRET}@127.0.0.1:1/3")
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError, match="socket_timeout") as info:
        client_from_url(f"redis+cluster://:{SECRET}@127.0.0.1:1?socket_timeout=abc")
    assert SECRET not in str(info.value)


def test_cluster_client_reads_the_slots_while_it_is_built() -> None:
    """Unlike the others, a Cluster client connects at once: with no node reachable it raises
    (fast, and without the password) instead of returning a client."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    began = time.monotonic()
    with pytest.raises(RedisClusterException) as info:
        client_from_url(
            f"rediss+cluster://:{SECRET}@127.0.0.1:{port};rediss+cluster://127.0.0.1:{port}",
            ssl={"ssl_cert_reqs": "none"},
        )
    assert time.monotonic() - began < 1.0
    assert SECRET not in str(info.value)
    assert PLAIN_SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": True}, "retries"),
        ({"socket_timeout": 0}, "socket_timeout"),
        ({"socket_connect_timeout": "1"}, "socket_connect_timeout"),
    ],
)
def test_invalid_bounds_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        client_from_url("redis://127.0.0.1:1/0", **kwargs)


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A loopback port whose SYNs are never answered: a listener with a full accept queue
    (Linux drops a SYN it cannot queue), like a black-holed route."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.3)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            raise AssertionError("could not fill the accept queue: no black hole to test with")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel does) and never replies: a hung server."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


def _cost(client: Any) -> tuple[float, BaseException]:
    began = time.monotonic()
    try:
        client.ping()
    except Exception as exc:
        return time.monotonic() - began, exc
    raise AssertionError("ping succeeded")


def test_black_holed_route_costs_one_connect_timeout() -> None:
    with black_hole() as port:
        client = client_from_url(f"redis://127.0.0.1:{port}/0")
        cost, exc = _cost(client)
        client.close()
    assert isinstance(exc, redis.TimeoutError)
    # One connect timeout (0.5 s), not retried; redis-py 8's defaults took seconds.
    assert 0.4 <= cost < 0.95, cost


def test_hung_server_costs_one_read_timeout(silent_port: int) -> None:
    client = client_from_url(f"redis://127.0.0.1:{silent_port}/0")
    cost, exc = _cost(client)
    client.close()
    assert isinstance(exc, redis.TimeoutError)
    assert 0.9 <= cost < 1.6, cost  # one socket_timeout: a timeout is not retried


def test_black_holed_sentinels_cost_under_a_second() -> None:
    with black_hole() as a, black_hole() as b, black_hole() as c:
        url = ";".join(f"sentinel://127.0.0.1:{p}" for p in (a, b, c))
        client = client_from_url(url, transport_options={"master_name": "m"})
        sentinel_of(client).watcher = None  # only discovery here (the watcher has its test)
        cost, exc = _cost(client)
        client.close()
    assert isinstance(exc, MasterNotFoundError)
    # Three sentinels share the 0.9 s budget; the retry is answered from the failed discovery.
    assert cost < 1.0, cost


# ------------------------------------------------------------------------------ Sentinel


def test_sentinel_url_as_kombu_reads_it() -> None:
    client = client_from_url(
        f"sentinel://user:{SECRET}@127.0.0.1/2;sentinel://:other@127.0.0.2:26380",
        transport_options={
            "master_name": "mymaster",
            "sentinel_kwargs": {"password": "sentinel-pw"},
            "min_other_sentinels": 1,
            "socket_keepalive": True,
            "socket_timeout": 30,  # the broker's long-poll timeout: not for locks
            "visibility_timeout": 3600,  # a broker option: ignored
        },
    )
    kwargs = client.connection_pool.connection_kwargs
    # The master's credentials and db from the first URL only (kombu).
    assert kwargs["username"] == "user"
    assert kwargs["password"] == PLAIN_SECRET
    assert kwargs["db"] == 2
    assert kwargs["socket_timeout"] == 1.0
    assert kwargs["socket_keepalive"] is True
    assert client.connection_pool.service_name == "mymaster"  # type: ignore[attr-defined]
    sentinel = sentinel_of(client)
    assert sentinel.min_other_sentinels == 1
    addresses = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinel.sentinels
    ]
    assert addresses == [("127.0.0.1", 26379), ("127.0.0.2", 26380)]
    for node in sentinel.sentinels:
        node_kwargs = node.connection_pool.connection_kwargs
        assert node_kwargs["password"] == "sentinel-pw"
        assert node_kwargs["socket_connect_timeout"] == 0.45  # 0.9 s shared by 2 sentinels
    assert PLAIN_SECRET not in repr(client)
    client.close()


def test_sentinel_tls_from_query_and_ssl_argument() -> None:
    client = client_from_url(
        "sentinel://127.0.0.1:1?ssl_cert_reqs=CERT_REQUIRED&ssl_check_hostname=false"
        "&ssl_ca_certs=/etc/ssl/ca.pem",
        transport_options={"master_name": "m"},
    )
    pool = client.connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    assert pool.connection_kwargs["ssl_check_hostname"] is False
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    client = client_from_url(
        "sentinel://127.0.0.1:1", transport_options={"master_name": "m"}, ssl=True
    )
    assert client.connection_pool.connection_class is SentinelManagedSSLConnection


@pytest.mark.parametrize(
    ("url", "options", "match"),
    [
        (f"sentinel://:{SECRET}@h:1", {}, "'master_name' in broker_transport_options"),
        ("sentinel://h:1", {"master_name": ""}, "master_name"),
        ("sentinel://h:1", {"master_name": "m", "min_other_sentinels": -1}, "min_other"),
        ("sentinel://h:1", {"master_name": "m", "sentinel_kwargs": "pw"}, "sentinel_kwargs"),
        ("sentinel://h:1/x", {"master_name": "m"}, "db of a sentinel"),
        ("sentinel://h:1?timeout=3", {"master_name": "m"}, "unsupported option 'timeout'"),
        ("sentinel://h:1?ssl_cert_reqs=maybe", {"master_name": "m"}, "ssl_cert_reqs"),
        ("sentinel://h:port", {"master_name": "m"}, "invalid port"),
        ("sentinel://:1", {"master_name": "m"}, "no host"),
    ],
)
def test_sentinel_url_errors_name_the_setting(
    url: str, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match) as info:
        client_from_url(url, transport_options=options, setting="broker_transport_options")
    assert SECRET not in str(info.value)


class _StubSentinel:
    """One sentinel's ``SENTINEL MASTERS`` reply (epoch and address of master "m")."""

    def __init__(self, epoch: int | None, port: int = 0) -> None:
        self.epoch = epoch
        self.port = port
        self.calls = 0
        self.sdown = False

    def sentinel_masters(self) -> Any:
        self.calls += 1
        if self.epoch is None:
            raise redis.ConnectionError("unreachable")
        state = {
            "name": "m",
            "ip": "127.0.0.1",
            "port": self.port,
            "config-epoch": self.epoch,
            "is_master": True,
            "is_sdown": self.sdown,
            "is_odown": False,
            "num-other-sentinels": 2,
        }
        return {"m": state}


def _stubbed(*stubs: _StubSentinel) -> FollowingSentinel:
    sentinel = FollowingSentinel([("127.0.0.1", 1)])
    sentinel.sentinels = list(stubs)  # type: ignore[assignment]
    sentinel.watcher = SwitchWatcher(sentinel, "m")  # no pool attached: no threads
    return sentinel


def test_discovery_takes_the_newest_epoch_when_a_sentinel_lags() -> None:
    lagging, current = _StubSentinel(3, port=1000), _StubSentinel(4, port=2000)
    sentinel = _stubbed(lagging, current)
    # No hint yet: redis-py's own answer (first sentinel that knows a master).
    assert sentinel.discover_master("m") == ("127.0.0.1", 1000)
    # The watcher heard of epoch 4: the lagging sentinel's answer no longer wins.
    assert sentinel.watcher is not None
    sentinel.watcher.offer(MasterView(4, ("127.0.0.1", 2000)))
    assert sentinel.discover_master("m") == ("127.0.0.1", 2000)


def test_discovery_trusts_the_hint_over_older_views_and_learns_newer_ones() -> None:
    lagging, gone = _StubSentinel(3, port=1000), _StubSentinel(None)
    sentinel = _stubbed(lagging, gone)
    watcher = sentinel.watcher
    assert watcher is not None
    watcher.offer(MasterView(5, ("127.0.0.1", 3000)))  # from a sentinel now unreachable
    assert sentinel.discover_master("m") == ("127.0.0.1", 3000)
    # A switch the watcher missed (epoch 7): discovery finds it and the hint follows.
    lagging.epoch, lagging.port = 7, 4000
    assert sentinel.discover_master("m") == ("127.0.0.1", 4000)
    assert watcher.hint() == MasterView(7, ("127.0.0.1", 4000))
    assert watcher.offer(MasterView(6, ("127.0.0.1", 3000))) is False  # older: ignored


def test_discovery_skips_views_of_a_master_that_is_down() -> None:
    down, current = _StubSentinel(9, port=1000), _StubSentinel(4, port=2000)
    down.sdown = True
    sentinel = _stubbed(down, current)
    assert sentinel.discover_master("m") == ("127.0.0.1", 2000)
    assert sentinel.watcher is not None
    sentinel.watcher.offer(MasterView(5, ("127.0.0.1", 3000)))
    # The sweep skips the sentinel that sees its master down (epoch 9 or not) and keeps
    # the hint, newer than the one valid view.
    assert sentinel.discover_master("m") == ("127.0.0.1", 3000)
    # No sentinel with a valid master: discovery fails, hint or not (it may name the master
    # that went down).
    current.sdown = True
    with pytest.raises(MasterNotFoundError):
        sentinel.discover_master("m")


def test_failed_discovery_is_answered_from_memory_briefly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gone = _StubSentinel(None)
    sentinel = _stubbed(gone)
    with pytest.raises(MasterNotFoundError):
        sentinel.discover_master("m")
    with pytest.raises(MasterNotFoundError):
        sentinel.discover_master("m")
    assert gone.calls == 1  # the retry did not ask again
    now = time.monotonic()
    monkeypatch.setattr(_sentinel._time, "monotonic", lambda: now + 1.0)
    gone.epoch = 1
    assert sentinel.discover_master("m") == ("127.0.0.1", 0)
    assert gone.calls == 2


def test_watcher_backs_off_from_an_unreachable_sentinel_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sentinel that closes every connection: the watcher's attempts stay few (bounded
    back-off, no busy loop), one WARNING, and close() ends its thread."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted: list[float] = []
    stop = threading.Event()

    def serve() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(time.monotonic())
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    caplog.set_level(logging.INFO, logger="celery_lock.redis")
    client = client_from_url(f"sentinel://127.0.0.1:{port}", transport_options={"master_name": "m"})
    watcher = sentinel_of(client).watcher
    assert watcher is not None
    try:
        watcher.ensure_running()
        assert watcher.running
        began = time.monotonic()
        wait_for(lambda: time.monotonic() - began > 3.0, timeout=5, interval=0.1)
        attempts = len(accepted)
        # Back-off 0.2, 0.4, 0.8, 1.6 s: about 5 attempts in 3 s; a busy loop makes thousands.
        assert 2 <= attempts <= 8, attempts
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert f"127.0.0.1:{port} unreachable" in warnings[0].getMessage()
        assert watcher.subscribed == 0
    finally:
        client.close()
        wait_for(lambda: not watcher.running, timeout=3, what="the watcher to stop")
        stop.set()
        thread.join(timeout=5)
        server.close()


def test_a_stopped_watcher_does_not_report_its_sentinel_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """close() stops the watcher, whose thread still waits up to POLL for an announcement:
    a sentinel going down in that second is no outage of the closed client, so no WARNING
    (one from a closed client turned up in a later test that killed that sentinel)."""
    waiting, dropped = threading.Event(), threading.Event()

    class PubSub:
        def __init__(self, **kwargs: Any) -> None:
            pass

        def subscribe(self, *channels: str) -> None:
            pass

        def get_message(self, timeout: float) -> None:
            waiting.set()
            dropped.wait(timeout)
            if dropped.is_set():
                raise redis.ConnectionError("Connection reset by peer")

        def close(self) -> None:
            pass

    client = redis.Redis(host="127.0.0.1", port=1)  # never connects: only its address is read
    client.pubsub = PubSub  # type: ignore[method-assign,assignment]
    watcher = SwitchWatcher(FollowingSentinel([("127.0.0.1", 1)]), "m")
    watcher._consider = lambda client, name: None  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="celery_lock.redis")
    stop = threading.Event()
    thread = threading.Thread(target=watcher._run, args=(client, stop))
    thread.start()
    try:
        assert waiting.wait(5)  # subscribed, waiting for an announcement
        stop.set()  # close(): the thread is still inside get_message
        dropped.set()  # ... when the sentinel goes away
        thread.join(timeout=5)
        assert not thread.is_alive()
    finally:
        stop.set()
        dropped.set()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# ------------------------------------------------------------------------------ deferred


def test_deferred_cluster_client_is_built_on_first_use_and_failures_are_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    answer = object()

    def build() -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RedisClusterException("Redis Cluster cannot be connected. Please provide ...")
        return answer

    deferred = Deferred(build, "redis+cluster://:pw@h:1")
    monkeypatch.setattr(Deferred, "NEGATIVE_TTL", 0.2)
    with pytest.raises(redis.ConnectionError) as info:
        deferred.get()
    assert "pw" not in str(info.value)
    with pytest.raises(redis.ConnectionError):  # remembered: no second attempt yet
        deferred.get()
    assert len(calls) == 1
    wait_for(lambda: _built(deferred), timeout=5)
    assert deferred.get() is answer
    assert len(calls) == 2


def test_a_remembered_cluster_failure_keeps_no_caller_alive() -> None:
    """A failed build is remembered for NEGATIVE_TTL without the traceback it was raised with:
    that traceback held the frames, and so the locals, of the caller (in the test suite, a
    closed Celery app and its manager, whose prober thread went on probing)."""

    def build() -> Any:
        raise RedisClusterException("Redis Cluster cannot be connected. Please provide ...")

    deferred = Deferred(build, "redis+cluster://127.0.0.1:1")

    class Caller:
        pass

    def call() -> weakref.ref[Caller]:
        local = Caller()
        with pytest.raises(redis.ConnectionError):
            deferred.get()
        return weakref.ref(local)

    first, second = call(), call()  # the second is answered from memory
    gc.collect()
    assert first() is None
    assert second() is None
    errors = []
    for _ in range(3):
        with pytest.raises(redis.ConnectionError, match="cannot be connected") as info:
            deferred.get()
        errors.append(info.value)
    assert len({id(error) for error in errors}) == 3  # a new error each time


def _built(deferred: Deferred) -> bool:
    try:
        deferred.get()
    except redis.ConnectionError:
        return False
    return True


def test_a_server_without_cluster_mode_is_a_configuration_error() -> None:
    def build() -> Any:
        raise RedisClusterException("Cluster mode is not enabled on this node")

    assert isinstance(client_or_deferred("redis+cluster://127.0.0.1:1"), Deferred)  # refused
    with pytest.raises(LockConfigurationError, match="is not a Redis Cluster"):
        Deferred(build, "redis+cluster://h:1").get()
