"""The multi-device acceptance (PROTOCOL.md section 25) with real `pigeon` processes on loopback,
set up only through the command: `pigeon init`, `invite`, `contact add`, `link`, `device add`,
`device remove`, `send`, `history --json`, `status --json`, with one `pigeon relay` holding every
device's mailbox.

Alice's first device links two more, A2 and A3; Bob (who added Alice before A2 and A3 existed)
links B2. Then, in one run (the set-up is the expensive part, so the phases share it), at the
scale the acceptance asks:

1. `EXCHANGE` (200) messages each way between random devices of both accounts, with one device of
   each account stopped for the second half and started again afterwards (it gets what it missed
   through the relay).
2. `KILLED` (500) more messages from each account, 1,000 in all, from random devices while a
   random device (of either account) is killed with kill -9 `KILLS` (10) times; it starts again
   at once, and the next batches go out from the other devices while it starts.
3. `pigeon device remove A3` on A1: what Bob and A1 send afterwards never reaches A3 (its own
   history), while every other device keeps receiving.

What the time goes to is processes starting (Python imports, libp2p's above all: a daemon start
is about a second of CPU, a `pigeon` command a third of one) and the daemons' own work. So the
messages go in batches of `BATCH` (50), each one `pigeon send --stdin`, and the steps that do not
depend on each other run in parallel: the first devices' init and daemon starts, the three
`pigeon link` processes (each waits for its approval), the queries of all devices at once. The
test takes about a minute and a half alone on a two-core machine.

After each phase every running device shows every message of the conversation exactly once, in
the order its sender sent them, the sender's own devices showing them as sent; after phases 2
and 3 every outbox (status --json, per device) is empty, each message `delivered` on its sender
(after phase 2 with every other device's own acknowledgment shown there).
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from node.device.datadir import DataDir
from node.protocol.devicelist import DeviceEntry
from node.protocol.directory import MAX_DEVICES
from node.protocol.keys import DeviceKeyPair, DHKeyPair
from node.protocol.linking import LinkCode
from tests.clitools import (
    FAST_RETRIES_TOML,
    DeviceSlot,
    Linking,
    pigeon,
    pigeon_json,
    stop_all,
    wait_until,
)
from tests.conftest import open_node
from tests.relaytools import RelayProcess

EXCHANGE = 200
KILLED = 500
KILLS = 10
BATCH = 50
#: Each account's name for the other (Bob's invite-time name for Alice, Alice's for Bob).
CONTACT = {"a": "Bob", "b": "alice"}
HISTORY_LIMIT = "5000"
T = TypeVar("T")


class Device(DeviceSlot):
    """One device's data directory and, while it runs, its daemon."""

    def __init__(self, name: str, account: str, data_dir: Path, config_toml: str) -> None:
        super().__init__(data_dir)
        self.name, self.account, self.config_toml = name, account, config_toml
        self.peer_id = ""

    @property
    def contact(self) -> str:
        return CONTACT[self.account]

    @property
    def ready(self) -> bool:
        """Whether its daemon runs and has been seen listening (it serves `pigeon send`)."""
        return self.daemon is not None and bool(self.daemon.hello)

    def send(self, texts: list[str]) -> None:
        pigeon(self.data_dir, "send", self.contact, "--stdin", "--wait", "0", "--json",
               stdin="".join(t + "\n" for t in texts), timeout=120)

    def history(self) -> list[dict[str, Any]]:
        entries = pigeon_json(self.data_dir, "history", self.contact, "--limit", HISTORY_LIMIT)
        return [e for e in entries if e["kind"] == "text"]

    def status(self) -> dict[str, Any]:
        value: dict[str, Any] = pigeon_json(self.data_dir, "status")
        return value


def _each(devices: list[Device], query: Callable[[Device], T]) -> list[T]:
    """`query` on every device at once (each is a `pigeon` process, mostly start-up time)."""
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        return list(pool.map(query, devices))


def _check_history(device: Device, sent: list[str]) -> list[str]:
    """Problems with `device`'s history against everything `sent` in the conversation (texts
    "<account> <device> <number>"): every one exactly once, in its sender's order, outgoing
    exactly on the sender's own account's devices."""
    entries = device.history()
    problems: list[str] = []
    texts = [e["text"] for e in entries]
    doubled = [t for t, n in Counter(texts).items() if n > 1]
    missing = sorted(set(sent) - set(texts))
    if doubled:
        problems.append(f"{device.name}: doubled {doubled[:5]}")
    if missing:
        problems.append(f"{device.name}: missing {len(missing)}, e.g. {missing[:5]}")
    for entry in entries:
        want = "out" if entry["text"].split()[0] == device.account else "in"
        if entry["direction"] != want:
            problems.append(f"{device.name}: {entry['text']!r} is {entry['direction']}")
    by_sender: dict[str, list[int]] = {}
    for text in texts:
        _, sender, number = text.split()
        by_sender.setdefault(sender, []).append(int(number))
    for sender, numbers in by_sender.items():
        if numbers != sorted(numbers):
            problems.append(f"{device.name}: {sender}'s messages out of order")
    return problems


def _wait_nothing_waiting(devices: list[Device]) -> None:
    """Until no message of these devices waits to be written to a device or left at a relay,
    nor for a device's ack (`pigeon status`: per contact and for our own other devices)."""

    def waiting(device: Device) -> int:
        status = device.status()
        rows = [*status["contacts"], *status["own_devices"]]
        return sum(row["pending"] + row["sent"] for row in rows)

    wait_until(lambda: sum(_each(devices, waiting)) == 0, timeout=60,
               what="the devices' messages to leave them", interval=0.2)


def _wait_all_received(devices: list[Device], sent: list[str], *, timeout: float) -> None:
    last: list[str] = []

    def done() -> bool:
        nonlocal last
        last = [p for problems in _each(devices, lambda d: _check_history(d, sent))
                for p in problems]
        return not last

    try:
        wait_until(done, timeout=timeout, what="every message on every device", interval=1.0)
    except AssertionError:
        raise AssertionError("\n".join(last[:20])) from None


def _queued(status: dict[str, Any]) -> list[tuple[str, int, int, int]]:
    rows = [d for c in status["contacts"] for d in c.get("devices", ())]
    rows += status.get("own_devices", [])
    return [(d["peer_id"], d["pending"], d["sent"], d["relayed"]) for d in rows
            if d["pending"] or d["sent"] or d["relayed"]]


def _wait_outboxes_empty(devices: list[Device], sent_by: dict[str, Device], *,
                         timeout: float, others: list[Device] | None = None) -> None:
    """Every copy of every message acknowledged by its device, and each message `delivered` on
    the device that sent it; with `others`, the devices every message went to (the sender's
    excepted), each of them shown `delivered` in the sender's history."""
    last: list[Any] = []

    def done() -> bool:
        nonlocal last
        last = [(d.name, q) for d, status in zip(devices, _each(devices, Device.status),
                                                 strict=True) if (q := _queued(status))]
        return not last

    try:
        wait_until(done, timeout=timeout, what="empty outboxes", interval=1.0)
    except AssertionError:
        raise AssertionError(f"still queued: {last}") from None
    for device, history in zip(devices, _each(devices, Device.history), strict=True):
        mine = {t for t, sender in sent_by.items() if sender is device}
        entries = {e["text"]: e for e in history if e["text"] in mine}
        assert set(entries) == mine
        states = Counter(e["state"] for e in entries.values())
        assert set(states) <= {"delivered"}, (device.name, states)
        if others is not None:
            # Each device acknowledged its own copy: the sender shows it per device.
            want = sorted(d.peer_id for d in others if d is not device)
            for text, entry in entries.items():
                got = sorted((d["peer_id"], d["state"]) for d in entry["devices"])
                assert got == [(p, "delivered") for p in want], (device.name, text, got)


def _wait_held_at_relays(devices: list[Device], absent: set[str]) -> None:
    """Every copy `devices` hold for the `absent` devices deposited at those devices' relays
    (none pending or awaiting an ack from them), from each sender that has any."""
    last: list[Any] = []

    def done() -> bool:
        nonlocal last
        last = []
        for device, status in zip(devices, _each(devices, Device.status), strict=True):
            rows = [d for c in status["contacts"] for d in c.get("devices", ())]
            rows += status.get("own_devices", [])
            last += [(device.name, d) for d in rows if d["peer_id"] in absent and (
                d["pending"] or d["sent"] or not d["relayed"])]
        return not last

    try:
        wait_until(done, timeout=60, what="copies for stopped devices at their relays",
                   interval=1.0)
    except AssertionError:
        raise AssertionError(f"not at a relay: {last}") from None


def _link(approver: Device, new: Device, linking: Linking) -> dict[str, Any]:
    """`pigeon device add` on `approver` for `linking` (new's `pigeon link`), then new's daemon
    started (not waited for: `wait_started`)."""
    try:
        approved = pigeon_json(approver.data_dir, "device", "add", linking.code)
        linked = linking.next("Linked", timeout=120)
        assert linked["confirmation"] == approved["confirmation"]
        assert linking.process.wait(timeout=30) == 0
    finally:
        linking.stop()
    new.start(wait=False)
    return linked


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[str]:
    process = RelayProcess(tmp_path / "relay")
    try:
        ready = process.wait_ready()
        address = str(ready["addresses"][0])
        assert address.endswith(f"/p2p/{ready['peer_id']}")
        yield address
    finally:
        process.kill()


@pytest.fixture
def world(tmp_path: Path, relay: str) -> Iterator[dict[str, Device]]:
    toml = FAST_RETRIES_TOML + f"relays = [{json.dumps(relay)}]\n"
    devices = {name: Device(name, name[0], tmp_path / name, toml)
               for name in ("a1", "a2", "a3", "b1", "b2")}
    links = (("a1", "a2"), ("a1", "a3"), ("b1", "b2"))
    linkings: list[Linking] = []
    started = time.monotonic()
    # Every step that does not depend on another runs in parallel (each is a process whose
    # start-up, mostly imports, is most of its time): the two first devices' init and daemon
    # start, the three `pigeon link` processes (each waits for its approval with its code).
    try:
        first = [devices["a1"], devices["b1"]]

        def init(device: Device) -> None:
            pigeon(device.data_dir, "init", "--name", {"a": "Alice", "b": "Bob"}[device.account])
            (device.data_dir / "config.toml").write_text(toml)
            device.start(wait=False)

        _each(first, init)
        _each(first, Device.wait_started)
        a1, b1 = first
        pigeon_json(b1.data_dir, "contact", "add", "alice", pigeon_json(a1.data_dir,
                                                                        "invite")["invite"])
        assert a1.daemon is not None
        a1.daemon.next_event("ContactAdded", timeout=30)

        def open_link(device: Device) -> Linking:
            linking = Linking(device.data_dir, device.config_toml)
            linkings.append(linking)
            return linking

        for (approver, new), linking in zip(links, _each([devices[new] for _, new in links],
                                                         open_link), strict=True):
            linked = _link(devices[approver], devices[new], linking)
            assert linked["account_id"] == pigeon_json(devices[approver].data_dir,
                                                       "id")["account_id"]
        _each(list(devices.values()), Device.wait_started)
        for device, ids in zip(devices.values(), _each(
                list(devices.values()), lambda d: pigeon_json(d.data_dir, "id")), strict=True):
            device.peer_id = ids["peer_id"]
        print(f"set-up: {time.monotonic() - started:.1f} s")
        yield devices
    finally:
        for linking in linkings:
            linking.stop()
        stop_all([d.daemon for d in devices.values() if d.daemon is not None])


@pytest.mark.slow(seconds=30)
def test_two_accounts_of_several_devices_exchange_through_kills_and_a_removal(
        world: dict[str, Device]) -> None:
    rng = random.Random(0x5EED)
    devices = list(world.values())
    sent: list[str] = []
    sent_by: dict[str, Device] = {}
    counters: Counter[str] = Counter()

    def send_batch(sender: Device) -> None:
        texts = [f"{sender.account} {sender.name} {counters[sender.name] + i:05d}"
                 for i in range(BATCH)]
        counters[sender.name] += BATCH
        sender.send(texts)
        sent.extend(texts)
        sent_by.update(dict.fromkeys(texts, sender))

    def batches(count: int) -> Iterator[None]:
        """`count` messages from each account in batches, each from a random running device."""
        order = ["a", "b"] * (count // BATCH)
        rng.shuffle(order)
        for account in order:
            send_batch(rng.choice([d for d in devices if d.account == account and d.ready]))
            yield

    started = time.monotonic()
    # 1. The exchange; A3 and B2 are stopped for its second half.
    half = EXCHANGE // 2
    for _ in batches(half):
        pass
    stopped = {world[name].peer_id for name in ("a3", "b2")}
    # Their own messages have left them first: a device stopped with messages still pending
    # keeps them pending until it is back (they are not the running devices' to receive yet).
    _wait_nothing_waiting([world["a3"], world["b2"]])
    _each([world["a3"], world["b2"]], Device.stop)
    running = [d for d in devices if d.daemon is not None]
    for _ in batches(half):
        pass
    _wait_all_received(running, sent, timeout=120)
    # What the stopped devices missed waits for them at their relay, from every sender,
    # their own account's devices (transcripts) included.
    _wait_held_at_relays(running, stopped)
    _each([world["a3"], world["b2"]], Device.start)
    _wait_all_received(devices, sent, timeout=120)
    print(f"phase 1: {time.monotonic() - started:.1f} s")
    assert len(sent) == 2 * EXCHANGE and len(set(sent)) == len(sent)

    # 2. kill -9 of a random device, KILLS times, while messages fan out. The killed device
    # starts again at once; the next batches go out from the other devices while it starts (it
    # is killed only once running again, and sends only then).
    kill_at = set(rng.sample(range(2 * KILLED // BATCH), KILLS))
    restarting: Device | None = None
    for step, _ in enumerate(batches(KILLED)):
        if step in kill_at:
            if restarting is not None:
                restarting.wait_started()
            restarting = rng.choice(devices)
            restarting.kill_hard()
            restarting.start(wait=False)
    if restarting is not None:
        restarting.wait_started()
    _wait_all_received(devices, sent, timeout=180)
    _wait_outboxes_empty(devices, sent_by, timeout=120, others=devices)
    print(f"phase 2: {time.monotonic() - started:.1f} s")

    # 3. A3 is removed on A1; Bob's devices and A2 learn it through device-list updates.
    a1, a3 = world["a1"], world["a3"]
    a3_peer = a3.peer_id
    removed = pigeon_json(a1.data_dir, "device", "remove", a3_peer)
    assert removed["removed"] == a3_peer
    assert a3_peer not in [d["peer_id"] for d in removed["devices"]]
    others = [d for d in devices if d is not a3]
    wait_until(lambda: all(a3_peer not in json.dumps(s) for s in _each(others, Device.status)),
               timeout=60, what="every other device forgetting A3", interval=1.0)
    a3_before = a3.history()
    before = list(sent)
    for sender in (world["b1"], world["b2"], a1, world["a2"]):
        send_batch(sender)
    _wait_all_received(others, sent, timeout=120)
    assert a3.history() == a3_before
    assert not set(e["text"] for e in a3_before) - set(before)
    # What A3 sends is no longer accepted anywhere: its account dropped it.
    _wait_outboxes_empty(others, {t: d for t, d in sent_by.items() if d is not a3},
                         timeout=60)
    print(f"phase 3: {time.monotonic() - started:.1f} s")


def _approver_state(data_dir: Path) -> list[Any]:
    """What approving a link changes on the approving device (its lists, devices, used codes)."""
    conn = sqlite3.connect(f"file:{data_dir / 'pigeon.db'}?mode=ro", uri=True)
    try:
        return [conn.execute(q).fetchall() for q in (
            "SELECT account, seq, record FROM device_lists ORDER BY account",
            "SELECT device, contact_id FROM devices ORDER BY device",
            "SELECT nonce FROM link_codes ORDER BY nonce")]
    finally:
        conn.close()


def test_an_expired_code_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """Tampered and replayed codes: tests/test_cli_linking.py. An expired one cannot wait out
    10 minutes in a test, so it is made as `pigeon link` makes it, with its expiry passed, and
    signed by its device (so expiry is the only thing wrong with it)."""
    a1 = tmp_path / "a1"
    pigeon(a1, "init", "--name", "Alice")
    assert len(pigeon_json(a1, "device", "list")) == 1  # the first open signs the first list
    before = _approver_state(a1)
    device = DeviceKeyPair.generate()
    code = LinkCode(device=device.public, addrs=("/ip4/127.0.0.1/tcp/9",),
                    ephemeral=DHKeyPair.generate().public, nonce=bytes(range(16)),
                    expires=int(time.time()) - 1)
    refused = pigeon(a1, "device", "add", code.to_text(device), "--json", check=False)
    assert refused.returncode == 1
    assert "expired" in json.loads(refused.stdout)["error"]["message"]
    assert _approver_state(a1) == before
    assert len(pigeon_json(a1, "device", "list")) == 1


async def test_a_seventeenth_device_is_refused_by_device_add(tmp_path: Path) -> None:
    """A 17th device is refused with a clear error before anything is dialed: `pigeon link`
    keeps waiting, nothing changes on the approver. The 15 other devices are added to the
    account's list in-process (linking 15 processes would take minutes): the limit is the
    approver's, checked against its own list."""
    a1 = tmp_path / "a1"
    pigeon(a1, "init", "--name", "Alice")
    async with open_node(a1, "Alice") as node:
        identity = node._identity.public
        for _ in range(MAX_DEVICES - 1):
            node.add_device(DeviceEntry.make(DeviceKeyPair.generate(), identity))
    before = _approver_state(a1)
    linking = Linking(tmp_path / "a17")
    try:
        refused = pigeon(a1, "device", "add", linking.code, "--json", check=False)
        assert refused.returncode == 1
        message = json.loads(refused.stdout)["error"]["message"]
        assert f"{MAX_DEVICES} devices" in message, message
        assert _approver_state(a1) == before
        assert linking.process.poll() is None
        assert not DataDir(tmp_path / "a17").identity_file.exists()
    finally:
        linking.stop()
