"""The account's own devices: this device's copy of the signed device list, and the changes to
it (PROTOCOL.md section 25.1).

Every device of an account holds the account key, so each keeps the newest device list it has
seen (`device_lists` table) and any of them can sign the next version: a device being linked is
added by the device that approves it, a device is removed from any device. Our other devices are
rows of `devices` under the hidden own-account contact (`Database.own_contact`), so reaching them
works as for a contact's devices.

This class changes the list and stores it; telling contacts and our other devices about a new
version is the caller's business (it publishes `DeviceAdded` / `DeviceRemoved`).
"""

from __future__ import annotations

from collections.abc import Iterable

from node.clock import Clock
from node.device.storage import Contact, Database
from node.errors import DeviceError, InvalidRecord
from node.protocol.devicelist import DEVICE_LIST_LIFETIME_S, DeviceEntry, DeviceList
from node.protocol.directory import MAX_DEVICES, next_seq
from node.protocol.keys import DeviceKey, DeviceKeyPair, IdentityKeyPair

__all__ = ["AccountDevices"]


class AccountDevices:
    """This account's device list as this device knows it. Synchronous (database calls only)."""

    def __init__(self, *, db: Database, identity: IdentityKeyPair, device: DeviceKeyPair,
                 clock: Clock) -> None:
        self._db = db
        self._identity = identity
        self._device = device
        self._clock = clock
        self.own: Contact = db.own_contact(identity.public.to_bytes(), now_ms=clock.now_ms())
        self._list = self._load_or_create()

    @property
    def current(self) -> DeviceList:
        """The newest version of the list this device has."""
        return self._list

    def signed(self) -> bytes:
        """The stored signed bytes of the current list (what is handed to others)."""
        stored = self._db.device_list(self._identity.public.to_bytes())
        assert stored is not None  # stored by _load_or_create before anything can ask
        return stored[1]

    def others(self) -> tuple[DeviceKey, ...]:
        """The account's devices other than this one."""
        return tuple(d for d in self._list.devices if d != self._device.public)

    def add(self, entry: DeviceEntry, *, peer_id: str, addrs: Iterable[str],
            relays: Iterable[str] = ()) -> DeviceList:
        """Sign and store the next version with `entry` added, and remember where the device
        is. DeviceError if the account already has MAX_DEVICES devices or the binding does not
        verify (nothing changes then)."""
        if entry.device in self._list:
            raise DeviceError(f"device {peer_id} is already in this account")
        if len(self._list.entries) >= MAX_DEVICES:
            raise DeviceError(f"this account already has {MAX_DEVICES} devices, the most it may"
                              " have: remove one first (`pigeon device remove`)")
        try:
            new = self._list.with_device(entry, **self._next_version())
            signed = new.sign(self._identity)  # verifies every binding
        except (ValueError, InvalidRecord) as exc:
            raise DeviceError(f"cannot add device {peer_id}: {exc}") from exc
        now_ms = self._clock.now_ms()
        with self._db.transaction():
            self._db.put_device(self.own.id, entry.device.to_bytes(), peer_id, addrs,
                                relays=relays, binding=entry.binding, seen_at_ms=0,
                                now_ms=now_ms)
            self._store(new, signed)
        return new

    def remove(self, device: DeviceKey) -> DeviceList:
        """Sign and store the next version without `device`, and forget how to reach it.
        DeviceError if it is not in the list or is this device (leave by removing it from
        another device)."""
        if device == self._device.public:
            raise DeviceError("this device cannot remove itself; remove it from another device"
                              " of the account")
        if device not in self._list:
            raise DeviceError(f"device {device.peer_id()} is not in this account")
        new = self._list.without_device(device, **self._next_version())
        signed = new.sign(self._identity)
        with self._db.transaction():
            self._db.remove_device(device.to_bytes())
            self._store(new, signed)
        return new

    def accept(self, data: bytes) -> DeviceList | None:
        """Adopt a device list another device of the account signed, if it is newer than ours;
        returns it then, None when it is not newer. InvalidRecord if it does not verify or is
        not this account's."""
        received = DeviceList.verify(data, now=self._clock.now_s())
        if received.identity != self._identity.public:
            raise InvalidRecord("a device list of another account")
        if received.seq <= self._list.seq:
            return None
        with self._db.transaction():
            for gone in set(self._list.devices) - set(received.devices):
                self._db.remove_device(gone.to_bytes())
            self._store(received, data)
        return received

    def _next_version(self) -> dict[str, int]:
        now_s = self._clock.now_s()
        return {"seq": next_seq(self._clock.now_ms(), self._list.seq),
                "expires": now_s + DEVICE_LIST_LIFETIME_S}

    def _store(self, new: DeviceList, signed: bytes) -> None:
        self._db.put_device_list(self._identity.public.to_bytes(), new.seq, signed)
        self._list = new

    def _load_or_create(self) -> DeviceList:
        """The stored list, re-signed (same devices, higher seq) when half its lifetime has
        passed; a first list of just this device when there is none (a new data dir, or one
        made before multi-device accounts)."""
        account = self._identity.public.to_bytes()
        stored = self._db.device_list(account)
        now_s = self._clock.now_s()
        if stored is None:
            new = DeviceList.first(self._identity, self._device, **self._first_version())
        else:
            seq, data = stored
            # Our own list was verified when it was stored; one that expired while this device
            # was off is checked as of when it was signed (its seq is unix ms, section 25.1).
            current = DeviceList.verify(data, now=min(now_s, seq // 1000))
            if current.expires - now_s > DEVICE_LIST_LIFETIME_S // 2:
                return current
            self._list = current
            new = DeviceList(identity=current.identity, entries=current.entries,
                             **self._next_version())
        with self._db.transaction():
            self._db.put_device_list(account, new.seq, new.sign(self._identity))
        return new

    def _first_version(self) -> dict[str, int]:
        return {"seq": next_seq(self._clock.now_ms()),
                "expires": self._clock.now_s() + DEVICE_LIST_LIFETIME_S}
