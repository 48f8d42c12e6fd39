"""The hybrid's circuit breaker on its own: transitions once each, probes off the caller's thread,
a prober that ends with its owner, and a fresh mutex in a forked child."""

from __future__ import annotations

import gc
import os
import signal
import time

from celery_lock.backends._circuit import Circuit
from tests._workers import wait_for


class Owner:
    """What a hybrid gives its circuit: a probe that fails while ``down`` and two observers."""

    def __init__(self, retry_interval: float = 0.02) -> None:
        self.down = True
        self.probes = 0
        self.failures: list[str] = []  # names: an exception would keep a frame (and self)
        self.ups = 0
        self.circuit = Circuit(retry_interval, self.probe, self.probe_failed, self.up)

    def probe(self) -> None:
        self.probes += 1
        if self.down:
            raise ConnectionError("still down")

    def probe_failed(self, exc: Exception) -> None:
        self.failures.append(type(exc).__name__)

    def up(self) -> None:
        self.ups += 1


def test_it_opens_once_probes_off_the_callers_thread_and_closes_once() -> None:
    owner = Owner()
    circuit = owner.circuit
    assert circuit.closed() and not circuit.is_open
    assert circuit.trip(time.monotonic()) is True
    assert circuit.trip(time.monotonic()) is False  # one outage, one transition
    assert not circuit.closed()
    assert wait_for(lambda: len(owner.failures) >= 2)  # probed again after each failure
    assert set(owner.failures) == {"ConnectionError"}
    assert owner.ups == 0 and circuit.is_open
    owner.down = False
    assert wait_for(lambda: owner.ups == 1)
    assert circuit.closed()
    time.sleep(0.1)
    assert owner.ups == 1  # closed once; no more probes
    probes = owner.probes
    time.sleep(0.1)
    assert owner.probes == probes


def test_a_failure_of_a_call_that_began_before_the_recovery_is_old_news() -> None:
    owner = Owner()
    circuit = owner.circuit
    before_outage = time.monotonic()
    assert circuit.trip(time.monotonic())
    owner.down = False
    assert wait_for(lambda: owner.ups == 1)
    # A call that started before the recovery (a slow one) fails after it: not a new outage.
    assert circuit.trip(before_outage) is False
    assert circuit.closed()
    assert circuit.trip(time.monotonic()) is True


def test_the_prober_thread_ends_when_its_owner_is_gone() -> None:
    """The circuit holds its owner weakly: with the cycle collector off, dropping the owner
    frees both at once and the prober ends (a strong reference would keep it probing)."""
    gc.disable()
    try:
        owner = Owner(retry_interval=0.05)
        owner.circuit.trip(time.monotonic())
        deadline = time.monotonic() + 5.0
        while owner.probes < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        prober = owner.circuit._prober
        assert prober is not None and prober.is_alive()
        del owner
        prober.join(timeout=5.0)  # it naps at most 1 s between checks
        assert not prober.is_alive()
    finally:
        gc.enable()


def test_a_forked_child_gets_a_fresh_mutex_and_its_own_prober() -> None:
    owner = Owner(retry_interval=0.01)
    circuit = owner.circuit
    read, write = os.pipe()
    # The parent holds the circuit's mutex at the fork, as another thread might.
    with circuit._state:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                signal.alarm(10)  # a deadlock ends the child instead of hanging the test
                owner.down = False
                opened = circuit.trip(time.monotonic())  # would deadlock on the parent's lock
                try:
                    closed = bool(wait_for(lambda: owner.ups == 1, timeout=5.0))
                except AssertionError:
                    closed = False
                os.write(write, f"{opened} {closed}".encode())
            finally:
                os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    data = os.read(read, 64).decode()
    os.close(read)
    assert os.WIFEXITED(status)
    assert data == "True True"
    assert not circuit.is_open and owner.ups == 0  # the parent's circuit is its own
