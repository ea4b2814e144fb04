"""A second device of an account for in-process tests, made as linking makes it, at once.

`provision` and `open_linked` stand in for `pigeon link` / `pigeon device add` in the fan-out
tests (tests/test_fanout.py), which need linked devices in every test and want them without
a link stream and a history transfer each; linking itself is tested for real in
tests/test_linking.py, tests/test_cli_linking.py and tests/test_multidevice_acceptance.py. They
do what provisioning does (PROTOCOL.md section 25) except queue the new device's own device
list (section 25.2, step 7):
the existing device adds the new one to the account's device list with its real binding
(`Node.add_device`, which sends the new list to every contact), and the new device gets the
account's identity key and a fresh device key of its own, the contacts with their devices and
device lists, the account's other devices and the new device list.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from node import Node
from node.device.datadir import DataDir
from node.device.node import init_data_dir
from node.device.storage import Database
from node.protocol.devicelist import DeviceEntry
from tests.conftest import open_node


def provision(first: Node, path: Path, name: str, *, relays: Sequence[str] = ()) -> str:
    """A data directory at `path` for a new device of `first`'s account (whose relays are
    `relays`), added to the account by `first`, with what provisioning hands over; returns its
    peer id. Where it listens is told to `first` once it runs (`open_linked`)."""
    init_data_dir(path, display_name=name)
    target = DataDir(path)
    shutil.copyfile(first.data_dir.identity_file, target.identity_file)
    identity, device = target.load_keys()
    first.add_device(DeviceEntry.make(device, identity.public), relays=relays)
    source = first._db
    now = first._clock.now_ms()
    db = Database.open(target.database_file)
    try:
        with db.transaction():
            for contact in source.contacts():
                copy = db.add_contact(contact.name, contact.account, now_ms=contact.added_at_ms)
                for d in source.devices(contact.id):
                    db.put_device(copy.id, d.device, d.peer_id, d.addrs, relays=d.relays,
                                  seen_at_ms=d.seen_at_ms, now_ms=now)
                stored = source.device_list(contact.account)
                if stored is not None:
                    db.put_device_list(contact.account, *stored)
            account = identity.public.to_bytes()
            own = db.own_contact(account, now_ms=now)
            db.put_device(own.id, first._device.public.to_bytes(), first.peer_id,
                          first.contact_addresses(), relays=first.relays, seen_at_ms=0,
                          now_ms=now)
            for d in source.devices(first._account_devices.own.id):
                if d.device != device.public.to_bytes():
                    db.put_device(own.id, d.device, d.peer_id, d.addrs, relays=d.relays,
                                  seen_at_ms=d.seen_at_ms, now_ms=now)
            stored = source.device_list(account)
            assert stored is not None
            db.put_device_list(account, *stored)
    finally:
        db.close()
    return device.public.peer_id()


@asynccontextmanager
async def open_linked(first: Node, path: Path, name: str,
                      **changes: Any) -> AsyncIterator[Node]:
    """A running new device of `first`'s account (see the module's docstring); `first` learns
    where it listens once it does."""
    peer_id = provision(first, path, name, relays=changes.get("relays", ()))
    async with open_node(path, name, **changes) as node:
        own = first._account_devices.own
        row = first._db.device_by_peer_id(peer_id)
        assert row is not None
        first._db.put_device(own.id, row.device, peer_id, node.contact_addresses(),
                             seen_at_ms=row.seen_at_ms, now_ms=first._clock.now_ms())
        yield node
