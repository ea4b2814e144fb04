"""Sealed sender: the outer envelope a relay stores (PROTOCOL.md "Sealed sender").

The envelope is encrypted to the recipient *device* with a fresh ephemeral X25519 key, so its
bytes say nothing about the sender; inside are the sender's account and device and the session
message. Layout:

    0x01 || E (32) || XChaCha20-Poly1305(K, nonce = 24 zero bytes, inner, AD = 0x01 || E || R)

    R     = the recipient device key in X25519 form
    K     = HKDF-SHA256(ikm = X25519(e, R), salt = E || R, info = INFO_SEALED, length = 32)
    inner = CBOR {"v": 1, "ik": sender identity key, "dev": sender device key, "m": session message,
                  ? "id": the message id, when the deposit carries an unlinkable deposit id}

K is fresh per envelope (e is), so the constant nonce is safe. The sender claim is not trusted on
its own: it only selects the session, and the session message authenticates it (a ratchet
message decrypts only in the session with that device; a prekey message's PQXDH includes
DH(IK_A, SPK_B) and must name the same account).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from node.errors import DecryptionFailed, LimitExceeded, NodeError
from node.protocol import codec
from node.protocol.content import MESSAGE_ID_BYTES
from node.protocol.kdf import INFO_SEALED, hkdf
from node.protocol.keys import KEY_BYTES, DeviceKey, DeviceKeyPair, DHKeyPair, IdentityKey, Random
from node.protocol.limits import MAX_SEALED_BYTES

__all__ = ["SealedContent", "seal", "unseal"]

SEALED_VERSION: Final = 0x01
_PREFIX_BYTES: Final = 1 + KEY_BYTES
_ZERO_NONCE: Final = bytes(24)


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedContent:
    """What an envelope holds: a *claimed* sender and the session message that proves it."""

    sender: IdentityKey
    sender_device: DeviceKey
    message: bytes
    #: The message id of the content (section 11), when the deposit carries another id (a
    #: deposit id the relay cannot link to it, section 21); None: the deposit's id is the
    #: message id.
    message_id: bytes | None = None

    def __post_init__(self) -> None:
        if self.message_id is not None and len(self.message_id) != MESSAGE_ID_BYTES:
            raise ValueError("message ids are 16 bytes")


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return hkdf(shared, salt=ephemeral + recipient, info=INFO_SEALED, length=32)


def seal(recipient: DeviceKey, content: SealedContent, *, rng: Random = os.urandom) -> bytes:
    """An envelope only `recipient` can open (PROTOCOL.md section 9); LimitExceeded if it would
    exceed MAX_SEALED_BYTES."""
    fields: dict[str, object] = {
        "v": 1,
        "ik": content.sender.to_bytes(),
        "dev": content.sender_device.to_bytes(),
        "m": content.message,
    }
    if content.message_id is not None:
        fields["id"] = content.message_id
    inner = codec.encode(fields)
    ephemeral = DHKeyPair.generate(rng)
    r = recipient.to_x25519()
    e = ephemeral.public.to_bytes()
    prefix = bytes([SEALED_VERSION]) + e
    key = _key(ephemeral.dh(r), e, r)
    envelope = prefix + crypto_aead_xchacha20poly1305_ietf_encrypt(inner, prefix + r, _ZERO_NONCE, key)
    if len(envelope) > MAX_SEALED_BYTES:
        raise LimitExceeded("MAX_SEALED_BYTES", f"{len(envelope)} bytes")
    return envelope


def unseal(device: DeviceKeyPair, envelope: bytes) -> SealedContent:
    """Open an envelope addressed to `device`; one opaque DecryptionFailed for anything wrong."""
    if len(envelope) > MAX_SEALED_BYTES:
        raise LimitExceeded("MAX_SEALED_BYTES", f"{len(envelope)} bytes")
    if len(envelope) < _PREFIX_BYTES + 16 or envelope[0] != SEALED_VERSION:
        raise DecryptionFailed("not a sealed envelope")
    prefix, e = envelope[:_PREFIX_BYTES], envelope[1:_PREFIX_BYTES]
    r = device.public.to_x25519()
    key = _key(device.dh(e), e, r)
    try:
        inner = crypto_aead_xchacha20poly1305_ietf_decrypt(
            envelope[_PREFIX_BYTES:], prefix + r, _ZERO_NONCE, key
        )
    except CryptoError as exc:
        raise DecryptionFailed("envelope did not authenticate") from exc
    try:
        f = codec.decode_map(inner, limit=MAX_SEALED_BYTES, what="sealed content", version=1)
        content = SealedContent(
            sender=IdentityKey.from_bytes(f.bytes("ik", KEY_BYTES)),
            sender_device=DeviceKey.from_bytes(f.bytes("dev", KEY_BYTES)),
            message=f.bytes("m", max_size=MAX_SEALED_BYTES),
            message_id=f.bytes("id", MESSAGE_ID_BYTES, optional=True),
        )
        f.done()
    except NodeError as exc:
        # Authenticated by the AEAD yet malformed: a broken sender; still opaque to callers.
        raise DecryptionFailed("malformed sealed content") from exc
    return content
