"""Finding contacts without pasting addresses: on the LAN over mDNS, anywhere through the DHT.

- `Directory` publishes this device in the DHT (an account record listing its devices and a
  device record with its addresses, relays and a prekey bundle; PROTOCOL.md "DHT records"),
  republishes them before they expire and whenever what they say changes, and looks up other
  accounts and devices (fresh lookups; the newest valid record wins).
- `LanDiscovery` listens for devices announced over mDNS. A device of a known contact is dialed
  at once (the Noise handshake proves it is that device, whatever the announcement claimed), so
  queued messages flow; unknown peers are ignored, never dialed. Announced addresses are only
  dialed, never stored: anyone on the LAN can announce anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

from node.clock import Clock
from node.device.config import Config
from node.device.session_store import SessionStore
from node.device.storage import Database
from node.errors import InvalidRecord, NodeError, TransportError
from node.net import Transport
from node.net.dht import Dht
from node.net.mdns import MdnsDiscovery
from node.protocol.devicelist import DeviceEntry
from node.protocol.directory import (
    RECORD_LIFETIME_S,
    REPUBLISH_INTERVAL_S,
    AccountRecord,
    DeviceRecord,
    account_key,
    device_key,
)
from node.protocol.keys import DeviceKey, DeviceKeyPair, IdentityKey, IdentityKeyPair

log = logging.getLogger("pigeon.discovery")

__all__ = ["Directory", "LanDiscovery"]

#: After a failed publish (no DHT peer reachable yet), try again this soon.
PUBLISH_RETRY_S = 30.0


class Directory:
    """This device's records in the DHT, and lookups of others'."""

    def __init__(self, dht: Dht, *, db: Database, identity: IdentityKeyPair,
                 device: DeviceKeyPair, sessions: SessionStore,
                 addresses: Callable[[], Sequence[str]], relays: Callable[[], Sequence[str]],
                 clock: Clock, devices: Callable[[], Sequence[DeviceEntry]] | None = None
                 ) -> None:
        self.dht = dht
        #: The account's devices, as the account record lists them (PROTOCOL.md section 25.4):
        #: every device of our device list with its binding; just this one without it.
        self.devices = devices or (lambda: (DeviceEntry.make(device, identity.public),))
        self.clock = clock
        self.db = db
        self.identity = identity
        self.device = device
        self.sessions = sessions
        self.addresses = addresses
        self.relays = relays  # ours as they are now (they may change: PROTOCOL.md section 28.3)
        self._changed = trio.Event()
        self.published: DeviceRecord | None = None


    def changed(self) -> None:
        """What the records say changed (addresses, relays): publish again soon."""
        self._changed.set()

    async def run(self) -> None:
        """Publish now, then again every REPUBLISH_INTERVAL_S or when something changed."""
        while True:
            self._changed = trio.Event()
            try:
                await self.publish()
                wait: float = REPUBLISH_INTERVAL_S
            except NodeError as exc:
                log.info("publishing in the DHT failed (%s); retrying", exc)
                wait = PUBLISH_RETRY_S
            with trio.move_on_after(wait):
                await self._changed.wait()

    async def publish(self) -> int:
        """Sign and store both records; returns how many peers took the device record."""
        now_ms = self.clock.now_ms()
        now = now_ms // 1000
        # One sequence with the `ts` of our intros: a contact compares the two to keep the
        # newer (PROTOCOL.md sections 21 "Where a device is" and 23.6).
        seq = self.db.next_location_stamp(now_ms)
        expires = now + RECORD_LIFETIME_S
        bundle = self.sessions.prekeys.bundle(self.identity, self.device, seq=seq,
                                              expires=expires, one_time=False)
        # Every device with its binding (PROTOCOL.md section 4 "Binding"), as our device list
        # has them.
        entries = tuple(self.devices())
        account = AccountRecord(identity=self.identity.public,
                                devices=tuple(e.device for e in entries),
                                bindings=tuple(e.binding for e in entries), seq=seq,
                                expires=expires)
        record = DeviceRecord(identity=self.identity.public, device=self.device.public,
                              addrs=tuple(self.addresses())[:16], relays=tuple(self.relays())[:16],
                              bundle=bundle, seq=seq, expires=expires)
        await self.dht.put(account.key, account.sign(self.identity))
        stored = await self.dht.put(record.key, record.sign(self.identity))
        self.published = record
        log.info("published in the DHT (seq %d, %d addresses, %d peers took it)", seq,
                 len(record.addrs), stored)
        return stored

    async def resolve_account(self, identity: IdentityKey) -> AccountRecord | None:
        value = await self.dht.get(account_key(identity))
        return None if value is None else _verified(AccountRecord, value, self.clock.now_s())

    async def resolve_device(self, identity: IdentityKey, device: DeviceKey) -> DeviceRecord | None:
        """The device record of `device` of the account `identity` (its DHT key needs both,
        PROTOCOL.md section 23.2), or None."""
        value = await self.dht.get(device_key(identity, device))
        record = None if value is None else _verified(DeviceRecord, value, self.clock.now_s())
        if record is not None and (record.identity, record.device) != (identity, device):
            return None  # the key derivation makes this impossible for a valid record
        return record


_Record = TypeVar("_Record", AccountRecord, DeviceRecord)


def _verified(cls: type[_Record], value: bytes, now: int) -> _Record | None:
    try:
        return cls.verify(value, now)
    except InvalidRecord as exc:  # the DHT layer validated it; time may have passed since
        log.info("DHT record no longer valid: %s", exc)
        return None


class LanDiscovery:
    """mDNS on the configured interfaces: dial the contacts' devices it finds."""

    def __init__(self, *, transport: Transport, config: Config, db: Database,
                 addresses: Callable[[], list[str]]) -> None:
        self.transport = transport
        self.config = config
        self.db = db
        self.addresses = addresses
        self._mdns: MdnsDiscovery | None = None

    async def update_addresses(self) -> None:
        if self._mdns is not None:
            await self._mdns.update_addresses(self.addresses())

    async def run(self) -> None:
        interfaces = list(self.config.mdns_interfaces) or None
        try:
            async with MdnsDiscovery.open(self.transport.peer_id, self.addresses(),
                                          interfaces=interfaces,
                                          announce=self.config.mdns_announce) as mdns:
                self._mdns = mdns
                async with trio.open_nursery() as nursery:
                    async for peer in mdns.found():
                        if self.db.device_by_peer_id(peer.peer_id) is None:
                            continue  # not a contact's device: never dialed
                        nursery.start_soon(self._dial, peer.peer_id, peer.addresses)
        except (OSError, NodeError) as exc:
            log.warning("LAN discovery unavailable: %s", exc)
        finally:
            self._mdns = None

    async def _dial(self, peer_id: str, addresses: Sequence[str]) -> None:
        if self.transport.is_connected(peer_id):
            return
        try:
            # The connection event wakes the device's delivery lane.
            await self.transport.connect(peer_id, addresses,
                                         timeout=self.config.connect_timeout_s)
            log.info("found %s on the LAN", peer_id)
        except TransportError as exc:
            log.debug("LAN peer %s not reachable: %s", peer_id, exc)
