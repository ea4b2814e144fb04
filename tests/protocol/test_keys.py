"""Typed keys: round trips, text forms, and refusal of malformed key bytes."""

from __future__ import annotations

import nacl.signing
import pytest

from node.errors import DecodeError, InvalidRecord
from node.protocol.keys import (
    DeviceKey,
    DeviceKeyPair,
    DHKeyPair,
    IdentityKey,
    IdentityKeyPair,
    KEMKeyPair,
    KEMPublicKey,
    b58decode,
    b58encode,
)
from node.testing import DeterministicRandom


def test_key_pairs_round_trip_through_bytes() -> None:
    rng = DeterministicRandom(b"keys")
    identity = IdentityKeyPair.generate(rng)
    assert IdentityKeyPair.from_bytes(identity.to_bytes()).public == identity.public
    dh = DHKeyPair.generate(rng)
    assert DHKeyPair.from_bytes(dh.to_bytes()).public == dh.public
    kem = KEMKeyPair.generate(rng)
    again = KEMKeyPair.from_bytes(kem.to_bytes())
    assert again.public == kem.public
    ciphertext, shared = kem.public.encapsulate()
    assert again.decapsulate(ciphertext) == shared


def test_identity_and_device_keys_are_different_types() -> None:
    raw = IdentityKeyPair.generate().public.to_bytes()
    assert IdentityKey.from_bytes(raw) != DeviceKey.from_bytes(raw)


def test_account_id_round_trips_and_catches_typos() -> None:
    key = IdentityKeyPair.generate(DeterministicRandom(b"acct")).public
    text = key.account_id()
    assert text.startswith("pg") and text == text.lower()
    assert IdentityKey.from_account_id(text) == key
    typo = text[:10] + ("a" if text[10] != "a" else "b") + text[11:]
    with pytest.raises(DecodeError, match="checksum"):
        IdentityKey.from_account_id(typo)
    for bad in ["", "pg", "xx" + text[2:], text + "aa", "pg!!!!"]:
        with pytest.raises(DecodeError):
            IdentityKey.from_account_id(bad)


def test_peer_id_matches_libp2p() -> None:
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    device = DeviceKeyPair.generate()
    expected = ID.from_pubkey(Ed25519PublicKey.from_bytes(device.public.to_bytes())).to_base58()
    assert device.public.peer_id() == expected
    assert DeviceKey.from_peer_id(expected) == device.public


def test_peer_id_of_another_key_type_is_refused() -> None:
    sha256_peer_id = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    with pytest.raises(DecodeError):
        DeviceKey.from_peer_id(sha256_peer_id)
    with pytest.raises(DecodeError):
        DeviceKey.from_peer_id("0OIl")  # not base58


def test_base58_round_trip_keeps_leading_zeros() -> None:
    for data in [b"", b"\x00", b"\x00\x00\x01", bytes(range(40))]:
        if data:
            assert b58decode(b58encode(data)) == data


def test_signatures_verify_in_pynacl_and_reject_tampering() -> None:
    identity = IdentityKeyPair.generate()
    signature = identity.sign(b"record")
    nacl.signing.VerifyKey(identity.public.to_bytes()).verify(b"record", signature)
    identity.public.verify(signature, b"record")
    with pytest.raises(InvalidRecord):
        identity.public.verify(signature, b"recorD")


@pytest.mark.parametrize("size", [0, 31, 33])
def test_wrong_length_keys_are_refused(size: int) -> None:
    for cls in (IdentityKey, DeviceKey, DHKeyPair, IdentityKeyPair):
        with pytest.raises(DecodeError):
            cls.from_bytes(b"\x01" * size)


def test_kem_keys_of_wrong_size_or_value_are_refused() -> None:
    with pytest.raises(DecodeError):
        KEMPublicKey.from_bytes(b"\x00" * 100)
    with pytest.raises(DecodeError):
        KEMPublicKey.from_bytes(b"\xff" * 1568)  # coefficients above the modulus
    with pytest.raises(DecodeError):
        KEMKeyPair.from_bytes(b"\x00" * 63)
