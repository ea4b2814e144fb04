"""Multi-device fan-out (PROTOCOL.md sections 25.4, 25.5 and 25.7) with real nodes on loopback:
contacts learn an account's new devices from device-list updates, every message reaches every
device of the recipient once, our own other devices get sent transcripts, a message is delivered
once any recipient device committed it, and a removed device gets nothing new."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from node import DeviceAdded, DeviceRemoved, MessageReceived, MessageSent, Node
from node.device import outbound as outbound_module
from node.device.bundles import fetch_known_device_record
from node.errors import DeviceError
from node.net import Transport
from node.protocol.bundle import BUNDLE_PROTOCOL, BundleError, decode_reply, encode_request
from node.protocol.devicelist import DeviceEntry, DeviceList
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.relay.config import RelayConfig
from node.relay.service import open_relay
from tests.conftest import LOOPBACK, WAIT, befriend, next_event, open_node
from tests.devicetools import open_linked
from tests.test_dht import network


async def wait_until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll `check()` (a cheap read of a node's store) until it is true, within WAIT."""
    with trio.fail_after(WAIT):
        while not check():
            await trio.sleep(0.02)


def texts(node: Node, contact: str) -> list[tuple[str, str]]:
    return [(e.direction, e.text) for e in node.history(contact, limit=1000) if e.kind == "text"]


async def test_contact_learns_new_device_and_messages_reach_each_device_once(
        tmp_path: Path) -> None:
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        with b1.events() as events:
            async with open_linked(a1, tmp_path / "a2", "alice") as a2:
                with trio.fail_after(WAIT):
                    added = await next_event(events, DeviceAdded)
                assert (added.contact, added.peer_id) == ("alice", a2.peer_id)
                assert {p for p in b1.contact("alice").peer_ids} == {a1.peer_id, a2.peer_id}
                # The account key is unchanged, so is the safety number; the history says so.
                assert b1.safety_number("alice") == a1.safety_number("bob")
                notices = [e.text for e in b1.history("alice") if e.kind == "notice"]
                assert notices == [f"alice added a device ({a2.peer_id})"]
                with a1.events() as on_a1, a2.events() as on_a2:
                    await b1.send("alice", "hello both")
                    with trio.fail_after(WAIT):
                        await next_event(on_a1, MessageReceived)
                        await next_event(on_a2, MessageReceived)
                assert texts(a1, "bob") == [("in", "hello both")]
                assert texts(a2, "bob") == [("in", "hello both")]


def sent_states(node: Node, contact: str, text: str) -> tuple[str, dict[str, tuple[bool, str]]]:
    """The message's state and its state per device (peer id -> (own, state)) on `node`."""
    (entry,) = [e for e in node.history(contact, limit=1000) if e.text == text]
    return entry.state, {d.peer_id: (d.own, d.state) for d in entry.devices}


async def test_sent_messages_show_on_our_other_devices_and_delivery_is_per_device(
        tmp_path: Path) -> None:
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        async with open_linked(a1, tmp_path / "a2", "alice") as a2:
            with a2.events() as on_a2:
                message_id = await a1.send("bob", "from the laptop")
                with trio.fail_after(WAIT):
                    await next_event(on_a2, MessageSent, lambda e: e.message_id == message_id)
            assert texts(a2, "bob") == [("out", "from the laptop")]
            assert await a1.wait_delivered(message_id, timeout=WAIT) == "delivered"
            # Each device acked for itself: Bob's device, and our A2 for its transcript.
            await wait_until(lambda: sent_states(a1, "bob", "from the laptop")[1] == {
                b1.peer_id: (False, "delivered"), a2.peer_id: (True, "delivered")}, "acks")
            # And the other way: what A2 sends shows on A1 as sent, and reaches Bob once.
            with b1.events() as on_b1:
                other = await a2.send("bob", "from the phone")
                with trio.fail_after(WAIT):
                    await next_event(on_b1, MessageReceived, lambda e: e.message_id == other)
            await wait_until(lambda: ("out", "from the phone") in texts(a1, "bob"), "transcript")
            assert texts(b1, "alice") == [("in", "from the laptop"), ("in", "from the phone")]
            assert await a2.wait_delivered(other, timeout=WAIT) == "delivered"


@pytest.mark.slow(seconds=1)
async def test_delivered_once_any_recipient_device_committed(tmp_path: Path) -> None:
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        with a1.events() as on_a1:
            async with open_linked(b1, tmp_path / "b2", "bob") as b2:
                with trio.fail_after(WAIT):
                    await next_event(on_a1, DeviceAdded, lambda e: e.peer_id == b2.peer_id)
                await wait_until(lambda: a1._sessions.record(
                    b1._identity.public.to_bytes(), b2._device.public.to_bytes()).current
                    is not None, "a session with B2")
            # B2 is stopped: B1 alone commits the message, which makes it delivered.
            message_id = await a1.send("bob", "one of you")
            assert await a1.wait_delivered(message_id, timeout=WAIT) == "delivered"
            state, per_device = sent_states(a1, "bob", "one of you")
            assert state == "delivered"
            assert per_device[b1.peer_id] == (False, "delivered")
            assert per_device[b2.peer_id][1] in ("pending", "sent")
            (bob,) = a1.status().contacts
            assert {d.peer_id for d in bob.devices} == {b1.peer_id, b2.peer_id}
        # B2 comes back and gets it, once.
        async with open_node(tmp_path / "b2", "bob") as b2:
            await wait_until(lambda: texts(b2, "alice") == [("in", "one of you")], "B2")
            await wait_until(lambda: sent_states(a1, "bob", "one of you")[1][b2.peer_id]
                             == (False, "delivered"), "B2's ack")
            assert texts(b2, "alice") == [("in", "one of you")]


async def test_removed_device_gets_nothing_new_and_the_others_keep_receiving(
        tmp_path: Path) -> None:
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        async with open_linked(a1, tmp_path / "a2", "alice") as a2, \
                open_linked(a1, tmp_path / "a3", "alice") as a3:
            await wait_until(lambda: len(b1.contact("alice").peer_ids) == 3, "B learns A2, A3")
            with b1.events() as on_b1:
                removed = a1.remove_device(a3.peer_id[:20])
                assert removed.peer_id == a3.peer_id
                with trio.fail_after(WAIT):
                    gone = await next_event(on_b1, DeviceRemoved)
            assert (gone.contact, gone.peer_id) == ("alice", a3.peer_id)
            assert set(b1.contact("alice").peer_ids) == {a1.peer_id, a2.peer_id}
            await wait_until(lambda: a3.peer_id not in {d.peer_id for d in a2.devices()},
                             "A2 adopts the new list")
            await b1.send("alice", "not for A3")
            await a1.send("bob", "nor this")
            await wait_until(lambda: {("in", "not for A3"), ("out", "nor this")} <= set(
                texts(a2, "bob")), "A2 receives")
            await wait_until(lambda: ("in", "not for A3") in texts(a1, "bob"), "A1 receives")
            # Nothing is queued for A3 anywhere, and neither B1 nor A1 knows it any more: the
            # two messages, delivered to the others, never reached A3's own store.
            a3_key = a3._device.public.to_bytes()
            for node in (a1, a2, b1):
                assert node._db.device(a3_key) is None
                assert a3_key not in node._db.outbox_devices()
            assert ("in", "not for A3") not in texts(a3, "bob")
            assert ("out", "nor this") not in texts(a3, "bob")
            # Removing this device, or one that is not there, is refused clearly.
            with pytest.raises(DeviceError, match="cannot remove itself"):
                a1.remove_device(a1.peer_id)
            with pytest.raises(DeviceError, match="no device"):
                a1.remove_device("12D3KooWnothere")


@pytest.mark.slow(seconds=2)
async def test_offline_device_gets_its_messages_through_its_own_relay(tmp_path: Path) -> None:
    async with open_relay(RelayConfig(data_dir=tmp_path / "r", listen=(LOOPBACK,))) as relay:
        relays = (relay.addresses()[0],)
        async with open_node(tmp_path / "a1", "alice") as a1, \
                open_node(tmp_path / "b1", "bob") as b1:
            await befriend(a1, b1, "alice")
            async with open_linked(a1, tmp_path / "a2", "alice", relays=relays) as a2:
                await wait_until(lambda: len(b1.contact("alice").peer_ids) == 2, "B learns A2")
                await wait_until(lambda: b1._sessions.record(
                    a1._identity.public.to_bytes(), a2._device.public.to_bytes()).current
                    is not None, "a session with A2")
            # A2 is offline: B's copy for it goes to A2's relay; A1 gets its own directly.
            message_id = await b1.send("alice", "while A2 sleeps")
            assert await b1.wait_delivered(message_id, timeout=WAIT) == "delivered"
            await wait_until(lambda: sent_states(b1, "alice", "while A2 sleeps")[1].get(
                a2.peer_id, (False, ""))[1] == "relayed", "deposited at A2's relay")
            async with open_node(tmp_path / "a2", "alice", relays=relays) as a2:
                await wait_until(lambda: texts(a2, "bob") == [("in", "while A2 sleeps")], "A2")
            await wait_until(lambda: sent_states(b1, "alice", "while A2 sleeps")[1][
                a2.peer_id] == (False, "delivered"), "A2's receipt")


def has_cap(node: Node, of: Node) -> bool:
    """Whether `node` holds the deposit capability `of`'s device gave it."""
    row = node._db.device(of._device.public.to_bytes())
    return row is not None and row.cap is not None


@pytest.mark.slow(seconds=2)
async def test_a_device_linked_later_and_its_contacts_trade_capabilities(tmp_path: Path) -> None:
    """A device linked after its account added a contact never met that contact through an
    invite: the two give each other their deposit capabilities once they have a session. More
    copies than a stranger may leave (PROTOCOL.md section 21) then wait at the relay for the
    linked device while it is offline, and for the contact's while it is."""
    config = RelayConfig(data_dir=tmp_path / "r", listen=(LOOPBACK,))
    more_than_a_stranger = config.open_mailbox_max_messages + 16
    async with open_relay(config) as relay:
        relays = (relay.addresses()[0],)
        async with open_node(tmp_path / "a1", "alice", relays=relays) as a1, \
                open_node(tmp_path / "b1", "bob", relays=relays) as b1:
            await befriend(a1, b1, "alice")
            async with open_linked(a1, tmp_path / "a2", "alice", relays=relays) as a2:
                await wait_until(lambda: len(b1.contact("alice").peer_ids) == 2, "B learns A2")
                await b1.send("alice", "hello A2")
                await wait_until(lambda: texts(a2, "bob") == [("in", "hello A2")], "A2")
                await wait_until(lambda: has_cap(b1, a2) and has_cap(a2, b1),
                                 "each has the other's capability")
            # A2 is offline: B's copies for it wait at A2's relay, every one of them.
            ids = await b1.send_many("alice", [f"to A2 {i}" for i in range(more_than_a_stranger)])
            await wait_until(lambda: all(sent_states(b1, "alice", f"to A2 {i}")[1][a2.peer_id]
                                         == (False, "relayed") for i in range(len(ids))),
                             "every copy for A2 at its relay")
        async with open_node(tmp_path / "a2", "alice", relays=relays) as a2:
            # and B is offline: A2's copies for it wait at B's relay.
            ids = await a2.send_many("bob", [f"to B {i}" for i in range(more_than_a_stranger)])
            await wait_until(lambda: all(sent_states(a2, "bob", f"to B {i}")[1][b1.peer_id]
                                         == (False, "relayed") for i in range(len(ids))),
                             "every copy for B at its relay")


async def test_forged_and_old_device_lists_change_nothing(tmp_path: Path) -> None:
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        old = a1._account_devices.signed()
        async with open_linked(a1, tmp_path / "a2", "alice") as a2:
            await wait_until(lambda: len(b1.contact("alice").peer_ids) == 2, "B learns A2")
            mallory = IdentityKeyPair.generate()
            forged = DeviceList.first(mallory, DeviceKeyPair.generate(), seq=2**40,
                                      expires=a1._clock.now_s() + 3600).sign(mallory)
            for bad in (old, forged):  # an older list of the account, another account's list
                a1._account_devices.signed = lambda bad=bad: bad  # type: ignore[method-assign]
                a1._device_list_changed()
                await wait_until(lambda: not a1._db.has_queued(
                    b1._device.public.to_bytes(), "device-list"), "the list went out")
                assert set(b1.contact("alice").peer_ids) == {a1.peer_id, a2.peer_id}
            stored = b1._db.device_list(a1._identity.public.to_bytes())
            assert stored is not None and a2._device.public in DeviceList.verify(
                stored[1], now=b1._clock.now_s())


@pytest.mark.slow(seconds=1)
async def test_a_contact_offline_during_the_update_learns_the_device_when_back(
        tmp_path: Path) -> None:
    async with open_node(tmp_path / "a1", "alice") as a1:
        async with open_node(tmp_path / "b1", "bob") as b1:
            await befriend(a1, b1, "alice")
        # Bob is offline while Alice links A2: the update waits in A1's outbox for him.
        async with open_linked(a1, tmp_path / "a2", "alice") as a2:
            bob_key = next(d.device for c in a1._db.contacts() for d in a1._db.devices(c.id))
            assert a1._db.has_queued(bob_key, "device-list")
            async with open_node(tmp_path / "b1", "bob") as b1:
                await wait_until(lambda: set(b1.contact("alice").peer_ids) == {
                    a1.peer_id, a2.peer_id}, "Bob learns A2 when back")
                with a2.events() as on_a2:
                    await b1.send("alice", "welcome, A2")
                    with trio.fail_after(WAIT):
                        await next_event(on_a2, MessageReceived)


@pytest.mark.slow(seconds=1)
async def test_many_messages_between_random_devices_arrive_once_in_order_everywhere(
        tmp_path: Path) -> None:
    """Both accounts have two devices; texts go both ways from random devices. Every device
    ends with every text of the conversation exactly once, each sender's texts in its order,
    its own account's texts as sent."""
    rng = random.Random(7)
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        async with open_linked(a1, tmp_path / "a2", "alice") as a2, \
                open_linked(b1, tmp_path / "b2", "bob") as b2:
            alice, bob = (a1, a2), (b1, b2)
            await wait_until(lambda: all(len(n.contact(c).peer_ids) == 2 for n, c in (
                (a1, "bob"), (a2, "bob"), (b1, "alice"), (b2, "alice"))), "all devices known")
            sent: dict[str, list[str]] = {}  # sending device -> texts in order
            for i in range(60):
                sender = rng.choice(alice + bob)
                text = f"m{i:03d} from {sender.peer_id[-6:]}"
                await sender.send("bob" if sender in alice else "alice", text)
                sent.setdefault(sender.peer_id, []).append(text)
            everything = {t for texts_ in sent.values() for t in texts_}
            for node, other, mine in ((a1, "bob", alice), (a2, "bob", alice),
                                      (b1, "alice", bob), (b2, "alice", bob)):
                await wait_until(lambda node=node, other=other: {  # type: ignore[misc]
                    t for _, t in texts(node, other)} == everything, f"{node.peer_id} has all")
                shown = texts(node, other)
                assert len(shown) == len(everything)  # each once
                for device, texts_ in sent.items():
                    assert [t for _, t in shown if t in texts_] == texts_  # in its order
                    outgoing = any(device == m.peer_id for m in mine)
                    assert {d for d, t in shown if t in texts_} == {
                        "out" if outgoing else "in"}


async def test_keys_without_a_token_only_for_known_devices(tmp_path: Path) -> None:
    """PROTOCOL.md sections 14.2 and 25.4: a key-fetch request without a token is answered for a
    device of a contact, and refused (`unknown-device`) for anyone else."""
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1, \
            Transport.open(os.urandom(32), [LOOPBACK]) as stranger:
        await befriend(a1, b1, "alice")
        with trio.fail_after(WAIT):
            record = await fetch_known_device_record(
                b1._transport, a1._device.public, a1._identity.public, a1.addresses(),
                now=b1._clock.now_s, timeout=WAIT)
            assert record.device == a1._device.public and record.bundle is not None
            stream = await stranger.open_stream(a1.peer_id, a1.addresses(), BUNDLE_PROTOCOL,
                                                timeout=WAIT)
            await stream.send([encode_request(None)])
            frame = await stream.receive()
        assert frame is not None and decode_reply(frame) == BundleError(code="unknown-device")


async def test_the_dht_account_record_lists_every_device(tmp_path: Path) -> None:
    """PROTOCOL.md section 25.4: the account record a device publishes names every device of its
    device list, so whoever resolves the account finds the new one."""
    async with network(3) as servers:
        boot = (servers[0].transport.listen_addrs()[0],)
        async with open_node(tmp_path / "a1", "alice", bootstrap=boot) as a1:
            assert a1._directory is not None
            entry = DeviceEntry.make(DeviceKeyPair.generate(), a1._identity.public)
            a1.add_device(entry)
            # The node republishes by itself when its list changes (`Directory.changed`); a
            # publish of our own here would race it for the same record (the older of the two
            # seqs is refused), so the test waits for what a resolver sees.
            expected = {a1._device.public, entry.device}
            found = None
            with trio.fail_after(WAIT * 3):
                while found is None or set(found.devices) != expected:
                    found = await a1._directory.resolve_account(a1._identity.public)
                    await trio.sleep(0.05)
            assert set(found.devices) == expected


async def test_the_encoded_content_cache_stays_within_its_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each text is encoded once for all its copies (PROTOCOL.md section 25.5); the cache of
    encoded texts is bounded in bytes, and texts that fell out of it are encoded again."""
    monkeypatch.setattr(outbound_module, "ENCODED_CACHE_BYTES", 2000)
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        async with open_linked(a1, tmp_path / "a2", "alice") as a2:
            bodies = [f"text {i} " + "x" * 600 for i in range(20)]
            await a1.send_many("bob", bodies)
            await wait_until(lambda: [t for _, t in texts(b1, "alice")] == bodies, "Bob")
            await wait_until(lambda: [t for _, t in texts(a2, "bob")] == bodies, "A2")
            assert 0 < a1._outbound._encoded_bytes <= 2000
