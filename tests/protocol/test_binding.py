"""The device-to-account binding (PROTOCOL.md section 4, "Binding")."""

import pytest

from node.errors import InvalidRecord
from node.protocol.binding import BINDING_CONTEXT, sign_binding, verify_binding
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair


def test_a_binding_verifies_only_for_its_own_device_and_account() -> None:
    device, other_device = DeviceKeyPair.generate(), DeviceKeyPair.generate()
    account, other_account = IdentityKeyPair.generate(), IdentityKeyPair.generate()
    bind = sign_binding(device, account.public)
    verify_binding(device.public, account.public, bind)
    with pytest.raises(InvalidRecord):
        verify_binding(device.public, other_account.public, bind)
    with pytest.raises(InvalidRecord):
        verify_binding(other_device.public, account.public, bind)
    # The account key cannot vouch for itself in the device's place (a hijacker's own signature).
    forged = account.sign(BINDING_CONTEXT + account.public.to_bytes())
    with pytest.raises(InvalidRecord):
        verify_binding(device.public, account.public, forged)


@pytest.mark.parametrize("bad", [b"", b"\x00" * 63, b"\x00" * 65, "sig" * 22])
def test_a_malformed_binding_is_refused_not_crashed_on(bad: object) -> None:
    device, account = DeviceKeyPair.generate(), IdentityKeyPair.generate()
    with pytest.raises(InvalidRecord):
        verify_binding(device.public, account.public, bad)  # type: ignore[arg-type]
