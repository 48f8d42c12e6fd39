"""Release wake-ups for QUEUE waiters: one pub/sub connection per manager and process.

Every release publishes on the key's channel ``<prefix>:{<key>}:wake``. A :class:`WakeHub`
owns one redis-py ``PubSub`` (one connection) and the one thread that uses it (redis-py's
PubSub objects must not be shared between threads): waiters of any key, in any number of
threads or greenlets, register with the hub, which subscribes each channel on demand and drops
it when the channel's last waiter leaves (issue 14, item 5: a waiter with a connection of its
own exhausted the pool at 100 waiters).

* **No missed release.** :meth:`WakeHub.register` returns once the server confirmed the
  subscription, so the waiter's next acquire attempt, which travels on another connection,
  comes after it: a release after that attempt is published to us. A lost connection is
  re-established and every channel subscribed again; since a release may have gone out in
  between, the first waiter of each channel is woken once the subscription is back.
* **In line, not a herd.** A message wakes the first waiter of the channel that has no
  wake-up pending, not all of them: one release frees the lock for one holder, and a thousand
  threads retrying at once would only queue up on the GIL and the server. A waiter that leaves
  with a wake-up it did not use passes it on to the next one.
* **Polling fallback.** While the hub cannot subscribe (server down, connection lost) waiters
  keep polling with the base class's jittered delays. A refused SUBSCRIBE (an ACL without the
  channel right, a proxy without pub/sub) switches the hub to polling for good: ``on_refused``
  is called once with the server's message.
* **Fork.** The owning manager makes a new hub in a forked child (``_fork.generation``): the
  parent's thread does not exist there and its socket belongs to the parent.

The listener reads with short slices (``LISTEN_SLICE``) while any channel is wanted, so a new
channel is subscribed within a few milliseconds, and parks on a condition (no socket I/O, no
wake-ups) when none is; it closes the connection and ends after ``LINGER`` idle seconds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from redis.exceptions import (
    NoPermissionError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

from celery_lock import _fork
from celery_lock._base import Waiter
from celery_lock.backends._clients import socket_timeout
from celery_lock.backends._redis_errors import is_connection_error

__all__ = ["WakeHub", "WakeUps", "wait_slice"]

_log = logging.getLogger("celery_lock.redis")

#: Longest single read of the listener while channels are wanted (s): also how long a new
#: channel may wait before its SUBSCRIBE is sent. A read that finds nothing costs one poll().
LISTEN_SLICE: Final = 0.01
#: Seconds the listener keeps its connection after the last waiter left, for the next one.
LINGER: Final = 5.0
#: Back-off between attempts to reconnect (s), doubled up to the cap.
BACKOFF_MIN: Final = 0.05
BACKOFF_MAX: Final = 2.0

_ERRORS: Final = (RedisError, RedisClusterException, OSError)


def wait_slice(client: object) -> float:
    """Longest single pub/sub read: half the client's socket timeout, at most 1 s (a longer
    read would time out and be retried by redis-py: redis/redis-py#2807, #583)."""
    timeout = socket_timeout(client)
    return 1.0 if timeout is None else min(1.0, timeout / 2)


#: Guards the creation of hubs; replaced in a forked child (a parent thread may have held it).
_mutex = threading.Lock()


@_fork.in_child
def _reset_after_fork() -> None:
    global _mutex  # noqa: PLW0603
    _mutex = threading.Lock()


class WakeUps:
    """One manager's release wake-ups: its :class:`WakeHub` in this process, or polling when
    pub/sub is refused.

    :param prefix: the manager's key prefix (named in the ACL advice).
    :param log: the manager's logger.
    """

    def __init__(self, prefix: str, log: logging.Logger) -> None:
        self._prefix = prefix
        self._log = log
        #: (fork generation, hub) of this process's listener.
        self._hub: tuple[int, WakeHub] | None = None
        #: Why wake-ups are off for good (a refused SUBSCRIBE or PUBLISH), or None.
        self.off: str | None = None
        self._warned = False

    def waiter(self, client: object, channel: str) -> Waiter:
        """A waiter on ``channel`` (subscribed when this returns), or a polling one."""
        hub = self.hub(client)
        if hub is None or self.off is not None:
            if self._log.isEnabledFor(logging.DEBUG):
                self._log.debug("no pub/sub wake-ups (%s), polling", self.off, extra=_EXTRA)
            return Waiter()
        return hub.register(channel)

    def hub(self, client: object) -> WakeHub | None:
        """This process's hub (made on first use; a forked child makes its own), or None when
        wake-ups are off or there is no client yet (a Cluster not reached yet)."""
        current = self._hub
        generation = _fork.generation()
        if current is not None and current[0] == generation:
            return current[1]
        if self.off is not None or client is None:
            return None
        with _mutex:
            current = self._hub
            if current is None or current[0] != generation:
                wait = wait_slice(client)
                hub = WakeHub(
                    client,
                    confirm_timeout=wait,
                    read_slice=wait,
                    on_refused=self.refused,
                )
                current = self._hub = (generation, hub)
        return current[1]

    def refused(self, exc: BaseException) -> None:
        """The hub's SUBSCRIBE was refused: poll from now on (WARNING when an ACL is why)."""
        if isinstance(exc, NoPermissionError) or str(exc).startswith("NOPERM"):
            self.denied("SUBSCRIBE", str(exc))
        else:  # a proxy without pub/sub, say: nothing the user can grant
            self.off = f"SUBSCRIBE refused: {exc}"
            self._log.debug("no pub/sub wake-ups (%s), polling", exc, extra=_EXTRA)

    def denied(self, command: str, text: str) -> None:
        """``command`` (SUBSCRIBE or PUBLISH) was refused by an ACL: one WARNING per manager
        naming the missing right; waiters poll from now on."""
        with _mutex:
            first, self._warned = not self._warned, True
            self.off = f"{command} denied: {text}"
            current = self._hub
        if current is not None:
            current[1].close()  # waiting threads poll from now on
        if first:
            self._log.warning(
                "Redis refused %s on the lock wake-up channels (%s): QUEUE waiters poll for "
                "released locks instead of being woken. Give the lock user the channel right "
                "'&%s:*' (ACL SETUSER <user> &%s:*; see docs/redis.md)",
                command,
                text,
                self._prefix,
                self._prefix,
                extra=_EXTRA,
            )


_EXTRA: Final = {"backend": "redis"}


class _Slot:
    """One waiting call: its channel and a wake-up flag."""

    __slots__ = ("channel", "event")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.event = threading.Event()


class WakeHub:
    """The pub/sub listener of one manager in one process (see the module docstring).

    :param client: the manager's redis-py client.
    :param confirm_timeout: seconds :meth:`register` waits for the server to confirm a new
        subscription before the waiter polls instead.
    :param read_slice: upper bound of one blocking read (below the client's socket timeout).
    :param on_refused: called once, with the server's reply, when SUBSCRIBE is refused.
    """

    def __init__(
        self,
        client: Any,
        *,
        confirm_timeout: float,
        read_slice: float,
        on_refused: Callable[[BaseException], None],
    ) -> None:
        self._client = client
        self._confirm_timeout = confirm_timeout
        self._slice = min(LISTEN_SLICE, read_slice)
        self._on_refused = on_refused
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)
        #: Waiters per channel, in arrival order (the order they are woken in).
        self._slots: dict[str, list[_Slot]] = {}
        #: Channels the listener has sent SUBSCRIBE for and not UNSUBSCRIBE since.
        self._sent: set[str] = set()
        #: SUBSCRIBE confirmations still to come, per channel (a channel dropped and wanted
        #: again within one round trip has two in flight: only the last one counts).
        self._pending: dict[str, int] = {}
        #: Channels whose subscription the server confirmed (and that are still wanted).
        self._confirmed: set[str] = set()
        #: Channels whose first waiter is woken when the subscription is confirmed: it was
        #: lost with a connection, or a waiter stopped waiting for it (a release in between
        #: was published to nobody). Waking the first one is enough: waiters are in line.
        self._rewake: set[str] = set()
        #: Channels redis-py subscribed again by itself after a reconnect that nobody wants.
        self._stray: set[str] = set()
        self._thread: threading.Thread | None = None
        #: True once SUBSCRIBE was refused or the hub was closed: every waiter polls.
        self.polling = False
        #: (Re)connections made by the listener (tests read it).
        self.connections = 0

    # ------------------------------------------------------------------ waiters

    def register(self, channel: str) -> Waiter:
        """A waiter on ``channel``, subscribed and confirmed when this returns (or polling)."""
        slot = _Slot(channel)
        with self._mutex:
            if self.polling:
                return Waiter()
            self._slots.setdefault(channel, []).append(slot)
            if channel not in self._confirmed:
                self._start()
                self._changed.notify_all()  # a parked listener has work now
                if not self._changed.wait_for(
                    lambda: channel in self._confirmed or self.polling, self._confirm_timeout
                ):
                    # Not yet (the server is slow or away): poll until it is confirmed,
                    # which then wakes the channel's first waiter for one more attempt.
                    self._rewake.add(channel)
        return _HubWaiter(self, slot)

    def _leave(self, slot: _Slot) -> None:
        with self._mutex:
            slots = self._slots.get(slot.channel)
            if slots is None or slot not in slots:
                return
            slots.remove(slot)
            if not slots:
                del self._slots[slot.channel]  # the listener unsubscribes it
                self._changed.notify_all()
            elif slot.event.is_set():
                # A wake-up this waiter will not use (it got the lock by its own attempt, or
                # gave up): the next one in line may be the one it was meant for.
                self._wake_first(slot.channel)

    def _wake_first(self, channel: str) -> None:
        """Wake the first waiter of ``channel`` without a pending wake-up (mutex held)."""
        for slot in self._slots.get(channel, ()):
            if not slot.event.is_set():
                slot.event.set()
                return

    def close(self) -> None:
        """Stop the listener and let every waiter poll (the manager is going away)."""
        with self._mutex:
            self.polling = True
            self._release_all()

    def _release_all(self) -> None:
        # Wake everybody for one more attempt: from now on they poll (mutex held).
        for slots in self._slots.values():
            for slot in slots:
                slot.event.set()
        self._changed.notify_all()

    @property
    def channels(self) -> int:
        """How many channels have waiters right now."""
        return len(self._slots)

    @property
    def waiters(self) -> int:
        """How many waiting calls are registered right now."""
        with self._mutex:
            return sum(len(slots) for slots in self._slots.values())

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    # ------------------------------------------------------------------ listener

    def _start(self) -> None:
        # Mutex held. The thread ends itself only under the mutex, after setting _thread to
        # None, so a thread seen here is one that will serve this registration.
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="celery_lock-wakeups", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        pubsub: Any = None
        backoff = BACKOFF_MIN
        try:
            while True:
                if not self._await_work():
                    return
                try:
                    if pubsub is None:
                        pubsub = self._client.pubsub()
                        self.connections += 1
                    self._reconcile(pubsub)
                    message = pubsub.get_message(timeout=self._slice)
                    if message is not None:
                        self._dispatch(message)
                    backoff = BACKOFF_MIN
                except Exception as exc:  # noqa: BLE001 - the listener must outlive any reply
                    if isinstance(exc, ResponseError) and not is_connection_error(exc):
                        # SUBSCRIBE refused (NOPERM: no channel right; a proxy without it).
                        self._refused(exc)
                        return
                    # Connection lost, LOADING, READONLY... (or anything unexpected): connect
                    # again after a pause, subscribing everything again.
                    pubsub = _discard(pubsub)
                    self._lost(exc)
                    with self._mutex:
                        self._changed.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            _discard(pubsub)

    def _await_work(self) -> bool:
        """Park while no channel is wanted; False when the listener should end (after
        ``LINGER`` idle seconds, or when the hub polls for good)."""
        with self._mutex:
            if self.polling:
                self._thread = None
                return False
            if self._slots or self._sent:
                return True
            self._changed.wait_for(lambda: bool(self._slots) or self.polling, LINGER)
            if self._slots and not self.polling:
                return True
            self._thread = None
            return False

    def _reconcile(self, pubsub: Any) -> None:
        """Send SUBSCRIBE for wanted channels and UNSUBSCRIBE for the others, in one command
        each (a thousand waiters arriving at once cost one round trip)."""
        with self._mutex:
            wanted = set(self._slots)
            new = sorted(wanted - self._sent)
            old = sorted((self._sent - wanted) | (self._stray - wanted))
            self._stray = set()
            for channel in new:
                self._pending[channel] = self._pending.get(channel, 0) + 1
            for channel in old:
                self._confirmed.discard(channel)
            self._sent = wanted
        # Sent outside the mutex: a write to a stalled server must not block registrations.
        if new:
            pubsub.subscribe(*new)
        if old:
            pubsub.unsubscribe(*old)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        if not isinstance(channel, str):
            return
        with self._mutex:
            if kind == "message":
                self._wake_first(channel)
            elif kind == "subscribe":
                pending = self._pending.get(channel, 0)
                if pending > 1:
                    self._pending[channel] = pending - 1
                    return  # an earlier SUBSCRIBE of a channel dropped and wanted again
                self._pending.pop(channel, None)
                if channel not in self._sent:
                    if pending == 0:
                        self._stray.add(channel)  # resubscribed by redis-py: drop it again
                    return  # unsubscribed meanwhile
                if channel in self._confirmed or pending == 0 or channel in self._rewake:
                    # redis-py reconnected by itself and subscribed again, or the link was
                    # lost, or a waiter stopped waiting for this: a release may have been
                    # published while nobody listened.
                    self._rewake.discard(channel)
                    self._wake_first(channel)
                self._confirmed.add(channel)
                self._changed.notify_all()

    def _lost(self, exc: BaseException) -> None:
        # Everything is subscribed again on the next connection; meanwhile the waiters poll.
        # A release published while nobody listened is made up for when each subscription is
        # confirmed again (its first waiter is woken then).
        with self._mutex:
            self._sent = set()
            self._pending = {}
            self._confirmed = set()
            self._rewake = set(self._slots)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "wake-up connection lost (%s): waiters poll until it is back",
                exc,
                extra={"backend": "redis"},
            )

    def _refused(self, exc: BaseException) -> None:
        with self._mutex:
            self.polling = True
            self._thread = None
            self._release_all()
        self._on_refused(exc)


class _HubWaiter(Waiter):
    """A waiter woken by its :class:`WakeHub`; polls while the hub cannot deliver."""

    def __init__(self, hub: WakeHub, slot: _Slot) -> None:
        self._hub = hub
        self._slot: _Slot | None = slot

    @property
    def poll_max(self) -> float | None:  # type: ignore[override]
        """Releases wake this waiter, so polls (for holders that die or expire) thin out as
        waiters add up: 0.25 s for up to 50 of them, at most 2 s (a thousand waiters poll
        500 times a second instead of 4,000, which starved the hand-offs themselves)."""
        if self._hub.polling:
            return None
        return min(2.0, 0.25 * max(1.0, self._hub.waiters / 50))

    def wait(self, seconds: float) -> bool:
        slot = self._slot
        if slot is None or self._hub.polling:
            return super().wait(seconds)
        if slot.event.wait(max(0.0, seconds)):
            slot.event.clear()
            # A hub that switched to polling wakes everybody once: that is no release.
            return not self._hub.polling
        return False

    def close(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self._hub._leave(slot)


def _discard(pubsub: Any) -> Any:
    """Close ``pubsub`` (if any) and return None, the listener's "no connection"."""
    if pubsub is not None:
        with contextlib.suppress(*_ERRORS):  # the connection is being dropped anyway
            pubsub.close()
    return None
