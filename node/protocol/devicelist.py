"""The account's device list: which devices belong to an account, signed and versioned
(PROTOCOL.md section 25.1 "Device list").

    device list, kind "device-list", a signed record (records.py envelope) by the account key IK
        body = {"kind", "ik", "seq", "exp",
                "devices": [+ {"dev": bstr .size 32,      a device key DK
                               "bind": bstr .size 64}]}   DK's binding to IK (section 4, "Binding")

Every device of the account holds IK, so any of them can sign a new version (adding or removing a
device); `seq` orders versions and the highest one wins everywhere (a contact, another device of
the account, a DHT reader). A list names 1 to MAX_DEVICES devices, each once, each with a binding
that verifies: IK vouches for every device and every device for IK.

A device list travels in sessions (contacts learn new devices from it) and is kept by receivers
long after it was signed, so its expiry is the general record bound (MAX_RECORD_LIFETIME_S), not
the DHT's: a publisher re-signs its list (same devices, higher seq) before half of that passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Self

from node.errors import DecodeError, InvalidRecord
from node.protocol.binding import sign_binding, verify_binding
from node.protocol.directory import MAX_DEVICES
from node.protocol.keys import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    DeviceKey,
    DeviceKeyPair,
    IdentityKey,
    IdentityKeyPair,
)
from node.protocol.limits import MAX_RECORD_LIFETIME_S
from node.protocol.records import MAX_SEQ, open_record, sign_record

__all__ = ["DEVICE_LIST_KIND", "DEVICE_LIST_LIFETIME_S", "DeviceEntry", "DeviceList"]

DEVICE_LIST_KIND: Final = "device-list"

#: Validity a publisher gives its device list (exp = now + this): the longest any record may claim
#: minus a day of clock skew, so a list signed on a fast clock is not refused as over-long.
DEVICE_LIST_LIFETIME_S: Final = MAX_RECORD_LIFETIME_S - 24 * 3600


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """One device of the list: its key and its binding to the account."""

    device: DeviceKey
    binding: bytes

    @classmethod
    def make(cls, device: DeviceKeyPair, identity: IdentityKey) -> Self:
        """The entry for a device whose private key we hold (it signs its own binding)."""
        return cls(device.public, sign_binding(device, identity))


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceList:
    """A verified (or about to be signed) version of an account's device list."""

    identity: IdentityKey
    entries: tuple[DeviceEntry, ...]
    seq: int
    expires: int

    def __post_init__(self) -> None:
        if not 0 <= self.seq <= MAX_SEQ:
            raise ValueError("seq out of range")
        if not 1 <= len(self.entries) <= MAX_DEVICES:
            raise ValueError(f"a device list names 1 to {MAX_DEVICES} devices")
        if len({e.device for e in self.entries}) != len(self.entries):
            raise ValueError("a device list names each device once")

    @property
    def devices(self) -> tuple[DeviceKey, ...]:
        """The device keys, in list order."""
        return tuple(e.device for e in self.entries)

    def __contains__(self, device: object) -> bool:
        return any(e.device == device for e in self.entries)

    def sign(self, identity: IdentityKeyPair) -> bytes:
        """The signed record bytes; ValueError unless `identity` is the list's own account key.
        Every binding is checked first, so a list this device signs is one others accept."""
        if identity.public != self.identity:
            raise ValueError("a device list is signed by its own account key")
        for entry in self.entries:
            verify_binding(entry.device, self.identity, entry.binding)
        return sign_record(identity, {
            "kind": DEVICE_LIST_KIND,
            "seq": self.seq,
            "exp": self.expires,
            "devices": [{"dev": e.device.to_bytes(), "bind": e.binding} for e in self.entries],
        })

    @classmethod
    def verify(cls, data: bytes, *, now: int) -> Self:
        """Decode and verify a signed device list at `now` (unix seconds), every binding
        included; InvalidRecord for anything wrong."""
        record = open_record(data, kind=DEVICE_LIST_KIND, now=now)
        f = record.fields
        try:
            raw = f.list("devices", max_items=MAX_DEVICES)
            f.done()
            entries = []
            for item in raw:
                if not isinstance(item, dict) or set(item) != {"dev", "bind"}:
                    raise DecodeError("a device entry is a map of dev and bind")
                dev, bind = item["dev"], item["bind"]
                if not isinstance(dev, bytes) or len(dev) != KEY_BYTES:
                    raise DecodeError("dev must be a 32-byte key")
                if not isinstance(bind, bytes) or len(bind) != SIGNATURE_BYTES:
                    raise DecodeError("bind must be a 64-byte signature")
                entries.append(DeviceEntry(DeviceKey.from_bytes(dev), bind))
            result = cls(identity=record.signer, entries=tuple(entries), seq=record.seq,
                         expires=record.expires)
        except (DecodeError, ValueError) as exc:
            raise InvalidRecord(f"malformed device list: {exc}") from exc
        for entry in result.entries:
            try:
                verify_binding(entry.device, result.identity, entry.binding)
            except InvalidRecord as exc:
                raise InvalidRecord(
                    f"device list names {entry.device.peer_id()} without its binding") from exc
        return result

    def with_device(self, entry: DeviceEntry, *, seq: int, expires: int) -> Self:
        """The next version with `entry` added (or its binding replaced); ValueError when the
        list is full."""
        others = tuple(e for e in self.entries if e.device != entry.device)
        if len(others) >= MAX_DEVICES:
            raise ValueError(f"an account has at most {MAX_DEVICES} devices")
        return type(self)(identity=self.identity, entries=(*others, entry), seq=seq,
                          expires=expires)

    def without_device(self, device: DeviceKey, *, seq: int, expires: int) -> Self:
        """The next version without `device`; ValueError if it is not listed or is the last."""
        entries = tuple(e for e in self.entries if e.device != device)
        if len(entries) == len(self.entries):
            raise ValueError("that device is not in the account's device list")
        return type(self)(identity=self.identity, entries=entries, seq=seq, expires=expires)

    @classmethod
    def first(cls, identity: IdentityKeyPair, device: DeviceKeyPair, *, seq: int,
              expires: int) -> Self:
        """An account's first list: the one device that created it."""
        return cls(identity=identity.public, entries=(DeviceEntry.make(device, identity.public),),
                   seq=seq, expires=expires)

