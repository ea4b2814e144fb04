"""A contact's device addresses and relays follow the NEWEST information about where the device
is, not the last to arrive (PROTOCOL.md section 21 "Where a device is").

Storage rules first (real SQLite), then real nodes on loopback: Bob's intros are encrypted
through his real session with Alice and handed to Alice's real inbound path as a relay would
(one held back to arrive late), and his device records are signed by his real keys and applied
by Alice's code for a record found in the DHT.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from node import Node
from node.device.storage import Database, Device
from node.protocol import inbound as machine_inbound
from node.protocol.binding import sign_binding
from node.protocol.content import Intro, decode_content, encode_content
from node.protocol.directory import RECORD_LIFETIME_S, DeviceRecord
from node.protocol.keys import DeviceKeyPair
from node.protocol.mailbox import contact_cap, mailbox_id, mailbox_key

OLD = (f"/ip4/127.0.0.1/tcp/1/p2p/{DeviceKeyPair.generate().public.peer_id()}",)
NEW = (f"/ip4/127.0.0.1/tcp/2/p2p/{DeviceKeyPair.generate().public.peer_id()}",)
NEWER = (f"/ip4/127.0.0.1/tcp/3/p2p/{DeviceKeyPair.generate().public.peer_id()}",)
ADDRS_OLD = ("/ip4/127.0.0.1/tcp/11",)
ADDRS_NEW = ("/ip4/127.0.0.1/tcp/12",)

# --- storage ---------------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(tmp_path / "test.db", durability="normal", create=True)
    yield database
    database.close()


DEVICE = b"D" * 32


def _stored(db: Database) -> Device:
    found = db.device(DEVICE)
    assert found is not None
    return found


def test_stored_addresses_and_relays_follow_the_newest_stamp(db: Database) -> None:
    bob = db.add_contact("bob", b"B" * 32, now_ms=1)
    assert db.put_device(bob.id, DEVICE, "peer-d", ADDRS_NEW, relays=NEW, seen_at_ms=2000,
                         now_ms=10)
    # older (a late intro, a stale DHT copy): nothing changes, whenever it arrives
    assert not db.put_device(bob.id, DEVICE, "peer-d", ADDRS_OLD, relays=OLD, seen_at_ms=1000,
                             now_ms=20)
    assert (_stored(db).addrs, _stored(db).relays, _stored(db).seen_at_ms) == (
        ADDRS_NEW, NEW, 2000)
    # the same stamp: the same information, applied (harmless)
    assert not db.put_device(bob.id, DEVICE, "peer-d", ADDRS_NEW, relays=NEW, seen_at_ms=2000,
                             now_ms=30)
    # newer: replaces both, and the stamp rises
    assert db.put_device(bob.id, DEVICE, "peer-d", ADDRS_OLD, relays=NEWER, seen_at_ms=3000,
                         now_ms=40)
    assert (_stored(db).addrs, _stored(db).relays, _stored(db).seen_at_ms) == (
        ADDRS_OLD, NEWER, 3000)
    # relays=None keeps the relays even when newer addresses come
    assert db.put_device(bob.id, DEVICE, "peer-d", ADDRS_NEW, seen_at_ms=4000, now_ms=50)
    assert (_stored(db).addrs, _stored(db).relays, _stored(db).seen_at_ms) == (
        ADDRS_NEW, NEWER, 4000)


def test_older_information_still_brings_its_capability(db: Database) -> None:
    """Only where the device is follows the stamp: a late intro's deposit capability and
    mailbox are still its sender's (section 21 "Deposit capabilities")."""
    bob = db.add_contact("bob", b"B" * 32, now_ms=1)
    db.put_device(bob.id, DEVICE, "peer-d", ADDRS_NEW, relays=NEW, seen_at_ms=2000, now_ms=10)
    db.put_device(bob.id, DEVICE, "peer-d", ADDRS_OLD, relays=OLD, cap=b"c" * 16, box=b"x" * 32,
                  seen_at_ms=1000, now_ms=20)
    stored = _stored(db)
    assert (stored.relays, stored.cap, stored.box) == (NEW, b"c" * 16, b"x" * 32)


def test_unstamped_information_only_fills_what_is_unknown(db: Database) -> None:
    """A sync from our own device, a device-list hint, a link payload (stamp 0): they fill an
    unknown device or an empty list, never replace stamped information."""
    bob = db.add_contact("bob", b"B" * 32, now_ms=1)
    assert db.put_device(bob.id, DEVICE, "peer-d", ADDRS_OLD, relays=OLD, seen_at_ms=0, now_ms=1)
    assert _stored(db).relays == OLD
    # unstamped over unstamped: the later wins, as before stamps
    assert db.put_device(bob.id, DEVICE, "peer-d", ADDRS_OLD, relays=NEW, seen_at_ms=0, now_ms=2)
    assert _stored(db).relays == NEW
    # any stamp beats unknown
    assert db.put_device(bob.id, DEVICE, "peer-d", (), relays=NEWER, seen_at_ms=1, now_ms=3)
    assert (_stored(db).addrs, _stored(db).relays) == ((), NEWER)
    # unstamped: fills the empty addresses, leaves the stamped relays
    assert db.put_device(bob.id, DEVICE, "peer-d", ADDRS_OLD, relays=OLD, seen_at_ms=0, now_ms=4)
    assert (_stored(db).addrs, _stored(db).relays, _stored(db).seen_at_ms) == (
        ADDRS_OLD, NEWER, 1)
    assert not db.put_device(bob.id, DEVICE, "peer-d", ADDRS_NEW, relays=OLD, seen_at_ms=0,
                             now_ms=5)
    assert (_stored(db).addrs, _stored(db).relays) == (ADDRS_OLD, NEWER)


def test_a_device_held_by_another_contact_is_left_alone(db: Database) -> None:
    bob = db.add_contact("bob", b"B" * 32, now_ms=1)
    carol = db.add_contact("carol", b"C" * 32, now_ms=1)
    db.put_device(bob.id, DEVICE, "peer-d", ADDRS_OLD, relays=OLD, seen_at_ms=1, now_ms=1)
    assert not db.put_device(carol.id, DEVICE, "peer-d", ADDRS_NEW, relays=NEW, seen_at_ms=9,
                             now_ms=2)
    assert (_stored(db).contact_id, _stored(db).relays, _stored(db).seen_at_ms) == (
        bob.id, OLD, 1)


def test_own_stamps_increase_across_a_clock_step_back(db: Database) -> None:
    first = db.next_location_stamp(5_000)
    assert first == 5_000
    assert db.next_location_stamp(5_000) == 5_001
    assert db.next_location_stamp(1_000) == 5_002  # the clock went back
    assert db.next_location_stamp(9_000) == 9_000


def test_an_intro_is_as_fresh_as_its_ts() -> None:
    """An intro's freshness is its `ts` (PROTOCOL.md section 11): no field of its own, so a
    device from before the rule decodes every intro as before."""
    intro = Intro(id=os.urandom(16), sent_at_ms=1234, name="bob", addrs=(), relays=OLD)
    decoded = decode_content(encode_content(intro))
    assert isinstance(decoded, Intro)
    assert decoded.seen_at_ms == 1234


# --- real nodes ------------------------------------------------------------------------------------


def _intro_from_bob(bob: Node, alice: Node, relays: tuple[str, ...], *,
                    ts_ms: int | None = None) -> machine_inbound.Incoming:
    """An intro from Bob to Alice saying Bob's mailbox is at `relays`, encrypted now through
    Bob's real session with Alice's device, as a relay would hand it to her. Its `ts`: taken
    from Bob's sequence now, as his lane does at encryption, or `ts_ms` (as a device from
    before the rule sends: the time it queued the intro)."""
    (alice_device,) = [d for d in bob._db.devices(bob._db.contact_by_name("alice").id)]  # type: ignore[union-attr]
    account = alice._identity.public.to_bytes()
    bob_device = bob._device.public.to_bytes()
    message_id = os.urandom(16)
    intro = Intro(
        id=message_id,
        sent_at_ms=ts_ms or bob._db.next_location_stamp(bob._clock.now_ms()), name="Bob",
        addrs=tuple(bob.contact_addresses()), relays=relays,
        binding=sign_binding(bob._device, bob._identity.public),
        cap=contact_cap(bob._device, account), box=mailbox_id(mailbox_key(bob._device).public))
    record = bob._sessions.record(account, alice_device.device)
    encrypted = record.encrypt(encode_content(intro))
    bob._sessions.save(account, alice_device.device)
    return machine_inbound.Incoming(bob_device, bob.peer_id, message_id, encrypted.message,
                                    bob._identity.public.to_bytes())


def _record_of_bob(bob: Node, relays: tuple[str, ...]) -> DeviceRecord:
    """Bob's device record as he publishes it in the DHT (discovery.Directory.publish), with
    his mailbox at `relays` and `seq` from his own sequence."""
    now_ms = bob._clock.now_ms()
    expires = now_ms // 1000 + RECORD_LIFETIME_S
    seq = bob._db.next_location_stamp(now_ms)
    bundle = bob._sessions.prekeys.bundle(bob._identity, bob._device, seq=seq, expires=expires,
                                          one_time=False)
    record = DeviceRecord(identity=bob._identity.public, device=bob._device.public,
                          addrs=tuple(bob.contact_addresses()), relays=relays, bundle=bundle,
                          seq=seq, expires=expires)
    return DeviceRecord.verify(record.sign(bob._identity), now_ms // 1000)


def _bob_at_alice(alice: Node) -> Device:
    contact = alice._db.contact_by_name("bob")
    assert contact is not None
    (device,) = alice._db.devices(contact.id)
    return device


def _deliver(alice: Node, item: machine_inbound.Incoming) -> list[bytes]:
    """Alice takes `item` out of her mailbox; the devices she now thinks moved."""
    result = alice._inbound.process([item])
    assert result.accepted == 1, result.nacks
    alice._inbound.publish(result)
    return result.moved


def _learn(alice: Node, record: DeviceRecord) -> bool:
    contact = alice._db.contact_by_name("bob")
    assert contact is not None
    return alice._learn_device_record(contact, _bob_at_alice(alice), record)


async def test_a_lane_stamps_an_intro_when_it_encrypts_it(node_pair: tuple[Node, Node]) -> None:
    """Bob introduced himself to Alice once (his lane built the intro): Alice stores its `ts`,
    the stamp Bob took from his sequence (meta `directory_seq`) when encrypting it."""
    alice, bob = node_pair
    stamp = int(bob._db.get_meta("directory_seq", 0) or 0)
    assert stamp > 0
    assert _bob_at_alice(alice).seen_at_ms == stamp


async def test_a_late_intro_does_not_take_back_newer_relays(
        node_pair: tuple[Node, Node]) -> None:
    """The flake of test_relay_fleet.py::test_a_device_whose_relay_goes_away_moves_and_its_
    contact_follows, made certain: an intro Bob encrypted while at OLD reaches Alice after one
    saying NEW (drained late from the relay he left, section 28.3)."""
    alice, bob = node_pair
    late = _intro_from_bob(bob, alice, OLD)
    bob_device = bob._device.public.to_bytes()
    assert _deliver(alice, _intro_from_bob(bob, alice, NEW)) == []
    assert _bob_at_alice(alice).relays == NEW
    assert _deliver(alice, late) == []  # not a move: nothing applied
    assert _bob_at_alice(alice).relays == NEW
    # and a newer one still moves him
    assert _deliver(alice, _intro_from_bob(bob, alice, NEWER)) == [bob_device]
    assert _bob_at_alice(alice).relays == NEWER


async def test_a_late_intro_does_not_take_back_relays_from_a_newer_record(
        node_pair: tuple[Node, Node]) -> None:
    alice, bob = node_pair
    late = _intro_from_bob(bob, alice, OLD)
    assert _learn(alice, _record_of_bob(bob, NEW))
    assert _deliver(alice, late) == []
    assert _bob_at_alice(alice).relays == NEW


async def test_an_older_record_does_not_take_back_a_newer_intros_relays(
        node_pair: tuple[Node, Node]) -> None:
    """A DHT server that has not seen Bob's newer record serves the older one: Alice keeps
    what his newer intro said; a record newer than the intro replaces it."""
    alice, bob = node_pair
    stale = _record_of_bob(bob, OLD)
    _deliver(alice, _intro_from_bob(bob, alice, NEW))
    assert not _learn(alice, stale)
    assert _bob_at_alice(alice).relays == NEW
    assert _learn(alice, _record_of_bob(bob, NEWER))
    assert _bob_at_alice(alice).relays == NEWER


async def test_a_contact_sync_does_not_replace_stamped_relays(
        node_pair: tuple[Node, Node]) -> None:
    """Another device of Alice's account syncs Bob as it knows him (PROTOCOL.md section 25.6):
    its view carries no time, so it does not replace what Alice learned from Bob."""
    alice, bob = node_pair
    _deliver(alice, _intro_from_bob(bob, alice, NEW))
    change = machine_inbound.SyncChange(
        op="contact-add", account=bob._identity.public.to_bytes(), name="bob",
        devices=((bob._device.public.to_bytes(), ADDRS_OLD, OLD),))
    with alice._db.transaction():
        alice._inbound._apply_sync(change, alice._clock.now_ms())
    assert _bob_at_alice(alice).relays == NEW
    assert _bob_at_alice(alice).addrs != ADDRS_OLD
