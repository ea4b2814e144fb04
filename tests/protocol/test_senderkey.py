"""Sender keys (PROTOCOL.md section 27.4): one ciphertext for every member device."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import DecryptionFailed, LimitExceeded
from node.protocol.limits import MAX_SKIP, MAX_SKIPPED_KEYS
from node.protocol.senderkey import MESSAGE_OVERHEAD, ReceiverChain, SenderChain, peek_message

GID = b"\x07" * 32


def pair() -> tuple[SenderChain, ReceiverChain]:
    sender = SenderChain.generate(GID)
    key_id, ck, n = sender.distribution()
    return sender, ReceiverChain(group_id=GID, key_id=key_id, chain_key=ck, iteration=n)


def test_every_receiver_opens_the_same_ciphertext_once() -> None:
    sender, _ = pair()
    key_id, ck, n = sender.distribution()
    receivers = [ReceiverChain(group_id=GID, key_id=key_id, chain_key=ck, iteration=n)
                 for _ in range(3)]
    message = sender.encrypt(b"hello group")
    assert len(message) == MESSAGE_OVERHEAD + len(b"hello group")
    assert peek_message(message) == (GID, key_id, 0)
    for r in receivers:
        assert r.decrypt(message) == b"hello group"
        with pytest.raises(DecryptionFailed):
            r.decrypt(message)  # the key was used and deleted


def test_out_of_order_messages_open_and_state_round_trips() -> None:
    sender, receiver = pair()
    messages = [sender.encrypt(b"m%d" % i) for i in range(5)]
    assert receiver.decrypt(messages[3]) == b"m3"
    receiver = ReceiverChain.from_bytes(receiver.to_bytes())
    sender = SenderChain.from_bytes(sender.to_bytes())
    assert [receiver.decrypt(messages[i]) for i in (0, 4, 2, 1)] == [b"m0", b"m4", b"m2", b"m1"]
    assert receiver.decrypt(sender.encrypt(b"next")) == b"next"


def test_a_bad_signature_is_refused_and_changes_nothing() -> None:
    sender, receiver = pair()
    message = sender.encrypt(b"genuine")
    before = receiver.to_bytes()
    bad_sig = message[:-1] + bytes([message[-1] ^ 1])
    # Chain-key holder forging: the right chain key but the signature of another signing key.
    impostor = SenderChain(group_id=GID, signing_seed=b"\x01" * 32,
                           chain_key=receiver.chain_key, iteration=0)
    forged = impostor.encrypt(b"forged")
    forged = message[:33] + forged[33:]  # claims the genuine chain's key id
    tampered = message[:80] + bytes([message[80] ^ 1]) + message[81:]
    for bad in (bad_sig, forged, tampered, message[:-70], b"", b"\x02" + message[1:]):
        with pytest.raises(DecryptionFailed):
            receiver.decrypt(bad)
        assert receiver.to_bytes() == before
    assert receiver.decrypt(message) == b"genuine"


def test_a_replaced_chain_is_unreadable_with_the_old_one() -> None:
    old, receiver = pair()
    receiver.decrypt(old.encrypt(b"before"))
    new = SenderChain.generate(GID)
    with pytest.raises(DecryptionFailed):
        receiver.decrypt(new.encrypt(b"after removal"))


def test_skips_are_bounded_as_in_the_ratchet() -> None:
    sender, receiver = pair()
    # A sender that claims to be MAX_SKIP + 1 messages ahead: refused before deriving keys.
    far = SenderChain(group_id=GID, signing_seed=b"\x00" * 32, chain_key=receiver.chain_key,
                      iteration=MAX_SKIP + 1)
    far_receiver = ReceiverChain(group_id=GID, key_id=far.key_id, chain_key=receiver.chain_key,
                                 iteration=0)
    with pytest.raises(LimitExceeded, match="MAX_SKIP"):
        far_receiver.decrypt(far.encrypt(b"x"))
    for _ in range(MAX_SKIPPED_KEYS + 10):
        sender.encrypt(b"lost")
    receiver.decrypt(sender.encrypt(b"late"))
    assert len(receiver.skipped) == MAX_SKIPPED_KEYS
    assert min(receiver.skipped) == 10  # the oldest were evicted


@settings(max_examples=30, deadline=None)
@given(st.permutations(list(range(8))))
def test_any_delivery_order_opens_every_message_exactly_once(order: list[int]) -> None:
    sender, receiver = pair()
    messages = [sender.encrypt(bytes([i])) for i in range(8)]
    assert [receiver.decrypt(messages[i]) for i in order] == [bytes([i]) for i in order]
    for i in order:
        with pytest.raises(DecryptionFailed):
            receiver.decrypt(messages[i])
