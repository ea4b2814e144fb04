"""The signed, versioned device list (PROTOCOL.md section 25.1)."""

import cbor2
import pytest

from node.errors import InvalidRecord
from node.protocol import codec
from node.protocol.devicelist import DEVICE_LIST_LIFETIME_S, DeviceEntry, DeviceList
from node.protocol.directory import MAX_DEVICES
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.protocol.records import sign_record

NOW = 1_900_000_000


def first() -> tuple[IdentityKeyPair, DeviceKeyPair, DeviceList]:
    ik, dk = IdentityKeyPair.generate(), DeviceKeyPair.generate()
    return ik, dk, DeviceList.first(ik, dk, seq=1, expires=NOW + DEVICE_LIST_LIFETIME_S)


def test_a_list_round_trips_and_grows_and_shrinks_by_version() -> None:
    ik, dk, lst = first()
    assert DeviceList.verify(lst.sign(ik), now=NOW) == lst
    d2 = DeviceKeyPair.generate()
    grown = lst.with_device(DeviceEntry.make(d2, ik.public), seq=2, expires=lst.expires)
    assert DeviceList.verify(grown.sign(ik), now=NOW).devices == (dk.public, d2.public)
    shrunk = grown.without_device(dk.public, seq=3, expires=lst.expires)
    assert shrunk.devices == (d2.public,) and dk.public not in shrunk and d2.public in shrunk
    with pytest.raises(ValueError, match="1 to"):
        shrunk.without_device(d2.public, seq=4, expires=lst.expires)
    with pytest.raises(ValueError, match="not in"):
        shrunk.without_device(dk.public, seq=4, expires=lst.expires)


def test_a_seventeenth_device_is_refused() -> None:
    ik, _, lst = first()
    for seq in range(2, MAX_DEVICES + 1):
        lst = lst.with_device(DeviceEntry.make(DeviceKeyPair.generate(), ik.public), seq=seq,
                              expires=lst.expires)
    assert len(lst.entries) == MAX_DEVICES
    with pytest.raises(ValueError, match=f"at most {MAX_DEVICES}"):
        lst.with_device(DeviceEntry.make(DeviceKeyPair.generate(), ik.public), seq=99,
                        expires=lst.expires)
    assert len(DeviceList.verify(lst.sign(ik), now=NOW).entries) == MAX_DEVICES


def test_a_list_naming_someone_elses_device_is_refused() -> None:
    """Claiming a device key needs that device's binding to this account (section 4)."""
    ik, dk, _ = first()
    victim_ik, victim_dk, _ = first()
    stolen = DeviceEntry.make(victim_dk, victim_ik.public)  # the victim's real binding
    body = {"kind": "device-list", "seq": 1, "exp": NOW + 100,
            "devices": [{"dev": dk.public.to_bytes(), "bind": DeviceEntry.make(dk, ik.public).binding},
                        {"dev": stolen.device.to_bytes(), "bind": stolen.binding}]}
    with pytest.raises(InvalidRecord, match="without its binding"):
        DeviceList.verify(sign_record(ik, body), now=NOW)
    # And this device refuses to sign such a list in the first place.
    forged = DeviceList(identity=ik.public, entries=(stolen,), seq=1, expires=NOW + 100)
    with pytest.raises(InvalidRecord):
        forged.sign(ik)


@pytest.mark.parametrize("devices", [
    [],
    [{"dev": b"\x01" * 31, "bind": b"\x00" * 64}],
    [{"dev": b"\x01" * 32, "bind": b"\x00" * 63}],
    [{"dev": b"\x01" * 32}],
    [{"dev": b"\x01" * 32, "bind": b"\x00" * 64, "x": 1}],
    ["not a map"],
    [{"dev": b"\x01" * 32, "bind": b"\x00" * 64}] * 2,
    [{"dev": bytes([i]) * 32, "bind": b"\x00" * 64} for i in range(MAX_DEVICES + 1)],
])
def test_malformed_lists_are_refused_with_invalid_record(devices: list[object]) -> None:
    ik = IdentityKeyPair.generate()
    data = sign_record(ik, {"kind": "device-list", "seq": 1, "exp": NOW + 100, "devices": devices})
    with pytest.raises(InvalidRecord):
        DeviceList.verify(data, now=NOW)


def test_expired_and_wrong_kind_lists_are_refused() -> None:
    ik, _, lst = first()
    data = lst.sign(ik)
    with pytest.raises(InvalidRecord, match="expired"):
        DeviceList.verify(data, now=lst.expires)
    outer = cbor2.loads(data)
    body = codec.decode_map(outer["body"], limit=10_000, what="x")
    assert body.text("kind", max_size=20) == "device-list"
    account = sign_record(ik, {"kind": "account", "seq": 1, "exp": NOW + 100,
                               "devices": [b"\x01" * 32]})
    with pytest.raises(InvalidRecord, match="expected a device-list"):
        DeviceList.verify(account, now=NOW)
