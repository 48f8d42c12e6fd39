"""Redis backend: fenced one-round-trip acquire, compare-token release/extend, pub/sub wake-ups."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import math
import time as _time
from collections.abc import Iterator, Mapping
from typing import Any, TypeAlias

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from celery_lock import _fork, _identity
from celery_lock._base import LockManager, Waiter
from celery_lock._types import CleanReport, Lease, LockInfo
from celery_lock.backends import _clients, _durability
from celery_lock.backends import _redis_scripts as scripts
from celery_lock.backends._redis_errors import CLIENT_ERRORS as _CLIENT_ERRORS
from celery_lock.backends._redis_errors import cluster_node_error, is_connection_error
from celery_lock.backends._redis_jobs import RedisJobs, release_keys
from celery_lock.backends._redis_values import (
    GLOB_ESCAPES,
    encodable,
    holder_of,
    key_of,
    opt,
    parse,
    release_id,
    reserved_for,
    tag_of,
)
from celery_lock.backends._wakeups import WakeUps
from celery_lock.errors import LockBackendUnavailable, LockConfigurationError

__all__ = ["RedisLockManager", "is_connection_error"]

#: What a :class:`RedisLockManager` talks to: ``redis.Redis`` (also ``fakeredis.FakeRedis`` and
#: a Sentinel master client, both subclasses) or ``redis.cluster.RedisCluster``.
RedisClient: TypeAlias = "redis.Redis | RedisCluster"


class RedisLockManager(RedisJobs, LockManager):
    """Locks in Redis: ``<prefix>:{<key>}`` holds ``"<token> <fence> <json-metadata>"``.

    Acquire, release and extend are one round trip each (Lua scripts run by EVALSHA, loaded on
    NOSCRIPT); the fence counter ``<prefix>:{<key>}:fence`` and the wake-up channel
    ``<prefix>:{<key>}:wake`` share the key's hash tag, so every script touches one Cluster
    slot. A key containing ``{`` or ``}`` (or that cannot be encoded as UTF-8) is stored as
    ``<prefix>:#{<sha256 of the key>}`` instead, a namespace no plain key reaches.

    Any failure of the store is raised as :class:`LockBackendUnavailable` with the Redis error
    as its ``__cause__``; use :func:`is_connection_error` to tell an outage from other errors.

    For a client you build yourself, bound its timeouts and retries the way :meth:`from_url`
    does: ``socket_timeout`` (e.g. 1 s), ``socket_connect_timeout`` (e.g. 0.5 s) and
    ``retry=Retry(NoBackoff(), 1)`` (with redis-py 5 also ``retry_on_error=[ConnectionError]``,
    or it re-sends nothing). redis-py 8's defaults (5 s timeouts, 10 retries with
    back-off) make a refused connection take ~4.5 s and re-send every lock command up to ten
    times. ``decode_responses`` may be either.

    :param client: ``redis.Redis``, ``fakeredis.FakeRedis``, a Sentinel master client or
        ``redis.cluster.RedisCluster``.
    :param prefix: namespace of every key this manager writes (no ``{`` or ``}``).
    :param default_ttl: lease seconds when ``acquire(ttl=None)``.
    :param wait_replicas: after each grant, wait until this many replicas have it (Redis
        ``WAIT``); a grant fewer replicas acknowledged within ``wait_timeout`` is released and
        the acquire raises :class:`LockBackendUnavailable`. 0 (default): do not wait.
    :param wait_timeout: seconds a grant waits for its replicas (below the socket timeout).
    :raises TypeError: for a non-str prefix.
    :raises ValueError: for an empty prefix, one with braces, a bad ``default_ttl``,
        ``wait_replicas`` or ``wait_timeout``.
    """

    backend = "redis"

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "celery_lock",
        default_ttl: float = 300.0,
        wait_replicas: int = 0,
        wait_timeout: float = _durability.DEFAULT_WAIT_TIMEOUT,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty str without '{{' or '}}', got {prefix!r}")
        super().__init__(default_ttl=default_ttl)
        self._client = client
        self._prefix = prefix
        #: (lock key, token) of acquires that raised although the server may have granted them.
        #: Not a release mechanism: no lease was ever handed out for these tokens, so nobody
        #: would release them, and without this the key would stay blocked until its ttl. The
        #: next call that reaches the server releases them by token (see _acquire_again).
        self._orphans: collections.deque[tuple[str, str]] = collections.deque(maxlen=1024)
        self._wait_replicas, self._wait_timeout = _durability.check(
            wait_replicas, wait_timeout, _clients.socket_timeout(self._built)
        )
        #: Release wake-ups: one pub/sub listener per process for every waiting call.
        self._wakeups = WakeUps(prefix, self._log)

    #: The client, once built (a Cluster that did not answer yet is built on first use).
    _built: RedisClient | None = None
    _deferred: _clients.Deferred | None = None

    @property
    def _client(self) -> RedisClient:
        client = self._built
        if client is None:
            # Raises redis.ConnectionError while the Cluster is away, inside the callers'
            # error handling (an outage like any other).
            client = self._built = self._deferred.get()  # type: ignore[union-attr]
        return client

    @_client.setter
    def _client(self, client: RedisClient | _clients.Deferred) -> None:
        if isinstance(client, _clients.Deferred):
            self._deferred = client
        else:
            self._built = client

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout: float = _clients.DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout: float = _clients.DEFAULT_SOCKET_CONNECT_TIMEOUT,
        retries: int = _clients.DEFAULT_RETRIES,
        prefix: str = "celery_lock",
        default_ttl: float = 300.0,
        transport_options: Mapping[str, Any] | None = None,
        ssl: Mapping[str, Any] | bool | None = None,
        wait_replicas: int = 0,
        wait_timeout: float = _durability.DEFAULT_WAIT_TIMEOUT,
        **kwargs: Any,
    ) -> RedisLockManager:
        """Build a manager on a new client for ``url`` with bounded timeouts and retries.

        A refused connection fails within milliseconds (redis-py 8's defaults take ~4.5 s), a
        black-holed one after ``socket_connect_timeout``, a hung server after
        ``socket_timeout``; timeouts are not retried. A Cluster none of whose startup nodes
        answers yet gives a manager that raises :class:`LockBackendUnavailable` until one does.

        :param url: ``redis://``, ``rediss://``, ``unix://``, kombu's ``sentinel://`` list (with
            ``transport_options={"master_name": ...}``) or a ``redis+cluster://`` list; see
            ``celery_lock.backends._clients``.
        :param socket_timeout: seconds to wait for a reply (default 1.0).
        :param socket_connect_timeout: seconds to wait for a connection (default 0.5).
        :param retries: immediate retries of a command after a connection error.
        :param prefix: namespace of every key the manager writes.
        :param default_ttl: lease seconds when ``acquire(ttl=None)``.
        :param transport_options: kombu-style options of a ``sentinel://`` URL.
        :param ssl: TLS options as in Celery's ``broker_use_ssl``.
        :param wait_replicas: see the class.
        :param wait_timeout: see the class.
        :param kwargs: passed on to the redis-py client (``password``, ``ssl_*`` ...).
        :raises ValueError: for an unsupported URL or bad options.
        :raises LockConfigurationError: for a ``redis+cluster://`` URL of a server that is
            not a Cluster.
        """

        client = _clients.client_or_deferred(
            url,
            transport_options=transport_options,
            ssl=ssl,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retries=retries,
            **kwargs,
        )
        _durability.check(wait_replicas, wait_timeout, socket_timeout)
        return cls(
            client,  # type: ignore[arg-type]  # a Deferred is built on first use (_client)
            prefix=prefix,
            default_ttl=default_ttl,
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
        )

    @property
    def client(self) -> RedisClient:
        """The redis-py client this manager uses.

        :raises LockBackendUnavailable: for a Cluster none of whose nodes answered yet.
        """
        try:
            return self._client
        except redis.ConnectionError as exc:
            raise self._unavailable(None, exc) from exc

    @property
    def prefix(self) -> str:
        """Namespace of every key this manager writes."""
        return self._prefix

    # ------------------------------------------------------------------ hot path

    def _eval(self, script: scripts.Lua, numkeys: int, *keys_and_args: str | int | bytes) -> Any:
        """Run ``script`` by EVALSHA; load it and run it again when the server answers NOSCRIPT.

        redis-py's ``Script`` object (``register_script``) does the same, but adds ~5 us of
        per-call work here (argument tuples, pipeline checks), which is 5 % of a lock cycle.
        ``evalsha`` is public on ``Redis`` and ``RedisCluster`` alike; a Cluster client routes
        it by its keys, and ``script_load`` there loads the script on every primary.
        """
        client = self._client
        try:
            return client.evalsha(script.sha, numkeys, *keys_and_args)
        except NoScriptError:
            # The server's script cache is empty after a restart, a failover or SCRIPT FLUSH.
            client.script_load(script.source)
            return client.evalsha(script.sha, numkeys, *keys_and_args)

    def _try_acquire(
        self, key: str, ttl: float, token: str, task_id: str | None, task_name: str | None
    ) -> Lease | None:
        name = self._name(key)
        now = _time.time()
        args = (
            name,
            name + ":fence",
            scripts.grant_arg(ttl, token, self._meta(key, now, ttl, task_id, task_name)),
        )
        if self._orphans:
            self._reap_orphans()
        try:
            reply = self._eval(scripts.ACQUIRE, 2, *args)
        except _CLIENT_ERRORS as exc:
            reply = self._acquire_again(key, token, args, exc)
        # A list: {0, pttl, value} held by someone else; otherwise the fence of our lease.
        if isinstance(reply, list) and self._break_if_dead(key, name, reply[2]):
            reply = self._acquire_again(key, token, args, None)
        if isinstance(reply, list):
            return None
        # now was taken before sending, so expires_at is never later than the server's expiry.
        lease = Lease(key, token, int(reply), "redis", ttl, now + ttl, now, _fork.pid())
        return self._replicated(lease)

    def _acquire_again(
        self, key: str, token: str, args: tuple[str, str, str], error: BaseException | None
    ) -> Any:
        """Run the acquire script once more with the same token (after ``error``, if any)."""
        if error is not None and not is_connection_error(error):
            raise self._unavailable(key, error) from error
        if isinstance(error, redis.TimeoutError):
            # No answer within the socket timeout: the server is hung or cut off and would not
            # answer a re-send either, which would double what a hung store costs the caller
            # (issue 14). The script may have run: its grant is released later, by token.
            self._orphans.append((args[0], token))
            raise self._unavailable(key, error) from error
        # After a connection error the reply may have been lost after the script ran: the same
        # token makes the retry answer "already ours" instead of "busy" (simstudioai/sim#6864).
        # Without one, a dead holder's lock was just broken.
        try:
            reply = self._eval(scripts.ACQUIRE, 2, *args)
        except _CLIENT_ERRORS as exc:
            if error is not None:
                # Twice no answer: the script may have run (the reply lost), leaving the key
                # held under a token nobody will use. Remember it and compare-and-delete it on
                # the next round trip that gets through, instead of blocking the key until
                # its ttl.
                self._orphans.append((args[0], token))
            raise self._unavailable(key, exc) from exc
        return reply

    def _reap_orphans(self) -> None:
        """Delete locks of acquires that raised after the server may have granted them."""
        while self._orphans:
            name, token = self._orphans[0]
            try:
                keys = release_keys(name, "")
                reply = self._eval(scripts.RELEASE, len(keys), *keys, self._release_arg(token))
            except _CLIENT_ERRORS:
                return  # still unreachable: try again next time
            if isinstance(reply, list):
                self._turn(key_of(None, name), reply)
            with contextlib.suppress(IndexError):
                self._orphans.popleft()

    def _release(self, lease: Lease) -> bool:
        return self._end(lease, "", 0.0, False)

    def _end(self, lease: Lease, finished: str, done_ttl: float, mark: bool) -> bool:
        """Release ``lease`` (``finished``: the task id of a job whose run completed, or "")."""
        name = self._name(lease.key)
        try:
            # One release id per call: redis-py's own retry of this command (after a lost
            # reply) re-sends the same id and is recognised by the script; any other call is not.
            keys = release_keys(name, finished)
            args: tuple[str, ...] = (self._release_arg(lease.token),)
            if finished:
                done_ms = max(1, math.ceil(done_ttl * 1000))
                args += (f"{done_ms} {'1' if mark else '0'} {finished}",)
            reply = self._eval(scripts.RELEASE, len(keys), *keys, *args)
        except _CLIENT_ERRORS as exc:
            # Whether the server ran the script is unknown. The lease keeps its token, so a
            # later call can still release it if this one never arrived (redis/redis-py#3847,
            # #4258); if it did arrive, that later call is a second release and says False.
            raise self._unavailable(lease.key, exc) from exc
        # 1: the server still had our value (or this call's own tombstone: an earlier attempt
        # whose reply was lost), so by its clock, the one that expires keys, the lease was
        # alive. The client's wall clock is not consulted: it may have jumped.
        if isinstance(reply, list):  # {1, task id, payload}: released, and handed to that job
            self._turn(lease.key, reply)
            return True
        return bool(reply == 1)

    def _release_arg(self, token: str) -> str:
        """The RELEASE script's first argument: token, a new release id, reservation ttl."""
        return f"{token} {release_id()} {math.ceil(self.reserve_ttl * 1000)}"

    def _extend(self, lease: Lease, ttl: float) -> Lease | None:
        now = _time.time()
        # No client-side expiry check: the script renews only while the server still holds our
        # token, which is exactly "not expired" by the server's clock.
        try:
            renewed = self._eval(
                scripts.EXTEND, 1, self._name(lease.key), lease.token, math.ceil(ttl * 1000)
            )
        except _CLIENT_ERRORS as exc:
            raise self._unavailable(lease.key, exc) from exc
        if renewed != 1:
            return None
        return dataclasses.replace(lease, ttl=ttl, expires_at=now + ttl)

    # ---------------------------------------------------------- inspection, breaking

    def _inspect(self, key: str) -> LockInfo | None:
        if self._orphans:
            self._reap_orphans()
        now = _time.time()
        found = self._read(key, self._name(key))
        if found is None:
            return None
        return self._info(key, parse(found[0]), found[1], now, found[0])

    def _iter_locks(self) -> Iterator[LockInfo]:
        for name, tag in self._scan():
            now = _time.time()
            found = self._read(None, name)
            if found is None:
                continue  # released or expired since SCAN saw it
            parsed = parse(found[0])
            yield self._info(key_of(parsed, tag), parsed, found[1], now, found[0])

    def _break(
        self, key: str, *, task_id: str | None, token_prefix: str | None, only_if_dead: bool
    ) -> bool:
        name = self._name(key)
        found = self._read(key, name)
        if found is None:
            return False
        parsed = parse(found[0])
        if task_id is not None and (parsed is None or parsed[2].get("task_id") != task_id):
            return False
        if token_prefix is not None and (parsed is None or not parsed[0].startswith(token_prefix)):
            return False
        if only_if_dead and (parsed is None or not _identity.holder_is_dead(parsed[2])):
            return False
        if not self._compare_and_delete(key, name, found[0]):
            return False
        self._log_broken("broke lock", key, parsed)
        return True

    def clean(self, *, dry_run: bool = False) -> CleanReport:
        """Remove locks whose holder is provably dead, by compare-and-delete on their value.

        Expired locks need no cleaning in Redis (the server drops them). A value this library
        cannot parse is kept and counted as an error (with a WARNING).

        :param dry_run: count what would be removed, delete nothing.
        """
        report = CleanReport()
        for name, tag in self._scan():
            found = self._read(None, name)
            if found is None:
                continue  # released or expired since SCAN saw it
            report.scanned += 1
            parsed = parse(found[0])
            if parsed is None and reserved_for(found[0]) is not None:
                report.kept += 1  # reserved for a waiting job: it ends by itself
            elif parsed is None:
                report.kept += 1
                report.errors += 1
                self._log.warning(
                    "kept lock %s: its value is not a celery_lock value",
                    name,
                    extra={"lock_key": tag, "backend": "redis", "fence": None},
                )
            elif not _identity.holder_is_dead(parsed[2]):
                report.kept += 1
            elif dry_run:
                report.removed += 1
            elif self._compare_and_delete(key := key_of(parsed, tag), name, found[0]):
                report.removed += 1
                self._log_broken("cleaner removed lock of dead holder", key, parsed)
            else:
                report.kept += 1  # released or re-acquired since we read it
        return report

    # ------------------------------------------------------------------ waiting

    def _waiter(self, key: str) -> Waiter:
        return self._wakeups.waiter(self._built, self._name(key) + ":wake")

    def _publish_denied(self, exc_text: str) -> None:
        """A release could not publish its wake-up (``NOPERM``): log one WARNING per manager
        naming the missing ACL right, and let this process's waiters poll from now on."""
        self._wakeups.denied("PUBLISH", exc_text)

    # ------------------------------------------------------------------ durability

    def _replicated(self, lease: Lease) -> Lease:
        """``lease``, once ``wait_replicas`` replicas acknowledged its grant (no-op when 0).

        :raises LockBackendUnavailable: fewer did in ``wait_timeout``; the grant is released
            (a grant only the master has would be lost with it, and granted again).
        """
        if not self._wait_replicas:
            return lease
        name = self._name(lease.key)
        try:
            acked = _durability.replicas_acknowledging(
                self._client, name, self._wait_replicas, self._wait_timeout
            )
        except _CLIENT_ERRORS as exc:
            self._give_back(name, lease)
            raise self._unavailable(lease.key, exc) from exc
        if acked < self._wait_replicas:
            self._give_back(name, lease)
            raise _durability.too_few(lease.key, acked, self._wait_replicas, self._wait_timeout)
        return lease

    def _give_back(self, name: str, lease: Lease) -> None:
        try:
            self._release(lease)
        except LockBackendUnavailable:
            self._orphans.append((name, lease.token))  # released on the next round trip

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _holder_task_id(value: bytes | str) -> str | None:
        return holder_of(value)

    def _name(self, key: str) -> str:
        if "{" in key or "}" in key or not (key.isascii() or encodable(key)):
            # Braces would change the Cluster hash tag, so such a key is tagged by its hash, in
            # a namespace of its own: a plain key always gives "<prefix>:{...}", never "#{".
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
            return f"{self._prefix}:#{{{digest}}}"
        return f"{self._prefix}:{{{key}}}"

    def _scan(self) -> Iterator[tuple[str, str]]:
        """Names of the lock keys under our prefix (SCAN, never KEYS), each with the key to show
        when its value does not record one: the plain key, or ``#<sha256>`` for a hashed one."""
        head = f"{self._prefix}:"
        try:
            # One SCAN finds both forms, "<prefix>:{<key>}" and "<prefix>:#{<sha256>}"; "}" at
            # the end leaves out the fence counters ("...}:fence").
            for raw in self._client.scan_iter(match=head.translate(GLOB_ESCAPES) + "*}", count=500):
                try:
                    name = raw.decode("utf-8") if isinstance(raw, bytes) else raw
                except UnicodeDecodeError:
                    continue  # not ours: every name we write is UTF-8
                tag = tag_of(name[len(head) :])
                if tag is not None:
                    yield name, tag
        except _CLIENT_ERRORS as exc:
            raise self._unavailable(None, exc) from exc

    def _read(self, key: str | None, name: str) -> tuple[bytes | str, int] | None:
        """``(value, pttl ms)`` of lock ``name`` in one round trip, or None when it is free."""
        try:
            found = self._eval(scripts.INSPECT, 1, name)
        except _CLIENT_ERRORS as exc:
            raise self._unavailable(key, exc) from exc
        return None if found is None else (found[0], int(found[1]))

    @staticmethod
    def _info(
        key: str,
        parsed: tuple[str, int, dict[str, Any]] | None,
        pttl: int,
        now: float,
        value: bytes | str,
    ) -> LockInfo:
        expires = now + pttl / 1000 if pttl >= 0 else None
        if parsed is None:
            # A reservation shows the job it is kept for (or nothing, for a foreign value).
            waiter = reserved_for(value)
            return LockInfo(key, None, None, "redis", None, None, waiter, None, None, expires)
        token, fence, meta = parsed
        return LockInfo(
            key=key,
            token_prefix=token[:8],
            fence=fence,
            backend="redis",
            host=opt(meta.get("host"), str),
            pid=opt(meta.get("pid"), int),
            task_id=opt(meta.get("task_id"), str),
            task_name=opt(meta.get("task_name"), str),
            acquired_at=opt(meta.get("acquired"), float),
            expires_at=expires,
        )

    def _break_if_dead(self, key: str, name: str, value: bytes | str) -> bool:
        """Delete a busy lock whose holder is provably dead; True when it was deleted."""
        parsed = parse(value)
        if parsed is None or not _identity.holder_is_dead(parsed[2]):
            return False
        if not self._compare_and_delete(key, name, value):
            return False
        self._log_broken("broke lock of dead holder", key, parsed)
        return True

    def _compare_and_delete(self, key: str, name: str, value: bytes | str) -> bool:
        try:
            reply = self._eval(
                scripts.BREAK,
                3,
                name,
                name + ":line",
                name + ":wake-ups",
                value,
                math.ceil(self.reserve_ttl * 1000),
            )
        except _CLIENT_ERRORS as exc:
            raise self._unavailable(key, exc) from exc
        self._turn(key, reply)
        return bool(int(reply[0]) == 1)

    def _log_broken(
        self, message: str, key: str, parsed: tuple[str, int, dict[str, Any]] | None
    ) -> None:
        pid = parsed[2].get("pid") if parsed else None
        self._log.info(
            "%s %s (holder pid %s)",
            message,
            key,
            pid,
            extra={
                "lock_key": key,
                "backend": "redis",
                "fence": parsed[1] if parsed else None,
                "holder_pid": pid,
            },
        )

    def _unavailable(
        self, key: str | None, exc: BaseException
    ) -> LockBackendUnavailable | LockConfigurationError:
        # Every failure becomes LockBackendUnavailable, not only connection-class ones: an OOM
        # refusal ("command not allowed when used memory > 'maxmemory'"), a WRONGTYPE value or
        # a script error also mean the store cannot grant locks now, and no raw redis exception
        # may reach the caller. is_connection_error(exc) tells the two kinds apart. A Cluster
        # node's redirection is the one exception: retrying or falling back would hide a
        # wrong URL (issue 14), so it is a LockConfigurationError.
        misconfigured = cluster_node_error(self._built, key, exc)
        if misconfigured is not None:
            return misconfigured
        what = "unreachable" if is_connection_error(exc) else "failed"
        return LockBackendUnavailable(
            f"redis {what} for lock {key!r}: {type(exc).__name__}: {exc}",
            key=key,
            backend="redis",
        )
