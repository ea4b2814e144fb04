"""The one clock of a node or a relay (README.md, "Layers": the clock is injected).

Two readings, one source:

- `monotonic()`: seconds for timers, deadlines, rate limits and backoff. In the trio shell it is
  `trio.current_time()`, so a test that runs under trio's `autojump_clock` (or `MockClock`)
  drives every timer of the product without sleeping.
- `now_ms()`: Unix time in milliseconds for what is stored or sent (message timestamps, record
  expiries, TTLs). `TrioClock` derives it from the same trio clock, anchored to the system
  time once per `trio.run` (every TrioClock of the run shares the anchor, so nodes and relays
  of one test agree), so when a test's clock jumps an hour ahead, TTLs expire and records age by
  that hour too.

Pure code never reads a clock: it is handed the current time (`node.protocol`). The shells are
handed a `Clock`; `ManualClock` is the one for unit tests of code that takes a clock without
running trio.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "TrioClock"]


class Clock(Protocol):
    """What the shells read the time from."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: only differences mean anything."""
        ...

    def now_ms(self) -> int:
        """Unix time in milliseconds."""
        ...

    def now_s(self) -> int:
        """Unix time in whole seconds (TTLs and record expiries are in seconds)."""
        ...


class TrioClock:
    """The production clock: trio's clock for timers, and Unix time derived from it.

    Make it inside `trio.run`. The first TrioClock of a run anchors trio's clock to the system
    time; later ones reuse that anchor, so a clock made after a test jumped trio's clock ahead
    reads the jumped time too."""

    __slots__ = ("_anchor_ms", "_anchor_trio", "_trio")

    def __init__(self) -> None:
        import trio  # imported here: node.clock is shared by code that never runs trio

        self._trio = trio
        anchor = _run_anchor(trio)
        self._anchor_trio, self._anchor_ms = anchor

    def monotonic(self) -> float:
        return self._trio.current_time()

    def now_ms(self) -> int:
        return self._anchor_ms + int((self._trio.current_time() - self._anchor_trio) * 1000)

    def now_s(self) -> int:
        return self.now_ms() // 1000


_ANCHOR_VAR: object | None = None


def _run_anchor(trio: Any) -> tuple[float, int]:
    """(trio time, Unix ms) read together once per `trio.run`."""
    global _ANCHOR_VAR
    if _ANCHOR_VAR is None:
        _ANCHOR_VAR = trio.lowlevel.RunVar("pigeon_clock_anchor")
    var: Any = _ANCHOR_VAR
    try:
        anchor: tuple[float, int] = var.get()
    except LookupError:
        anchor = (trio.current_time(), time.time_ns() // 1_000_000)
        var.set(anchor)
    return anchor


class SystemClock:
    """The system's clocks, for code that runs outside trio (command-line tools, benchmarks'
    synchronous parts)."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def now_s(self) -> int:
        return self.now_ms() // 1000


class ManualClock:
    """A clock that moves only when told (`advance`), for unit tests without trio."""

    __slots__ = ("_ms", "_t")

    def __init__(self, *, start_ms: int = 1_700_000_000_000, start_monotonic: float = 0.0) -> None:
        self._ms, self._t = start_ms, start_monotonic

    def advance(self, seconds: float) -> None:
        """Move both readings forward by `seconds`; ValueError if negative."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._t += seconds
        self._ms += int(seconds * 1000)

    def monotonic(self) -> float:
        return self._t

    def now_ms(self) -> int:
        return self._ms

    def now_s(self) -> int:
        return self._ms // 1000
