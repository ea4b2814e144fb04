"""The account's own device list as a node keeps it (PROTOCOL.md section 25.1): made on first
start, re-signed before it expires, changed only by valid versions."""

from pathlib import Path

import pytest

from node.clock import ManualClock
from node.device.account_devices import AccountDevices
from node.device.datadir import DataDir
from node.device.setup import init_data_dir
from node.device.storage import Database
from node.errors import DeviceError, InvalidRecord
from node.protocol.devicelist import DEVICE_LIST_LIFETIME_S, DeviceEntry, DeviceList
from node.protocol.directory import MAX_DEVICES
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair

START_S = 1_900_000_000


def open_devices(path: Path, clock: ManualClock) -> tuple[AccountDevices, Database, IdentityKeyPair]:
    dd = DataDir(path)
    identity, device = dd.load_keys()
    db = Database.open(dd.database_file)
    return AccountDevices(db=db, identity=identity, device=device, clock=clock), db, identity


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    init_data_dir(tmp_path / "a", clock=ManualClock(start_ms=START_S * 1000))
    return tmp_path / "a"


def test_first_start_makes_a_list_of_this_device_and_keeps_it(data_dir: Path) -> None:
    clock = ManualClock(start_ms=START_S * 1000)
    devices, db, _ = open_devices(data_dir, clock)
    first = devices.current
    assert len(first.entries) == 1 and devices.others() == ()
    assert DeviceList.verify(devices.signed(), now=START_S) == first
    db.close()
    clock.advance(3600)
    again, db, _ = open_devices(data_dir, clock)
    assert again.current == first  # not re-signed while far from expiry
    db.close()


def test_adding_and_removing_devices_signs_new_versions(data_dir: Path) -> None:
    clock = ManualClock(start_ms=START_S * 1000)
    devices, db, identity = open_devices(data_dir, clock)
    other = DeviceKeyPair.generate()
    added = devices.add(DeviceEntry.make(other, identity.public), peer_id=other.public.peer_id(),
                        addrs=["/ip4/127.0.0.1/tcp/1"])
    assert devices.others() == (other.public,) and added.seq > 0
    assert db.device(other.public.to_bytes()) is not None
    assert db.contacts() == []  # the own-account row stays hidden
    with pytest.raises(DeviceError, match="already"):
        devices.add(DeviceEntry.make(other, identity.public), peer_id="x", addrs=[])
    removed = devices.remove(other.public)
    assert removed.seq > added.seq and devices.others() == ()
    assert db.device(other.public.to_bytes()) is None
    with pytest.raises(DeviceError, match="cannot remove itself"):
        devices.remove(devices.current.devices[0])
    db.close()


def test_a_seventeenth_device_and_a_device_without_binding_are_refused(data_dir: Path) -> None:
    clock = ManualClock(start_ms=START_S * 1000)
    devices, db, identity = open_devices(data_dir, clock)
    stranger = IdentityKeyPair.generate()
    unbound = DeviceKeyPair.generate()
    with pytest.raises(DeviceError, match="cannot add"):
        devices.add(DeviceEntry.make(unbound, stranger.public), peer_id="x", addrs=[])
    for _ in range(MAX_DEVICES - 1):
        d = DeviceKeyPair.generate()
        devices.add(DeviceEntry.make(d, identity.public), peer_id=d.public.peer_id(), addrs=[])
    before = devices.signed()
    extra = DeviceKeyPair.generate()
    with pytest.raises(DeviceError, match=f"already has {MAX_DEVICES} devices"):
        devices.add(DeviceEntry.make(extra, identity.public), peer_id=extra.public.peer_id(),
                    addrs=[])
    assert devices.signed() == before and db.device(extra.public.to_bytes()) is None
    db.close()


def test_a_list_that_expired_while_off_is_re_signed_with_the_same_devices(data_dir: Path) -> None:
    clock = ManualClock(start_ms=START_S * 1000)
    devices, db, identity = open_devices(data_dir, clock)
    other = DeviceKeyPair.generate()
    kept = devices.add(DeviceEntry.make(other, identity.public), peer_id=other.public.peer_id(),
                       addrs=[])
    db.close()
    clock.advance(DEVICE_LIST_LIFETIME_S + 86400)
    later, db, _ = open_devices(data_dir, clock)
    assert later.current.devices == kept.devices and later.current.seq > kept.seq
    assert DeviceList.verify(later.signed(), now=clock.now_s()) == later.current
    db.close()


def test_accept_takes_only_newer_valid_versions_of_this_account(data_dir: Path) -> None:
    clock = ManualClock(start_ms=START_S * 1000)
    devices, db, identity = open_devices(data_dir, clock)
    other = DeviceKeyPair.generate()
    newer = devices.current.with_device(DeviceEntry.make(other, identity.public),
                                        seq=devices.current.seq + 5, expires=devices.current.expires)
    assert devices.accept(newer.sign(identity)) == newer
    assert devices.accept(newer.sign(identity)) is None  # same version again: nothing changes
    stranger = IdentityKeyPair.generate()
    theirs = DeviceList.first(stranger, DeviceKeyPair.generate(), seq=newer.seq + 1,
                              expires=newer.expires)
    with pytest.raises(InvalidRecord, match="another account"):
        devices.accept(theirs.sign(stranger))
    assert devices.current == newer
    db.close()
