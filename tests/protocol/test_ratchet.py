"""Double Ratchet behaviour: tampering, forward secrecy, post-compromise security, skip limits."""

from __future__ import annotations

import pytest

import node.protocol.ratchet as ratchet_module
from node.errors import DecryptionFailed, LimitExceeded
from node.protocol.limits import MAX_NEW_SESSION_SKIP, MAX_SKIP, MAX_SKIPPED_KEYS
from node.protocol.ratchet import PREFIX_BYTES, RatchetState
from node.protocol.session import SessionRecord
from node.testing import Party, session_pair


def _state(party: Party, other: Party) -> RatchetState:
    current = party.sessions[other.name].current
    assert current is not None
    return current.ratchet


def _snapshot(party: Party, other: Party) -> bytes:
    return party.sessions[other.name].to_bytes()


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_every_single_bit_flip_of_a_ratchet_message_fails_and_changes_nothing() -> None:
    alice, bob = session_pair()
    message = alice.encrypt(bob, b"x" * 48)
    before = _snapshot(bob, alice)
    for bit in range(len(message) * 8):
        with pytest.raises(DecryptionFailed):
            bob.decrypt(alice, _flip(message, bit))
        assert _snapshot(bob, alice) == before
    assert bob.decrypt(alice, message) == b"x" * 48


@pytest.mark.slow(seconds=2)
def test_every_single_bit_flip_of_a_prekey_message_fails_and_changes_nothing() -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    alice.start_session(bob)
    message = alice.encrypt(bob, b"first")
    prekeys_before = bob.prekeys.to_bytes()
    # Every bit of the type byte, the PQXDH fields and the header; every 8th bit of the rest
    # (the KEM ciphertext is 1,568 bytes and each try runs a decapsulation).
    total = len(message) * 8
    bits = [b for b in range(total) if b < 8 * 200 or b % 8 == 0 or b >= total - 8 * 120]
    for bit in bits:
        with pytest.raises(DecryptionFailed):
            bob.decrypt(alice, _flip(message, bit))
        assert bob.sessions[alice.name].current is None
        assert bob.prekeys.to_bytes() == prekeys_before
    assert bob.decrypt(alice, message) == b"first"


def test_changed_associated_data_fails_and_session_still_works() -> None:
    alice, bob = session_pair()
    message = alice.encrypt(bob, b"bound to identities")
    state = _state(bob, alice)
    genuine_ad = state.ad
    for bit in range(len(genuine_ad) * 8):
        state.ad = _flip(genuine_ad, bit)
        with pytest.raises(DecryptionFailed):
            state.decrypt(message)
    state.ad = genuine_ad
    assert bob.decrypt(alice, message) == b"bound to identities"


def test_forward_secrecy_no_stored_state_decrypts_a_read_message() -> None:
    alice, bob = session_pair()
    messages = [alice.encrypt(bob, b"m%d" % i) for i in range(5)]
    # Deliver out of order so some keys pass through the skipped-key store first.
    for i in [3, 0, 4, 1, 2]:
        assert bob.decrypt(alice, messages[i]) == b"m%d" % i
    stored = _snapshot(bob, alice)
    for message in messages:
        copy = SessionRecord.from_bytes(stored)
        with pytest.raises(DecryptionFailed):
            copy.decrypt(message, identity=bob.identity, remote_identity=alice.identity.public,
                         prekeys=bob.prekeys)
        # and no message key is still lying around in the serialized state
        assert not _state(bob, alice).skipped


def test_post_compromise_security_after_a_dh_round_trip() -> None:
    alice, bob = session_pair()
    # The attacker copies both sides' whole session state.
    stolen = {"alice": _snapshot(alice, bob), "bob": _snapshot(bob, alice)}

    def attacker_reads(message: bytes, *, as_: Party, sender: Party) -> bool:
        copy = SessionRecord.from_bytes(stolen[as_.name])
        try:
            copy.decrypt(message, identity=as_.identity, remote_identity=sender.identity.public,
                         prekeys=as_.prekeys)
        except DecryptionFailed:
            return False
        return True

    # Before healing, the copies read new messages in both directions: the compromise is real.
    early_b = bob.encrypt(alice, b"before healing, from Bob")
    early_a = alice.encrypt(bob, b"before healing, from Alice")
    assert attacker_reads(early_b, as_=alice, sender=bob)
    assert attacker_reads(early_a, as_=bob, sender=alice)
    assert alice.decrypt(bob, early_b) == b"before healing, from Bob"
    assert bob.decrypt(alice, early_a) == b"before healing, from Alice"
    # A DH ratchet round trip: each side receives a fresh key of the other and makes its own.
    assert alice.decrypt(bob, bob.encrypt(alice, b"ping")) == b"ping"
    assert bob.decrypt(alice, alice.encrypt(bob, b"pong")) == b"pong"
    healed_b = bob.encrypt(alice, b"after healing, from Bob")
    assert not attacker_reads(healed_b, as_=alice, sender=bob)
    assert alice.decrypt(bob, healed_b) == b"after healing, from Bob"
    healed_a = alice.encrypt(bob, b"after healing, from Alice")
    assert not attacker_reads(healed_a, as_=bob, sender=alice)
    assert bob.decrypt(alice, healed_a) == b"after healing, from Alice"


def test_header_skipping_beyond_max_skip_is_refused_before_deriving_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, bob = session_pair()
    sender = _state(alice, bob)
    receiver = _state(bob, alice)
    sender.ns = receiver.nr + MAX_SKIP + 1  # a header claiming one more than allowed
    message = sender.encrypt(b"far ahead")
    before = _snapshot(bob, alice)
    calls = 0
    real = ratchet_module.kdf_ck

    def counting(ck: bytes) -> tuple[bytes, bytes]:
        nonlocal calls
        calls += 1
        return real(ck)

    monkeypatch.setattr(ratchet_module, "kdf_ck", counting)
    with pytest.raises(LimitExceeded, match="MAX_SKIP"):
        bob.decrypt(alice, message)
    assert calls == 0
    assert _snapshot(bob, alice) == before


def test_skipped_key_store_stays_bounded_under_a_flood() -> None:
    alice, bob = session_pair()
    for round_ in range(4):
        for _ in range(MAX_SKIPPED_KEYS // 2 + 300):
            alice.encrypt(bob, b"lost")  # never delivered
        assert bob.decrypt(alice, alice.encrypt(bob, b"arrives")) == b"arrives"
        assert len(_state(bob, alice).skipped) <= MAX_SKIPPED_KEYS
        # A reply makes Alice start a new chain (new header key) for the next round.
        assert alice.decrypt(bob, bob.encrypt(alice, b"ack %d" % round_)) == b"ack %d" % round_
    state = _state(bob, alice)
    assert len(state.skipped) == MAX_SKIPPED_KEYS
    assert sum(state.skipped_hks.values()) == MAX_SKIPPED_KEYS


def test_evicted_skipped_keys_fail_cleanly() -> None:
    alice, bob = session_pair()
    oldest = alice.encrypt(bob, b"oldest")
    for _ in range(MAX_SKIPPED_KEYS):
        alice.encrypt(bob, b"lost")
    assert bob.decrypt(alice, alice.encrypt(bob, b"newest")) == b"newest"
    with pytest.raises(DecryptionFailed):
        bob.decrypt(alice, oldest)  # its key was evicted (oldest first)


def test_header_is_encrypted() -> None:
    alice, bob = session_pair()
    state = _state(alice, bob)
    message = alice.encrypt(bob, b"hidden counters")
    assert state.dhs_pub not in message  # the ratchet key travels only inside the header AEAD
    assert len(message) == PREFIX_BYTES + len(b"hidden counters") + 16


def test_state_serialization_round_trip_keeps_working() -> None:
    alice, bob = session_pair()
    pending = [alice.encrypt(bob, b"p%d" % i) for i in range(3)]
    bob.decrypt(alice, pending[2])  # leaves two skipped keys
    restored = SessionRecord.from_bytes(_snapshot(bob, alice))
    assert restored.to_bytes() == _snapshot(bob, alice)
    bob.sessions[alice.name] = restored
    assert bob.decrypt(alice, pending[0]) == b"p0"
    assert bob.decrypt(alice, pending[1]) == b"p1"


def _first_message_claiming(n: int, *, genuine: bool = False) -> tuple[Party, Party, bytes]:
    """A stranger's first (prekey) message to Bob whose header claims counter `n`: anyone with
    Bob's public bundle can make one. `genuine`: the n messages before it
    were really sent (and lost), so it decrypts; otherwise only its header claims them."""
    stranger, bob = Party.create("stranger"), Party.create("bob")
    stranger.start_session(bob)
    record = stranger.sessions[bob.name]
    assert record.current is not None
    if genuine:
        for _ in range(n):
            record.encrypt(b"lost")
    else:
        record.current.ratchet.ns = n
    return stranger, bob, record.encrypt(b"x").message


def test_first_message_of_a_new_session_may_skip_only_max_new_session_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    real = ratchet_module.kdf_ck

    def counting(ck: bytes) -> tuple[bytes, bytes]:
        nonlocal calls
        calls += 1
        return real(ck)

    monkeypatch.setattr(ratchet_module, "kdf_ck", counting)
    stranger, bob, message = _first_message_claiming(MAX_NEW_SESSION_SKIP + 1)
    prekeys_before = bob.prekeys.to_bytes()
    calls = 0
    with pytest.raises(LimitExceeded, match="MAX_NEW_SESSION_SKIP"):
        bob.decrypt(stranger, message)
    assert calls == 0  # refused before deriving a single chain key
    assert bob.prekeys.to_bytes() == prekeys_before
    assert bob.sessions[stranger.name].current is None

    # A genuine sender whose first MAX_NEW_SESSION_SKIP messages were lost still gets through.
    stranger, bob, message = _first_message_claiming(MAX_NEW_SESSION_SKIP, genuine=True)
    assert bob.decrypt(stranger, message) == b"x"


def test_an_initiator_still_accepts_a_reply_skipping_up_to_max_skip() -> None:
    # The cap is for the responder's first chain only: a reply to our own first message comes
    # from a session we started, which a stranger cannot write in.
    alice, bob = Party.create("alice"), Party.create("bob")
    alice.start_session(bob)
    assert bob.decrypt(alice, alice.encrypt(bob, b"hi")) == b"hi"
    for _ in range(MAX_NEW_SESSION_SKIP + 10):
        bob.encrypt(alice, b"lost")
    assert alice.decrypt(bob, bob.encrypt(alice, b"late")) == b"late"
