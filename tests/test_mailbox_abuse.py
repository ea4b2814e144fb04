"""Mailbox flooding and what a relay can link (PROTOCOL.md section 21 "Registration", "Deposit
capabilities", "Deposit ids", "What a relay learns"): in-process relays and `pigeon relay`
processes, real libp2p hosts on 127.0.0.1, real SQLite files, real nodes.

The attacks these rerun: a stranger flooding a victim's mailbox, then the whole relay, with
maximum-size junk from fresh peer ids, until real messages were refused `mailbox-full` and
everyone got `storage-full`; and a relay rebuilding who writes to whom from one deposit identity
per node run, message ids it could match to acks, and `auth` coming from the device's peer id.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from node import MessageReceived
from node.clock import ManualClock
from node.device.mailbox_client import DepositRequest
from node.errors import RelayRefused
from node.protocol import mailbox as mb
from node.protocol.keys import DeviceKeyPair
from node.relay.service import RelayService, open_relay
from tests.conftest import WAIT, befriend, next_event, open_node, wait_registered
from tests.relaytools import (
    CAP,
    RelayProcess,
    box_of,
    client,
    peer,
    register_at,
    relay_config,
    running_relay,
)
from tests.test_relay_delivery import _close_direct_path


def mid() -> bytes:
    return os.urandom(16)


def codes(results: list[RelayRefused | None]) -> list[str | None]:
    return [None if r is None else r.code for r in results]


async def test_a_deposit_into_a_mailbox_nobody_registered_is_refused_and_stores_nothing(
        tmp_path: Path) -> None:
    bob = DeviceKeyPair.generate()
    box = box_of(bob.public)
    marker = b"junk-" + os.urandom(8).hex().encode()
    async with running_relay(tmp_path / "relay") as relay, peer() as t, \
            client(t, relay.peer_id, relay.addresses()) as alice:
        for cap in (None, CAP):
            with pytest.raises(RelayRefused) as info:
                await alice.deposit(box, mid(), marker, cap=cap)
            assert info.value.code == mb.UNKNOWN_MAILBOX
        status = relay.relay.status()
        assert (status["messages"], status["mailboxes"], status["registered_mailboxes"]) == \
            (0, 0, 0)
        assert status["rejects"]["unknown_mailbox"] == 2
        # Bob's device authenticates once: from then on his mailbox takes deposits.
        await register_at(relay.peer_id, relay.addresses(), bob)
        await alice.deposit(box, mid(), b"now it exists", cap=CAP)
        status = relay.relay.status()
        assert (status["messages"], status["registered_mailboxes"]) == (1, 1)
    database = (tmp_path / "relay" / "relay.db").read_bytes()
    assert marker not in database


@pytest.mark.slow(seconds=1)
async def test_registrations_are_bounded_and_lapse(tmp_path: Path) -> None:
    clock = ManualClock(start_ms=1_800_000_000_000)
    bob, carol, dave = (DeviceKeyPair.generate() for _ in range(3))
    async with running_relay(tmp_path / "relay", clock=clock, max_mailboxes=2,
                             registration_ttl_s=1000) as relay, peer() as t:
        addrs = relay.addresses()
        await register_at(relay.peer_id, addrs, bob)
        await register_at(relay.peer_id, addrs, carol)
        with pytest.raises(RelayRefused) as info:  # a third mailbox is one too many
            await register_at(relay.peer_id, addrs, dave)
        assert info.value.code == mb.RELAY_FULL  # PROTOCOL.md section 28.2
        assert relay.relay.status()["mailboxes_moved"] == {"in": 2, "out": 0}
        clock.advance(600)
        await register_at(relay.peer_id, addrs, bob)  # renewing is not a new registration
        clock.advance(600)
        # Carol's device has not authenticated for 1200 s: her registration lapses, Bob's not.
        assert relay.relay.store.drop_lapsed(
            before=clock.now_s() - relay.relay.config.registration_ttl_s) == 1
        async with client(t, relay.peer_id, addrs) as alice:
            await alice.deposit(box_of(bob.public), mid(), b"e", cap=CAP)
            with pytest.raises(RelayRefused) as info:
                await alice.deposit(box_of(carol.public), mid(), b"e", cap=CAP)
            assert info.value.code == mb.UNKNOWN_MAILBOX
        await register_at(relay.peer_id, addrs, dave)  # there is room again
        assert relay.relay.status()["registered_mailboxes"] == 2


async def test_capabilities_are_registered_by_the_mailbox_device_only(tmp_path: Path) -> None:
    bob = DeviceKeyPair.generate()
    async with running_relay(tmp_path / "relay") as relay, peer() as t, \
            client(t, relay.peer_id, relay.addresses()) as anyone:
        with pytest.raises(RelayRefused) as info:
            await anyone.set_caps([mb.cap_hash(CAP)])
        assert info.value.code == mb.UNAUTHORIZED
        await anyone.authenticate(bob)
        await anyone.set_caps([mb.cap_hash(CAP)])
        # The store holds the hash, never the capability.
        assert relay.relay.store.caps_of(box_of(bob.public)) == {mb.cap_hash(CAP)}
    assert CAP not in (tmp_path / "relay" / "relay.db").read_bytes()


@pytest.mark.slow(seconds=4)
async def test_strangers_with_fresh_peer_ids_cannot_crowd_out_contacts_nor_fill_the_relay(
        tmp_path: Path) -> None:
    bob, carol = DeviceKeyPair.generate(), DeviceKeyPair.generate()
    envelope = 1000
    limits = dict(open_mailbox_max_messages=8, open_mailbox_max_bytes=6 * envelope,
                  open_storage_max_bytes=10 * envelope, storage_max_bytes=100 * envelope,
                  mailbox_max_messages=40, open_max_ttl_s=3600)
    async with running_relay(tmp_path / "relay", **limits) as relay:
        addrs = relay.addresses()
        await register_at(relay.peer_id, addrs, bob)
        await register_at(relay.peer_id, addrs, carol)
        # The flood: 12 fresh peer ids, each 10 junk envelopes into each mailbox, asking for the
        # longest TTL, with made-up capabilities or none.
        stored = 0
        for n in range(12):
            async with peer() as t, client(t, relay.peer_id, addrs) as stranger:
                junk = [DepositRequest(box_of(owner.public), mid(), os.urandom(envelope),
                                       ttl=30 * 86400, cap=os.urandom(16) if n % 2 else None)
                        for owner in (bob, carol) for _ in range(10)]
                results = await stranger.deposit_many(junk)
                assert set(codes(results)) <= {None, mb.MAILBOX_FULL, mb.STORAGE_FULL}
                stored += codes(results).count(None)
        status = relay.relay.status()
        # Per mailbox at most 6 (bytes), relay-wide at most 10: the rest was refused.
        assert stored == status["open_messages"] == 10
        assert status["open_bytes"] == status["bytes"] == 10 * envelope
        assert status["rejects"]["mailbox_full"] > 0 and status["rejects"]["storage_full"] > 0

        # Contacts are not affected: their capability opens the mailbox's own quota, and the
        # storage strangers cannot reach.
        async with peer() as t, client(t, relay.peer_id, addrs) as contact:
            for owner in (bob, carol):
                results = await contact.deposit_many(
                    [DepositRequest(box_of(owner.public), mid(), os.urandom(envelope), cap=CAP)
                     for _ in range(40)])
                assert codes(results) == [None] * 40
        assert relay.relay.status()["messages"] == 10 + 80

        # Junk is kept for at most open_max_ttl_s, whatever it asked for.
        now = relay.relay.clock.now_s()
        async with peer() as t, client(t, relay.peer_id, addrs) as inbox:
            await inbox.authenticate(bob)
            items, _ = await inbox.fetch(limit=100)
        assert sum(1 for i in items if i.exp <= now + 3600) == _open_of(relay, bob) > 0


def _open_of(relay: RelayService, device: DeviceKeyPair) -> int:
    return int(relay.relay.store._box_state(box_of(device.public)).open_count)


async def test_a_revoked_capability_deposits_as_a_stranger(tmp_path: Path) -> None:
    bob = DeviceKeyPair.generate()
    box = box_of(bob.public)
    kept = b"K" * 16
    async with running_relay(tmp_path / "relay", open_mailbox_max_messages=1) as relay, \
            peer() as t, client(t, relay.peer_id, relay.addresses()) as contact, \
            peer() as bt, client(bt, relay.peer_id, relay.addresses()) as owner:
        await owner.authenticate(bob)
        await owner.set_caps([mb.cap_hash(CAP), mb.cap_hash(kept)])
        await contact.deposit(box, mid(), b"while a contact", cap=CAP)
        assert relay.relay.status()["open_messages"] == 0
        await owner.set_caps([mb.cap_hash(kept)])  # the contact was removed
        await contact.deposit(box, mid(), b"now a stranger", cap=CAP)
        assert relay.relay.status()["open_messages"] == 1
        with pytest.raises(RelayRefused) as info:  # the strangers' quota of 1 is used up
            await contact.deposit(box, mid(), b"again", cap=CAP)
        assert info.value.code == mb.MAILBOX_FULL
        await contact.deposit(box, mid(), b"another contact", cap=kept)


# --- the attack reruns, against processes ----------------------------------------------------


@asynccontextmanager
async def relay_process(tmp_path: Path, config: str) -> AsyncIterator[RelayProcess]:
    path = tmp_path / "relay.toml"
    path.write_text(config)
    process = RelayProcess(tmp_path / "relay", "--config", str(path))
    try:
        await trio.to_thread.run_sync(process.wait_ready)
        yield process
    finally:
        process.kill()


@pytest.mark.slow(seconds=3)
async def test_flood_from_fresh_peer_ids_neither_fails_a_contact_nor_fills_the_relay(
        tmp_path: Path) -> None:
    """A `pigeon relay` process; Alice and Bob are real nodes. While Bob is offline a stranger
    deposits maximum-size junk from a fresh peer id per batch into Bob's mailbox and into other
    registered mailboxes until the relay refuses it; Alice's messages are still taken, and so are
    another contact's elsewhere."""
    size = mb.MAX_MAILBOX_FRAME_BYTES // 8  # a large envelope (the default limit allows 260 KiB)
    config = ("open_mailbox_max_bytes = 1048576\nopen_storage_max_bytes = 3145728\n"
              "storage_max_bytes = 67108864\n")
    async with relay_process(tmp_path, config) as process, \
            open_node(tmp_path / "alice", "alice", relay_reservations=False) as alice:
        relay = process.addresses[0]
        async with open_node(tmp_path / "bob", "bob", relays=(relay,),
                             relay_reservations=False) as bob:
            await befriend(bob, alice, "bob")
            await wait_registered(bob)
            bob_box = box_of(bob._device.public)
        others = [DeviceKeyPair.generate() for _ in range(4)]
        for other in others:
            await register_at(process.peer_id, process.addresses, other)
        refused: set[str | None] = set()
        batches = 0
        with trio.fail_after(WAIT * 6):
            while not {mb.MAILBOX_FULL, mb.STORAGE_FULL} <= refused and batches < 40:
                async with peer() as t, client(t, process.peer_id, process.addresses) as stranger:
                    targets = [bob_box] * 9 + [box_of(o.public) for o in others] * 3
                    results = await stranger.deposit_many(
                        [DepositRequest(box, mid(), os.urandom(size), ttl=30 * 86400)
                         for box in targets])
                    refused |= set(codes(results))
                batches += 1
        assert {mb.MAILBOX_FULL, mb.STORAGE_FULL} <= refused
        ids = await alice.send_many("bob", [f"genuine {i}" for i in range(5)])
        with trio.fail_after(WAIT * 2):
            while any(alice.message_state(i) != "relayed" for i in ids):
                await trio.sleep(0.05)
        assert "mailbox-full" not in (alice.status().contacts[0].last_error or "")
        async with peer() as t, client(t, process.peer_id, process.addresses) as contact:
            await contact.deposit(box_of(others[0].public), mid(), os.urandom(size), cap=CAP)
        async with open_node(tmp_path / "bob", "bob", relays=(relay,),
                             relay_reservations=False) as bob, bob.events() as events:
            with trio.fail_after(WAIT * 2):
                got = [(await next_event(events, MessageReceived)).text for _ in range(5)]
        assert sorted(got) == [f"genuine {i}" for i in range(5)]


@pytest.mark.slow(seconds=1)
async def test_the_relay_cannot_link_deposits_ids_or_mailboxes_to_devices(tmp_path: Path) -> None:
    """From the relay's own view (who connected to it, what its database holds): the deposits
    of two batches came from two peer ids that are neither device's, the ids it stores are not
    the message ids, the mailbox they are in is not the one Bob's public key gives (it was
    authenticated by a key that is not Bob's device key), and no stream to the relay came from
    Bob's or Alice's peer id."""
    seen: list[str] = []
    async with open_relay(relay_config(tmp_path / "relay")) as relay:
        relay.transport.on_connection_change(lambda p, up: seen.append(p) if up else None)
        address = relay.addresses()[0]
        async with open_node(tmp_path / "alice", "alice", relay_reservations=False) as alice:
            async with open_node(tmp_path / "bob", "bob", relays=(address,),
                                 relay_reservations=False) as bob:
                await befriend(bob, alice, "bob")
                await wait_registered(bob)
                bob_peer, bob_key = bob.peer_id, bob._device
                with trio.fail_after(WAIT):  # Bob's intro gave Alice his contacts' mailbox
                    while alice._db.devices()[0].box is None:
                        await trio.sleep(0.02)
            _close_direct_path(alice, "bob")
            before = len(seen)
            ids = []
            for text in ("first batch", "second batch"):
                (message_id,) = await alice.send_many("bob", [text])
                with trio.fail_after(WAIT * 2):
                    while alice.message_state(message_id) != "relayed":
                        await trio.sleep(0.05)
                ids.append(bytes.fromhex(message_id))
            depositors = set(seen[before:])
            assert len(depositors) >= 2  # a fresh identity per batch
            assert not depositors & {alice.peer_id, bob_peer}
            assert alice.peer_id not in seen and bob_peer not in seen
            conn = sqlite3.connect(tmp_path / "relay" / "relay.db")
            try:
                stored = [row[0] for row in conn.execute("SELECT id FROM messages")]
                envelopes = b"".join(row[0] for row in conn.execute("SELECT env FROM messages"))
                boxes = {row[0] for row in conn.execute("SELECT box FROM messages")}
                registered = {row[0] for row in conn.execute("SELECT box FROM mailboxes")}
            finally:
                conn.close()
            assert len(stored) == 2 and not set(stored) & set(ids)
            public = mb.mailbox_id(bob_key.public)
            assert boxes == {mb.mailbox_id(mb.mailbox_key(bob_key).public)}
            assert public not in boxes and registered == boxes | {public}
            assert mb.mailbox_key(bob_key).public != bob_key.public
            assert not any(i in envelopes for i in ids)
            # Bob still gets them under their message ids.
            async with open_node(tmp_path / "bob", "bob", relays=(address,),
                                 relay_reservations=False) as bob, bob.events() as events:
                with trio.fail_after(WAIT * 2):
                    got = [await next_event(events, MessageReceived) for _ in range(2)]
            assert sorted(bytes.fromhex(e.message_id) for e in got) == sorted(ids)
            assert bob_peer not in seen  # his mailbox was read from other identities
