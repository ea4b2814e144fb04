"""Sealed sender: the envelope hides the sender and binds to the recipient device."""

from __future__ import annotations

import pytest

from node.errors import DecryptionFailed, LimitExceeded
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair, b58decode
from node.protocol.limits import MAX_SEALED_BYTES
from node.protocol.sealed import SealedContent, seal, unseal
from node.testing import Party, session_pair

WINDOW = 6  # bytes: any 6-byte run of an identifier appearing by chance is ~2^-48 per offset


def _windows(data: bytes) -> set[bytes]:
    return {data[i:i + WINDOW] for i in range(len(data) - WINDOW + 1)}


def test_envelope_contains_no_sender_identifier() -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    alice.start_session(bob)  # a prekey message: it carries Alice's identity key inside
    message = alice.encrypt(bob, b"sealed")
    assert alice.identity.public.to_bytes() in message  # so the test below is meaningful
    envelope = seal(
        bob.device.public,
        SealedContent(
            sender=alice.identity.public, sender_device=alice.device.public, message=message
        ),
    )
    identifiers = [
        alice.identity.public.to_bytes(),
        alice.identity.public.to_x25519(),
        alice.identity.public.account_id().encode(),
        alice.device.public.to_bytes(),
        alice.device.public.to_x25519(),
        alice.device.public.peer_id().encode(),
        b58decode(alice.device.public.peer_id()),
    ]
    pieces = _windows(envelope)
    for identifier in identifiers:
        assert not (_windows(identifier) & pieces), identifier
    opened = unseal(bob.device, envelope)
    assert opened.sender == alice.identity.public
    assert opened.sender_device == alice.device.public
    assert bob.decrypt(alice, opened.message) == b"sealed"


def test_envelope_opens_only_for_its_device() -> None:
    alice, bob = session_pair()
    content = SealedContent(
        sender=alice.identity.public, sender_device=alice.device.public, message=b"m"
    )
    envelope = seal(bob.device.public, content)
    with pytest.raises(DecryptionFailed):
        unseal(DeviceKeyPair.generate(), envelope)
    for i in range(len(envelope)):
        tampered = bytearray(envelope)
        tampered[i] ^= 0x01
        with pytest.raises(DecryptionFailed):
            unseal(bob.device, bytes(tampered))
    assert unseal(bob.device, envelope) == content


def test_envelopes_are_unlinkable_between_sends() -> None:
    alice, bob = session_pair()
    content = SealedContent(
        sender=alice.identity.public, sender_device=alice.device.public, message=b"same"
    )
    one, two = seal(bob.device.public, content), seal(bob.device.public, content)
    assert one[1:33] != two[1:33] and one[33:] != two[33:]


def test_oversized_envelopes_are_refused_before_any_work() -> None:
    _, bob = session_pair()
    with pytest.raises(LimitExceeded):
        unseal(bob.device, b"\x01" + b"\x00" * MAX_SEALED_BYTES)
    with pytest.raises(DecryptionFailed):
        unseal(bob.device, b"\x02" + b"\x00" * 100)
    with pytest.raises(DecryptionFailed):
        unseal(bob.device, b"")


def test_an_envelope_may_carry_the_message_id_of_a_deposit_made_under_another_id() -> None:
    sender_identity, sender_device = IdentityKeyPair.generate(), DeviceKeyPair.generate()
    recipient = DeviceKeyPair.generate()
    message_id = bytes(range(16))
    envelope = seal(recipient.public, SealedContent(
        sender=sender_identity.public, sender_device=sender_device.public, message=b"m",
        message_id=message_id))
    assert unseal(recipient, envelope).message_id == message_id
    without = seal(recipient.public, SealedContent(
        sender=sender_identity.public, sender_device=sender_device.public, message=b"m"))
    assert unseal(recipient, without).message_id is None
