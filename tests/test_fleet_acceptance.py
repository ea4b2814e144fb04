"""Acceptance of the relay fleet (PROTOCOL.md section 28) with real relay processes: five relays,
many devices configured with nothing but two bootstrap peers. Every device picks two relays,
spread within twice even; messages between random pairs reach recipients that were offline,
exactly once; two relays killed with kill -9 during traffic are left by every device within a
minute, and nothing is lost or doubled; a relay of capacity 10 refuses the 11th mailbox, and
that device ends up on another relay.

In the first test the devices live in worker processes (tests/fleetworker.py), at most
`PIGEON_FLEET_PER_WORKER` (default 10) each: every device is a full node with its own DHT client
and connections, and one event loop carrying a hundred of them is too late for everything,
moving relays within a minute included. `PIGEON_FLEET_DEVICES` sets how many devices: the
default 16 (two workers) keeps the suite fast on two cores; the issue's figure is 100
(`PIGEON_FLEET_DEVICES=100`, ten workers, several minutes). Each worker logs to
`workers/w<i>/worker.stderr` under the test's tmp_path; `PIGEON_FLEET_LOG=pigeon.relays=DEBUG`
adds every device's relay choices and directory reads there.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.clitools import pigeon, pigeon_json
from tests.fleettools import (
    DEVICE_SETTINGS,
    Device,
    RelayProcesses,
    registered_relays,
    start_all,
    wait_chosen,
)
from tests.fleetworker import Worker, open_workers, peer_of

DEVICES = int(os.environ.get("PIGEON_FLEET_DEVICES", "16"))
PER_WORKER = int(os.environ.get("PIGEON_FLEET_PER_WORKER", "10"))
WORKERS = -(-DEVICES // PER_WORKER)
#: Bound on one phase (all devices choosing, all messages arriving): generous for 2 busy cores.
PHASE = 90.0 + DEVICES * 4.0
#: What the issue asks: devices whose relay died are elsewhere within a minute.
MOVE_WITHIN_S = 60.0
#: Bound on one pair becoming contacts (both introductions, both relays registering them).
BEFRIEND_S = 60.0
#: Messages each sender sends before, and during, the relays' death.
BEFORE, DURING = 3, 3


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[RelayProcesses]:
    relays = RelayProcesses(tmp_path / "relays", 5)
    try:
        yield relays
    finally:
        relays.close()


class Fleet:
    """Devices by name over the workers (device i in worker i mod the number of workers)."""

    def __init__(self, workers: list[Worker], names: list[str]) -> None:
        self.workers = workers
        self.where = {name: workers[i % len(workers)] for i, name in enumerate(names)}

    async def ask(self, device: str, op: str, **arguments: Any) -> dict[str, Any]:
        return await self.where[device].ask(op, device=device, **arguments)

    async def each(self, op: str, devices: list[str] | None = None, **arguments: Any
                   ) -> list[dict[str, Any]]:
        """`op` in every worker (with its share of `devices`, when given), side by side."""
        answers: list[dict[str, Any]] = []

        async def one(worker: Worker) -> None:
            if devices is None:
                answers.append(await worker.ask(op, **arguments))
            elif mine := [d for d in devices if self.where[d] is worker]:
                answers.append(await worker.ask(op, devices=mine, **arguments))

        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                nursery.start_soon(one, worker)
        return answers

    async def state(self, devices: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Relays chosen, relays registered and moves, per running device."""
        return {name: value for answer in await self.each("state", devices)
                for name, value in answer["devices"].items()}


@pytest.mark.slow(seconds=45)
async def test_five_relays_many_devices_choose_spread_move_and_lose_nothing(
        tmp_path: Path, fleet: RelayProcesses) -> None:
    assert DEVICES >= 4 and DEVICES % 2 == 0
    names = [f"d{i:03d}" for i in range(DEVICES)]
    rng = random.Random(13)
    order = list(range(DEVICES))
    rng.shuffle(order)
    # random pairs: the first of each sends, the second receives (offline at first)
    pairs = [(names[order[i]], names[order[i + 1]]) for i in range(0, DEVICES, 2)]
    senders, recipients = [s for s, _ in pairs], [r for _, r in pairs]
    phases: dict[str, float] = {}
    began = trio.current_time()

    def phase(name: str, figure: object = "") -> None:
        """A phase done, shown at once (with -s): a failed run at scale shows how far it got."""
        nonlocal began
        phases[name] = round(trio.current_time() - began, 1)
        began = trio.current_time()
        print(f"\nfleet of {DEVICES}: {name} {phases[name]} s {figure}", end="", flush=True)

    # Devices that read the directory while the relays were still announcing found only some
    # of them: one run saw 13 of 16 devices on one relay (bound 12.8; docs/testing.md T5).
    await fleet.wait_listed(timeout=PHASE)
    phase("relays listed")
    async with open_workers(tmp_path / "workers", WORKERS, fleet.bootstrap(2)) as workers:
        devices = Fleet(workers, names)
        await devices.each("start", names)
        phase("start")
        await devices.each("wait_chosen", want=2, timeout=PHASE)
        chosen = await devices.state()
        counts = Counter(peer_of(a) for d in chosen.values() for a in d["relays"])
        phase("choose", f"spread {sorted(counts.values())}")
        mean = 2 * DEVICES / 5
        assert sum(counts.values()) == 2 * DEVICES
        assert max(counts.values()) <= 2 * mean, f"relay spread {dict(counts)}"
        for name in names:  # two distinct relays each
            assert len(set(chosen[name]["relays"])) == 2, (name, chosen[name])

        # Contacts across processes as tests/conftest.py `befriend` makes them in one: the
        # sender adds the recipient from its invite, and both wait for the other's introduction.
        limit = trio.CapacityLimiter(4)

        async def pair_up(sender: str, recipient: str) -> None:
            async with limit:
                invite = (await devices.ask(recipient, "invite"))["invite"]
                await devices.ask(sender, "add_contact", name=recipient, invite=invite)
                async with trio.open_nursery() as both:
                    both.start_soon(lambda: devices.ask(recipient, "befriended", contact=sender,
                                                        timeout=BEFRIEND_S))
                    both.start_soon(lambda: devices.ask(sender, "befriended", contact=recipient,
                                                        timeout=BEFRIEND_S))

        async with trio.open_nursery() as befriending:
            for sender, recipient in pairs:
                befriending.start_soon(pair_up, sender, recipient)
        phase("befriend")
        await devices.each("stop", recipients)

        sent: dict[str, list[str]] = {r: [] for r in recipients}

        async def send(round_: str, count: int) -> None:
            async def from_one(sender: str, recipient: str) -> None:
                for k in range(count):
                    text = f"{round_} {k} from {sender}"
                    await devices.ask(sender, "send", contact=recipient, text=text)
                    sent[recipient].append(text)

            async with trio.open_nursery() as sending:
                for sender, recipient in pairs:
                    sending.start_soon(from_one, sender, recipient)

        await send("before", BEFORE)
        # Two relays die for good while messages flow (not the bootstrap ones: devices must
        # still reach the DHT through something).
        dead = {fleet.relays[3].peer_id, fleet.relays[4].peer_id}
        before_kill = await devices.state(senders)
        affected = [s for s in senders if {peer_of(a) for a in before_kill[s]["relays"]} & dead]
        killed_at = trio.current_time()
        fleet.kill(3)
        fleet.kill(4)
        await send("during", DURING)
        await devices.each("wait_chosen", senders, want=2, avoid=sorted(dead),
                           timeout=MOVE_WITHIN_S)
        moved_after = trio.current_time() - killed_at
        assert moved_after < MOVE_WITHIN_S
        after_kill = await devices.state(senders)
        assert all(after_kill[s]["moves"] >= 1 for s in affected), after_kill

        # The recipients come back: they leave the dead relays, tell their senders, and get
        # every message once, whichever path each took.
        phase("move", f"({len(affected)} senders moved {moved_after:.1f} s after the kill)")
        await devices.each("start", recipients)
        with trio.fail_after(PHASE):
            for sender, recipient in pairs:
                while len((await devices.ask(recipient, "history", contact=sender))["texts"]
                          ) < len(sent[recipient]):
                    await trio.sleep(0.2)
        phase("deliver")
        await devices.each("wait_chosen", want=2, avoid=sorted(dead), timeout=MOVE_WITHIN_S)
        phase("recipients moved")
        await trio.sleep(1.0)  # late duplicates would show up now
        for sender, recipient in pairs:
            got = (await devices.ask(recipient, "history", contact=sender))["texts"]
            assert sorted(got) == sorted(sent[recipient]), recipient
    print(f"\n{DEVICES} devices in {WORKERS} workers: spread {sorted(counts.values())}, "
          f"{len(affected)} senders moved {moved_after:.1f} s after the kill; phases (s) {phases}")


@pytest.mark.slow(seconds=4)
async def test_a_relay_of_capacity_10_refuses_the_11th_mailbox_and_that_device_moves(
        tmp_path: Path) -> None:
    # One relay at first, capacity 10 mailboxes: five devices of two mailboxes each fit, the
    # sixth is refused `relay-full`; a second relay started then takes it.
    small = RelayProcesses(tmp_path / "small", 1, extra_toml={0: "max_mailboxes = 10\n"})
    try:
        settings = dict(DEVICE_SETTINGS, bootstrap=small.bootstrap(1), auto_relays=1)
        devices = [Device(tmp_path / f"d{i}", f"d{i}", **settings) for i in range(6)]
        async with trio.open_nursery() as nursery:
            await start_all(devices, nursery)
            with trio.fail_after(PHASE):
                while True:
                    status = small.status(0)
                    if status["rejects"]["relay_full"] >= 1 and \
                            status["registered_mailboxes"] == 10:
                        break
                    await trio.sleep(0.2)
            big = RelayProcesses(tmp_path / "big", 1, join=small.bootstrap(1)[0])
            try:
                await wait_chosen(devices, 1, timeout=PHASE)
                small_id, big_id = small.relays[0].peer_id, big.relays[0].peer_id
                moved = [d for d in devices if d.running.relay_fleet is not None
                         and d.running.relay_fleet.moves]
                stayed = [d for d in devices if d not in moved]
                # Those refused are on the big relay now, the others stayed; the devices whose
                # two mailboxes raced for the last place may both have been refused one.
                assert 1 <= len(moved) <= 2 and len(stayed) >= 4
                assert all(big_id in registered_relays(d.running)[0] for d in moved)
                assert all(small_id in registered_relays(d.running)[0] for d in stayed)
                assert big.status(0)["registered_mailboxes"] == 2 * len(moved)
                assert small.status(0)["registered_mailboxes"] == 10
                for d in devices:
                    await d.stop()
            finally:
                big.close()
            nursery.cancel_scope.cancel()
    finally:
        small.close()



@pytest.mark.slow(seconds=2)
def test_pigeon_relays_lists_the_directory_with_rtt_and_load(tmp_path: Path) -> None:
    relays = RelayProcesses(tmp_path / "relays", 2, extra_toml={
        0: 'operator = "one.example"\n', 1: 'operator = "two.example"\nmax_mailboxes = 7\n'})
    try:
        data = tmp_path / "dev"
        pigeon(data, "init")
        found = pigeon_json(data, "relays", "--bootstrap", relays.bootstrap(1)[0])
        assert {r["peer_id"] for r in found} == {r.peer_id for r in relays.relays}
        by_operator = {r["operator"]: r for r in found}
        assert set(by_operator) == {"one.example", "two.example"}
        assert by_operator["two.example"]["capacity"] == 7
        for r in found:
            assert r["rtt_ms"] is not None and r["rtt_ms"] > 0
            assert isinstance(r["load"], int) and isinstance(r["chosen"], bool)
            assert all(a.endswith("/p2p/" + r["peer_id"]) for a in r["addresses"])
        text = pigeon(data, "relays", "--bootstrap", relays.bootstrap(1)[0]).stdout
        assert "two.example" in text and "load" in text
        # without bootstrap peers there is no DHT to ask: a clear error
        alone = tmp_path / "alone"
        pigeon(alone, "init")
        failed = pigeon(alone, "relays", check=False)
        assert failed.returncode == 1 and "bootstrap" in failed.stderr
    finally:
        relays.close()
