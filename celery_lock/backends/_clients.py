"""Redis clients from URLs for the lock store: one server, kombu's Sentinel form, Redis Cluster.

URL forms (scheme names are case-insensitive):

``redis://``, ``rediss://``, ``unix://``
    One server, exactly as ``redis.Redis.from_url`` reads them. kombu's ``redis+socket:///path``
    is read as ``unix:///path``.
``sentinel://[[user]:password@]host[:port][/db];sentinel://host2[:port2];...``
    kombu's Sentinel transport form: one URL per sentinel (port 26379 when left out), joined by
    ``;``. As in kombu, user, password and db of the *first* URL are the master's, later URLs
    give only an address, and everything else comes from the transport options (Celery's
    ``broker_transport_options``): ``master_name`` (required), ``sentinel_kwargs`` (connection
    options of the sentinels themselves, e.g. their ``password``) and ``min_other_sentinels``.
    TLS to the master: the ``ssl`` argument (Celery's ``broker_use_ssl``) or ``ssl_*`` query
    options on the first URL, as kombu reads them.
``redis+cluster://[[user]:password@]host[:port];redis+cluster://host2[:port2];...``
    Redis Cluster (``rediss+cluster://`` for TLS): startup nodes, any of which is enough to
    discover the others. User, password and query options (redis-py's, e.g.
    ``ssl_cert_reqs``) of the first URL apply to every node. Chosen over a separate setting
    because a URL alone then says where and how the locks live, in the ``;``-list spelling that
    kombu users already know from failover and Sentinel URLs.

Every client gets bounded timeouts (see ``DEFAULT_*``), one immediate retry of a failed
connection and no retry of a timeout. Passwords never reach a log line or an exception message:
see :func:`redact_url`.
"""

from __future__ import annotations

import copy
import re
import threading
import time as _time
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

from celery_lock.backends._sentinel import FollowingMaster, FollowingSentinel
from celery_lock.errors import LockConfigurationError

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_RETRIES",
    "DEFAULT_SOCKET_CONNECT_TIMEOUT",
    "DEFAULT_SOCKET_TIMEOUT",
    "Deferred",
    "LockClient",
    "broker_lock_url",
    "build_or_defer",
    "client_from_url",
    "client_or_deferred",
    "redact_url",
    "socket_timeout",
    "url_kind",
]

#: What :func:`client_from_url` returns (a Sentinel master client is a ``redis.Redis``).
LockClient: TypeAlias = "redis.Redis | RedisCluster"

#: Seconds to wait for a TCP (and TLS) connection. A healthy server on a LAN answers a SYN in
#: well under a millisecond and even a distant one in tens of milliseconds; a route that drops
#: packets (a host cut off, a black-holed route) never answers, and then this is what the first
#: failure costs (issue 14, item 7: at most 1 s). Timeouts are not retried, so it is paid once.
#: Kept below 1 s rather than at it: the kernel's own first SYN retransmission comes at 1 s,
#: so a longer wait would buy a second try, not a more patient first one.
DEFAULT_SOCKET_CONNECT_TIMEOUT: Final = 0.5
#: Seconds to wait for a reply. Every lock command is one short Lua script (microseconds of
#: server time), so a reply later than this means a hung or cut-off server, not a slow one; a
#: hung store then costs a task one read timeout (item 7), not the seconds a default would.
DEFAULT_SOCKET_TIMEOUT: Final = 1.0
#: Immediate retries of a command whose connection failed (refused, reset, closed while idle):
#: one retry on a fresh connection survives a server restart or an idle connection dropped by
#: the server or a NAT. Timeouts are not retried (``Retry``'s supported errors are connection
#: errors only): a server that did not answer within ``DEFAULT_SOCKET_TIMEOUT`` would not
#: answer the retry either, and redis-py 8's defaults (10 retries with back-off, timeouts
#: included) turn a refused connection into ~4.5 s and a hung one into minutes.
DEFAULT_RETRIES: Final = 1
#: Connections of a single-server client's pool; more commands at once wait for one to be
#: free (at most the socket timeout). Sentinel and Cluster clients keep redis-py's pools
#: (100 connections per server, failing with MaxConnectionsError beyond: pass
#: ``max_connections`` for more).
DEFAULT_MAX_CONNECTIONS: Final = 100
#: A pooled connection idle for longer than this (s) is checked with PING before use.
HEALTH_CHECK_INTERVAL: Final = 30
#: ``CLIENT SETNAME`` of every lock connection (visible in ``CLIENT LIST``).
CLIENT_NAME: Final = "celery_lock"
#: Seconds that one discovery of the master may spend on sentinels that do not answer, shared
#: among them (each sentinel's timeouts are at most this divided by their number, and at most
#: the client's own). A sentinel answers ``SENTINEL MASTERS`` in microseconds; a failed
#: discovery is not repeated for ``FollowingSentinel.NEGATIVE_TTL`` seconds (the immediate
#: retry of the command would otherwise pay it twice).
SENTINEL_DISCOVERY_BUDGET: Final = 0.9
#: Sentinel port when a ``sentinel://`` URL gives none (kombu's and Redis's default).
SENTINEL_PORT: Final = 26379
#: Redis port when a cluster URL gives none.
REDIS_PORT: Final = 6379

#: Options read from the transport options for a Sentinel URL (kombu's names). kombu's
#: socket timeouts, ``retry_on_timeout`` and ``max_connections`` are left out on purpose: they
#: tune the broker's long polls and channel pool, and the lock client keeps its own bounds.
_SENTINEL_OPTIONS: Final = ("master_name", "sentinel_kwargs", "min_other_sentinels")
#: Connection options copied from the transport options when set (kombu's names).
_CONNECTION_OPTIONS: Final = (
    "socket_keepalive",
    "socket_keepalive_options",
    "health_check_interval",
    "client_name",
)

_SINGLE: Final = ("redis", "rediss", "unix")
_CLUSTER: Final = ("redis+cluster", "rediss+cluster")
_KOMBU_SOCKET: Final = "redis+socket"

#: ``user:password@`` in a URL, also in a ``;``-list and in a URL that lacks its scheme. Up to
#: the last ``@`` of a part: a password written unquoted may hold ``/``, ``?`` or ``@`` (a
#: query value with an ``@`` is hidden too, erring on the safe side).
_CREDENTIALS: Final = re.compile(
    r"(?:^|(?<=[;\s]))(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<auth>[^;\s]*)@"
)


def redact_url(url: object) -> str:
    """``url`` with every password replaced by ``***`` (for logs and error messages).

    Works on ``;``-separated lists and on text that does not parse as a URL; a user name is
    kept (it is not a secret and helps to tell ACL users apart).
    """

    def hide(match: re.Match[str]) -> str:
        user, sep, _password = match.group("auth").partition(":")
        return f"{match.group('scheme') or ''}{user}{':***' if sep else ''}@"

    return _CREDENTIALS.sub(hide, str(url))


def url_kind(url: str) -> Literal["redis", "sentinel", "cluster"]:
    """Which kind of store ``url`` names: one server, a Sentinel group or a Cluster.

    :raises ValueError: for another scheme, a mix of schemes in one ``;``-list, or a list of
        ``redis://`` URLs (kombu's failover list: locks need one store, not a choice of them).
    """
    schemes = {_scheme(part) for part in _parts(url)}
    if len(schemes) != 1:
        raise ValueError(f"lock Redis URL mixes schemes {sorted(schemes)}: {redact_url(url)}")
    scheme = schemes.pop()
    if scheme in _SINGLE or scheme == _KOMBU_SOCKET:
        if len(_parts(url)) > 1:
            raise ValueError(
                "a ';'-list of Redis URLs is kombu's failover list, but locks must live in one "
                "store: give one URL, a sentinel:// list or a redis+cluster:// list, got "
                f"{redact_url(url)}"
            )
        return "redis"
    if scheme == "sentinel":
        return "sentinel"
    if scheme in _CLUSTER:
        return "cluster"
    raise ValueError(
        f"unsupported lock Redis URL scheme {scheme + '://'!r} in {redact_url(url)}: use "
        "redis://, rediss://, unix://, redis+socket://, sentinel:// (with master_name in the "
        "transport options) or redis+cluster:// / rediss+cluster://"
    )


def broker_lock_url(broker_url: object) -> str | None:
    """The broker URL when its server(s) can hold the locks, else None.

    ``redis://``, ``rediss://``, ``unix://`` and ``redis+socket://`` brokers give their
    (first) URL, as kombu connects to the first one of a failover list; a ``sentinel://``
    broker gives its whole list (every sentinel). Other brokers (AMQP, SQS ...) give None.
    """
    if isinstance(broker_url, (list, tuple)):
        broker_url = ";".join(str(u) for u in broker_url)
    if not isinstance(broker_url, str) or not broker_url.strip():
        return None
    parts = _parts(broker_url)
    schemes = [part.partition("://")[0].lower() if "://" in part else "" for part in parts]
    if schemes[0] == "sentinel":
        return ";".join(p for p, s in zip(parts, schemes, strict=True) if s == "sentinel")
    if schemes[0] in _SINGLE or schemes[0] == _KOMBU_SOCKET:
        return parts[0]
    return None  # another broker, or a spelling kombu resolves itself (e.g. "localhost")


def client_from_url(
    url: str,
    *,
    transport_options: Mapping[str, Any] | None = None,
    ssl: Mapping[str, Any] | bool | None = None,
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    socket_connect_timeout: float = DEFAULT_SOCKET_CONNECT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    setting: str = "transport_options",
    **client_kwargs: Any,
) -> LockClient:
    """A redis-py client for ``url`` (see the module docstring for the forms), with bounded
    timeouts and retries. Nothing connects yet, except a Cluster client, which reads the slot
    map from a startup node while it is built.

    :param url: the store's URL.
    :param transport_options: kombu-style options; read for ``sentinel://`` only (see
        ``_SENTINEL_OPTIONS`` and ``_CONNECTION_OPTIONS``), other keys are ignored, so
        Celery's ``broker_transport_options`` can be passed as it is.
    :param ssl: TLS options as in Celery's ``broker_use_ssl``: True, or a dict of ``ssl_*``
        arguments of redis-py (``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile`` ...).
        Turns ``redis://`` and ``redis+cluster://`` into their TLS forms.
    :param socket_timeout: seconds to wait for a reply.
    :param socket_connect_timeout: seconds to wait for a connection.
    :param retries: immediate retries of a command after a connection error (not a timeout).
    :param setting: how error messages name the transport options (e.g.
        ``"broker_transport_options"``).
    :param client_kwargs: passed on to the client (``password``, ``ssl_*``,
        ``decode_responses`` ...). For ``redis://`` and Cluster URLs the URL's own options win,
        as in redis-py's ``from_url``; for ``sentinel://`` these win over the transport options.
    :returns: ``redis.Redis``, a Sentinel master client (a ``redis.Redis`` that follows a
        switch of master within a second), or ``redis.cluster.RedisCluster``.
    :raises ValueError: for an unsupported or malformed URL, a Sentinel URL without
        ``master_name``, or invalid options; the message names the URL without its password.
    :raises redis.exceptions.RedisClusterException: when no startup node of a Cluster answers.
    """
    kind = url_kind(url)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    for name, value in (
        ("socket_timeout", socket_timeout),
        ("socket_connect_timeout", socket_connect_timeout),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    bounded: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "retry": _retry(retries),
        # redis-py 5 re-sends a command only for the errors listed here, whatever the Retry's
        # supported errors say (6 and later go by the Retry alone; the list is harmless there).
        "retry_on_error": [redis.ConnectionError],
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "client_name": CLIENT_NAME,
    }
    if kind == "sentinel":
        return _sentinel_client(url, transport_options or {}, ssl, bounded, setting, client_kwargs)
    if kind == "cluster":
        return _cluster_client(url, ssl, bounded, client_kwargs)
    single = _parts(url)[0]
    if _scheme(single) == _KOMBU_SOCKET:
        single = "unix" + single[len(_KOMBU_SOCKET) :]
    if ssl:
        if _scheme(single) == "unix":
            raise ValueError(f"TLS options given for a unix socket URL {redact_url(url)}")
        single = _with_scheme(single, "rediss")
        bounded.update(_ssl_options(ssl))
    # A pool that makes a command wait for a free connection instead of failing at once with
    # MaxConnectionsError, which is not an outage (issue 14, item 5: a hundred threads
    # waiting in QUEUE mode exhausted redis-py's default pool of 100). The wait is bounded
    # like a reply: a pool that stays full for that long serves a hung server.
    options = {
        "max_connections": DEFAULT_MAX_CONNECTIONS,
        "timeout": socket_timeout,
        **bounded,
        **client_kwargs,
    }
    try:
        pool = redis.BlockingConnectionPool.from_url(single, **options)
    except ValueError as exc:
        raise ValueError(f"invalid lock Redis URL {redact_url(url)}: {exc}") from None
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # it owns its pool, as from_url's clients do
    return client


def socket_timeout(client: object) -> float | None:
    """``client``'s read timeout in seconds when it can be told (None: unknown or unbounded)."""
    if isinstance(client, RedisCluster):
        value = client.nodes_manager.connection_kwargs.get("socket_timeout")
    else:
        pool = getattr(client, "connection_pool", None)
        value = getattr(pool, "connection_kwargs", {}).get("socket_timeout")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return float(value)


def _retry(retries: int) -> Retry:
    # Connection errors only: see DEFAULT_RETRIES. Sentinel's MasterNotFoundError and the
    # "previous master is now a slave" error of a demoted master are ConnectionErrors too, so
    # a command that met a failover is re-sent once, to the master the sentinels name now.
    return Retry(NoBackoff(), retries, supported_errors=(redis.ConnectionError,))


def _parts(url: str) -> list[str]:
    if not isinstance(url, str):
        raise ValueError(f"lock Redis URL must be a str, got {type(url).__name__}")
    parts = [part.strip() for part in url.split(";") if part.strip()]
    if not parts:
        raise ValueError("lock Redis URL is empty")
    return parts


def _scheme(part: str) -> str:
    scheme, sep, _rest = part.partition("://")
    if not sep:
        raise ValueError(f"not a URL (no scheme://): {redact_url(part)}")
    return scheme.lower()


def _with_scheme(part: str, scheme: str) -> str:
    return scheme + part[part.index("://") :]


def _ssl_options(ssl: Mapping[str, Any] | bool) -> dict[str, Any]:
    """``broker_use_ssl``-style TLS options as redis-py keyword arguments."""
    if ssl is True:
        return {}
    if not isinstance(ssl, Mapping):
        raise ValueError(f"ssl must be True or a dict of ssl_* options, got {type(ssl).__name__}")
    bad = sorted(str(k) for k in ssl if not str(k).startswith("ssl_"))
    if bad:
        raise ValueError(f"ssl options must be redis-py's ssl_* arguments, got {bad}")
    return dict(ssl)


def _address(part: str, default_port: int) -> tuple[str, int]:
    split = urlsplit(part)
    try:
        port = split.port
    except ValueError:
        raise ValueError(f"invalid port in {redact_url(part)}") from None
    host = unquote(split.hostname or "")
    if not host:
        raise ValueError(f"no host in {redact_url(part)}")
    return host, port or default_port


# ---------------------------------------------------------------------------------- Sentinel


def _sentinel_client(
    url: str,
    options: Mapping[str, Any],
    ssl: Mapping[str, Any] | bool | None,
    bounded: dict[str, Any],
    setting: str,
    client_kwargs: dict[str, Any],
) -> redis.Redis:
    parts = _parts(url)
    sentinels = [_address(part, SENTINEL_PORT) for part in parts]
    first = urlsplit(parts[0])
    master_name = options.get("master_name")
    if not isinstance(master_name, str) or not master_name:
        raise ValueError(
            f"a sentinel:// lock Redis URL needs the master's name: set 'master_name' in "
            f"{setting} (as for kombu's Sentinel transport), got {master_name!r} for "
            f"{redact_url(url)}"
        )
    min_other = options.get("min_other_sentinels", 0)
    if isinstance(min_other, bool) or not isinstance(min_other, int) or min_other < 0:
        raise ValueError(f"{setting}['min_other_sentinels'] must be an int >= 0")
    sentinel_kwargs = options.get("sentinel_kwargs") or {}
    if not isinstance(sentinel_kwargs, Mapping):
        raise ValueError(f"{setting}['sentinel_kwargs'] must be a dict")
    # The sentinels get bounded timeouts too (redis-py would leave them unbounded when the
    # user's sentinel_kwargs, e.g. just a password, give none), and no retry: discovery already
    # moves on to the next sentinel when one fails. Discovery asks the sentinels one after the
    # other, so each gets a share of SENTINEL_DISCOVERY_BUDGET: with every sentinel cut off,
    # the first failure still costs less than a second.
    share = SENTINEL_DISCOVERY_BUDGET / len(sentinels)
    sentinel_kwargs = {
        "socket_timeout": min(bounded["socket_timeout"], share),
        "socket_connect_timeout": min(bounded["socket_connect_timeout"], share),
        "retry": Retry(NoBackoff(), 0),
        **sentinel_kwargs,
    }

    master: dict[str, Any] = dict(bounded)
    master.update({k: options[k] for k in _CONNECTION_OPTIONS if k in options})
    # kombu: the master's user, password and db come from the first URL only.
    if first.username:
        master["username"] = unquote(first.username)
    if first.password:
        master["password"] = unquote(first.password)
    master["db"] = _sentinel_db(first.path, url)
    tls = _sentinel_query_ssl(first.query, url)
    if ssl:
        tls = {**tls, **_ssl_options(ssl)}
    if tls or ssl:
        master.update(tls)
        master["connection_class"] = SentinelManagedSSLConnection
    else:
        master["connection_class"] = SentinelManagedConnection
    master.update(client_kwargs)

    sentinel = FollowingSentinel(
        sentinels, min_other_sentinels=min_other, sentinel_kwargs=sentinel_kwargs
    )
    client: redis.Redis = sentinel.master_for(master_name, redis_class=FollowingMaster, **master)
    sentinel.watch(master_name, client.connection_pool)
    return client


def _sentinel_db(path: str, url: str) -> int:
    # kombu's _prepare_virtual_host: "" or "/" is 0, else an int.
    vhost = unquote(path or "").lstrip("/")
    if not vhost:
        return 0
    try:
        return int(vhost)
    except ValueError:
        raise ValueError(
            f"the db of a sentinel:// URL is an int, not {vhost!r}: {redact_url(url)}"
        ) from None


def _sentinel_query_ssl(query: str, url: str) -> dict[str, Any]:
    """kombu's reading of ``ssl_*`` query options (the only ones its URL parser keeps apart)."""
    tls: dict[str, Any] = {}
    for key, value in parse_qsl(query):
        if not key.startswith("ssl_"):
            raise ValueError(
                f"unsupported option {key!r} in the sentinel:// URL {redact_url(url)}: "
                "only ssl_* options go in the URL, the rest in the transport options"
            )
        if key == "ssl_check_hostname":
            tls[key] = value.lower() != "false"
        elif key == "ssl_cert_reqs":
            tls[key] = _cert_reqs(value)
        else:
            tls[key] = value
    return tls


def _cert_reqs(value: str) -> str:
    # kombu accepts CERT_REQUIRED / required and the like; redis-py takes the short names.
    short = value.lower().removeprefix("cert_")
    if short not in ("none", "optional", "required"):
        raise ValueError(f"ssl_cert_reqs must be none, optional or required, got {value!r}")
    return short


# ---------------------------------------------------------------------------------- Cluster


def _cluster_client(
    url: str,
    ssl: Mapping[str, Any] | bool | None,
    bounded: dict[str, Any],
    client_kwargs: dict[str, Any],
) -> RedisCluster:
    parts = _parts(url)
    nodes = [ClusterNode(*_address(part, REDIS_PORT)) for part in parts]  # type: ignore[no-untyped-call,unused-ignore]
    first = urlsplit(parts[0])
    if first.path not in ("", "/", "/0"):
        raise ValueError(f"a Cluster has only db 0, got path {first.path!r} in {redact_url(url)}")
    tls = _scheme(parts[0]) == "rediss+cluster" or bool(ssl)
    # redis-py reads user, password and query options of one URL; the other nodes are
    # startup nodes by address (a Cluster's nodes share their users).
    netloc = first.netloc
    node_url = urlunsplit(("rediss" if tls else "redis", netloc, "", first.query, ""))
    kwargs = dict(bounded)
    retry = kwargs.pop("retry")
    # A Cluster client retries through its own Retry and cluster logic; it is left as it was.
    kwargs.pop("retry_on_error")
    if ssl:
        kwargs.update(_ssl_options(ssl))
    kwargs.update(client_kwargs)
    try:
        return RedisCluster(url=node_url, startup_nodes=nodes[1:], retry=retry, **kwargs)
    except ValueError as exc:
        raise ValueError(f"invalid lock Redis URL {redact_url(url)}: {exc}") from None


# ---------------------------------------------------------------------------------- deferred


class Deferred:
    """A client that could not be built yet: a Cluster whose startup nodes did not answer
    (redis-py reads the slot map while it builds a ``RedisCluster``). :meth:`get` builds it on
    first use, so an app starts while its lock Cluster is away and uses it once it answers.

    :param build: makes the client (``client_from_url`` with its arguments).
    :param url: for messages (shown without its password).
    """

    #: Seconds a failed build is remembered: callers meanwhile fail at once instead of each
    #: paying the startup nodes' timeouts again.
    NEGATIVE_TTL: Final = 1.0

    def __init__(self, build: Callable[[], LockClient], url: str) -> None:
        self._build = build
        self._url = redact_url(url)
        self._mutex = threading.Lock()
        self._client: LockClient | None = None
        #: (monotonic time, error) of the last failed build: a copy without a traceback, since
        #: a traceback holds the frames (and locals) of every caller it was raised through.
        self._failed: tuple[float, redis.ConnectionError] | None = None

    def get(self) -> LockClient:
        """The client, built now if need be.

        :raises redis.ConnectionError: no startup node answered (now or within
            ``NEGATIVE_TTL``): an outage like any other.
        :raises LockConfigurationError: the nodes answered but are not a Cluster.
        """
        client = self._client
        if client is not None:
            return client
        with self._mutex:
            if self._client is not None:
                return self._client
            failed = self._failed
            if failed is not None and _time.monotonic() - failed[0] < self.NEGATIVE_TTL:
                # A new error each time: raising one instance again would grow its traceback
                # by every caller's frames, all kept alive while it is remembered.
                raise copy.copy(failed[1])
            try:
                self._client = build_or_defer(self._build, self._url)
            except redis.ConnectionError as exc:
                self._failed = (_time.monotonic(), copy.copy(exc))
                raise
            return self._client


def client_or_deferred(url: str, **kwargs: Any) -> LockClient | Deferred:
    """:func:`client_from_url` (same arguments), or a :class:`Deferred` that builds it on
    first use when the URL names a Cluster none of whose startup nodes answers yet."""

    def build() -> LockClient:
        return client_from_url(url, **kwargs)

    try:
        return build_or_defer(build, url)
    except redis.ConnectionError:
        return Deferred(build, url)


def build_or_defer(build: Callable[[], LockClient], url: str) -> LockClient:
    """``build()``, with a Cluster that cannot be reached raised as ``redis.ConnectionError``
    and a server that is not a Cluster as :class:`LockConfigurationError`.

    :raises redis.ConnectionError: no startup node answered.
    :raises LockConfigurationError: a node answered that Cluster mode is not enabled.
    """
    try:
        return build()
    except RedisClusterException as exc:
        if "not enabled" in str(exc):  # redis-py: "Cluster mode is not enabled on this node"
            raise LockConfigurationError(
                f"{redact_url(url)} is not a Redis Cluster ({exc}): use redis:// for a single "
                "server",
                backend="redis",
            ) from exc
        raise redis.ConnectionError(f"Redis Cluster {redact_url(url)}: {exc}") from exc
