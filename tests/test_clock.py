"""node.clock: trio's clock drives both readings of TrioClock, and every TrioClock of a run
agrees; ManualClock moves only when told."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from node.clock import ManualClock, SystemClock, TrioClock


async def test_trio_clock_follows_trio_time_and_clocks_of_a_run_share_one_anchor(
        mock_clock: trio.testing.MockClock) -> None:
    first = TrioClock()
    wall = time.time_ns() // 1_000_000
    assert abs(first.now_ms() - wall) < 5_000  # anchored to the system time
    start_ms, start_t = first.now_ms(), first.monotonic()
    mock_clock.jump(3600.5)
    assert first.monotonic() == pytest.approx(start_t + 3600.5)
    assert first.now_ms() == start_ms + 3_600_500
    assert first.now_s() == first.now_ms() // 1000
    # Made after the jump (a node reopened in the same test): it reads the jumped time too.
    later = TrioClock()
    assert later.now_ms() == first.now_ms() and later.monotonic() == first.monotonic()


def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(start_ms=1_000_000, start_monotonic=5.0)
    assert (clock.now_ms(), clock.now_s(), clock.monotonic()) == (1_000_000, 1_000, 5.0)
    clock.advance(1.5)
    assert (clock.now_ms(), clock.monotonic()) == (1_001_500, 6.5)
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_system_clock_reads_the_system_time() -> None:
    clock = SystemClock()
    assert abs(clock.now_ms() - time.time_ns() // 1_000_000) < 1_000
    assert clock.now_s() == clock.now_ms() // 1000 or clock.now_s() == clock.now_ms() // 1000 - 1
    before = clock.monotonic()
    assert clock.monotonic() >= before
