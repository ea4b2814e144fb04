"""A second device of an account for tests, made the way linking will make it.

`open_linked` stands in for `pigeon link` / `pigeon device add` until both parts of the
multi-device work are merged: it does what provisioning does (PROTOCOL.md section 25): the new
device gets the account's identity key and a fresh device key of its own, the contacts with
their devices and device lists, and the account's other devices; the existing device then adds
it to the account's device list with its real binding (`Node.add_device`), which sends the new
list to every contact and to the new device.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from node import Node
from node.device.datadir import DataDir
from node.device.node import init_data_dir
from node.device.storage import Database
from node.protocol.devicelist import DeviceEntry
from tests.conftest import open_node


def provision(first: Node, path: Path, name: str) -> DeviceEntry:
    """A data directory at `path` for a new device of `first`'s account, with what provisioning
    hands over; returns the new device's entry for the device list (not added yet)."""
    init_data_dir(path, display_name=name)
    target = DataDir(path)
    shutil.copyfile(first.data_dir.identity_file, target.identity_file)
    identity, device = target.load_keys()
    source = first._db
    now = first._clock.now_ms()
    db = Database.open(target.database_file)
    try:
        with db.transaction():
            for contact in source.contacts():
                copy = db.add_contact(contact.name, contact.account, now_ms=contact.added_at_ms)
                for d in source.devices(contact.id):
                    db.put_device(copy.id, d.device, d.peer_id, d.addrs, relays=d.relays,
                                  now_ms=now)
                stored = source.device_list(contact.account)
                if stored is not None:
                    db.put_device_list(contact.account, *stored)
            account = identity.public.to_bytes()
            own = db.own_contact(account, now_ms=now)
            db.put_device(own.id, first._device.public.to_bytes(), first.peer_id,
                          first.contact_addresses(), relays=first.config.relays, now_ms=now)
            for d in source.devices(first._account_devices.own.id):
                db.put_device(own.id, d.device, d.peer_id, d.addrs, relays=d.relays, now_ms=now)
            stored = source.device_list(account)
            assert stored is not None
            db.put_device_list(account, *stored)
    finally:
        db.close()
    return DeviceEntry.make(device, identity.public)


@asynccontextmanager
async def open_linked(first: Node, path: Path, name: str,
                      **changes: object) -> AsyncIterator[Node]:
    """A running new device of `first`'s account (see the module's docstring), added to the
    account's device list by `first` once it listens."""
    entry = provision(first, path, name)
    async with open_node(path, name, **changes) as node:
        first.add_device(entry, addrs=node.contact_addresses(), relays=node.config.relays)
        yield node
