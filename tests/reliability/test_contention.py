"""Scenario 1 (lock layer): many processes racing on one key, in both modes, on every backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._contention import run_contention
from tests.reliability._harness import BACKENDS, execution_contention
from tests.reliability.conftest import Setup

pytestmark = [pytest.mark.reliability, pytest.mark.redis]

EXPECTED_BACKEND = {"redis": "redis", "file": "file", "hybrid": "redis", "hybrid-down": "file"}


@pytest.mark.parametrize("setup", BACKENDS, indirect=True)
def test_queue_mode_contention(setup: Setup, tmp_path: Path) -> None:
    """QUEUE mode, 5 spawned processes x 60 acquisitions of one key: no two holders are ever in
    the critical section together, no read-modify-write update is lost, every waiter is served
    (exact count) and fences strictly increase in the order the section was entered."""
    result = run_contention(
        *setup.spec, workdir=tmp_path / "work", processes=5, iterations=60, key="queue-contended"
    )
    assert result.errors == []
    assert result.overlaps == 0
    assert result.acquired == result.final_count == 300
    assert result.fences_increasing
    assert set(result.backends) == {EXPECTED_BACKEND[setup.backend]}
    assert not setup.manager.is_locked("queue-contended")


@pytest.mark.parametrize("setup", BACKENDS, indirect=True)
def test_execution_mode_contention(setup: Setup, tmp_path: Path) -> None:
    """EXECUTION mode, 5 processes x 150 attempts holding the lock ~1 ms: a busy lock is a skip,
    never a duplicate run (no overlap), every run is counted exactly once (nothing lost), every
    attempt is either a run or a skip, and both happened (the key really was contended)."""
    facts = execution_contention(
        setup.spec, tmp_path / "work", processes=5, iterations=150, hold=0.001
    )
    stats = facts.stats
    assert stats.errors == []
    assert stats.overlaps == []
    assert stats.release_false == 0
    assert facts.lost == 0
    assert stats.acquired + stats.busy == 5 * 150
    assert stats.acquired > 0 and stats.busy > 0
    assert facts.fences_increasing
    assert set(stats.backends) == {EXPECTED_BACKEND[setup.backend]}
