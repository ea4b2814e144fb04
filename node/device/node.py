"""`Node`: one device's Pigeon node, as an async context manager owning one nursery.

    async with Node.open(data_dir, Config()) as node:
        message_id = await node.send("bob", "hello")
        async for event in node.events():
            ...

Everything the node does for the user goes through here: contacts and invites, sending, history,
status and events. The work is done by the pieces it wires together: `Transport` (libp2p),
`Database` (SQLite), `SessionStore` (crypto state), `Outbound` (delivery lanes) and `Inbound`
(receiving).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from node.clock import Clock, SystemClock, TrioClock
from node.device.bundles import BundleServer, checked_dht_record, fetch_device_record
from node.device.config import (
    BUNDLE_STREAMS_PER_ADDRESS,
    BUNDLE_STREAMS_PER_PEER,
    BUNDLE_STREAMS_TOTAL,
    MAX_SEND_MANY,
    MAX_TEXT_BYTES,
    MSG_STRANGER_STREAMS,
    MSG_STREAMS_PER_ADDRESS,
    MSG_STREAMS_PER_PEER,
    MSG_STREAMS_TOTAL,
    Config,
)
from node.device.datadir import DataDir
from node.device.discovery import Directory, LanDiscovery
from node.device.eventbus import EventBus, Subscription
from node.device.events import ContactOffline, ContactOnline, MessageDelivered, MessageFailed
from node.device.inbound import Inbound, clean_name
from node.device.outbound import Outbound, intro_body
from node.device.relay_client import Depositor, RelayInbox, RelayState
from node.device.session_store import SessionStore
from node.device.storage import Contact, Database, MessageRow, NewMessage
from node.errors import (
    ContactError,
    DecodeError,
    InvalidMessage,
    InviteError,
    NotRunning,
    TransportError,
)
from node.net import MSG_PROTOCOL, FrameStream, StreamCaps, Transport, configure_libp2p_logging
from node.net.addresses import dialable
from node.net.dht import Dht, open_pigeon_dht
from node.protocol.bundle import BUNDLE_PROTOCOL, MAX_BUNDLE_REPLY_BYTES
from node.protocol.fingerprint import SafetyNumber
from node.protocol.invite import Invite, ShortInvite, parse_invite, short_addresses
from node.protocol.keys import DeviceKey, DeviceKeyPair, IdentityKey, IdentityKeyPair
from node.protocol.records import PreKeyBundle

log = logging.getLogger("pigeon.node")

#: Contacts' devices a node connects to when it starts (so they learn it is back), and how many
#: of those dials run at once: bounded so a node with many contacts does not storm the network.
GREET_MAX_DEVICES = 256
GREET_CONCURRENCY = 8

#: Where the throwaway deposit identity listens (py-libp2p dials only the kinds a host listens on).
DEPOSIT_LISTEN = ("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0/ws")

#: Inbound stream caps of the message and bundle protocols (node/device/config.py); contacts'
#: devices are never counted with strangers.
_MSG_CAPS = StreamCaps(per_peer=MSG_STREAMS_PER_PEER,
                       per_address=MSG_STREAMS_PER_ADDRESS,
                       strangers=MSG_STRANGER_STREAMS, total=MSG_STREAMS_TOTAL)
_BUNDLE_CAPS = StreamCaps(per_peer=BUNDLE_STREAMS_PER_PEER,
                          per_address=BUNDLE_STREAMS_PER_ADDRESS,
                          strangers=BUNDLE_STREAMS_TOTAL,
                          total=BUNDLE_STREAMS_TOTAL)

__all__ = ["ContactInfo", "ContactStatus", "HistoryEntry", "Node", "Status", "init_data_dir"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ContactInfo:
    name: str
    account_id: str
    peer_ids: tuple[str, ...]
    addrs: tuple[str, ...]
    online: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryEntry:
    message_id: str
    direction: str  # "in" | "out"
    text: str
    sent_at_ms: int
    received_at_ms: int | None
    state: str  # out: pending | sent | delivered | failed; in: received
    error: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ContactStatus:
    name: str
    online: bool
    path: str | None  # "direct", "relayed" or None when not connected
    pending: int  # messages not yet written to the device nor left at its relays
    sent: int  # written to the device, waiting for the end-to-end ack
    relayed: int  # held by the device's relays, waiting for its receipt
    last_error: str | None
    #: Why the direct path to the contact is down (a dial failed, no ack or ping answer in
    #: time...); None while a path is open or before any failure.
    path_down: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Status:
    account_id: str
    peer_id: str
    addresses: tuple[str, ...]
    contacts: tuple[ContactStatus, ...]
    relays: tuple[RelayState, ...]  # this device's own relays
    connected_peers: int  # libp2p connections open now (contacts, relays, DHT peers)
    storage_error: str | None = None  # why the database failed last (e.g. the disk is full)


def init_data_dir(data_dir: Path | str, *, display_name: str = "",
                  clock: Clock | None = None) -> tuple[str, str]:
    """Create keys and database in `data_dir`; returns (account id, peer id). DataDirError if it
    already holds an identity. `clock` dates the first prekeys (the system's by default: this
    runs outside trio too, for `pigeon init`)."""
    dd = DataDir(data_dir)
    dd.lock()
    try:
        identity, device = dd.create_keys()
        db = Database.open(dd.database_file, create=True)
        try:
            SessionStore(db, identity, device, now=(clock or SystemClock()).now_s())
            if display_name:
                db.set_meta("display_name", clean_name(display_name))
        finally:
            db.close()
    finally:
        dd.unlock()
    return identity.public.account_id(), device.public.peer_id()


class Node:
    """A running node. Create with `Node.open()`; everything else is valid only inside it."""

    def __init__(self, *, data_dir: DataDir, config: Config, db: Database,
                 identity: IdentityKeyPair, device: DeviceKeyPair, sessions: SessionStore,
                 transport: Transport, deposit_transport: Transport, clock: Clock,
                 dht: Dht | None = None) -> None:
        self.data_dir = data_dir
        self._clock = clock
        self.config = config
        self._db = db
        self._identity = identity
        self._device = device
        self._sessions = sessions
        self._transport = transport
        self._bus = EventBus()
        self._open = True
        self._last_sent_at = db.last_sent_at()
        depositor = Depositor(transport=deposit_transport, identity=identity, device=device,
                              config=config)
        self._outbound = Outbound(db=db, sessions=sessions, transport=transport, bus=self._bus,
                                  config=config, clock=clock,
                                  intro_addrs=self.contact_addresses, depositor=depositor,
                                  refresh_device=self._refresh_device if dht else None)
        self._inbound = Inbound(db=db, sessions=sessions, bus=self._bus, clock=clock,
                                on_device_active=self._outbound.kick,
                                disconnect=self._disconnect_quietly,
                                on_receipt=self._outbound.record_delivered)
        self._inboxes = [RelayInbox(address, transport=transport, device=device,
                                    inbound=self._inbound, config=config)
                         for address in config.relays]
        self._directory = Directory(
            dht, db=db, identity=identity, device=device, sessions=sessions,
            addresses=self.contact_addresses, relays=config.relays, clock=clock) if dht else None
        self._bundles = BundleServer(db=db, identity=identity, device=device, sessions=sessions,
                                     addresses=self.contact_addresses, relays=config.relays,
                                     clock=clock)
        self._lan = LanDiscovery(transport=transport, config=config, db=db,
                                 addresses=self.contact_addresses) if config.mdns else None
        # relay peer id -> relayed addresses of our reservation there (NAT traversal)
        self._circuit_addrs: dict[str, list[str]] = {}
        self._reservation_lost: dict[str, trio.Event] = {}

    # --- lifecycle ----------------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(cls, data_dir: Path | str, config: Config | None = None, *,
                   create: bool = False, clock: Clock | None = None) -> AsyncIterator[Node]:
        """Open the node in `data_dir` (creating keys and database first if `create`), start
        listening and delivering, and close everything when the block ends.

        `clock` is the node's one clock (node.clock); the default reads trio's clock, so a test
        under trio's `autojump_clock` drives every timer of the node.

        Raises DataDirLocked if another process uses the directory, DataDirError if it is not
        initialised or is damaged, TransportError if it cannot listen.
        """
        config = config or Config()
        clock = clock or TrioClock()
        dd = DataDir(data_dir)
        if create and not dd.is_initialized():
            init_data_dir(dd.path, display_name=config.display_name, clock=clock)
        dd.lock()
        try:
            identity, device = dd.load_keys()
            db = Database.open(dd.database_file, durability=config.durability)
            try:
                sessions = SessionStore(db, identity, device, now=clock.now_s())
                # libp2p logs expected failures (a dial to a stopped peer) at ERROR; Pigeon logs
                # what matters on its own loggers, so libp2p speaks only when debugging.
                configure_libp2p_logging(
                    logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL)
                async with (
                    _open_transport(db, device, config, clock) as transport,
                    # Deposits at contacts' relays go out from a throwaway identity, so a relay
                    # cannot link them to this device (PROTOCOL.md "Relay mailbox").
                    Transport.open(os.urandom(32), DEPOSIT_LISTEN,
                                   clock=clock) as deposit_transport,
                    _open_dht(transport, config, clock) as dht,
                ):
                    node = cls(data_dir=dd, config=config, db=db, identity=identity,
                               device=device, sessions=sessions, transport=transport,
                               deposit_transport=deposit_transport, clock=clock, dht=dht)
                    async with node._running():
                        yield node
            finally:
                db.close()
        finally:
            dd.unlock()

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._outbound.run)
                self._transport.set_stream_handler(MSG_PROTOCOL, self._inbound.handle_stream,
                                                   caps=_MSG_CAPS, is_member=self._is_contact)
                self._transport.set_stream_handler(BUNDLE_PROTOCOL, self._bundles.handle_stream,
                                                   max_frame_bytes=MAX_BUNDLE_REPLY_BYTES,
                                                   caps=_BUNDLE_CAPS, is_member=self._is_contact)
                unsubscribe = self._transport.on_connection_change(self._on_connection)
                nursery.start_soon(self._greet_contacts)
                for inbox in self._inboxes:
                    nursery.start_soon(inbox.run)
                if self._directory is not None:
                    nursery.start_soon(self._directory.run)
                if self._lan is not None:
                    nursery.start_soon(self._lan.run)
                if self.config.relay_reservations:
                    unsubscribe_lost = self._transport.on_reservation_lost(self._on_reservation_lost)
                    for relay in self.config.relays:
                        nursery.start_soon(self._keep_reservation, relay)
                else:
                    unsubscribe_lost = _nothing
                try:
                    yield
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    self._open = False
                    unsubscribe()
                    unsubscribe_lost()
                    self._transport.remove_stream_handler(MSG_PROTOCOL)
                    self._transport.remove_stream_handler(BUNDLE_PROTOCOL)
                    self._bus.close()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Hand the caller back its own exception rather than trio's group around it.
            if body_error is not None and group.split(lambda e: e is body_error)[1] is None:
                raise body_error from None
            raise

    def _check_open(self) -> None:
        if not self._open:
            raise NotRunning("the node is closed; use it inside `async with Node.open(...)`")

    # --- identity ---------------------------------------------------------------------------------

    @property
    def account_id(self) -> str:
        return self._identity.public.account_id()

    @property
    def peer_id(self) -> str:
        return self._device.public.peer_id()

    @property
    def display_name(self) -> str:
        return self.config.display_name or str(self._db.get_meta("display_name", "") or "")

    def addresses(self) -> list[str]:
        """Addresses others can dial, each ending in /p2p/<peer id>: the listen addresses
        (listening on 0.0.0.0 expands to each interface), then the relayed addresses of our
        circuit relay reservations (NAT traversal)."""
        relayed = [a for addrs in self._circuit_addrs.values() for a in addrs]
        return [*dialable(self._transport.listen_addrs()), *relayed]

    def contact_addresses(self) -> list[str]:
        """`addresses()` without our own /p2p/ suffix, as contacts are told them (invites,
        intros, the DHT): the device key is carried anyway, and shorter text keeps an invite fit
        for a QR code."""
        return [a.rsplit("/p2p/", 1)[0] for a in self.addresses()]

    # --- contacts -----------------------------------------------------------------------------------

    def invite(self, *, addresses: bool = True, short: bool = False) -> str:
        """A one-line invite: whoever uses it (`add_contact`) becomes a contact. Valid for
        `Config.invite_lifetime_s`, usable by several people. With `addresses=False` it carries
        no address of this device (nothing about where it is): the new contact finds it through
        discovery (LAN, DHT) or its relays.

        With `short`, a short invite (PROTOCOL.md section 14.1, a few hundred characters, fits
        a QR code): it leaves out the prekey bundle, which the joiner fetches from this device
        (`add_contact_from_invite`) or the DHT, so this node must be running then."""
        self._check_open()
        now = self._clock.now_s()
        expires = now + self.config.invite_lifetime_s
        token = os.urandom(16)
        if short:
            if not addresses and self._directory is None:
                raise InviteError("a short invite without addresses can only be used through"
                                  " the DHT, which is not configured (give bootstrap peers)")
            self._db.add_invite(token, now_ms=now * 1000, expires_ms=expires * 1000)
            return ShortInvite(
                identity=self._identity.public, device=self._device.public,
                addrs=short_addresses(self.contact_addresses()) if addresses else (),
                token=token, seq=now, expires=expires).to_text(self._identity)
        bundle = self._sessions.prekeys.bundle(
            self._identity, self._device.public, seq=now, expires=expires, one_time=False)
        self._db.add_invite(token, now_ms=now * 1000, expires_ms=expires * 1000)
        invite = Invite(identity=self._identity.public, device=self._device.public,
                        name=self.display_name,
                        addrs=tuple(self.contact_addresses()) if addresses else (),
                        relays=self.config.relays, bundle=bundle, token=token, seq=now,
                        expires=expires)
        return invite.to_text(self._identity)

    def add_contact(self, name: str, invite_text: str) -> ContactInfo:
        """Add the person behind `invite_text` as contact `name`, start an end-to-end session
        with their device and introduce ourselves (queued like a message).

        InviteError for a malformed, tampered or expired invite, and for a short invite (its keys
        must be fetched first: `add_contact_from_invite` takes both forms); ContactError if the name is
        taken by someone else (names compare case-insensitively), or if the account is already a
        contact under another name (`rename_contact` changes a name). Adding a contact again
        under its own name refreshes their addresses.
        """
        self._check_open()
        name = _valid_name(name)
        invite = Invite.from_text(invite_text, now=self._clock.now_s())
        if invite.identity == self._identity.public:
            raise InviteError("this is your own invite")
        return self._adopt(name, invite.identity, [(invite.device, invite.addrs, invite.relays,
                                                     invite.bundle)], token=invite.token)

    async def add_contact_from_invite(self, name: str, invite_text: str) -> ContactInfo:
        """`add_contact` for either form of invite. For a short invite (PROTOCOL.md section
        14.1) it first fetches the inviter's signed device record, with its prekey bundle, from
        the inviting device (at the invite's addresses, through a relay circuit if one is
        listed) or else from the DHT, and checks that the invite's account signed it for the
        invite's device. InviteError says why when neither has it."""
        self._check_open()
        name = _valid_name(name)
        invite = parse_invite(invite_text, now=self._clock.now_s())
        if isinstance(invite, Invite):
            return self.add_contact(name, invite_text)
        if invite.identity == self._identity.public:
            raise InviteError("this is your own invite")
        try:
            record = await fetch_device_record(self._transport, invite, now=self._clock.now_s,
                                               timeout=self.config.connect_timeout_s * 2)
        except InviteError as exc:
            found = None
            if self._directory is not None:
                found = checked_dht_record(
                    await self._directory.resolve_device(invite.device), invite)
            if found is None:
                raise
            log.info("keys of %s from the DHT (%s)", invite.account_id, exc)
            record = found
        self._check_open()
        addrs = record.addrs or invite.addrs
        return self._adopt(name, invite.identity,
                           [(invite.device, addrs, record.relays, record.bundle)],
                           token=invite.token)

    async def add_contact_by_id(self, name: str, account_id: str) -> ContactInfo:
        """Add the account `account_id` as contact `name`, finding its devices, their addresses,
        relays and prekey bundles in the DHT; start sessions and introduce ourselves.

        ContactError if the id is malformed, the DHT is not configured, or the account is not
        found there. The other side accepts our messages once it has added us too (by id or from
        an invite of ours): nobody can write to a Pigeon user uninvited.
        """
        self._check_open()
        name = _valid_name(name)
        try:
            identity = IdentityKey.from_account_id(account_id)
        except DecodeError as exc:
            raise ContactError(f"not an account id: {exc}") from exc
        if identity == self._identity.public:
            raise ContactError("that is your own account")
        if self._directory is None:
            raise ContactError("finding contacts by account id needs the DHT: give bootstrap"
                               " peers (--bootstrap, or bootstrap in config.toml)")
        account = await self._directory.resolve_account(identity)
        if account is None or account.identity != identity:
            raise ContactError(f"account {account_id} was not found in the DHT")
        devices = []
        for device in account.devices:
            record = await self._directory.resolve_device(device)
            if record is not None and record.identity == identity:
                devices.append((record.device, record.addrs, record.relays, record.bundle))
        if not devices:
            raise ContactError(f"no reachable device of {account_id} is published in the DHT")
        self._check_open()
        return self._adopt(name, identity, devices, token=None)

    def _adopt(self, name: str, identity: IdentityKey,
               devices: Sequence[tuple[DeviceKey, Sequence[str], Sequence[str], PreKeyBundle]],
               *, token: bytes | None) -> ContactInfo:
        """Store the contact and its devices, start a session with each device that has none yet
        and queue our intro to it, all in one transaction."""
        account = identity.to_bytes()
        now = self._clock.now_ms()
        existing = self._db.contact_by_account(account)
        if existing is not None and existing.name != name:
            # Silently renaming would surprise (the history moves to the new name): say so.
            raise ContactError(
                f"this account is already your contact {existing.name!r}; to change the name: "
                f"pigeon contact rename {existing.name} {name}")
        self._check_name_free(name, account)
        started: list[bytes] = []
        try:
            with self._db.transaction():
                contact = existing or self._db.add_contact(name, account, now_ms=now)
                for device, addrs, relays, bundle in devices:
                    key = device.to_bytes()
                    self._db.put_device(contact.id, key, device.peer_id(), addrs, relays=relays,
                                        now_ms=now)
                    record = self._sessions.record(account, key)
                    if record.current is None:
                        started.append(key)
                        record.initiate(self._identity, bundle)
                        self._sessions.save(account, key)
                        intro: NewMessage = (os.urandom(16), "intro", intro_body(self.display_name, token),
                                 self._next_timestamp())
                        self._db.insert_outgoing(contact=contact, messages=[intro],
                                                 devices=[key], now_ms=now)
        except BaseException:
            self._sessions.forget([(account, key) for key in started])
            raise
        for device, _, _, _ in devices:
            self._outbound.kick(device.to_bytes())
        return self._contact_info(contact)

    def contacts(self) -> list[ContactInfo]:
        self._check_open()
        return [self._contact_info(c) for c in self._db.contacts()]

    def contact(self, name: str) -> ContactInfo:
        # Checked like every other public method: on a closed node the database is closed too,
        # and callers were getting a StorageError instead of NotRunning (found by
        # tests/test_node.py::test_using_the_node_after_its_block_raises_not_running).
        self._check_open()
        return self._contact_info(self._contact(name))

    def rename_contact(self, name: str, new_name: str) -> ContactInfo:
        """Give the contact `name` (matched as `contact` does) the name `new_name`; its history
        and sessions stay. ContactError if another contact has that name (in any case)."""
        self._check_open()
        contact = self._contact(name)
        new_name = _valid_name(new_name)
        self._check_name_free(new_name, contact.account)
        return self._contact_info(self._db.rename_contact(contact, new_name))

    def _check_name_free(self, name: str, account: bytes) -> None:
        """ContactError if a contact other than `account` is called `name`, ignoring case (two
        contacts told apart only by case would be a trap at the keyboard)."""
        folded = name.casefold()
        for other in self._db.contacts():
            if other.name.casefold() == folded and other.account != account:
                raise ContactError(f"a contact named {other.name!r} exists already")

    def remove_contact(self, name: str) -> None:
        """Forget a contact: devices, sessions, history and undelivered messages."""
        self._check_open()
        contact = self._contact(name)
        devices = self._db.devices(contact.id)
        self._db.remove_contact(contact)
        for d in devices:
            self._sessions.drop(contact.account, d.device)

    def safety_number(self, name: str) -> str:
        """The 60-digit safety number with a contact (compare it with theirs)."""
        self._check_open()  # NotRunning, not StorageError, once closed (see `contact`)
        contact = self._contact(name)
        return SafetyNumber.of(self._identity.public, IdentityKey(contact.account)).display()

    def _contact(self, name: str) -> Contact:
        """The contact called `name`: exactly, else ignoring case when that names just one;
        ContactError (with the closest names, if any) otherwise."""
        contact = self._db.contact_by_name(name)
        if contact is not None:
            return contact
        contacts = self._db.contacts()
        folded = [c for c in contacts if c.name.casefold() == name.casefold()]
        if len(folded) == 1:
            return folded[0]
        if folded:
            raise ContactError(f"no contact named {name!r}; did you mean "
                               + " or ".join(repr(c.name) for c in folded) + "?")
        close = difflib.get_close_matches(name.casefold(), [c.name.casefold() for c in contacts],
                                          n=3, cutoff=0.6)
        names = [c.name for f in close for c in contacts if c.name.casefold() == f]
        hint = ("; did you mean " + " or ".join(repr(n) for n in names) + "?") if names else ""
        raise ContactError(f"no contact named {name!r}{hint}")

    def _contact_info(self, contact: Contact) -> ContactInfo:
        devices = self._db.devices(contact.id)
        return ContactInfo(
            name=contact.name,
            account_id=IdentityKey(contact.account).account_id(),
            peer_ids=tuple(d.peer_id for d in devices),
            addrs=tuple(a for d in devices for a in d.addrs),
            online=any(self._transport.is_connected(d.peer_id) for d in devices),
        )

    # --- messages ---------------------------------------------------------------------------------

    async def send(self, contact: str, text: str) -> str:
        """Queue `text` for every device of `contact` and return the message id (hex).

        The message is on disk when this returns; delivery happens in the background (watch
        `events()` or `history()` for its state: pending, sent, delivered or failed).
        """
        return (await self.send_many(contact, [text]))[0]

    async def send_many(self, contact: str, texts: Sequence[str]) -> list[str]:
        """Queue several messages to `contact` in one transaction (one disk sync instead of one
        per message: the way to send in bulk). Returns their ids, in order; they are delivered in
        this order. All or none are queued."""
        self._check_open()
        if not 1 <= len(texts) <= MAX_SEND_MANY:
            raise InvalidMessage(f"send between 1 and {MAX_SEND_MANY} messages at once")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InvalidMessage("a message needs some text")
            if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
                raise InvalidMessage(f"message longer than {MAX_TEXT_BYTES} bytes")
        target = self._contact(contact)
        devices = self._db.device_keys(target.id)
        if not devices:
            raise ContactError(f"{contact!r} has no device to send to")
        messages: list[NewMessage] = [
            (os.urandom(16), "text", text, self._next_timestamp()) for text in texts]
        self._db.insert_outgoing(contact=target, messages=messages, devices=devices,
                                 now_ms=self._clock.now_ms())
        for device in devices:
            self._outbound.kick(device)
        await trio.lowlevel.checkpoint()
        return [message_id.hex() for message_id, _, _, _ in messages]

    def _next_timestamp(self) -> int:
        """Sender timestamps strictly increase per device, so histories order our messages
        exactly as we sent them."""
        self._last_sent_at = max(self._clock.now_ms(), self._last_sent_at + 1)
        return self._last_sent_at

    def history(self, contact: str, *, limit: int = 50) -> list[HistoryEntry]:
        """The last `limit` messages with `contact`, oldest first (by sender time)."""
        self._check_open()
        return [_entry(row) for row in self._db.history(self._contact(contact), limit=limit)]

    def message_state(self, message_id: str) -> str:
        self._check_open()  # NotRunning, not StorageError, once closed (see `contact`)
        row = self._db.message(bytes.fromhex(message_id))
        if row is None:
            raise InvalidMessage(f"no outgoing message {message_id}")
        return row.state

    async def wait_delivered(self, message_id: str, *, timeout: float) -> str:
        """Wait until the message is delivered or failed, or `timeout` seconds pass; returns its
        state then."""
        with self.events() as events, trio.move_on_after(timeout):
            state = self.message_state(message_id)
            while state not in ("delivered", "failed"):
                event = await events.__anext__()
                if isinstance(event, MessageDelivered | MessageFailed) and \
                        event.message_id == message_id:
                    break
        return self.message_state(message_id)

    def events(self) -> Subscription:
        """Subscribe to events from now on: `async for event in node.events():`. Use it as a
        context manager (`with node.events() as events:`) to unsubscribe when done."""
        self._check_open()
        return self._bus.subscribe()

    # --- status -----------------------------------------------------------------------------------

    def status(self) -> Status:
        self._check_open()
        counts: dict[str, dict[str, int]] = {}
        errors: dict[str, str | None] = {}
        for name, state, count, error in self._db.outbox_summary():
            counts.setdefault(name, {})[state] = count
            errors[name] = errors.get(name) or error
        lanes = self._outbound.status()
        contacts = []
        for contact in self._db.contacts():
            devices = self._db.devices(contact.id)
            online = any(self._transport.is_connected(d.peer_id) for d in devices)
            path = None
            if online:
                relayed = any(self._transport.connection_relayed(d.peer_id) for d in devices)
                path = "relayed" if relayed else "direct"
            # An error is news only while a path is still failing: a lane that opened a stream
            # since (no failures in a row) has recovered, whatever its last error was.
            failing = [lanes[d.device] for d in devices
                       if d.device in lanes and lanes[d.device].attempts > 0]
            recovered = not failing and any(d.device in lanes and lanes[d.device].connected
                                            for d in devices)
            last_error = None if recovered else (
                next((lane.last_error for lane in failing if lane.last_error), None)
                or errors.get(contact.name))
            down = None if path else next(
                (lanes[d.device].path_down for d in devices
                 if d.device in lanes and lanes[d.device].path_down), None)
            contacts.append(ContactStatus(
                name=contact.name, online=online, path=path,
                pending=counts.get(contact.name, {}).get("pending", 0),
                sent=counts.get(contact.name, {}).get("sent", 0),
                relayed=counts.get(contact.name, {}).get("relayed", 0),
                last_error=last_error, path_down=down))
        return Status(account_id=self.account_id, peer_id=self.peer_id,
                      addresses=tuple(self.addresses()), contacts=tuple(contacts),
                      relays=tuple(dataclasses.replace(i.state) for i in self._inboxes),
                      connected_peers=len(self._transport.connected_peers()),
                      storage_error=str(problem) if (problem := self._db.health.problem) else None)

    # --- connection events ------------------------------------------------------------------------

    async def _keep_reservation(self, relay: str) -> None:
        """Hold a circuit relay v2 slot on one of our relays, so that contacts who cannot dial
        us directly (NAT) reach us through it; advertise its address while we hold it."""
        relay_id = relay.rpartition("/p2p/")[2]
        attempts = 0
        while True:
            lost = self._reservation_lost[relay_id] = trio.Event()
            try:
                self._circuit_addrs[relay_id] = await self._transport.reserve(
                    relay, timeout=self.config.connect_timeout_s)
            except TransportError as exc:
                attempts += 1
                log.info("no reservation on relay %s: %s", relay_id, exc)
                delay = min(self.config.retry_max_s,
                            self.config.retry_initial_s * 2 ** min(attempts, 30))
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            attempts = 0
            await self._advertise_changed()
            await lost.wait()
            self._circuit_addrs.pop(relay_id, None)
            await self._advertise_changed()

    def _on_reservation_lost(self, relay_id: str, reason: str) -> None:
        log.info("reservation on relay %s lost: %s", relay_id, reason)
        event = self._reservation_lost.get(relay_id)
        if event is not None:
            event.set()

    async def _advertise_changed(self) -> None:
        """Our addresses changed: republish them (DHT) and re-announce them (LAN)."""
        if self._directory is not None:
            self._directory.changed()
        if self._lan is not None:
            await self._lan.update_addresses()

    async def _refresh_device(self, device: bytes) -> bool:
        """Look a contact's device up in the DHT; store its addresses and relays if they
        changed (True then)."""
        known = self._db.device(device)
        contact = self._db.contact_by_id(known.contact_id) if known else None
        if self._directory is None or known is None or contact is None:
            return False
        record = await self._directory.resolve_device(DeviceKey(device))
        if record is None or record.identity.to_bytes() != contact.account:
            return False
        if (record.addrs, record.relays) == (known.addrs, known.relays):
            return False
        self._db.put_device(contact.id, device, known.peer_id, record.addrs,
                            relays=record.relays, now_ms=self._clock.now_ms())
        log.info("%s moved: now at %s", contact.name, ", ".join(record.addrs) or "no address")
        return True

    async def _disconnect_quietly(self, peer_id: str) -> None:
        try:
            await self._transport.disconnect(peer_id)
        except TransportError as exc:
            log.debug("disconnecting %s failed: %s", peer_id, exc)

    async def _greet_contacts(self) -> None:
        """Connect to contacts' devices once at start. Their nodes see us come online and deliver
        what they queued for us at once, instead of when their retry backoff next fires."""
        devices = self._db.devices()[:GREET_MAX_DEVICES]
        limit = trio.CapacityLimiter(GREET_CONCURRENCY)

        async def greet(peer_id: str, addrs: tuple[str, ...]) -> None:
            async with limit:
                try:
                    await self._transport.connect(peer_id, addrs,
                                                  timeout=self.config.connect_timeout_s)
                except TransportError as exc:
                    log.debug("contact %s not reachable at start: %s", peer_id, exc)

        async with trio.open_nursery() as nursery:
            for device in devices:
                nursery.start_soon(greet, device.peer_id, device.addrs)

    def _is_contact(self, stream: FrameStream) -> bool:
        """Whether a stream comes from a contact's device (not a stranger, for StreamCaps)."""
        return self._db.device_by_peer_id(stream.remote_peer_id) is not None

    def _on_connection(self, peer_id: str, connected: bool) -> None:
        device = self._db.device_by_peer_id(peer_id)
        if device is None:
            return
        contact = self._db.contact_by_id(device.contact_id)
        if contact is None:
            return
        event = ContactOnline if connected else ContactOffline
        self._bus.publish(event(contact=contact.name, peer_id=peer_id))
        if connected:
            self._outbound.kick(device.device)


def _nothing() -> None:
    pass


def _entry(row: MessageRow) -> HistoryEntry:
    return HistoryEntry(message_id=row.id.hex(), direction=row.direction, text=row.body,
                        sent_at_ms=row.sent_at_ms, received_at_ms=row.received_at_ms,
                        state=row.state, error=row.error)


def _valid_name(name: str) -> str:
    if not isinstance(name, str) or not name or clean_name(name) != name or name.startswith("-"):
        raise ContactError(
            f"{name!r} is not a usable contact name (printable, single spaces, no leading '-', "
            "at most 64 characters)")
    return name


@asynccontextmanager
async def _open_dht(transport: Transport, config: Config, clock: Clock
                    ) -> AsyncIterator[Dht | None]:
    """The DHT, when the node is configured to use it: bootstrap peers, or serving it."""
    if not config.bootstrap and not config.dht_server:
        yield None
        return
    async with open_pigeon_dht(transport, server=config.dht_server,
                               bootstrap=config.bootstrap, clock=clock) as dht:
        yield dht


@asynccontextmanager
async def _open_transport(db: Database, device: DeviceKeyPair, config: Config, clock: Clock
                          ) -> AsyncIterator[Transport]:
    """Listen where we listened last time if the configuration asks for the same addresses with
    port 0 (so invites handed out stay valid across restarts); fall back to fresh ports."""
    requested = list(config.listen)
    attempts = [requested]
    remembered = db.get_meta("listen_bound")
    if remembered and db.get_meta("listen_requested") == json.dumps(requested):
        attempts.insert(0, json.loads(remembered))
    for i, listen in enumerate(attempts):
        entered = False
        try:
            async with Transport.open(device.to_bytes(), listen,
                                      max_frame_bytes=config.max_frame_bytes,
                                      clock=clock) as transport:
                entered = True
                bound = [a.rsplit("/p2p/", 1)[0] for a in transport.listen_addrs()]
                with db.transaction():
                    db.set_meta("listen_requested", json.dumps(requested))
                    db.set_meta("listen_bound", json.dumps(bound))
                yield transport
            return
        except TransportError:
            if entered or i == len(attempts) - 1:
                raise
            log.info("could not listen on %s again; taking new ports", listen)
