"""A fleet of relays (PROTOCOL.md section 28): how devices with `relays = "auto"` spread over the
relays, and how long they take to leave one that dies.

Relays are `pigeon relay` processes on 127.0.0.1, each joining the DHT through the first;
devices are `Node`s in this process with nothing configured but two bootstrap peers
(tests/fleettools.py, the harness the acceptance tests use). Figures:

- choose: seconds from the devices' start until every one holds two registered relays;
- balance: most mailboxes any relay holds, over the mean (1.0 is even; the issue asks <= 2),
  read from the relays' own counts (`pigeon relay status`);
- move: after `kill -9` of one relay, seconds until the last device that held it holds two live
  relays again (registered and subscribed), and the same for each affected device (p50, max).
  A device gives a relay it cannot reach `relay_down_after_s` (5 s here, 20 s by default)
  before leaving it.

Each measurement is a function of the `Fleet` below, so more (a wake-up latency, say) can be
added to MEASUREMENTS and to the table.

    .venv/bin/python benchmarks/relays.py [--devices 12] [--relays 5] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import emit, parse_args, percentile
from tests.fleettools import (
    DEVICE_SETTINGS,
    Device,
    RelayProcesses,
    registered_relays,
    start_all,
    wait_chosen,
)


@dataclass
class Fleet:
    """Relays and running devices, and the figures measured so far."""

    relays: RelayProcesses
    devices: list[Device]
    nursery: trio.Nursery
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, Any, str]] = field(default_factory=list)


async def measure_choice(fleet: Fleet) -> None:
    began = trio.current_time()
    await start_all(fleet.devices, fleet.nursery)
    await wait_chosen(fleet.devices, 2, timeout=600)
    seconds = trio.current_time() - began
    await trio.sleep(2.0)  # the relays' counts settle (they re-announce within a second)
    counts = [fleet.relays.status(i)["registered_mailboxes"]
              for i in range(len(fleet.relays.relays))]
    balance = max(counts) / statistics.mean(counts)
    fleet.figures.update(choose_s=round(seconds, 2), mailboxes_per_relay=counts,
                         balance_max_over_mean=round(balance, 3))
    fleet.rows += [("all devices on two relays", seconds, "s"),
                   ("mailboxes per relay", " ".join(map(str, counts)), ""),
                   ("balance (max / mean)", round(balance, 2), "")]


async def measure_move(fleet: Fleet) -> None:
    victim = len(fleet.relays.relays) - 1  # not a bootstrap peer
    dead = fleet.relays.relays[victim].peer_id
    affected = [d for d in fleet.devices
                if dead in {a.rpartition("/p2p/")[2] for a in d.running.relays}]
    moved: dict[str, float] = {}
    killed_at = trio.current_time()
    fleet.relays.kill(victim)
    with trio.fail_after(300):
        while len(moved) < len(affected):
            for d in affected:
                if d.name in moved:
                    continue
                held = registered_relays(d.running)
                if len(held) == 2 and dead not in {a.rpartition("/p2p/")[2] for a in held}:
                    moved[d.name] = trio.current_time() - killed_at
            await trio.sleep(0.1)
    times = sorted(moved.values()) or [0.0]
    fleet.figures.update(move_affected_devices=len(affected),
                         move_last_s=round(times[-1], 2),
                         move_p50_s=round(percentile(times, 0.5), 2))
    fleet.rows += [("devices on the killed relay", len(affected), ""),
                   ("kill -9 to last resubscribed", times[-1], "s"),
                   ("kill -9 to resubscribed, p50", percentile(times, 0.5), "s")]


MEASUREMENTS: list[Callable[[Fleet], Awaitable[None]]] = [measure_choice, measure_move]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-relays-") as tmp:
        root = Path(tmp)
        relays = RelayProcesses(root / "relays", args.relays)
        try:
            settings = dict(DEVICE_SETTINGS, bootstrap=relays.bootstrap(2))
            devices = [Device(root / f"d{i:03d}", f"d{i:03d}", **settings)
                       for i in range(args.devices)]
            async with trio.open_nursery() as nursery:
                fleet = Fleet(relays, devices, nursery)
                fleet.figures.update(devices=args.devices, relays=args.relays)
                for measure in MEASUREMENTS:
                    await measure(fleet)
                for d in devices:
                    await d.stop()
                nursery.cancel_scope.cancel()
        finally:
            relays.close()
    emit(f"relay fleet: {args.relays} relay processes, {args.devices} devices (relays = auto)",
         fleet.rows, fleet.figures, args.json)
    return fleet.figures


def main() -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--devices", type=int, default=12, help="devices (default 12)")
        parser.add_argument("--relays", type=int, default=5, help="relay processes (default 5)")

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    if args.devices < 2 or args.relays < 3:
        print("need at least 2 devices and 3 relays", file=sys.stderr)
        return 2
    trio.run(run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
