"""A fleet of relay processes and many devices with `relays = "auto"`, for the fleet acceptance
tests (tests/test_fleet_acceptance.py) and benchmarks/relays.py.

Relays are real `pigeon relay` processes on 127.0.0.1 (tests/relaytools.py), each joining the
DHT through the first; devices are `Node`s configured with nothing but bootstrap peers (two of
the relays), so they find, choose and move relays by themselves (PROTOCOL.md section 28). They
share the process that runs them: the test's own, or a worker of tests/fleetworker.py.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import trio

from node import Node
from node.clock import SystemClock
from node.device.relay_fleet import FoundRelay, find_relays
from node.net import Transport
from node.net.dht import Dht, open_pigeon_dht
from tests.conftest import LOOPBACK, open_node
from tests.relaytools import RelayProcess

#: Every relay re-announces within a second of its load changing (60 s by default), so devices
#: choosing later see the choices made before; circuit relay is not needed on loopback.
RELAY_TOML = "announce_min_interval_s = 1.0\ncircuit_relay = false\n"

#: Devices check their relays every second (5 s by default) and retry quickly (processes cannot
#: share a clock a test could jump). A connection may take 20 s and a relay counts as down after
#: 10 s unreachable (5 s and 20 s by default): on a 2-core machine shared with other test runs
#: (load 15), handshakes took more than 5 s, and devices with a 5 s bound kept leaving live
#: relays and never settled; 10 s keeps twice that margin, and the two phases that wait for
#: moves (after the kill, after the recipients return) take 12 s each instead of 22 s.
DEVICE_SETTINGS: dict[str, Any] = {
    "relay_check_s": 1.0, "relay_down_after_s": 10.0, "retry_initial_s": 0.05,
    "retry_max_s": 1.0, "connect_timeout_s": 20.0, "ack_timeout_s": 10.0,
    "relay_reservations": False,  # loopback needs no circuit relay (the relays offer none)
}


class RelayProcesses:
    """`count` relay processes; the first is started alone, the others join the DHT through
    it (or all through `join`, a relay of another fleet)."""

    def __init__(self, root: Path, count: int, *, extra_toml: dict[int, str] | None = None,
                 join: str | None = None) -> None:
        self.root = root
        self.relays: list[RelayProcess] = []
        extra_toml = extra_toml or {}
        for i in range(count):
            data_dir = root / f"relay{i}"
            data_dir.mkdir(parents=True, exist_ok=True)
            config = data_dir / "relay.toml"
            config.write_text(RELAY_TOML + extra_toml.get(i, ""))
            flags = ["--config", str(config)]
            through = join or (self.relays[0].addresses[0] if i else None)
            if through is not None:
                flags += ["--bootstrap", through]
            self.relays.append(RelayProcess(data_dir, *flags, log_level="WARNING"))
            if i == 0:
                self.relays[0].wait_ready()
        for relay in self.relays[1:]:
            relay.wait_ready()

    def bootstrap(self, count: int = 2) -> tuple[str, ...]:
        """Bootstrap peers for devices: the first address of the first `count` relays."""
        return tuple(r.addresses[0] for r in self.relays[:count])

    def index(self, peer_id: str) -> int:
        return next(i for i, r in enumerate(self.relays) if r.peer_id == peer_id)

    def status(self, i: int) -> dict[str, Any]:
        """`pigeon relay status --json` of relay `i` (its control socket)."""
        return self.relays[i].status()

    def kill(self, i: int) -> None:
        """kill -9, for good."""
        self.relays[i].kill()

    async def wait_listed(self, *, timeout: float) -> None:
        """Until every relay is in the relay directory, read as a device reads it (through the
        bootstrap peers), as on a network whose relays have run for a while: a device reading
        it in the seconds the relays are announcing finds only some."""
        async with Transport.open(os.urandom(32), (LOOPBACK,)) as transport, \
                open_pigeon_dht(transport, server=False, bootstrap=self.bootstrap(2),
                                clock=SystemClock()) as dht:
            await wait_listed(dht, len(self.relays), timeout=timeout)

    def close(self) -> None:
        for relay in self.relays:
            if relay.process.poll() is None:
                relay.terminate()


class Device:
    """A node that can be stopped and started again (its data directory stays)."""

    def __init__(self, path: Path, name: str, **settings: Any) -> None:
        self.path, self.name, self.settings = path, name, settings
        self.node: Node | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()

    async def start(self, nursery: trio.Nursery) -> Node:
        self._stop, self._stopped = trio.Event(), trio.Event()
        node: Node = await nursery.start(self._run)
        return node

    async def _run(self, task_status: trio.TaskStatus[Node]) -> None:
        try:
            async with open_node(self.path, self.name, **self.settings) as node:
                self.node = node
                task_status.started(node)
                await self._stop.wait()
        finally:
            self.node = None
            self._stopped.set()

    async def stop(self) -> None:
        self._stop.set()
        await self._stopped.wait()

    @property
    def running(self) -> Node:
        assert self.node is not None, f"{self.name} is not running"
        return self.node


async def start_all(devices: Iterable[Device], nursery: trio.Nursery, *, at_once: int = 8) -> None:
    """Start devices side by side (`at_once` at a time: each start binds sockets and opens a
    database)."""
    limit = trio.CapacityLimiter(at_once)

    async def one(device: Device) -> None:
        async with limit:
            await device.start(nursery)

    async with trio.open_nursery() as starters:
        for device in devices:
            starters.start_soon(one, device)


async def wait_listed(dht: Dht, count: int, *, timeout: float) -> list[FoundRelay]:
    """The relay directory (PROTOCOL.md section 28.1) read through `dht` until it lists `count`
    relays or more: relays that just started announce within seconds, and a device reading
    the directory before that finds only some of them."""
    def open_transport() -> Any:
        return Transport.open(os.urandom(32), (LOOPBACK,))

    with trio.fail_after(timeout):
        while True:
            found = await find_relays(dht, open_transport, SystemClock(), timeout=5.0)
            if len(found) >= count:
                return found
            await trio.sleep(0.2)


def registered_relays(node: Node) -> tuple[str, ...]:
    """The relays `node` holds its mailboxes at now, each registered there (both mailboxes)."""
    states = {s.address: s for s in node.relay_states() if not s.draining}
    return tuple(a for a in node.relays if a in states and states[a].registered)


async def wait_chosen(devices: Sequence[Device], want: int, *, avoid: Iterable[str] = (),
                      timeout: float) -> None:
    """Until every running device holds `want` registered relays, none of `avoid` (peer ids)."""
    avoided = set(avoid)
    pending: list[Device] = []
    with trio.move_on_after(timeout):
        while True:
            pending = [d for d in devices if d.node is not None and not _settled(
                d.node, want, avoided)]
            if not pending:
                return
            await trio.sleep(0.5)
    shown = [(d.name, [(s.address.rpartition("/p2p/")[2][-6:], s.connected, s.registered,
                        s.last_error, s.draining) for s in d.running.relay_states()])
             for d in pending[:5]]
    raise AssertionError(f"{len(pending)} of {len(devices)} devices without {want} relays after"
                         f" {timeout:.0f} s, e.g. {shown}")


def _settled(node: Node, want: int, avoid: set[str]) -> bool:
    held = registered_relays(node)
    return len(held) == want == len(node.relays) and not {
        a.rpartition("/p2p/")[2] for a in held} & avoid


def spread(devices: Sequence[Device]) -> Counter[str]:
    """Devices per relay peer id, over the running devices."""
    counts: Counter[str] = Counter()
    for d in devices:
        if d.node is not None:
            counts.update(a.rpartition("/p2p/")[2] for a in d.node.relays)
    return counts
