"""PQXDH session setup: prekey consumption, replay protection, last-resort reuse, crossing."""

from __future__ import annotations

import pytest

from node.errors import DecryptionFailed, LocalError
from node.protocol.limits import MAX_ARCHIVED_SESSIONS
from node.protocol.records import PreKeyBundle
from node.protocol.session import PREKEY_MESSAGE_TYPE, SessionRecord
from node.testing import FIXED_NOW, Party


def test_first_messages_repeat_the_header_until_the_responder_answers() -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    alice.start_session(bob)
    first = [alice.encrypt(bob, b"%d" % i) for i in range(3)]
    assert all(m[0] == PREKEY_MESSAGE_TYPE for m in first)
    # Delivered out of order: the third creates the session, the others join it.
    assert [bob.decrypt(alice, first[i]) for i in (2, 0, 1)] == [b"2", b"0", b"1"]
    assert alice.decrypt(bob, bob.encrypt(alice, b"answer")) == b"answer"
    assert alice.encrypt(bob, b"now plain")[0] == 0x01


def test_acknowledge_stops_the_header() -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    alice.start_session(bob)
    record = alice.sessions["bob"]
    encrypted = record.encrypt(b"x")
    assert encrypted.message[0] == PREKEY_MESSAGE_TYPE
    assert bob.decrypt(alice, encrypted.message) == b"x"
    record.acknowledge(encrypted.session_base_key)
    follow_up = record.encrypt(b"y").message
    assert follow_up[0] == 0x01
    assert bob.decrypt(alice, follow_up) == b"y"


def test_one_time_prekeys_are_consumed_on_use() -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    signed = bob.bundle()
    bundle = PreKeyBundle.verify(signed, now=FIXED_NOW)
    assert bundle.one_time_prekey_id is not None and not bundle.kem_last_resort
    alice.sessions["bob"] = SessionRecord()
    alice.sessions["bob"].initiate(alice.identity, bundle)
    assert bob.decrypt(alice, alice.encrypt(bob, b"one")) == b"one"
    assert bob.prekeys.one_time_prekey(bundle.one_time_prekey_id) is None
    assert bob.prekeys.kem_prekey(bundle.kem_prekey_id) is None
    # Someone else starting from the same (already used) bundle cannot open a session.
    carol = Party.create("carol")
    carol_record = SessionRecord()
    carol_record.initiate(carol.identity, bundle)
    bob_record = SessionRecord()
    with pytest.raises(DecryptionFailed):
        bob_record.decrypt(carol_record.encrypt(b"late").message, identity=bob.identity,
                           remote_identity=carol.identity.public, prekeys=bob.prekeys)


def test_last_resort_prekey_is_reused_and_replays_are_refused() -> None:
    alice, bob, carol = Party.create("alice"), Party.create("bob"), Party.create("carol")
    alice.start_session(bob, one_time=False)
    carol.start_session(bob, one_time=False)
    for sender in (alice, carol):
        bundle_used = sender.sessions["bob"].current
        assert bundle_used is not None and bundle_used.pending is not None
        assert bundle_used.pending.one_time_prekey_id is None
    first_from_alice = alice.encrypt(bob, b"from alice")
    assert bob.decrypt(alice, first_from_alice) == b"from alice"
    assert bob.decrypt(carol, carol.encrypt(bob, b"from carol")) == b"from carol"
    # The session that message created is gone (say, evicted); its replay is still refused.
    bob.sessions["alice"] = SessionRecord()
    with pytest.raises(DecryptionFailed):
        bob.decrypt(alice, first_from_alice)
    # and the replay survives a restart of Bob's prekey store from disk
    from node.protocol.prekeys import PreKeyStore

    bob.prekeys = PreKeyStore.from_bytes(bob.prekeys.to_bytes())
    with pytest.raises(DecryptionFailed):
        bob.decrypt(alice, first_from_alice)


def test_rotated_signed_prekey_still_opens_messages_in_flight() -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    alice.start_session(bob)
    in_flight = alice.encrypt(bob, b"sent before rotation")
    bob.prekeys.rotate_signed_prekey(now=FIXED_NOW + 10)
    assert bob.decrypt(alice, in_flight) == b"sent before rotation"


def test_prekey_message_naming_another_account_is_refused() -> None:
    alice, bob, mallory = Party.create("alice"), Party.create("bob"), Party.create("mallory")
    mallory.start_session(bob)
    forged = mallory.encrypt(bob, b"I am alice")
    with pytest.raises(DecryptionFailed):
        bob.decrypt(alice, forged)  # claimed to come from Alice's device


def test_crossing_first_messages_converge_on_one_session() -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    alice.start_session(bob)
    bob.start_session(alice)
    from_alice = alice.encrypt(bob, b"a1")
    from_bob = bob.encrypt(alice, b"b1")
    assert bob.decrypt(alice, from_alice) == b"a1"
    assert alice.decrypt(bob, from_bob) == b"b1"
    for i in range(3):
        assert bob.decrypt(alice, alice.encrypt(bob, b"a%d" % i)) == b"a%d" % i
        assert alice.decrypt(bob, bob.encrypt(alice, b"b%d" % i)) == b"b%d" % i
    a_current = alice.sessions["bob"].current
    b_current = bob.sessions["alice"].current
    assert a_current is not None and b_current is not None
    assert a_current.base_key == b_current.base_key


def test_archived_sessions_are_bounded() -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    for _ in range(MAX_ARCHIVED_SESSIONS + 5):
        bob.prekeys.replenish(count=1, now=FIXED_NOW)
        alice.start_session(bob)
    assert len(alice.sessions["bob"].archived) == MAX_ARCHIVED_SESSIONS


def test_responder_cannot_send_before_receiving() -> None:
    record = SessionRecord()
    with pytest.raises(LocalError):
        record.encrypt(b"nothing to encrypt with")
