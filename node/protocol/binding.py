"""Device-to-account binding: the device key's proof that it belongs to an account.

An account names its devices in records signed by the identity key IK (prekey bundles, device
and account records, invites). That signature alone lets anyone claim any device key DK for
their own account. The binding is the other half (PROTOCOL.md section 4, "Binding"): the
device key signs its membership of the account,

    bind = Ed25519 signature by DK over  "pigeon-device-binding-v1" || 0x00 || IK

so a record that names DK for IK is trusted only when it carries a `bind` that verifies under
DK. Together the two signatures make the binding mutual: IK vouches for DK and DK for IK.
"""

from __future__ import annotations

from typing import Final

from node.errors import InvalidRecord
from node.protocol.keys import SIGNATURE_BYTES, DeviceKey, DeviceKeyPair, IdentityKey

__all__ = ["BINDING_CONTEXT", "sign_binding", "verify_binding"]

#: Domain separation for binding signatures (no other Pigeon signature starts with it).
BINDING_CONTEXT: Final = b"pigeon-device-binding-v1\x00"


def sign_binding(device: DeviceKeyPair, identity: IdentityKey) -> bytes:
    """The 64-byte binding of `device` to the account `identity`."""
    return device.sign(BINDING_CONTEXT + identity.to_bytes())


def verify_binding(device: DeviceKey, identity: IdentityKey, signature: bytes) -> None:
    """Raise InvalidRecord unless `signature` is `device`'s binding to `identity`."""
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise InvalidRecord("a device binding is a 64-byte signature")
    device.verify(signature, BINDING_CONTEXT + identity.to_bytes())
