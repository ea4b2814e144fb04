"""Linking a new device into an account (PROTOCOL.md section 25.2) and the history transfer
(section 25.3), with real nodes on loopback and real SQLite files."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from node import DeviceAdded, DeviceError
from node.clock import ManualClock
from node.device.account_devices import AccountDevices
from node.device.datadir import DataDir
from node.device.linking import HISTORY_META, LinkResult, link_new_device
from node.device.node import Node
from node.device.storage import Database
from node.protocol.devicelist import DeviceEntry
from node.protocol.directory import MAX_DEVICES
from node.protocol.keys import DeviceKey, DeviceKeyPair
from node.protocol.linking import LinkCode
from tests.conftest import WAIT, befriend, config, next_event, open_node


def _snapshot(path: Path) -> dict[str, object]:
    """What a link may change on the approving device: its device list, own devices, used
    codes, outbox and sessions."""
    db = Database.open(path / "pigeon.db")
    try:
        return {
            "lists": db._q("SELECT account, seq FROM device_lists ORDER BY account"),
            "devices": db._q("SELECT device, contact_id FROM devices ORDER BY device"),
            "codes": db._q("SELECT nonce FROM link_codes"),
            "outbox": db._q("SELECT count(*) FROM outbox"),
            "sessions": db._q("SELECT account, device FROM sessions ORDER BY device"),
        }
    finally:
        db.close()


async def _link(approver: Node, new_dir: Path, *, name: str = "a2",
                tamper: bool = False) -> tuple[LinkResult, LinkResult, list[str]]:
    """Run `link_new_device` in `new_dir` and approve its code on `approver`; returns both
    sides' results and the confirmations the new device showed."""
    shown: list[str] = []
    codes: trio.MemorySendChannel[str]
    codes, received = trio.open_memory_channel[str](1)
    results: list[LinkResult] = []

    async def new_device() -> None:
        results.append(await link_new_device(new_dir, config(name), on_code=codes.send_nowait,
                                             on_confirmation=shown.append))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(new_device)
        code = await received.receive()
        approved = await approver.approve_link(code)
    return approved, results[0], shown


@pytest.mark.slow(seconds=1)
async def test_a_linked_device_gets_the_account_contacts_and_history(tmp_path: Path) -> None:
    with trio.fail_after(4 * WAIT):
        async with open_node(tmp_path / "a1", "alice") as a1, \
                open_node(tmp_path / "b", "bob") as b:
            await befriend(b, a1, "bob")
            for i in range(5):
                await b.send("alice", f"from bob {i}")
                await a1.send("bob", f"from alice {i}")
            while len([e for e in a1.history("bob", limit=100) if e.direction == "in"]) < 5:
                await trio.sleep(0.05)
            with a1.events() as events:
                approved, linked, shown = await _link(a1, tmp_path / "a2")
                added = await next_event(events, DeviceAdded)
            assert added.contact is None and added.peer_id == linked.peer_id
            assert approved.confirmation == linked.confirmation == shown[0]
            assert len(approved.confirmation) == 7  # "123 456"
            assert approved.peer_id == linked.peer_id and approved.devices == 2
            assert linked.account_id == a1.account_id
            assert [d.peer_id for d in a1.devices()] == [a1.peer_id, linked.peer_id]

            async with Node.open(tmp_path / "a2", config("")) as a2:
                assert a2.account_id == a1.account_id and a2.peer_id == linked.peer_id
                assert {d.peer_id for d in a2.devices()} == {a1.peer_id, a2.peer_id}
                assert [c.name for c in a2.contacts()] == ["bob"]
                assert a2.contact("bob").peer_ids == a1.contact("bob").peer_ids
                assert a2.safety_number("bob") == a1.safety_number("bob")
                assert a2.display_name == "alice"
                progress = await a2.wait_history_transfer()
                assert progress.done and progress.received == progress.total == 10
                want = [(e.message_id, e.direction, e.text) for e in a1.history("bob", limit=100)]
                got = [(e.message_id, e.direction, e.text) for e in a2.history("bob", limit=100)]
                assert got == want and len(got) == 10
                # The approver started a session with the new device and introduced itself
                # over it: the intro is acknowledged, so messages flow between the two.
                key = DeviceKey.from_peer_id(a2.peer_id).to_bytes()
                while a1._db.outbox_for(key, limit=1):
                    await trio.sleep(0.05)


async def test_tampered_and_expired_codes_change_nothing(
        tmp_path: Path, jump_clock: trio.testing.MockClock) -> None:
    # The clock jumps past the code's 10 minutes inside: the bound leaves room for that.
    with trio.fail_after(4 * WAIT + 601):
        async with open_node(tmp_path / "a1", "alice") as a1:
            codes: trio.MemorySendChannel[str]
            codes, received = trio.open_memory_channel[str](4)
            before = None
            waited_out: list[str] = []
            async with trio.open_nursery() as nursery:
                async def new_device() -> None:
                    try:
                        await link_new_device(tmp_path / "a2", config(""),
                                              on_code=codes.send_nowait)
                    except DeviceError as exc:
                        waited_out.append(str(exc))

                nursery.start_soon(new_device)
                code = await received.receive()
                before = _snapshot(tmp_path / "a1")
                # Tampered: one character of the code changed (the signature no longer holds).
                body = code[len("pigeon-link:"):]
                flip = "B" if body[40] != "B" else "C"
                tampered = "pigeon-link:" + body[:40] + flip + body[41:]
                with pytest.raises(DeviceError, match=r"not genuine|damaged"):
                    await a1.approve_link(tampered)
                assert _snapshot(tmp_path / "a1") == before
                assert not (tmp_path / "a2" / "identity.key").exists()
                # Expired: the same code after its 10 minutes.
                jump_clock.jump(601)
                with pytest.raises(DeviceError, match="expired"):
                    await a1.approve_link(code)
                assert _snapshot(tmp_path / "a1") == before
            # The new device gave up waiting when its code expired, and says so.
            assert waited_out and "within 10 minutes" in waited_out[0]
            assert not (tmp_path / "a2" / "identity.key").exists()

            # A fresh code still works afterwards: the refusals left nothing behind.
            await _link(a1, tmp_path / "a3")
            assert _snapshot(tmp_path / "a1") != before and len(a1.devices()) == 2


async def test_a_code_used_once_is_refused_when_replayed(tmp_path: Path) -> None:
    with trio.fail_after(4 * WAIT):
        async with open_node(tmp_path / "a1", "alice") as a1, \
                open_node(tmp_path / "x1", "xavier") as x1:
            codes: trio.MemorySendChannel[str]
            codes, received = trio.open_memory_channel[str](1)
            async with trio.open_nursery() as nursery:
                async def new_device() -> None:
                    await link_new_device(tmp_path / "a2", config(""),
                                          on_code=codes.send_nowait)

                nursery.start_soon(new_device)
                code = await received.receive()
                await a1.approve_link(code)
            snapshot = _snapshot(tmp_path / "a1")
            # The approver remembers the code...
            with pytest.raises(DeviceError, match="used already"):
                await a1.approve_link(code)
            assert _snapshot(tmp_path / "a1") == snapshot
            # ...and another account's device cannot use it either: the new device is gone
            # (linked, its link listener closed) and would refuse a second provisioning.
            x_before = _snapshot(tmp_path / "x1")
            with pytest.raises(DeviceError):
                await x1.approve_link(code)
            assert _snapshot(tmp_path / "x1") == x_before
            assert len(a1.devices()) == 2  # the one link that worked


@pytest.mark.slow(seconds=2)
async def test_history_transfer_resumes_after_the_approver_stops(tmp_path: Path) -> None:
    """The transfer is cut after some chunks (the approving node closes); when it runs again,
    the new device continues from its cursor and ends with every message once, in order."""
    small = {"link_history_chunk": 10}  # many chunks: a cut falls inside the transfer
    with trio.fail_after(6 * WAIT):
        async with open_node(tmp_path / "a1", "alice", **small) as a1, \
                open_node(tmp_path / "b", "bob") as b:
            await befriend(b, a1, "bob")
            await b.send_many("alice", [f"b{i}" for i in range(300)])
            await a1.send_many("bob", [f"a{i}" for i in range(300)])
            while len(a1.history("bob", limit=2000)) < 600:
                await trio.sleep(0.05)
            await _link(a1, tmp_path / "a2")
            want = [(e.message_id, e.direction) for e in a1.history("bob", limit=2000)]

        async with Node.open(tmp_path / "a2", config("")) as a2:
            async with open_node(tmp_path / "a1", "alice", **small):
                while a2.history_transfer().received == 0:
                    await trio.sleep(0.005)
            partial = a2.history_transfer()
            assert 0 < partial.received < 600 and not partial.done
            seen: list[int] = []
            async with open_node(tmp_path / "a1", "alice", **small):
                done = await a2.wait_history_transfer(
                    on_progress=lambda p: seen.append(p.received))
            assert done.done and seen[0] >= partial.received
            got = [(e.message_id, e.direction) for e in a2.history("bob", limit=2000)]
            assert got == want
        db = Database.open(tmp_path / "a2" / "pigeon.db")
        try:
            assert db.get_meta(HISTORY_META) is None
        finally:
            db.close()


@pytest.mark.slow(seconds=2)
async def test_contacts_added_renamed_and_removed_on_one_device_follow_on_the_other(
        tmp_path: Path) -> None:
    with trio.fail_after(6 * WAIT):
        async with open_node(tmp_path / "a1", "alice") as a1, \
                open_node(tmp_path / "b", "bob") as b, \
                open_node(tmp_path / "c", "carol") as c:
            await befriend(b, a1, "bob")
            await _link(a1, tmp_path / "a2")
            async with Node.open(tmp_path / "a2", config("")) as a2:
                a1.rename_contact("bob", "robert")
                await befriend(c, a1, "carol")  # added on a1 after the link
                while [x.name for x in a2.contacts()] != ["carol", "robert"]:
                    await trio.sleep(0.05)
                assert a2.contact("carol").peer_ids == a1.contact("carol").peer_ids
                assert a2.safety_number("carol") == a1.safety_number("carol")
                # ...and the other way: a change made on the new device reaches the first one.
                a2.rename_contact("carol", "caroline")
                a1.remove_contact("robert")
                while [x.name for x in a1.contacts()] != ["caroline"] or \
                        [x.name for x in a2.contacts()] != ["caroline"]:
                    await trio.sleep(0.05)


async def test_a_17th_device_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    async with open_node(tmp_path / "a1", "alice"):
        pass
    identity, device = DataDir(tmp_path / "a1").load_keys()
    db = Database.open(tmp_path / "a1" / "pigeon.db")
    try:
        devices = AccountDevices(db=db, identity=identity, device=device,
                                 clock=ManualClock(start_ms=int(time.time() * 1000)))
        for _ in range(MAX_DEVICES - 1):
            other = DeviceKeyPair.generate()
            devices.add(DeviceEntry.make(other, identity.public), peer_id=other.public.peer_id(),
                        addrs=[])
    finally:
        db.close()
    with trio.fail_after(4 * WAIT):
        async with open_node(tmp_path / "a1", "alice") as a1:
            assert len(a1.devices()) == MAX_DEVICES
            before = _snapshot(tmp_path / "a1")
            codes: trio.MemorySendChannel[str]
            codes, received = trio.open_memory_channel[str](1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(link_new_device, tmp_path / "a2", config(""),
                                           on_code=codes.send_nowait))
                with pytest.raises(DeviceError, match=f"already has {MAX_DEVICES} devices"):
                    await a1.approve_link(await received.receive())
                nursery.cancel_scope.cancel()
            assert _snapshot(tmp_path / "a1") == before
            assert not (tmp_path / "a2" / "identity.key").exists()


async def test_a_new_device_with_a_relay_puts_its_relayed_address_in_the_code(
        tmp_path: Path) -> None:
    """Behind a NAT the approver reaches the new device through a relay circuit: the code
    carries the relayed address of the new device's reservation (after the direct one)."""
    from tests.relaytools import running_relay

    with trio.fail_after(4 * WAIT):
        async with running_relay(tmp_path / "relay", circuit_relay=True) as relay, \
                open_node(tmp_path / "a1", "alice") as a1:
            relay_addr = relay.addresses()[0]
            codes: trio.MemorySendChannel[str]
            codes, received = trio.open_memory_channel[str](1)
            results: list[LinkResult] = []

            async def new_device() -> None:
                results.append(await link_new_device(
                    tmp_path / "a2", config("", relays=(relay_addr,)),
                    on_code=codes.send_nowait))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(new_device)
                code = await received.receive()
                addrs = LinkCode.from_text(code, now=int(time.time())).addrs
                assert any("/p2p-circuit" in a for a in addrs)
                assert "/p2p-circuit" not in addrs[0]  # direct first
                await a1.approve_link(code)
            assert results and results[0].devices == 2


@pytest.mark.slow(seconds=1)
async def test_the_approver_learns_the_new_devices_relays_from_it(tmp_path: Path) -> None:
    """The code names no relays, so the approver stores the new device without any; the new
    device's first device-list update tells it (PROTOCOL.md section 25.2, step 7), so the
    approver can deposit for it while it is offline."""
    from tests.relaytools import running_relay

    with trio.fail_after(4 * WAIT):
        async with running_relay(tmp_path / "relay") as relay, \
                open_node(tmp_path / "a1", "alice") as a1:
            relays = (relay.addresses()[0],)
            codes: trio.MemorySendChannel[str]
            codes, received = trio.open_memory_channel[str](1)
            results: list[LinkResult] = []

            async def new_device() -> None:
                results.append(await link_new_device(
                    tmp_path / "a2", config("", relays=relays), on_code=codes.send_nowait))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(new_device)
                await a1.approve_link(await received.receive())
            key = DeviceKey.from_peer_id(results[0].peer_id).to_bytes()
            row = a1._db.device(key)
            assert row is not None and tuple(row.relays) == ()
            async with Node.open(tmp_path / "a2", config("", relays=relays)):
                while (row := a1._db.device(key)) is not None and tuple(row.relays) != relays:
                    await trio.sleep(0.05)
                assert row is not None
