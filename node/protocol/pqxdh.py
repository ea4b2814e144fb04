"""PQXDH session setup (Signal's PQXDH spec; X3DH is its classical core).

Initiator A, responder B (PROTOCOL.md "PQXDH"):

    DH1 = DH(IK_A, SPK_B)      DH2 = DH(EK_A, IK_B)      DH3 = DH(EK_A, SPK_B)
    DH4 = DH(EK_A, OPK_B)      (only if B's bundle carried a one-time prekey)
    (CT, SS) = ML-KEM-1024.Encaps(PQPK_B)
    SK = HKDF-SHA256(ikm = 0xFF*32 || DH1 || DH2 || DH3 [|| DH4] || SS,
                     salt = 0x00*32, info = INFO_PQXDH, length = 32)
    AD = IK_A || IK_B          (the 32-byte Ed25519 identity keys)

IK keys are Ed25519; DH uses their X25519 form (RFC 7748 birational map). SK is then split into
the first root key and the two initial header keys of the header-encrypted Double Ratchet:

    RK || HK_A || NHK_B = HKDF-SHA256(ikm = SK, salt = 0x00*32, info = INFO_RATCHET_INIT, 96)

B's signed prekey doubles as B's first ratchet key (as in Signal).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final, Self

from node.errors import DecodeError, DecryptionFailed
from node.protocol import codec
from node.protocol.kdf import INFO_PQXDH, INFO_RATCHET_INIT, hkdf
from node.protocol.keys import (
    KEM_CIPHERTEXT_BYTES,
    KEY_BYTES,
    DHKeyPair,
    DHPublicKey,
    IdentityKey,
    IdentityKeyPair,
    Random,
)
from node.protocol.prekeys import PreKeyStore, PreKeyUse
from node.protocol.ratchet import RatchetState
from node.protocol.records import MAX_PREKEY_ID, PreKeyBundle

__all__ = ["PreKeyHeader", "initiate", "respond"]

_F: Final = b"\xff" * 32  # PQXDH section 2.2: separates the X25519 inputs from XEdDSA's


@dataclass(frozen=True, slots=True, kw_only=True)
class PreKeyHeader:
    """The PQXDH fields of an initial message (PQXDH section 3.3), sent with every message of a
    new session until the responder is known to have it."""

    identity: IdentityKey  # IK_A
    base_key: DHPublicKey  # EK_A
    signed_prekey_id: int
    one_time_prekey_id: int | None
    kem_prekey_id: int
    kem_ciphertext: bytes

    def __post_init__(self) -> None:
        if len(self.kem_ciphertext) != KEM_CIPHERTEXT_BYTES:
            raise ValueError("kem_ciphertext must be an ML-KEM-1024 ciphertext")

    def to_dict(self) -> dict[str, object]:
        """The header's fields of a prekey message body (PROTOCOL.md section 8)."""
        out: dict[str, object] = {
            "ik": self.identity.to_bytes(),
            "ek": self.base_key.to_bytes(),
            "spk": self.signed_prekey_id,
            "pqpk": self.kem_prekey_id,
            "ct": self.kem_ciphertext,
        }
        if self.one_time_prekey_id is not None:
            out["opk"] = self.one_time_prekey_id
        return out

    @classmethod
    def from_fields(cls, f: codec.Fields) -> Self:
        """The header in a decoded map (the caller checks for unknown keys)."""
        return cls(
            identity=IdentityKey.from_bytes(f.bytes("ik", KEY_BYTES)),
            base_key=DHPublicKey.from_bytes(f.bytes("ek", KEY_BYTES)),
            signed_prekey_id=f.int("spk", 0, MAX_PREKEY_ID),
            one_time_prekey_id=f.int("opk", 0, MAX_PREKEY_ID, optional=True),
            kem_prekey_id=f.int("pqpk", 0, MAX_PREKEY_ID),
            kem_ciphertext=f.bytes("ct", KEM_CIPHERTEXT_BYTES),
        )


def _session_keys(secret: bytes) -> tuple[bytes, bytes, bytes]:
    sk = hkdf(_F + secret, salt=None, info=INFO_PQXDH, length=32)
    out = hkdf(sk, salt=None, info=INFO_RATCHET_INIT, length=96)
    return out[:32], out[32:64], out[64:]


def associated_data(initiator: IdentityKey, responder: IdentityKey) -> bytes:
    return initiator.to_bytes() + responder.to_bytes()


def initiate(
    identity: IdentityKeyPair,
    bundle: PreKeyBundle,
    *,
    rng: Random = os.urandom,
    kem_encapsulation: tuple[bytes, bytes] | None = None,
) -> tuple[RatchetState, PreKeyHeader]:
    """Start a session with the device behind a *verified* bundle (`PreKeyBundle.verify`).

    `kem_encapsulation` (ciphertext, shared secret) replaces the library's encapsulation in
    known-answer tests only; normal callers leave it out.
    """
    ephemeral = DHKeyPair.generate(rng)
    ct, ss = kem_encapsulation or bundle.kem_prekey.encapsulate()
    secret = (
        identity.dh(bundle.signed_prekey.to_bytes())
        + ephemeral.dh(bundle.identity.to_x25519())
        + ephemeral.dh(bundle.signed_prekey)
    )
    if bundle.one_time_prekey is not None:
        secret += ephemeral.dh(bundle.one_time_prekey)
    root, hk_a, nhk_b = _session_keys(secret + ss)
    state = RatchetState.init_initiator(
        root,
        bundle.signed_prekey,
        ad=associated_data(identity.public, bundle.identity),
        hk_send=hk_a,
        nhk_recv=nhk_b,
        rng=rng,
    )
    header = PreKeyHeader(
        identity=identity.public,
        base_key=ephemeral.public,
        signed_prekey_id=bundle.signed_prekey_id,
        one_time_prekey_id=bundle.one_time_prekey_id,
        kem_prekey_id=bundle.kem_prekey_id,
        kem_ciphertext=ct,
    )
    return state, header


def respond(
    identity: IdentityKeyPair, prekeys: PreKeyStore, header: PreKeyHeader
) -> tuple[RatchetState, PreKeyUse]:
    """The responder's half. Reads `prekeys` but does not change it: the caller decrypts the
    first message with the returned state and only then calls `prekeys.commit_use(use)`.

    Unknown or consumed prekeys and replays all raise the same opaque DecryptionFailed.
    """
    spk = prekeys.signed_prekey(header.signed_prekey_id)
    kem = prekeys.kem_prekey(header.kem_prekey_id)
    if spk is None or kem is None:
        raise DecryptionFailed("prekey not available")
    opk = None
    if header.one_time_prekey_id is not None:
        opk = prekeys.one_time_prekey(header.one_time_prekey_id)
        if opk is None:
            raise DecryptionFailed("prekey not available")
    elif prekeys.is_replay(header.signed_prekey_id, header.base_key.to_bytes()):
        raise DecryptionFailed("replayed first message")
    kem_pair, last_resort = kem
    try:
        their_identity = header.identity.to_x25519()
    except DecodeError as exc:
        raise DecryptionFailed("bad identity key") from exc
    secret = (
        spk.dh(their_identity)
        + identity.dh(header.base_key.to_bytes())
        + spk.dh(header.base_key)
    )
    if opk is not None:
        secret += opk.dh(header.base_key)
    root, hk_a, nhk_b = _session_keys(secret + kem_pair.decapsulate(header.kem_ciphertext))
    state = RatchetState.init_responder(
        root,
        spk,
        ad=associated_data(header.identity, identity.public),
        hk_recv_next=hk_a,
        nhk_send=nhk_b,
    )
    use = PreKeyUse(
        signed_prekey_id=header.signed_prekey_id,
        one_time_prekey_id=header.one_time_prekey_id,
        kem_prekey_id=header.kem_prekey_id,
        kem_last_resort=last_resort,
        base_key=header.base_key.to_bytes(),
    )
    return state, use
