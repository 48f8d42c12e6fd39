"""The hybrid's circuit breaker: Redis in use (closed) or not (open), and the thread that probes
Redis while the circuit is open.

Each transition happens once: a failure of a call that started before the last recovery is old
news, as is a recovery seen by a probe that started before the outage was noticed. Nothing here
waits for Redis on a caller's thread: probes run on the prober thread, which holds only weak
references, so a circuit (and the hybrid that owns it) that nobody uses any more ends it.
"""

from __future__ import annotations

import math
import threading
import time as _time
import weakref
from collections.abc import Callable
from typing import Final

from celery_lock import _fork

__all__ = ["Circuit"]

#: Longest sleep of a prober thread (s) before it checks that its circuit still exists.
_PROBER_NAP: Final = 1.0

#: Every circuit of this process, to reset their mutexes in a forked child.
_circuits: weakref.WeakSet[Circuit] = weakref.WeakSet()


@_fork.in_child
def _reset_after_fork() -> None:
    for circuit in list(_circuits):
        # A parent thread may have held it at the fork; the prober thread is not copied and
        # starts again on the child's next call while the circuit is open.
        circuit._state = threading.Lock()
        circuit._prober = None


class Circuit:
    """Closed until :meth:`trip`; then open, probed every ``retry_interval`` seconds by
    ``probe()`` (it raises while Redis is down) until a probe succeeds, which closes it and
    calls ``on_up()``.

    ``probe`` and ``on_up`` are bound methods of the owner, held weakly (the owner holds the
    circuit).
    """

    def __init__(
        self,
        retry_interval: float,
        probe: Callable[[], object],
        on_probe_failed: Callable[[Exception], object],
        on_up: Callable[[], object],
    ) -> None:
        self.retry_interval = retry_interval
        self._probe = weakref.WeakMethod(probe)
        self._on_probe_failed = weakref.WeakMethod(on_probe_failed)
        self._on_up = weakref.WeakMethod(on_up)
        self._state = threading.Lock()
        #: monotonic time of the next allowed probe; None while the circuit is closed.
        self._probe_at: float | None = None
        #: monotonic time of the last transition.
        self._changed_at = -math.inf
        #: The thread that probes while the circuit is open (None: not started).
        self._prober: threading.Thread | None = None
        _circuits.add(self)

    @property
    def is_open(self) -> bool:
        return self._probe_at is not None

    def closed(self) -> bool:
        """True when calls should use Redis now; while open, make sure the prober runs."""
        if self._probe_at is None:
            return True
        self._ensure_prober()
        return False

    def trip(self, started: float) -> bool:
        """Open the circuit for a failure of a call that started at ``started`` (monotonic).

        :returns: True when this failure opened it (log and notify once per outage).
        """
        with self._state:
            if self._probe_at is not None or started < self._changed_at:
                return False  # already open, or the call began before the last recovery
            now = _time.monotonic()
            self._changed_at = now
            self._probe_at = now + self.retry_interval
        self._ensure_prober()
        return True

    def _recovered(self, started: float) -> bool:
        with self._state:
            if self._probe_at is None or started < self._changed_at:
                return False  # already closed, or the probe began before the outage was noticed
            self._probe_at = None
            self._changed_at = _time.monotonic()
        return True

    def _ensure_prober(self) -> None:
        """Start the prober thread unless it runs (one attribute read and is_alive() when it
        does; a forked child starts its own)."""
        thread = self._prober
        if thread is not None and thread.is_alive():
            return
        with self._state:
            thread = self._prober
            if self._probe_at is None or (thread is not None and thread.is_alive()):
                return
            thread = threading.Thread(
                target=_probe_loop, args=(weakref.ref(self),), name="celery_lock-probe", daemon=True
            )
            self._prober = thread
            thread.start()

    def _probe_delay(self) -> float | None:
        """Seconds until the next probe is due; None once the circuit is closed."""
        probe_at = self._probe_at
        return None if probe_at is None else max(0.0, probe_at - _time.monotonic())

    def _run_probe(self) -> bool:
        """One probe (on the prober thread); False when its owner is gone."""
        probe = self._probe()
        if probe is None:
            return False
        started = _time.monotonic()
        try:
            probe()
        except Exception as exc:  # noqa: BLE001 - whatever the store says, probe again later
            with self._state:
                if self._probe_at is not None:
                    self._probe_at = _time.monotonic() + self.retry_interval
            failed = self._on_probe_failed()
            if failed is not None:
                failed(exc)
            return True
        if self._recovered(started):
            on_up = self._on_up()
            if on_up is not None:
                on_up()
        return True


def _probe_loop(ref: weakref.ReferenceType[Circuit]) -> None:
    """The prober thread: probe when due until the circuit is closed or gone."""
    while True:
        circuit = ref()
        if circuit is None:
            return
        delay = circuit._probe_delay()
        if delay is None:
            return
        if delay <= 0:
            if not circuit._run_probe():
                return
            continue
        del circuit  # no strong reference while asleep
        _time.sleep(min(delay, _PROBER_NAP))
