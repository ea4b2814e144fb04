"""Key derivation: HKDF-SHA256 (RFC 5869, from `cryptography`) and HMAC-SHA256 (stdlib).

Every info string of the protocol is defined here and nowhere else (PROTOCOL.md "Parameters").
"""

from __future__ import annotations

import hmac
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["hkdf", "hmac_sha256"]

#: PQXDH KDF info (PQXDH section 2.2: "application name, curve, hash, KEM").
INFO_PQXDH: Final = b"Pigeon_PQXDH_X25519_SHA-256_ML-KEM-1024"
#: Splits the PQXDH secret into the first root key and the two initial header keys.
INFO_RATCHET_INIT: Final = b"Pigeon_Ratchet_Init_v1"
#: KDF_RK_HE of the Double Ratchet (root key, chain key, next header key).
INFO_RATCHET_ROOT: Final = b"Pigeon_Ratchet_Root_v1"
#: Sealed-sender envelope key from the ephemeral-static X25519 secret.
INFO_SEALED: Final = b"Pigeon_SealedSender_v1"

# KDF_CK inputs (Double Ratchet section 5.2): distinct constants for message and chain keys.
CK_MESSAGE: Final = b"\x01"
CK_CHAIN: Final = b"\x02"


def hkdf(ikm: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 extract-then-expand. `salt=None` means a string of HashLen zero bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA-256 (RFC 2104) of `data` under `key`."""
    return hmac.digest(key, data, "sha256")


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """Double Ratchet KDF_CK: (next chain key, message key) = (HMAC(ck, 0x02), HMAC(ck, 0x01))."""
    return hmac.digest(chain_key, CK_CHAIN, "sha256"), hmac.digest(chain_key, CK_MESSAGE, "sha256")


def kdf_rk_he(root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes, bytes]:
    """Double Ratchet KDF_RK_HE: HKDF(salt=rk, ikm=dh_out) -> (root key, chain key, next header key)."""
    out = hkdf(dh_out, salt=root_key, info=INFO_RATCHET_ROOT, length=96)
    return out[:32], out[32:64], out[64:]
