"""Sentinel master clients that follow a switch of master within a second (issue 14, item 3).

A graceful ``SENTINEL FAILOVER`` promotes the replica, but the old master keeps running and
keeps answering as a writable master until the sentinels convert it into a replica, about 10 s
later (Sentinel reconfigures an old master only after several of its INFO periods). redis-py's
Sentinel pool asks the sentinels for the master's address only when it opens a connection: a
connection that stays open keeps writing to the old master for those 10 s, and a new one may
still be sent there by a sentinel that has not heard of the switch yet (sentinels learn it from
each other's hello messages, every 2 s). A role check on new connections cannot help either:
the old master says ``master`` until it is converted. Locks granted on two masters at once
break mutual exclusion.

Two parts, with public redis-py API only:

* :class:`SwitchWatcher` runs one small daemon thread per sentinel, subscribed to
  ``+switch-master``. On an announcement for our master it reads that sentinel's view
  (``SENTINEL MASTERS``: address and ``config-epoch``), keeps the newest one as a hint, and
  points the master pool at the new master (``get_master_address()``): idle connections are
  closed, and each one in use is dropped when it is released (the pool no longer owns it), so
  the next command reconnects.
* :class:`FollowingSentinel` (a ``redis.sentinel.Sentinel``) discovers the master as redis-py
  does, but when the answer differs from the watcher's hint it asks every sentinel and takes
  the address with the highest ``config-epoch``: a sentinel that has not caught up yet cannot
  send the reconnect back to the old master. A discovery that found no master is remembered
  for ``NEGATIVE_TTL``, so the command's immediate retry does not ask unreachable sentinels
  again (a cut-off group costs one round of sentinel timeouts, not two).

The watcher starts on the first connection of the master client (``discover_master``), again
on the first connection in a forked child (reset by ``_fork.in_child``: the parent's threads do
not exist there and the parent's pub/sub sockets must not be used) and after
:meth:`FollowingMaster.close`; it stops when the client is closed or its pool is
garbage-collected. A sentinel it cannot reach is tried again with a bounded back-off, and each
loss and recovery of a sentinel is logged once (WARNING, then INFO).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time as _time
import weakref
from typing import Any, Final, NamedTuple, cast

import redis
from redis.connection import ConnectionPool
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

from celery_lock import _fork

__all__ = ["FollowingMaster", "FollowingSentinel", "SwitchWatcher"]

_log = logging.getLogger("celery_lock.redis")

#: Channel on which every sentinel announces a new master ("<name> <old-ip> <old-port>
#: <new-ip> <new-port>").
SWITCH_CHANNEL: Final = "+switch-master"
#: A watcher thread wakes this often (s) to notice that it should stop. It otherwise blocks on
#: its sentinel's socket, so an idle client costs one wake-up per sentinel per POLL seconds.
POLL: Final = 1.0
#: Back-off (s) between attempts to reach a sentinel that failed: doubled up to the cap, so an
#: unreachable sentinel costs a connection attempt every few seconds, never a busy loop.
BACKOFF_MIN: Final = 0.2
BACKOFF_MAX: Final = 5.0


class MasterView(NamedTuple):
    """One sentinel's current view of a master."""

    epoch: int
    address: tuple[str, int]


#: Every watcher of this process, to reset after a fork.
_watchers: weakref.WeakSet[SwitchWatcher] = weakref.WeakSet()


@_fork.in_child
def _reset_after_fork() -> None:
    for watcher in list(_watchers):
        watcher._after_fork()


class SwitchWatcher:
    """Follows ``+switch-master`` announcements for one master name and disconnects the master
    pool when the master moved.

    :param sentinel: the :class:`FollowingSentinel` whose ``sentinels`` clients to subscribe on.
    :param service_name: the master name.
    """

    def __init__(self, sentinel: Sentinel, service_name: str) -> None:
        self._sentinel = sentinel
        self._service_name = service_name
        self._mutex = threading.Lock()
        self._pool: weakref.ReferenceType[ConnectionPool] | None = None
        #: Newest view announced or read so far (highest config epoch), or None.
        self._hint: MasterView | None = None
        #: Stop flag of the current threads (set when they are asked to stop; None before the
        #: first start). A new flag per start, so a thread of an earlier start, still ending,
        #: never keeps running after a stop and restart.
        self._stop: threading.Event | None = None
        self._threads: list[threading.Thread] = []
        #: Sentinels (by "host:port") this watcher currently cannot reach, for log-once.
        self._lost: set[str] = set()
        #: Sentinels (by "host:port") whose announcements this watcher receives now.
        self._subscribed: set[str] = set()
        #: Times the pool was disconnected because the master moved (tests read it).
        self.switches = 0
        _watchers.add(self)

    # ------------------------------------------------------------------ control

    def attach(self, pool: ConnectionPool) -> None:
        """Watch on behalf of ``pool``: it is disconnected on a switch; the watcher stops when
        the pool is garbage-collected (it is only weakly referenced)."""
        self._pool = weakref.ref(pool)
        weakref.finalize(pool, self.stop)

    def ensure_running(self) -> None:
        """Start the threads unless they run already (two attribute reads when they do)."""
        stop = self._stop
        if stop is not None and not stop.is_set():
            return
        with self._mutex:
            stop = self._stop
            if stop is not None and not stop.is_set():
                return
            if self._pool is None or self._pool() is None:
                return
            self._stop = stop = threading.Event()
            self._lost = set()
            self._threads = [
                threading.Thread(
                    target=self._run,
                    args=(client, stop),
                    name=f"celery_lock-sentinel-{self._service_name}-{i}",
                    daemon=True,
                )
                for i, client in enumerate(list(self._sentinel.sentinels))
            ]
            for thread in self._threads:
                thread.start()

    def stop(self) -> None:
        """Ask the threads to end (each within ``POLL`` seconds); does not wait for them.

        Takes no lock: it also runs from a garbage collector's finalizer, which may interrupt a
        thread that holds this watcher's mutex.
        """
        stop = self._stop
        if stop is not None:
            stop.set()

    def _after_fork(self) -> None:
        # The parent's threads do not exist in the child, their pub/sub sockets belong to the
        # parent, and a parent thread may have held the mutex at the fork: start afresh (on
        # the child's first connection). The hint stays true.
        self._mutex = threading.Lock()
        self._stop = None
        self._threads = []
        self._lost = set()
        self._subscribed = set()

    @property
    def running(self) -> bool:
        """Whether any watcher thread of this process is alive."""
        return any(t.is_alive() for t in self._threads)

    @property
    def subscribed(self) -> int:
        """How many sentinels this watcher receives announcements from right now."""
        return len(self._subscribed) if self.running else 0

    def hint(self) -> MasterView | None:
        """The newest master view seen (None before the first sentinel answered)."""
        return self._hint

    # ------------------------------------------------------------------ threads

    def _run(self, client: redis.Redis, stop: threading.Event) -> None:
        name = _address(client)
        backoff = BACKOFF_MIN
        while not stop.is_set():
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(SWITCH_CHANNEL)
                # Anything announced while this thread was not subscribed is in the
                # sentinel's current view: read it once per (re)subscription.
                self._consider(client, name)
                self._reached(name)
                backoff = BACKOFF_MIN
                while not stop.is_set():
                    message = pubsub.get_message(timeout=POLL)
                    if (
                        message is not None
                        and message.get("type") == "message"
                        and _names_us(message.get("data"), self._service_name)
                    ):
                        self._consider(client, name)
            except Exception as exc:  # noqa: BLE001 - a watcher thread must outlive any reply
                if stop.is_set():
                    # Asked to stop (close(), a collected pool) while it waited up to POLL:
                    # the client is done with this sentinel, so its loss is no news.
                    return
                self._unreachable(name, exc)
                stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def offer(self, view: MasterView) -> bool:
        """Keep ``view`` as the hint if its config epoch is newer than the hint's.

        :returns: True when it replaced a hint that named another address (the master moved).
        """
        accepted, previous = self._accept(view)
        return accepted and previous is not None and previous.address != view.address

    def _accept(self, view: MasterView) -> tuple[bool, MasterView | None]:
        with self._mutex:
            hint = self._hint
            if hint is not None and view.epoch <= hint.epoch:
                return False, hint  # announced again by another sentinel, or older
            self._hint = view
            return True, hint

    def _consider(self, client: redis.Redis, name: str) -> None:
        """Read ``client``'s view of the master; when it is newer than the hint and names
        another master, disconnect every connection of the pool."""
        view = _view(self._sentinel, client, self._service_name)
        if view is None:
            return
        accepted, previous = self._accept(view)
        pool = self._pool() if self._pool is not None else None
        if not accepted or pool is None:
            return  # the other sentinels repeat a switch already acted on: nothing to do
        if previous is not None:
            moved = previous.address != view.address
        else:
            # The first view (at start-up): the pool may be connected elsewhere if a switch
            # happened while nobody watched.
            master = getattr(pool, "master_address", None)  # SentinelConnectionPool's
            moved = master is not None and tuple(master) != view.address
        if not moved:
            return
        with self._mutex:
            self.switches += 1
        _log.info(
            "Sentinel %s: master %r is now %s:%s (config epoch %s); reconnecting",
            name,
            self._service_name,
            view.address[0],
            view.address[1],
            view.epoch,
            extra={"backend": "redis"},
        )
        # Point the pool at the new master now (our discover_master: the newest view by
        # epoch), not when its next connection asks: redis-py then closes the idle connections,
        # and drops each one in use when it is released, since the pool no longer owns a
        # connection to the old address. Closing in-use connections here instead would close a
        # socket under a thread reading from it: redis-py's parser then raises AttributeError,
        # which reached callers of acquire() during a failover.
        if isinstance(pool, SentinelConnectionPool):
            with contextlib.suppress(redis.RedisError):
                pool.get_master_address()  # type: ignore[no-untyped-call,unused-ignore]
        pool.disconnect(inuse_connections=False)

    def _reached(self, name: str) -> None:
        with self._mutex:
            self._subscribed.add(name)
            if name not in self._lost:
                return
            self._lost.discard(name)
        _log.info(
            "Sentinel %s reachable again: following failovers of %r through it",
            name,
            self._service_name,
            extra={"backend": "redis"},
        )

    def _unreachable(self, name: str, exc: BaseException) -> None:
        with self._mutex:
            self._subscribed.discard(name)
            if name in self._lost:
                return
            self._lost.add(name)
        _log.warning(
            "Sentinel %s unreachable, cannot follow failovers of %r through it: %s",
            name,
            self._service_name,
            exc,
            extra={"backend": "redis"},
        )


class FollowingSentinel(Sentinel):
    """A ``redis.sentinel.Sentinel`` whose master discovery never goes back to an old master
    that a sentinel still reports after a newer one was announced (see the module docstring).

    Call :meth:`watch` once with the master client's pool to start following switches.
    """

    #: A discovery that found no master is answered from memory for this long (s): the
    #: connection's immediate retry, and other threads meanwhile, fail at once instead of
    #: asking unreachable sentinels again (each failed discovery costs up to the sentinels'
    #: timeouts). Short, so that a recovered group is found again quickly.
    NEGATIVE_TTL: Final = 0.5

    watcher: SwitchWatcher | None = None
    #: (monotonic time, message) of the last discovery that found no master, or None.
    _failed: tuple[float, str] | None = None

    def watch(self, service_name: str, pool: ConnectionPool) -> SwitchWatcher:
        """Create the watcher of ``service_name`` for ``pool`` (started on first connect)."""
        watcher = SwitchWatcher(self, service_name)
        watcher.attach(pool)
        self.watcher = watcher
        return watcher

    def discover_master(self, service_name: str) -> tuple[str, int]:
        """redis-py's discovery, checked against the newest announced master (by epoch)."""
        watcher = self.watcher
        if watcher is not None:
            watcher.ensure_running()
        failed = self._failed
        if failed is not None and _time.monotonic() - failed[0] < self.NEGATIVE_TTL:
            raise MasterNotFoundError(failed[1])
        try:
            host, port = super().discover_master(service_name)
        except MasterNotFoundError as exc:
            self._failed = (_time.monotonic(), str(exc))
            raise
        self._failed = None
        address = (str(host), int(port))
        hint = watcher.hint() if watcher is not None else None
        if hint is None or hint.address == address:
            return address
        # The first sentinel that answered disagrees with the newest announcement: one of the
        # two is behind. The config epochs of all sentinels settle it.
        return self._newest_master(service_name)

    def _newest_master(self, service_name: str) -> tuple[str, int]:
        """The address with the highest config epoch among the sentinels' views and the hint
        (whose sentinel may be unreachable now: its epoch still outranks older views)."""
        watcher = self.watcher
        newest = watcher.hint() if watcher is not None else None
        for client in list(self.sentinels):
            try:
                view = _view(self, client, service_name)
            except (redis.RedisError, OSError):
                continue
            if view is not None and (newest is None or view.epoch > newest.epoch):
                newest = view
        if newest is None:
            raise MasterNotFoundError(f"No master found for {service_name!r}")
        if watcher is not None:
            watcher.offer(newest)  # a switch the watcher missed: later discoveries agree
        return newest.address


class FollowingMaster(redis.Redis):
    """The master client of a :class:`FollowingSentinel`: ``close()`` also stops the switch
    watcher (a later command restarts it, like the pool reconnects)."""

    def close(self) -> None:
        """Close the client and stop following switches until it is used again."""
        sentinel = getattr(self.connection_pool, "sentinel_manager", None)
        watcher = getattr(sentinel, "watcher", None)
        if isinstance(watcher, SwitchWatcher):
            watcher.stop()
        super().close()


def _view(sentinel: Sentinel, client: redis.Redis, service_name: str) -> MasterView | None:
    """``client``'s (one sentinel's) view of ``service_name``, None if it has no valid one."""
    # {name: state}, as redis-py's own discover_master reads it.
    masters: Any = client.sentinel_masters()
    state = masters.get(service_name)
    # check_master_state: a master, not down, seen by enough other sentinels.
    if not state or not cast(Any, sentinel).check_master_state(state, service_name):
        return None
    return MasterView(int(state["config-epoch"]), (str(state["ip"]), int(state["port"])))


def _names_us(data: object, service_name: str) -> bool:
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    return isinstance(data, str) and data.split(" ", 1)[0] == service_name


def _address(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"
