"""Scenario 3 (lock layer): a renewing holder is frozen (SIGSTOP) past its TTL, then resumes."""

from __future__ import annotations

import pytest

from tests.reliability._harness import BACKENDS, stall
from tests.reliability.conftest import Setup

pytestmark = [pytest.mark.reliability, pytest.mark.redis]


@pytest.mark.parametrize("setup", BACKENDS, indirect=True)
def test_holder_stopped_past_its_ttl_learns_it_lost_the_lock(setup: Setup) -> None:
    """A holder with a 1 s lease and a running renewer is SIGSTOPped: the lock frees within a
    few TTLs, a successor takes it with a higher fence; after SIGCONT the old holder's renewer
    reports the loss (``on_lost`` called, ERROR "lock lost" logged), its ``release`` returns
    False and its ``extend`` None, and neither touched the successor's lock."""
    facts = stall(setup.spec, setup.manager, ttl=1.0)
    assert facts.successor_fence > facts.first_fence
    assert facts.free_after < 4.0
    assert facts.lost_reported
    assert facts.error_logged
    assert facts.stale_release is False
    assert facts.stale_extend is None
    assert facts.successor_intact
    assert facts.successor_released
