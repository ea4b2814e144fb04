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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from node.clock import Clock, TrioClock
from node.device.account_devices import AccountDevices
from node.device.bundles import (
    BundleServer,
    checked_dht_record,
    fetch_device_record,
    fetch_known_device_record,
)
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
from node.device.events import (
    AttachmentInfo,
    ContactOffline,
    ContactOnline,
    DeviceAdded,
    DeviceRemoved,
    Event,
    MessageDelivered,
    MessageFailed,
    MessagesRead,
)
from node.device.groups import GroupInfo, Groups
from node.device.inbound import Inbound, clean_name
from node.device.linking import (
    HistoryProgress,
    HistoryPuller,
    HistoryServer,
    LinkResult,
    provision_device,
)
from node.device.media import MediaOptions
from node.device.outbound import Outbound, intro_body, sync_body
from node.device.push import load_push, remove_push, save_push
from node.device.relay_client import Depositor, OpenTransport, RelayInbox, RelayState
from node.device.relay_fleet import FoundRelay, RelayFleet, RelayHealth, find_relays
from node.device.session_store import SessionStore
from node.device.setup import init_data_dir
from node.device.storage import (
    AttachmentRow,
    Contact,
    Database,
    Device,
    DeviceState,
    MessageRow,
    NewMessage,
    OutboxRow,
)
from node.device.transfers import (
    BLOB_CAPS,
    BlobStore,
    Transfers,
    TransferStatus,
    is_download,
)
from node.errors import (
    ContactError,
    DecodeError,
    DeviceError,
    GroupError,
    InvalidMessage,
    InvalidRecord,
    InviteError,
    NodeError,
    NotRunning,
    StorageError,
    TransportError,
)
from node.net import MSG_PROTOCOL, FrameStream, StreamCaps, Transport, libp2p_logging
from node.net.addresses import dialable
from node.net.dht import Dht, open_pigeon_dht
from node.protocol.attachment import Descriptor
from node.protocol.binding import sign_binding, verify_binding
from node.protocol.blob import BLOB_PROTOCOL, MAX_BLOB_FRAME_BYTES
from node.protocol.bundle import BUNDLE_PROTOCOL, MAX_BUNDLE_REPLY_BYTES
from node.protocol.content import (
    MAX_ADDRS,
    MAX_HINT_ADDRS,
    Content,
    DeviceHint,
    DeviceListUpdate,
    SenderKey,
)
from node.protocol.devicelist import DeviceEntry
from node.protocol.directory import MAX_DEVICES, DeviceRecord
from node.protocol.fingerprint import SafetyNumber
from node.protocol.history import HISTORY_PROTOCOL, MAX_HISTORY_FRAME_BYTES
from node.protocol.inbound import DeviceListReceived
from node.protocol.invite import Invite, ShortInvite, parse_invite, short_addresses
from node.protocol.keys import DeviceKey, DeviceKeyPair, IdentityKey, IdentityKeyPair
from node.protocol.linking import (
    ContactPayload,
    DevicePayload,
    LinkCode,
    Provisioning,
    link_code_record,
)
from node.protocol.mailbox import (
    MAX_CAPS,
    cap_hash,
    contact_cap,
    invite_cap,
    mailbox_key,
    own_cap,
)
from node.protocol.records import PreKeyBundle
from node.protocol.relaychoice import FULL, Plan

log = logging.getLogger("pigeon.node")

#: Contacts' devices a node connects to when it starts (so they learn it is back), and how many
#: of those dials run at once: bounded so a node with many contacts does not storm the network.
GREET_MAX_DEVICES = 256
GREET_CONCURRENCY = 8
#: After a round in which some device's keys could not be fetched (it was offline), the next
#: round; a device coming online starts one at once (PROTOCOL.md section 25.4).
SESSION_RETRY_S = 60.0

#: Longest sleep between two prekey schedule checks: trio's clock does not count time the
#: machine was suspended, so the wall clock is looked at again at least this often.
PREKEY_CHECK_S = 3600.0
#: After a failed prekey save (a full disk), try again this soon.
PREKEY_RETRY_S = 60.0
#: The `meta` key under which the relays we last told our contacts are kept (JSON list).
ANNOUNCED_RELAYS_KEY = "announced_relays"
#: The `meta` key of the relays this device left and still drains (PROTOCOL.md section 28.3):
#: JSON {address: until, unix ms}.
DRAINING_RELAYS_KEY = "draining_relays"
#: How often the relays being drained are looked at for their drain period's end.
DRAIN_CHECK_S = 3600.0
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

__all__ = ["ContactInfo", "ContactStatus", "DeliveryInfo", "DeviceInfo", "DeviceStatus",
           "FetchSummary", "HistoryEntry", "Node", "PushRegistration", "Status", "init_data_dir"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceInfo:
    """One device of this account (`Node.devices`)."""

    peer_id: str
    this_device: bool  # the device this node runs on
    addrs: tuple[str, ...]  # where it was last known to listen (empty for this device)



def new_message_id() -> bytes:
    """A fresh random id for a text the user sends (16 bytes, chosen by the sender, PROTOCOL.md
    section 11). One function, so tests can make a sender reuse an id on purpose."""
    return os.urandom(16)

@dataclass(frozen=True, kw_only=True, slots=True)
class ContactInfo:
    name: str
    account_id: str
    peer_ids: tuple[str, ...]
    addrs: tuple[str, ...]
    online: bool
    #: Incoming messages not read yet (`Node.mark_read`, here or on another device of ours).
    unread: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class DeliveryInfo:
    """Where one of our messages stands with one device it was queued for (PROTOCOL.md section
    25.5): a device of the contact, or (`own`) another device of ours, which gets the sent
    transcript."""

    peer_id: str
    own: bool
    state: str  # pending | sent | relayed | delivered


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryEntry:
    message_id: str
    direction: str  # "in" | "out"
    text: str
    sent_at_ms: int
    received_at_ms: int | None
    state: str  # out: pending | sent | delivered | failed; in: received
    error: str | None
    #: "text", or "notice": a line no one wrote, such as a device added to the contact's account
    kind: str = "text"
    #: Outgoing messages sent from this device: the state with each device, as far as known
    #: (devices that got a message through a relay confirm it when they fetch it).
    devices: tuple[DeliveryInfo, ...] = ()
    #: Incoming texts: whether read (here or on another device of ours); None for the others.
    read: bool | None = None
    #: Incoming texts of a group: the member who wrote it (PROTOCOL.md section 27).
    sender: str | None = None
    #: Kind "file" (PROTOCOL.md section 26.4): the attachment; `text` is then its caption.
    attachment: AttachmentInfo | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceStatus:
    """Delivery to one device of a contact, or of our own account (`Status.own_devices`)."""

    peer_id: str
    online: bool
    pending: int
    sent: int
    relayed: int


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
    #: The same counts per device of the contact (PROTOCOL.md section 25.5).
    devices: tuple[DeviceStatus, ...] = ()
    #: Incoming messages not read yet (`Node.mark_read`).
    unread: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Status:
    account_id: str
    peer_id: str
    addresses: tuple[str, ...]
    contacts: tuple[ContactStatus, ...]
    relays: tuple[RelayState, ...]  # this device's own relays
    connected_peers: int  # libp2p connections open now (contacts, relays, DHT peers)
    storage_error: str | None = None  # why the database failed last (e.g. the disk is full)
    #: Our other devices (their sent transcripts and device lists waiting).
    own_devices: tuple[DeviceStatus, ...] = ()
    #: Attachments being downloaded by us or from us now.
    transfers: tuple[TransferStatus, ...] = ()


@dataclass(frozen=True)
class PushRegistration:
    """This device's push endpoint after `Node.register_push` (PROTOCOL.md section 29): the
    URL, its Web Push public keys (base64url, as push services write them), and per relay
    whether it registered it ("registered", "refused: CODE: why", "unsupported", or None: the
    relay could not be reached in time; it is registered when the relay is)."""

    url: str
    p256dh: str
    auth: str
    relays: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class FetchSummary:
    """What `Node.fetch` did: texts received since the node started (from relays, or directly
    from a contact that was trying to reach it), messages acknowledged to relays since then
    (committed or duplicates), receipts still waiting to be delivered, relays drained of their
    backlog out of all, and the seconds it took."""

    received: int
    acked: int
    receipts_waiting: int
    relays_drained: int
    relays: int
    time_s: float


class Node:
    """A running node. Create with `Node.open()`; everything else is valid only inside it."""

    def __init__(self, *, data_dir: DataDir, config: Config, db: Database,
                 identity: IdentityKeyPair, device: DeviceKeyPair, sessions: SessionStore,
                 transport: Transport, open_deposit_transport: OpenTransport, clock: Clock,
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
        # The account's device list (PROTOCOL.md section 25.1): made on first start, re-signed
        # before it expires.
        self._account_devices = AccountDevices(db=db, identity=identity, device=device,
                                               clock=clock)
        self._last_sent_at = db.last_sent_at()
        depositor = Depositor(open_transport=open_deposit_transport, identity=identity,
                              device=device, config=config)
        # Our relays now: the pinned ones, or those chosen ("auto", PROTOCOL.md section 28.2);
        # and those we left but still drain (section 28.3), with until when (unix ms).
        self._relays: tuple[str, ...] = config.pinned_relays
        self._draining: dict[str, int] = self._load_draining()
        self._open_deposit_transport = open_deposit_transport
        self._outbound = Outbound(db=db, sessions=sessions, transport=transport, bus=self._bus,
                                  config=config, clock=clock, relays=lambda: self._relays,
                                  intro_addrs=self.contact_addresses, depositor=depositor,
                                  refresh_device=self._refresh_device if dht else None,
                                  device_list_update=self._device_list_update,
                                  need_session=self._need_session,
                                  group_content=self._group_content)
        self._groups = Groups(db=db, identity=identity, device_key=device.public.to_bytes(),
                              account_devices=self._account_devices, clock=clock,
                              next_timestamp=self._next_timestamp, kick=self._outbound.kick)
        # Attachments' blobs (PROTOCOL.md sections 26.4, 26.5): kept in the data directory.
        self._transfers = Transfers(
            db=db, transport=transport, bus=self._bus, clock=clock,
            store=BlobStore(data_dir.path),
            options=MediaOptions(max_bytes=config.max_attachment_bytes),
            auto_download_bytes=config.auto_download_bytes,
            connect_timeout_s=config.connect_timeout_s, contact_name=self._contact_name,
            retry_s=config.transfer_retry_s, open_transport=open_deposit_transport,
            device=device, relays=lambda: self._relays,
            sent_blob_keep_s=config.sent_blob_keep_s, identity=identity,
            own=lambda: self._account_devices.own)
        self._inbound = Inbound(db=db, sessions=sessions, bus=self._bus, clock=clock,
                                on_files=self._transfers.wake,
                                on_device_active=self._outbound.kick,
                                disconnect=self._disconnect_quietly,
                                on_receipt=self._outbound.record_delivered,
                                on_device_list=self._on_device_list,
                                on_new_sessions=self._sessions_usable,
                                on_group=self._groups.receive,
                                on_relays_changed=self._outbound.relays_changed)
        # Set when a device may need a session started (PROTOCOL.md section 25.4); when each
        # device's keys were last asked for (monotonic), so waiting lanes do not ask in a loop.
        self._sessions_wanted = trio.Event()
        self._sessions_wanted.set()
        self._session_tried: dict[bytes, float] = {}
        # Two mailboxes at each relay (PROTOCOL.md section 21 "Two mailboxes"): the one anyone
        # can compute from our device key, for invited first messages (and strangers), and our
        # contacts' one, under a key published nowhere. Both are read over throwaway
        # identities: the relay sees the mailbox's key in `auth`, not this device's peer id.
        # Our push endpoint (PROTOCOL.md section 29), registered with every relay connection.
        self._push = load_push(data_dir.path)
        self._opened_ms = clock.now_ms()  # `fetch` counts what was received since
        self._inboxes: list[RelayInbox] = []
        # address -> the cancel scope of its inboxes' tasks, and the inboxes
        self._relay_scopes: dict[str, tuple[trio.CancelScope, list[RelayInbox]]] = {}
        self._nursery: trio.Nursery | None = None
        self._dht = dht
        self._fleet = RelayFleet(
            dht=dht, open_transport=open_deposit_transport, clock=clock, config=config, db=db,
            health=self._relay_health, apply=self._apply_relay_plan,
        ) if dht is not None and config.relay_choice else None
        if self._fleet is not None:
            self._relays = self._fleet.current
            self._draining = {a: t for a, t in self._draining.items() if a not in self._relays}
        self._draining_watch = False
        self._directory = Directory(
            dht, db=db, identity=identity, device=device, sessions=sessions,
            addresses=self.contact_addresses, relays=lambda: self._relays, clock=clock,
            devices=lambda: self._account_devices.current.entries) if dht else None
        self._bundles = BundleServer(db=db, identity=identity, device=device, sessions=sessions,
                                     addresses=self.contact_addresses,
                                     relays=lambda: self._relays, clock=clock)
        self._lan = LanDiscovery(transport=transport, config=config, db=db,
                                 addresses=self.contact_addresses) if config.mdns else None
        # Linking (PROTOCOL.md sections 25.2, 25.3): history for our other devices, and, on a
        # device just linked, the transfer of the history to it.
        self._history_server = HistoryServer(db=db, own_contact_id=self._account_devices.own.id,
                                             config=config, clock=clock)
        self._history_puller = HistoryPuller(db=db, transport=transport, config=config,
                                             clock=clock)
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
                def open_deposit_transport() -> AbstractAsyncContextManager[Transport]:
                    # Deposits at contacts' relays, and reading our own mailboxes, go out from
                    # a throwaway identity made for that one batch or connection, so a relay
                    # cannot link them to this device (PROTOCOL.md section 21).
                    return Transport.open(os.urandom(32), DEPOSIT_LISTEN, clock=clock)

                # libp2p logs expected failures (a dial to a stopped peer) at ERROR; Pigeon logs
                # what matters on its own loggers, so libp2p speaks only when debugging.
                library_level = logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL
                with libp2p_logging(library_level):
                    async with (
                        _open_transport(db, device, config, clock) as transport,
                        _open_dht(transport, config, clock) as dht,
                    ):
                        node = cls(data_dir=dd, config=config, db=db, identity=identity,
                                   device=device, sessions=sessions, transport=transport,
                                   open_deposit_transport=open_deposit_transport, clock=clock,
                                   dht=dht)
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
                self._transport.set_stream_handler(HISTORY_PROTOCOL,
                                                   self._history_server.handle_stream,
                                                   max_frame_bytes=MAX_HISTORY_FRAME_BYTES)
                self._transport.set_stream_handler(BLOB_PROTOCOL, self._transfers.handle_stream,
                                                   max_frame_bytes=MAX_BLOB_FRAME_BYTES,
                                                   caps=BLOB_CAPS, is_member=self._is_contact)
                nursery.start_soon(self._transfers.run)
                nursery.start_soon(self._transfers.run_uploads)
                if self._history_puller.pending:
                    nursery.start_soon(self._history_puller.run)
                unsubscribe = self._transport.on_connection_change(self._on_connection)
                self._nursery = nursery
                self._announce_relays(drain_told=True)
                self._offer_caps()
                nursery.start_soon(self._greet_contacts)
                nursery.start_soon(self._keep_prekeys)
                nursery.start_soon(self._start_sessions)
                for address in dict.fromkeys([*self._relays, *self._draining]):
                    self._start_relay(address)
                if self._draining:
                    nursery.start_soon(self._end_draining)
                if self._fleet is not None:
                    nursery.start_soon(self._fleet.run)
                if self._directory is not None:
                    nursery.start_soon(self._directory.run)
                if self._lan is not None:
                    nursery.start_soon(self._lan.run)
                if self.config.relay_reservations:
                    unsubscribe_lost = self._transport.on_reservation_lost(self._on_reservation_lost)
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
                    self._transport.remove_stream_handler(HISTORY_PROTOCOL)
                    self._transport.remove_stream_handler(BLOB_PROTOCOL)
                    self._bus.close()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Hand the caller back its own exception rather than trio's group around it.
            if body_error is not None and group.split(lambda e: e is body_error)[1] is None:
                raise body_error from None
            raise

    # --- wake-ups and one-shot fetching (PROTOCOL.md section 29) --------------------------------

    async def register_push(self, url: str, *, timeout: float) -> PushRegistration:
        """Make `url` this device's push endpoint (keys are made on first use and kept in the
        data directory) and register it at every relay, waiting up to `timeout` seconds for
        their answers. InvalidMessage if `url` is not an http(s) URL."""
        self._check_open()
        try:
            self._push = save_push(self.data_dir.path, url)
        except ValueError as exc:
            raise InvalidMessage(f"not a push URL: {exc}") from None
        for inbox in self._inboxes:
            inbox.state.wake = None  # until this endpoint's registration is answered
        await self._register_wake_again(timeout)
        keys = self._push.keys
        return PushRegistration(
            url=url, p256dh=_b64url(keys.p256dh), auth=_b64url(keys.auth),
            relays=tuple((r.address, r.wake) for r in _relay_states(self._inboxes)))

    async def remove_push(self, *, timeout: float) -> bool:
        """Forget this device's push endpoint and its keys, and ask every relay to forget it
        (waiting up to `timeout` seconds; a relay not reached then is told at the next
        connection of this node). False if there was none."""
        self._check_open()
        removed = remove_push(self.data_dir.path)
        self._push = None
        for inbox in self._inboxes:
            inbox.push_removed = True
        await self._register_wake_again(timeout)
        return removed

    async def _register_wake_again(self, timeout: float) -> None:
        """Register the push endpoint (or its removal) at every relay again, waiting up to
        `timeout` seconds for their answers."""
        tickets = [inbox.register_wake_again() for inbox in self._inboxes]
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for inbox, ticket in zip(self._inboxes, tickets, strict=True):
                    nursery.start_soon(inbox.wait_wake_registered, ticket)

    async def fetch(self, *, timeout: float) -> FetchSummary:
        """What a wake-up asks for: wait until every relay's backlog has been fetched,
        committed and acknowledged, and the receipts for it delivered (deposited at the
        senders' relays or written to them), at most `timeout` seconds; then report."""
        self._check_open()
        started = self._clock.monotonic()
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for inbox in self._inboxes:
                    nursery.start_soon(inbox.wait_drained)
            # Receipts go out after a random wait (PROTOCOL.md section 21): poll the outbox
            # until they have left it (each check is one indexed query).
            while self._db.waiting_receipts():
                await trio.sleep(0.05)
        states = _relay_states(self._inboxes)
        drained = {i.state.address for i in self._inboxes if i.drained}
        drained -= {i.state.address for i in self._inboxes if not i.drained}
        return FetchSummary(
            received=self._db.received_since(self._opened_ms),
            acked=sum(i.acked for i in self._inboxes),
            receipts_waiting=self._db.waiting_receipts(),
            relays_drained=len(drained), relays=len(states),
            time_s=round(self._clock.monotonic() - started, 3))

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

    def devices(self) -> list[DeviceInfo]:
        """The devices of this account, in the order the device list names them."""
        self._check_open()
        known = {d.device: d for d in self._db.devices(self._account_devices.own.id)}
        result = []
        for key in self._account_devices.current.devices:
            row = known.get(key.to_bytes())
            result.append(DeviceInfo(peer_id=key.peer_id(),
                                     this_device=key == self._device.public,
                                     addrs=row.addrs if row is not None else ()))
        return result

    async def approve_link(self, code: str, *,
                           on_confirmation: Callable[[str], None] | None = None) -> LinkResult:
        """Link the new device showing `code` (`pigeon link` there) into this account: send it
        the account's keys, contacts and settings (PROTOCOL.md section 25.2), add it to the
        device list, start a session with it. `on_confirmation` gets the confirmation string as
        soon as it is known (the new device shows the same). Publishes DeviceAdded.

        DeviceError with the reason for a damaged, tampered, expired or already used code, a
        device already in the account, a full account (MAX_DEVICES) or a new device that cannot
        be reached; nothing changes here then."""
        self._check_open()
        record = link_code_record(code)
        link = LinkCode.from_record(record, now=self._clock.now_s())
        if self._db.link_code_used(link.nonce):
            raise DeviceError("this link code was used already; run `pigeon link` again on the"
                              " new device for a new one")
        if link.device in self._account_devices.current:
            raise DeviceError(f"device {link.device.peer_id()} is already in this account")
        if len(self._account_devices.current.entries) >= MAX_DEVICES:
            raise DeviceError(f"this account already has {MAX_DEVICES} devices, the most it may"
                              " have: remove one first (`pigeon device remove`)")
        own = self._account_devices.own
        key = link.device.to_bytes()
        committed: list[bool] = []

        def add(entry: DeviceEntry, bundle: PreKeyBundle) -> bytes:
            if bundle.identity != self._identity.public or bundle.device != link.device:
                raise DeviceError("the new device sent a prekey bundle that is not its own")
            if self._db.link_code_used(link.nonce):
                raise DeviceError("this link code was used already (by another approval)")
            try:
                with self._db.transaction():
                    self._db.mark_link_code_used(link.nonce, now_ms=self._clock.now_ms())
                    self._account_devices.add(entry, peer_id=link.device.peer_id(),
                                              addrs=link.addrs)
                    # A session with the new device from its bundle, as with a new contact.
                    self._sessions.record(own.account, key).initiate(self._identity, bundle)
                    self._sessions.save(own.account, key)
                    # The new list goes to every contact and to our other devices, the new one
                    # included: it is the first message of the session just started with it
                    # (PROTOCOL.md section 25.4), so both ways work.
                    self._device_list_changed()
            except BaseException:
                self._sessions.forget([(own.account, key)])
                raise
            committed.append(True)
            return self._account_devices.signed()

        try:
            confirmation = await provision_device(
                self._transport, link, record, self._provisioning(), add=add,
                now=self._clock.now_s, timeout=self.config.connect_timeout_s * 2,
                on_confirmation=on_confirmation)
        finally:
            if committed:  # in the list, whatever happened after: say so and reach it
                self._outbound.kick(key)
                self._bus.publish(DeviceAdded(contact=None, peer_id=link.device.peer_id()))
        return LinkResult(account_id=self.account_id, peer_id=link.device.peer_id(),
                          confirmation=confirmation,
                          devices=len(self._account_devices.current.entries))

    def _provisioning(self) -> Provisioning:
        """What a new device of the account gets (PROTOCOL.md section 25.2)."""
        own = self._account_devices.own
        devices = [DevicePayload(device=self._device.public,
                                 addrs=tuple(self.contact_addresses())[:MAX_ADDRS],
                                 relays=self._relays[:MAX_ADDRS])]
        devices += [DevicePayload(device=DeviceKey(d.device), addrs=d.addrs[:MAX_ADDRS],
                                  relays=d.relays[:MAX_ADDRS])
                    for d in self._db.devices(own.id) if d.device != self._device.public.to_bytes()]
        contacts = []
        for c in self._db.contacts():
            stored = self._db.device_list(c.account)
            contacts.append(ContactPayload(
                name=c.name, identity=IdentityKey(c.account), added_at_ms=c.added_at_ms,
                devices=tuple(DevicePayload(device=DeviceKey(d.device), addrs=d.addrs[:MAX_ADDRS],
                                            relays=d.relays[:MAX_ADDRS])
                              for d in self._db.devices(c.id)),
                device_list=stored[1] if stored else None))
        return Provisioning(identity=self._identity, device_list=self._account_devices.signed(),
                            devices=tuple(devices), contacts=tuple(contacts),
                            display_name=self.display_name, relays=self._relays[:MAX_ADDRS])

    def history_transfer(self) -> HistoryProgress:
        """Where the transfer of the history to this device (after it was linked, PROTOCOL.md
        section 25.3) stands; `done` when there is none to do."""
        self._check_open()
        return self._history_puller.progress()

    async def wait_history_transfer(self, *, on_progress: Callable[[HistoryProgress], None]
                                    | None = None) -> HistoryProgress:
        """Wait until the history transfer is complete, calling `on_progress` after each chunk
        (put a timeout around it: the device it comes from may be offline)."""
        while not self._history_puller.finished.is_set():
            if on_progress is not None:
                on_progress(self._history_puller.progress())
            await self._history_puller.wait_changed()
        return self._history_puller.progress()
    def add_device(self, entry: DeviceEntry, *, addrs: Sequence[str] = (),
                   relays: Sequence[str] = ()) -> DeviceInfo:
        """Add a device to this account (what approving a linked device ends with): a new
        version of the device list is signed and stored, then sent to every contact and to our
        other devices, and published (PROTOCOL.md section 25.4). DeviceError if the account is
        full (MAX_DEVICES) or the entry's binding does not verify; nothing changes then."""
        self._check_open()
        peer_id = entry.device.peer_id()
        self._account_devices.add(entry, peer_id=peer_id, addrs=addrs, relays=relays)
        self._device_list_changed()
        self._bus.publish(DeviceAdded(contact=None, peer_id=peer_id))
        return next(d for d in self.devices() if d.peer_id == peer_id)

    def remove_device(self, device: str) -> DeviceInfo:
        """Remove a device from this account, named by its peer id, a unique prefix of it, or
        its number in `devices()` (from 1). The new device list goes to every contact and our
        other devices at once, and none of them encrypts to it again (PROTOCOL.md section
        25.7); what the removed device holds stays with it. DeviceError if it does not name
        exactly one device, or names this one."""
        self._check_open()
        target = self._device_named(device)
        if target.this_device:
            raise DeviceError("this device cannot remove itself; remove it from another device"
                              " of the account")
        key = DeviceKey.from_peer_id(target.peer_id)
        self._account_devices.remove(key)
        self._sessions.drop(self._identity.public.to_bytes(), key.to_bytes())
        self._device_list_changed()
        self._bus.publish(DeviceRemoved(contact=None, peer_id=target.peer_id))
        return target

    def _device_named(self, ref: str) -> DeviceInfo:
        devices = self.devices()
        if ref.isdigit() and 1 <= int(ref) <= len(devices):
            return devices[int(ref) - 1]
        found = [d for d in devices if d.peer_id == ref] or [
            d for d in devices if ref and d.peer_id.startswith(ref)]
        if len(found) != 1:
            shown = "no" if not found else "more than one"
            raise DeviceError(f"{shown} device of this account matches {ref!r}; see"
                              " `pigeon device list`")
        return found[0]

    def _device_list_changed(self) -> None:
        """Our device list has a new version: send it to every device of every contact and to
        our other devices (queued like messages, so an offline one gets it through its relays),
        publish it, and start sessions with new devices (PROTOCOL.md section 25.4)."""
        now = self._clock.now_ms()
        targets = [(c, self._db.device_keys(c.id)) for c in self._db.contacts()]
        own = self._account_devices.own
        targets.append((own, [d.to_bytes() for d in self._account_devices.others()]))
        with self._db.transaction():
            for contact, devices in targets:
                if devices:
                    self._db.insert_outgoing(
                        contact=contact, devices=devices, now_ms=now,
                        messages=[(os.urandom(16), "device-list", "", self._next_timestamp())])
        for _, devices in targets:
            for key in devices:
                self._outbound.kick(key)
        if self._directory is not None:
            self._directory.changed()
        self._sessions_wanted.set()

    def _device_list_update(self, message_id: bytes, sent_at_ms: int) -> DeviceListUpdate:
        """The content of a queued device-list row, made when it is encrypted: our newest signed
        list, with where each listed device was last known to be (PROTOCOL.md section 25.4)."""
        rows = {d.device: d for d in self._db.devices(self._account_devices.own.id)}
        hints = []
        for key in self._account_devices.current.devices:
            if key == self._device.public:
                hints.append(DeviceHint(device=key.to_bytes(),
                                        addrs=tuple(self.contact_addresses()[:MAX_HINT_ADDRS]),
                                        relays=tuple(self._relays[:MAX_HINT_ADDRS])))
            elif (row := rows.get(key.to_bytes())) is not None:
                hints.append(DeviceHint(device=key.to_bytes(), addrs=row.addrs[:MAX_HINT_ADDRS],
                                        relays=row.relays[:MAX_HINT_ADDRS]))
        return DeviceListUpdate(id=message_id, sent_at_ms=sent_at_ms,
                                signed_list=self._account_devices.signed(), hints=tuple(hints))

    def _on_device_list(self, received: DeviceListReceived) -> list[Event]:
        """A verified device list from a device of its account (inside the inbound
        transaction): keep it if newer, and make our devices match it (PROTOCOL.md section
        25.4). Returns the events to publish after the commit."""
        now = self._clock.now_ms()
        hints = {h.device: h for h in received.hints}
        listed = [d.to_bytes() for d in received.device_list.devices]
        if received.own:
            before = {d.to_bytes() for d in self._account_devices.current.devices}
            try:
                new = self._account_devices.accept(received.signed)
            except InvalidRecord as exc:  # verified by the machine a moment ago
                log.info("our own device list refused: %s", exc)
                return []
            if new is None:
                return []
            contact, name = self._account_devices.own, None
            if self._device.public not in new:
                log.warning("this device was removed from its account by another device")
            listed = [d for d in listed if d != self._device.public.to_bytes()]
            if self._directory is not None:
                self._directory.changed()
        else:
            found = self._db.contact_by_account(received.account)
            if found is None or not self._db.put_device_list(
                    received.account, received.device_list.seq, received.signed):
                return []
            contact, name = found, found.name
            before = set(self._db.device_keys(contact.id))
            if received.new_device is not None:
                before.discard(received.new_device)  # added by this very message
        events: list[DeviceAdded | DeviceRemoved] = []
        # Each listed device comes with its binding, verified with the list (section 25.1).
        bindings = {e.device.to_bytes(): e.binding for e in received.device_list.entries}
        for key in listed:
            if self._db.device(key) is None:
                hint = hints.get(key)
                self._db.put_device(contact.id, key, DeviceKey(key).peer_id(),
                                    hint.addrs if hint else (),
                                    relays=hint.relays if hint else (),
                                    binding=bindings.get(key), seen_at_ms=0, now_ms=now)
        for key in before - set(listed):
            if key == self._device.public.to_bytes():
                continue
            self._db.remove_device(key)
            self._sessions.drop(contact.account, key)
            events.append(DeviceRemoved(contact=name, peer_id=DeviceKey(key).peer_id()))
        for key in listed:
            if key not in before:
                events.append(DeviceAdded(contact=name, peer_id=DeviceKey(key).peer_id()))
        if name is not None:
            for event in events:
                what = "added" if isinstance(event, DeviceAdded) else "removed"
                self._db.insert_notice(contact=contact, message_id=os.urandom(16), now_ms=now,
                                       body=f"{name} {what} a device ({event.peer_id})")
            # A contact's new device gets our list too, whoever starts the session with it:
            # it may have been set up before it knew all our devices (PROTOCOL.md 25.4).
            added = [key for key in listed if key not in before]
            self._queue_device_list(contact, added)
            for key in added:
                self._outbound.kick(key)
        if events:
            self._sessions_wanted.set()
        return list(events)

    def _need_session(self, device: bytes) -> None:
        """A lane has rows for a device we have no session with: fetch its keys, unless that
        was tried less than SESSION_RETRY_S ago (a new device list or the device coming online
        starts a round anyway)."""
        tried = self._session_tried.get(device)
        if tried is None or self._clock.monotonic() - tried >= SESSION_RETRY_S:
            self._sessions_wanted.set()

    async def _start_sessions(self) -> None:
        """Start a session with every device we know without one: a device that joined a
        contact's account or ours (PROTOCOL.md section 25.4). Its keys come from the device
        itself (`/pigeon/bundle/1.0.0`, as a known device) or else the DHT. Rounds run when
        something asks (a new device list, a lane waiting, a device online), and again every
        SESSION_RETRY_S while a device could not be reached."""
        while True:
            await self._sessions_wanted.wait()
            self._sessions_wanted = trio.Event()
            missing = False
            for contact, device in self._devices_without_session():
                try:
                    missing |= not await self._start_session(contact, device)
                except NodeError as exc:  # our disk, or a bundle that does not verify
                    log.warning("starting a session with %s failed: %s",
                                DeviceKey(device).peer_id(), exc)
                    missing = True
            if missing:
                with trio.move_on_after(SESSION_RETRY_S):
                    await self._sessions_wanted.wait()
                self._sessions_wanted.set()

    def _devices_without_session(self) -> list[tuple[Contact, bytes]]:
        """Known devices with no stored session (found by a query: session records are not
        read, which would cost a decode each)."""
        accounts = {c.id: c for c in self._db.contacts()}
        accounts[self._account_devices.own.id] = self._account_devices.own
        return [(accounts[d.contact_id], d.device) for d, _ in self._db.devices_without_session(
            except_device=self._device.public.to_bytes(), limit=GREET_MAX_DEVICES)
            if d.contact_id in accounts]

    async def _start_session(self, contact: Contact, device: bytes) -> bool:
        """Fetch `device`'s keys and start a session with it, its first message our device
        list; False if its keys could not be had now."""
        known = self._db.device(device)
        if known is None:
            return True
        self._session_tried[device] = self._clock.monotonic()
        key, account = DeviceKey(device), IdentityKey(contact.account)
        record = None
        try:
            record = await fetch_known_device_record(
                self._transport, key, account, known.addrs, now=self._clock.now_s,
                timeout=self.config.connect_timeout_s * 2)
        except NodeError as exc:
            log.info("keys of %s not fetched from it: %s", known.peer_id, exc)
            if self._directory is not None:
                found = await self._directory.resolve_device(account, key)
                if found is not None and found.identity == account and found.device == key:
                    record = found
        if record is None:
            return False
        if not self._open:  # closed while fetching: the next start tries again
            return True
        session = self._sessions.record(contact.account, device)
        if self._db.device(device) is None or session.current is not None:
            return True  # removed meanwhile, or it started one with us first
        try:
            with self._db.transaction():
                session.initiate(self._identity, record.bundle)
                self._sessions.save(contact.account, device)
                self._db.put_device(known.contact_id, device, known.peer_id,
                                    record.addrs or known.addrs,
                                    relays=record.relays or known.relays,
                                    seen_at_ms=record.seq, now_ms=self._clock.now_ms())
                self._device_list_first(contact, [device])
        except BaseException:
            self._sessions.forget([(contact.account, device)])
            raise
        log.info("session started with %s, a device of %s", known.peer_id,
                 contact.name or "this account")
        self._outbound.kick(device)
        self._sessions_usable(False)  # a device its account linked since: our capability
        return True

    def _device_list_first(self, contact: Contact, devices: Sequence[bytes]) -> None:
        """Queue our device list for those of `devices` that have no session yet and none
        queued: it is the first message of the session we start with them, which a device that
        does not know us accepts only with it (PROTOCOL.md section 25.4)."""
        self._queue_device_list(contact, [
            d for d in devices if self._sessions.record(contact.account, d).current is None])

    def _queue_device_list(self, contact: Contact, devices: Sequence[bytes]) -> None:
        """Queue our device list for those of `devices` (of `contact`) that have none queued."""
        need = [d for d in devices if not self._db.has_queued(d, "device-list")]
        if need:
            self._db.insert_outgoing(
                contact=contact, devices=need, now_ms=self._clock.now_ms(),
                messages=[(os.urandom(16), "device-list", "", self._next_timestamp())])

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
            self._caps_changed()
            return ShortInvite(
                identity=self._identity.public, device=self._device.public,
                addrs=short_addresses(self.contact_addresses()) if addresses else (),
                token=token, seq=now, expires=expires).to_text(self._identity)
        bundle = self._sessions.prekeys.bundle(
            self._identity, self._device, seq=now, expires=expires, one_time=False)
        self._db.add_invite(token, now_ms=now * 1000, expires_ms=expires * 1000)
        self._caps_changed()
        invite = Invite(identity=self._identity.public, device=self._device.public,
                        name=self.display_name,
                        addrs=tuple(self.contact_addresses()) if addresses else (),
                        relays=self._relays, bundle=bundle, token=token, seq=now,
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
        return self._add_from_long_invite(name, invite, invite.bundle)

    def _add_from_long_invite(self, name: str, invite: Invite, bundle: PreKeyBundle) -> ContactInfo:
        if invite.identity == self._identity.public:
            raise InviteError("this is your own invite")
        # An invite's seq is in seconds (PROTOCOL.md section 5); stamps are in ms (section 21).
        return self._adopt(name, invite.identity, [(invite.device, invite.addrs, invite.relays,
                                                     bundle, invite.seq * 1000)],
                           token=invite.token)

    async def add_contact_from_invite(self, name: str, invite_text: str) -> ContactInfo:
        """`add_contact` for either form of invite. For a long invite it first asks the
        inviting device, if it answers at the invite's addresses within the connect timeout, for
        fresh keys with one-time prekeys (PROTOCOL.md section 14.2), else it uses the invite's.
        For a short invite (PROTOCOL.md section 14.1) it first fetches the inviter's signed
        device record, with its prekey bundle, from the inviting device (at the invite's
        addresses, through a relay circuit if one is listed) or else from the DHT, and checks
        that the invite's account signed it for the invite's device. InviteError says why when
        neither has it."""
        self._check_open()
        name = _valid_name(name)
        invite = parse_invite(invite_text, now=self._clock.now_s())
        if isinstance(invite, Invite):
            return self._add_from_long_invite(name, invite, await self._freshest_bundle(invite))
        if invite.identity == self._identity.public:
            raise InviteError("this is your own invite")
        try:
            record = await fetch_device_record(self._transport, invite, now=self._clock.now_s,
                                               timeout=self.config.connect_timeout_s * 2)
        except InviteError as exc:
            found = None
            if self._directory is not None:
                found = checked_dht_record(
                    await self._directory.resolve_device(invite.identity, invite.device), invite)
            if found is None:
                raise
            log.info("keys of %s from the DHT (%s)", invite.account_id, exc)
            record = found
        self._check_open()
        addrs = record.addrs or invite.addrs
        return self._adopt(name, invite.identity,
                           [(invite.device, addrs, record.relays, record.bundle, record.seq)],
                           token=invite.token)

    async def _freshest_bundle(self, invite: Invite) -> PreKeyBundle:
        """The bundle to start a session from a long invite with: one fetched from the inviting
        device if it answers at the invite's addresses, which carries one-time prekeys (PROTOCOL.md
        sections 5 and 14.2), else the invite's own (signed and last-resort keys only)."""
        if not invite.addrs or invite.identity == self._identity.public:
            return invite.bundle
        try:
            record = await fetch_device_record(self._transport, invite, now=self._clock.now_s,
                                               timeout=self.config.connect_timeout_s)
        except InviteError as exc:
            log.info("using the invite's keys of %s (%s)", invite.identity.account_id(), exc)
            return invite.bundle
        self._check_open()
        return record.bundle

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
            record = await self._directory.resolve_device(identity, device)
            if record is not None and record.identity == identity:
                devices.append((record.device, record.addrs, record.relays, record.bundle,
                                record.seq))
        if not devices:
            raise ContactError(f"no reachable device of {account_id} is published in the DHT")
        self._check_open()
        return self._adopt(name, identity, devices, token=None)

    def _adopt(self, name: str, identity: IdentityKey,
               devices: Sequence[tuple[DeviceKey, Sequence[str], Sequence[str], PreKeyBundle,
                                       int]],
               *, token: bytes | None) -> ContactInfo:
        """Store the contact and its devices, start a session with each device that has none yet
        and queue our intro to it, all in one transaction. Each device comes with its
        addresses, relays, bundle and when the addresses and relays were current (ms, by its
        clock): older than what is stored, they leave it as it is (PROTOCOL.md section 21
        "Where a device is").

        Every bundle is a verified one, so it carries its device's binding to its account
        (PROTOCOL.md section 4 "Binding"); it must be this account's bundle for that device. A
        device another contact holds without proof (stored before bindings, or claimed in an
        intro) is taken from them; one another contact holds with proof is refused
        (ContactError)."""
        account = identity.to_bytes()
        now = self._clock.now_ms()
        for device, _, _, bundle, _ in devices:
            if (bundle.identity, bundle.device) != (identity, device):
                raise ContactError(f"the keys found for {identity.account_id()} belong to"
                                   " another account or device")
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
                for device, addrs, relays, bundle, seen_at_ms in devices:
                    key = device.to_bytes()
                    self._take_device(key, contact, now_ms=now)
                    # Until the device gives us its own capability, the invite's opens its
                    # mailbox to us (PROTOCOL.md section 21 "Deposit capabilities").
                    self._db.put_device(contact.id, key, device.peer_id(), addrs, relays=relays,
                                        binding=bundle.binding,
                                        cap=invite_cap(token) if token else None,
                                        seen_at_ms=seen_at_ms, now_ms=now)
                    record = self._sessions.record(account, key)
                    if record.current is None:
                        started.append(key)
                        record.initiate(self._identity, bundle)
                        self._sessions.save(account, key)
                        body = intro_body(self.display_name, token,
                                          sign_binding(self._device, self._identity.public))
                        intro: NewMessage = (os.urandom(16), "intro", body, self._next_timestamp())
                        self._db.insert_outgoing(contact=contact, messages=[intro],
                                                 devices=[key], now_ms=now)
                        self._db.mark_cap_sent([key])  # the intro carries our capability
        except BaseException:
            self._sessions.forget([(account, key) for key in started])
            raise
        for device, _, _, _, _ in devices:
            self._outbound.kick(device.to_bytes())
        self._sync_own("contact-add", contact,
                       [(d.to_bytes(), a, r) for d, a, r, _, _ in devices])
        self._caps_changed()
        return self._contact_info(contact)

    def _take_device(self, device: bytes, contact: Contact, *, now_ms: int) -> None:
        """Make room for `contact`'s proven `device` if another contact holds it (see `_adopt`).
        Runs inside `_adopt`'s transaction."""
        held = self._db.device(device)
        other = self._db.contact_by_id(held.contact_id) if held is not None else None
        if other is None or other.id == contact.id:
            return
        binding = self._db.device_binding(device)
        if binding is not None:
            try:
                verify_binding(DeviceKey(device), IdentityKey(other.account), binding)
            except InvalidRecord:
                pass  # a stored binding that does not verify proves nothing
            else:
                raise ContactError(f"that device belongs to your contact {other.name!r}, and it"
                                   " proved it: one device cannot be two contacts'")
        log.warning("device %s was your contact %s's without proof; it proved it is %s's",
                    held.peer_id if held else "?", other.name, contact.name)
        self._db.release_device(device, "the device turned out to be another account's",
                                now_ms=now_ms)
        self._sessions.drop(other.account, device)

    # --- deposit capabilities (PROTOCOL.md section 21) ----------------------------------------------

    def _contact_caps(self) -> list[bytes]:
        """The capability hashes our contacts' mailbox accepts: one per contact."""
        return [cap_hash(contact_cap(self._device, c.account))
                for c in self._db.contacts()][:MAX_CAPS]

    def _invite_caps(self) -> list[bytes]:
        """The capability hashes the mailbox of our device key accepts: our own devices' one,
        and one per invite that has not expired. Never a contact's: the same hash registered
        for both mailboxes would tell the relay they are one device's."""
        tokens = self._db.valid_invite_tokens(now_ms=self._clock.now_ms())
        # and the one our own other devices hold (derived from the account key)
        own = cap_hash(own_cap(self._identity, self._device.public))
        return [own, *(cap_hash(invite_cap(t)) for t in tokens)][:MAX_CAPS]

    def _caps_changed(self) -> None:
        for inbox in self._inboxes:
            inbox.caps_changed()

    def _sessions_usable(self, new_contacts: bool) -> None:
        """An inbound batch added contacts or made sessions usable: offer our capability to the
        devices now reachable that have not had it, and register the new contacts' ones. Runs
        after the batch's commit and before its ack: our full disk must not cost the ack (the
        devices stay owed, and the next session or start offers again)."""
        try:
            self._offer_caps()
        except StorageError as exc:
            log.warning("cannot queue our capability for new sessions now: %s", exc)
        if new_contacts:
            self._caps_changed()

    # --- our relays (PROTOCOL.md sections 21, 28.2, 28.3) -------------------------------------------

    @property
    def relays(self) -> tuple[str, ...]:
        """The relays holding this device's mailbox now (pinned, or chosen by "auto")."""
        return self._relays

    def relay_states(self) -> tuple[RelayState, ...]:
        """Our relays' states (as `status().relays`, without the rest of the status): the ones
        we receive at, and those left that we still drain (`draining`)."""
        self._check_open()
        return _relay_states(self._inboxes)

    @property
    def relay_fleet(self) -> RelayFleet | None:
        """The relay choice of `relays = "auto"` (None when relays are pinned or there is no
        DHT to find relays through)."""
        return self._fleet

    async def find_relays(self) -> list[FoundRelay]:
        """The relays of the DHT's relay directory with their round-trip time and load, fastest
        first (`pigeon relays`). NotRunning without a DHT (no bootstrap peers)."""
        self._check_open()
        if self._dht is None:
            raise NotRunning("finding relays needs the DHT: give bootstrap peers (--bootstrap)")
        return await find_relays(self._dht, self._open_deposit_transport, self._clock)

    def _load_draining(self) -> dict[str, int]:
        stored = self._db.get_meta_json(DRAINING_RELAYS_KEY)
        if not isinstance(stored, dict):
            return {}
        now = self._clock.now_ms()
        return {a: int(t) for a, t in stored.items()
                if isinstance(a, str) and isinstance(t, int) and t > now and a not in self._relays}

    def _save_draining(self) -> None:
        self._db.set_meta(DRAINING_RELAYS_KEY, json.dumps(self._draining))

    def _start_relay(self, address: str) -> None:
        """Drain our two mailboxes at `address` (PROTOCOL.md section 21 "Two mailboxes"), and
        hold a circuit relay reservation there while it is one of our relays."""
        if address in self._relay_scopes or self._nursery is None:
            return
        device = self._device
        inboxes = [RelayInbox(address, open_transport=self._open_deposit_transport,
                              device=device, inbound=self._inbound, config=self.config,
                              caps=caps, mailbox=key, push=lambda: self._push)
                   for key, caps in ((device, self._invite_caps),
                                     (mailbox_key(device), self._contact_caps))]
        draining = address in self._draining
        for inbox in inboxes:
            inbox.state.draining = draining
        self._inboxes.extend(inboxes)
        scope = trio.CancelScope()
        self._relay_scopes[address] = (scope, inboxes)

        async def run() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    for inbox in inboxes:
                        nursery.start_soon(inbox.run)
                    if self.config.relay_reservations and not draining:
                        nursery.start_soon(self._keep_reservation, address)

        self._nursery.start_soon(run)

    def _stop_relay(self, address: str) -> None:
        running = self._relay_scopes.pop(address, None)
        if running is not None:
            scope, inboxes = running
            scope.cancel()
            self._inboxes[:] = [i for i in self._inboxes if i not in inboxes]
        relay_id = address.rpartition("/p2p/")[2]
        if self._circuit_addrs.pop(relay_id, None) is not None:
            self._transport.drop_reservation(relay_id)

    def _relay_health(self, address: str) -> RelayHealth:
        """What the inboxes of `address` say: connected when both are; the refusal code of
        either."""
        states = [i.state for i in self._inboxes if i.state.address == address]
        return RelayHealth(connected=bool(states) and all(s.connected for s in states),
                           refused=next((s.refused for s in states if s.refused), None),
                           failing=any(s.last_error and not s.connected for s in states))

    def _apply_relay_plan(self, plan: Plan) -> None:
        """Carry out what the relay choice decided (PROTOCOL.md section 28.3): receive at the
        new relays, keep draining the ones left (not one that refused our mailbox: it holds
        nothing of ours), and tell contacts and our other devices where we now receive."""
        now = self._clock.now_ms()
        self._relays = plan.relays
        for address, reason in plan.drop:
            self._stop_relay(address)
            if reason != FULL:
                self._draining[address] = now + int(self.config.relay_drain_s * 1000)
        for address in plan.relays:
            if self._draining.pop(address, None) is not None:
                self._stop_relay(address)  # started as a drained relay: start it as ours
        self._save_draining()
        for address in dict.fromkeys([*plan.relays, *self._draining]):
            self._start_relay(address)
        if self._draining and self._nursery is not None:
            self._nursery.start_soon(self._end_draining)
        self._relays_changed()

    def _relays_changed(self) -> None:
        """Our relays changed while running: intros with the new ones to every contact device,
        our device record republished (PROTOCOL.md section 28.3)."""
        try:
            self._announce_relays()
            self._offer_caps()
        except StorageError as exc:
            log.warning("cannot queue the news of our relays now: %s", exc)
        if self._directory is not None:
            self._directory.changed()

    async def _end_draining(self) -> None:
        """Stop draining a relay left `relay_drain_s` ago (its messages have expired by then,
        and every contact was told)."""
        if self._draining_watch:
            return
        self._draining_watch = True
        try:
            await self._watch_draining()
        finally:
            self._draining_watch = False

    async def _watch_draining(self) -> None:
        while self._draining:
            now = self._clock.now_ms()
            for address, until in list(self._draining.items()):
                if until <= now:
                    del self._draining[address]
                    self._stop_relay(address)
                    self._save_draining()
            if not self._draining:
                return
            soonest = min(self._draining.values())
            await trio.sleep(min(DRAIN_CHECK_S, max(1.0, (soonest - now) / 1000)))

    def _announce_relays(self, *, drain_told: bool = False) -> None:
        """Our relays differ from those we last told our contacts (or we never recorded them):
        every contact device is owed an intro again, which carries the relays (PROTOCOL.md
        section 11), so their deposits go to where we now receive. `_offer_caps` queues them
        to the devices we have a session with; the others get one once we have."""
        relays = json.dumps(list(self._relays))
        before = self._db.get_meta(ANNOUNCED_RELAYS_KEY)
        if before == relays:
            return
        # At start, relays we told of before and left (pinned ones changed between runs):
        # drained for a while, as contacts not told yet still deposit there (PROTOCOL.md
        # section 28.3). While running, `_apply_relay_plan` decided that already.
        try:
            told = json.loads(before) if before else []
        except ValueError:
            told = []
        until = self._clock.now_ms() + int(self.config.relay_drain_s * 1000)
        for address in told if drain_told and isinstance(told, list) else []:
            if isinstance(address, str) and address not in self._relays:
                self._draining.setdefault(address, until)
        own = [d.to_bytes() for d in self._account_devices.others()]
        with self._db.transaction():
            if before is not None:
                self._db.owe_cap_again()
                # Our own devices get no intros (section 25.5): a device-list update, whose
                # hint about its sender is where the sender now is (section 25.4), tells them.
                if own:
                    self._db.insert_outgoing(
                        contact=self._account_devices.own, devices=own,
                        now_ms=self._clock.now_ms(),
                        messages=[(os.urandom(16), "device-list", "", self._next_timestamp())])
            self._db.set_meta(ANNOUNCED_RELAYS_KEY, relays)
            self._save_draining()
        if before is not None:
            for key in own:
                self._outbound.kick(key)

    def _offer_caps(self) -> None:
        """Queue an intro, which carries our capability, to every contact device we can encrypt
        to that has not had one from us: a contact that introduced itself to us, one added
        before capabilities, or a device its account linked after we added it (we have a
        session with it once either side sent the first message, PROTOCOL.md section 25.4).
        Until then, its deposits at our relays count as a stranger's (section 21)."""
        owed = [d for d in self._db.devices_owed_cap()
                if (c := self._db.contact_by_id(d.contact_id)) is not None
                and self._sessions.record(c.account, d.device).can_encrypt]
        if not owed:
            return
        queued: list[bytes] = []
        with self._db.transaction():
            for device in owed:
                contact = self._db.contact_by_id(device.contact_id)
                assert contact is not None  # read just above, in this task
                intro: NewMessage = (os.urandom(16), "intro", intro_body(self.display_name, None),
                                     self._next_timestamp())
                self._db.insert_outgoing(contact=contact, messages=[intro],
                                         devices=[device.device], now_ms=self._clock.now_ms())
                queued.append(device.device)
            self._db.mark_cap_sent(queued)
        for device_key in queued:
            self._outbound.kick(device_key)

    def contacts(self) -> list[ContactInfo]:
        self._check_open()
        unread = self._db.unread_counts()  # one query for all, not one per contact
        return [self._contact_info(c, unread) for c in self._db.contacts()]

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
        renamed = self._db.rename_contact(contact, new_name)
        if renamed.name != contact.name:
            self._sync_own("contact-rename", renamed)
        return self._contact_info(renamed)

    def _sync_own(self, op: str, contact: Contact,
                  devices: Sequence[tuple[bytes, Sequence[str], Sequence[str]]] = (), *,
                  read: tuple[bytes, int] | None = None) -> None:
        """Tell this account's other devices about a change to a contact (PROTOCOL.md section
        25.6): queued to each of them like a message, so it arrives once, directly or through
        their relays. `read`: the newest message read and its sender timestamp (op "read")."""
        own = self._account_devices.own
        targets = [d.to_bytes() for d in self._account_devices.others()]
        known = set(self._db.device_keys(own.id))
        targets = [d for d in targets if d in known]
        if not targets:
            return
        name = "" if op == "read" else contact.name
        message: NewMessage = (os.urandom(16), "sync",
                               sync_body(op, contact.account, name, devices, read=read),
                               self._next_timestamp())
        self._db.insert_outgoing(contact=own, messages=[message], devices=targets,
                                 now_ms=self._clock.now_ms())
        for device in targets:
            self._outbound.kick(device)

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
        self._sync_own("contact-remove", contact)
        self._caps_changed()  # its capability is no longer registered: revoked

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

    def _contact_info(self, contact: Contact, unread: dict[int, int] | None = None
                      ) -> ContactInfo:
        devices = self._db.devices(contact.id)
        if unread is None:
            unread = self._db.unread_counts()
        return ContactInfo(
            name=contact.name,
            account_id=IdentityKey(contact.account).account_id(),
            peer_ids=tuple(d.peer_id for d in devices),
            addrs=tuple(a for d in devices for a in d.addrs),
            online=any(self._transport.is_connected(d.peer_id) for d in devices),
            unread=unread.get(contact.id, 0),
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
        group = self._groups.find(contact)
        if group is not None:  # a group's name works wherever a contact's does (section 27)
            ids = self._groups.send_many(group, texts)
            await trio.lowlevel.checkpoint()
            return [message_id.hex() for message_id in ids]
        target = self._contact(contact)
        devices = self._db.device_keys(target.id)
        if not devices:
            raise ContactError(f"{contact!r} has no device to send to")
        # Every device of the contact, and our other devices as sent transcripts (PROTOCOL.md
        # section 25.5): one outbox row each, all in one transaction.
        own = self._account_devices.own
        copies = [(own.account, d) for d in self._db.device_keys(own.id)]
        with self._db.transaction():
            self._device_list_first(target, devices)
            self._device_list_first(own, [d for _, d in copies])
            messages: list[NewMessage] = [
                (new_message_id(), "text", text, self._next_timestamp()) for text in texts]
            self._db.insert_outgoing(contact=target, messages=messages, devices=devices,
                                     now_ms=self._clock.now_ms(), copies=copies)
        for device in [*devices, *(d for _, d in copies)]:
            self._outbound.kick(device)
        await trio.lowlevel.checkpoint()
        return [message_id.hex() for message_id, _, _, _ in messages]

    async def send_file(self, contact: str, path: Path | str, *, caption: str | None = None,
                        original: bool = False) -> str:
        """Send the file at `path` to every device of `contact` (PROTOCOL.md section 26);
        returns the message id (hex). Images are re-encoded without their metadata unless
        `original`; the file is encrypted into the data directory first (one copy serves every
        device, and survives a restart), then the message carrying its key is queued like a
        text. Raises `MediaError` (missing, directory, unreadable, too-large), `InvalidMessage`
        (caption too long), `ContactError`."""
        self._check_open()
        caption = caption or ""
        if not isinstance(caption, str) or len(caption.encode("utf-8")) > MAX_TEXT_BYTES:
            raise InvalidMessage(f"caption longer than {MAX_TEXT_BYTES} bytes")
        target = self._contact(contact)
        devices = self._db.device_keys(target.id)
        if not devices:
            raise ContactError(f"{contact!r} has no device to send to")
        descriptor = await self._transfers.prepare(Path(path), original=original)
        message_id = new_message_id()
        # Our other devices get its sent transcript, with the descriptor: they fetch the same
        # blob as the contact's devices (PROTOCOL.md sections 25.5, 26.4).
        own = self._account_devices.own
        copies = [(own.account, d) for d in self._db.device_keys(own.id)]
        with self._db.transaction():
            self._device_list_first(target, devices)
            self._device_list_first(own, [d for _, d in copies])
            rowid, = self._db.insert_outgoing(
                contact=target, messages=[(message_id, "file", caption, self._next_timestamp())],
                devices=devices, now_ms=self._clock.now_ms(), copies=copies)
            self._db.add_attachment(rowid, descriptor.to_bytes(), descriptor.sha256,
                                    state="ready", now_ms=self._clock.now_ms())
        for device in [*devices, *(d for _, d in copies)]:
            self._outbound.kick(device)
        return message_id.hex()

    async def save(self, message_id: str, path: Path | str | None = None) -> Path:
        """The file of a file message, downloaded first if needed (whatever its size); with
        `path`, also copied there (into it, under the file's name, if it is a directory).
        Returns where the file is. Raises `InvalidMessage` (no such file message), `MediaError`
        (the destination exists, or the download was refused as corrupt), `StorageError` (no
        disk space: nothing is lost, save again later), `TransportError` (no device of the
        sender serves it now)."""
        self._check_open()
        try:
            mid = bytes.fromhex(message_id)
        except (TypeError, ValueError):
            mid = b""
        row = self._db.attachment(mid) if len(mid) == 16 else None
        if row is None:
            raise InvalidMessage(f"{message_id!r} is not a file message")
        descriptor = Descriptor.from_bytes(row.descriptor)
        if is_download(row):  # received, or sent from another device of ours
            row = await self._transfers.wait_downloaded(mid)
            assert row.file is not None
            stored = self._transfers.store.file(row.file)
            if path is None:
                return stored
            return await self._transfers.copy_out(stored, Path(path), descriptor.name)
        if path is None:
            raise InvalidMessage("a file we sent is saved only to a path given")
        if row.state == "expired":
            raise InvalidMessage(f"the copy of file {message_id} was deleted after"
                                 f" {self.config.sent_blob_keep_s:g} s (sent_blob_keep_s)")
        return await self._transfers.restore_to(descriptor, Path(path))

    def _contact_name(self, contact_id: int) -> str:
        contact = self._db.contact_by_id(contact_id)
        return contact.name if contact is not None else ""

    def _next_timestamp(self) -> int:
        """Sender timestamps strictly increase per device, so histories order our messages
        exactly as we sent them."""
        self._last_sent_at = max(self._clock.now_ms(), self._last_sent_at + 1)
        return self._last_sent_at

    def history(self, contact: str, *, limit: int = 50) -> list[HistoryEntry]:
        """The last `limit` messages with `contact`, oldest first (by sender time)."""
        self._check_open()
        conversation = self._conversation(contact)
        rows = self._db.history(conversation, limit=limit, kinds=("text", "file", "notice"))
        states = self._db.device_states([r.rowid for r in rows if r.direction == "out"])
        senders = self._db.senders([r.rowid for r in rows if r.direction == "in"])
        files = self._db.attachments_of([r.rowid for r in rows if r.kind == "file"])
        entries = []
        for row in rows:
            entry = _entry(row, states.get(row.rowid, ()), self._attachment(files.get(row.rowid)))
            if row.rowid in senders:
                entry = dataclasses.replace(entry, sender=self._groups.name_of(senders[row.rowid]))
            entries.append(entry)
        return entries

    def _attachment(self, row: AttachmentRow | None) -> AttachmentInfo | None:
        if row is None:
            return None
        return AttachmentInfo.of(
            Descriptor.from_bytes(row.descriptor), row.state, error=row.error,
            path=str(self._transfers.store.file(row.file)) if row.file else None)

    def mark_read(self, contact: str, up_to: str | None = None) -> int:
        """Mark read the incoming messages of `contact` up to and including the one with id
        `up_to` (hex; None: all so far), in the order `history()` shows, and every one sent
        earlier by the contact's clock; returns how many became read. Our other devices are
        told in one sync (PROTOCOL.md section 25.6, `read`), and do the same. InvalidMessage if
        `up_to` is not an incoming message of the contact."""
        self._check_open()
        target = self._conversation(contact)
        message_id = None
        if up_to is not None:
            try:
                message_id = bytes.fromhex(up_to)
            except (TypeError, ValueError):
                message_id = None
            if message_id is None or len(message_id) != 16:
                raise InvalidMessage(f"{up_to!r} is not a message id (32 hex digits)")
        newest = self._db.newest_incoming(target, message_id)
        if newest is None:
            if message_id is not None:
                raise InvalidMessage(f"no incoming message {up_to} from {target.name!r}")
            return 0
        with self._db.transaction():
            count, rose = self._db.mark_read(target, up_to_ms=newest.sent_at_ms,
                                             now_ms=self._clock.now_ms())
            if rose:  # a mark at or below the one here is nothing new for our other devices
                self._sync_own("read", target, read=(newest.id, newest.sent_at_ms))
        if count:
            self._bus.publish(MessagesRead(contact=target.name, count=count))
        return count

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

    # --- groups (PROTOCOL.md section 27) --------------------------------------------------------

    def _conversation(self, name: str) -> Contact:
        """The conversation called `name`: a group's (exact name first), else a contact's."""
        group = self._groups.find(name)
        return group if group is not None else self._contact(name)

    def _members(self, names: Sequence[str], group: str | None = None) -> list[bytes]:
        """Identity keys of the accounts named: contacts by name, account ids, or (in `group`)
        the names `group_info` shows. GroupError naming the first unknown one."""
        keys: list[bytes] = []
        shown = {m.name: m.account_id for m in self._groups.info(group).members} \
            if group is not None else {}
        for name in names:
            contact = self._db.contact_by_name(name)
            if contact is not None:
                keys.append(contact.account)
                continue
            account_id = shown.get(name, name)
            try:
                keys.append(IdentityKey.from_account_id(account_id).to_bytes())
            except DecodeError:
                raise GroupError(f"unknown member {name!r}: not a contact of yours") from None
        return keys

    def create_group(self, name: str, members: Sequence[str]) -> GroupInfo:
        """Create a group called `name` with the contacts `members` (by name); this account is
        its first admin. GroupError for an unknown member or more than 1,000 members."""
        self._check_open()
        name = _valid_name(name)
        for member in members:
            if self._db.contact_by_name(member) is None:
                raise GroupError(f"unknown member {member!r}: add them as a contact first")
        return self._groups.create(name, self._members(members))

    def group_add(self, group: str, members: Sequence[str]) -> GroupInfo:
        """Add contacts to a group (admins only). GroupError: not an admin, a member already,
        unknown, the group full."""
        self._check_open()
        for member in members:
            if self._db.contact_by_name(member) is None:
                raise GroupError(f"unknown member {member!r}: add them as a contact first")
        return self._groups.change(group, "add", who=self._members(members))

    def group_remove(self, group: str, members: Sequence[str]) -> GroupInfo:
        """Remove members from a group (admins only); they read nothing sent afterwards."""
        self._check_open()
        return self._groups.change(group, "remove", who=self._members(members, group))

    def group_promote(self, group: str, members: Sequence[str]) -> GroupInfo:
        """Make members of a group admins (admins only)."""
        self._check_open()
        return self._groups.change(group, "promote", who=self._members(members, group))

    def group_leave(self, group: str) -> GroupInfo:
        """Leave a group: its other members replace their sender keys."""
        self._check_open()
        return self._groups.change(group, "leave")

    def group_rename(self, group: str, new_name: str) -> GroupInfo:
        """Rename a group for every member (admins only)."""
        self._check_open()
        return self._groups.change(group, "rename", new_name=_valid_name(new_name))

    def group_info(self, group: str) -> GroupInfo:
        """The group called `group` here; GroupError if there is none."""
        self._check_open()
        return self._groups.info(group)

    def is_group(self, name: str) -> bool:
        """Whether `name` is a group's name here (which `send`, `history` and `mark_read`
        take wherever they take a contact's)."""
        self._check_open()
        return self._groups.find(name) is not None

    def groups(self) -> list[GroupInfo]:
        """Every group this device knows, by name (also those we left)."""
        self._check_open()
        return self._groups.all()

    def _group_content(self, row: OutboxRow) -> Content | None:
        """The content of a queued group row at encryption time, or None if it is not one."""
        if row.kind == "group-ops":
            return self._groups.group_ops_content(row.conversation, row.message_id,
                                                  row.sent_at_ms)
        if row.kind == "sender-key":
            key = json.loads(row.body)
            return SenderKey(id=row.message_id, sent_at_ms=row.sent_at_ms,
                             group_id=bytes.fromhex(key["g"]), key_id=bytes.fromhex(key["kid"]),
                             chain_key=bytes.fromhex(key["ck"]), iteration=key["n"])
        if row.kind == "text" and row.transcript:
            return self._groups.group_message_content(row.message_rowid, row.conversation,
                                                      row.message_id, row.sent_at_ms)
        return None

    # --- status -----------------------------------------------------------------------------------

    def status(self) -> Status:
        self._check_open()
        counts: dict[str, dict[str, int]] = {}
        errors: dict[str, str | None] = {}
        for name, state, count, error in self._db.outbox_summary():
            counts.setdefault(name, {})[state] = count
            errors[name] = errors.get(name) or error
        lanes = self._outbound.status()
        per_device: dict[bytes, dict[str, int]] = {}
        for device_key, state, count in self._db.outbox_by_device():
            per_device.setdefault(device_key, {})[state] = count

        def device_status(devices: Sequence[bytes]) -> tuple[DeviceStatus, ...]:
            return tuple(DeviceStatus(
                peer_id=DeviceKey(d).peer_id(),
                online=self._transport.is_connected(DeviceKey(d).peer_id()),
                pending=per_device.get(d, {}).get("pending", 0),
                sent=per_device.get(d, {}).get("sent", 0),
                relayed=per_device.get(d, {}).get("relayed", 0)) for d in devices)

        contacts = []
        unread = self._db.unread_counts()
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
                last_error=last_error, path_down=down,
                devices=device_status([d.device for d in devices]),
                unread=unread.get(contact.id, 0)))
        return Status(account_id=self.account_id, peer_id=self.peer_id,
                      addresses=tuple(self.addresses()), contacts=tuple(contacts),
                      relays=_relay_states(self._inboxes),
                      connected_peers=len(self._transport.connected_peers()),
                      storage_error=str(problem) if (problem := self._db.health.problem) else None,
                      own_devices=device_status(
                          [d.to_bytes() for d in self._account_devices.others()]),
                      transfers=tuple(self._transfers.status()))

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

    async def _keep_prekeys(self) -> None:
        """Rotate the signed and last-resort PQ prekeys on schedule, delete replaced ones after
        their grace and refill the one-time pools (PROTOCOL.md section 6, "Rotation"); after a
        rotation, republish the DHT record so new initiators get the new keys."""
        while True:
            wait = PREKEY_CHECK_S
            try:
                done = self._sessions.maintain_prekeys(now=self._clock.now_s())
            except StorageError as exc:
                log.warning("prekey rotation could not be saved: %s", exc)
                wait = PREKEY_RETRY_S
            else:
                if done.rotated:
                    log.info("prekeys rotated (%d old deleted)", done.deleted)
                    if self._directory is not None:
                        self._directory.changed()
                elif done.deleted:
                    log.info("%d replaced prekeys deleted", done.deleted)
                due = self._sessions.prekeys.next_due() - self._clock.now_s()
                wait = min(PREKEY_CHECK_S, max(1.0, float(due)))
            await trio.sleep(wait)

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
        record = await self._directory.resolve_device(IdentityKey(contact.account),
                                                      DeviceKey(device))
        if record is None or record.identity.to_bytes() != contact.account:
            return False
        return self._learn_device_record(contact, known, record)

    def _learn_device_record(self, contact: Contact, known: Device, record: DeviceRecord
                             ) -> bool:
        """Store the addresses and relays of a contact's device record (found in the DHT) if
        they are newer than what we know and differ (True then)."""
        device = known.device
        # A record without relays does not take away the relays we know (as for bundles,
        # `_start_session`): a DHT server may still serve the record the device published
        # before it chose its relays, and deposits at relays it left are still drained
        # (PROTOCOL.md section 28.3), while none at all would leave messages pending.
        # A record older than what we know (a DHT server that has not seen the newer one, or
        # an intro stamped later) changes nothing (PROTOCOL.md section 21 "Where a device is").
        relays = record.relays or known.relays
        if not self._db.put_device(contact.id, device, known.peer_id, record.addrs,
                                   relays=relays, seen_at_ms=record.seq,
                                   now_ms=self._clock.now_ms()):
            return False
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
        if connected and self._sessions.record(contact.account, device.device).current is None:
            self._sessions_wanted.set()  # a device we have no session with is online now
        if contact.id == self._account_devices.own.id:
            if connected:
                self._outbound.kick(device.device)
            return
        event = ContactOnline if connected else ContactOffline
        self._bus.publish(event(contact=contact.name, peer_id=peer_id))
        if connected:
            self._outbound.kick(device.device)
            self._transfers.wake()  # downloads waiting for this contact's devices


def _nothing() -> None:
    pass


def _entry(row: MessageRow, states: Sequence[DeviceState] = (),
           attachment: AttachmentInfo | None = None) -> HistoryEntry:
    return HistoryEntry(message_id=row.id.hex(), direction=row.direction, text=row.body,
                        sent_at_ms=row.sent_at_ms, received_at_ms=row.received_at_ms,
                        state=row.state, error=row.error, kind=row.kind,
                        devices=tuple(DeliveryInfo(peer_id=s.peer_id, own=s.own, state=s.state)
                                      for s in states),
                        read=(row.read_at_ms is not None
                              if row.direction == "in" and row.kind in ("text", "file")
                              else None),
                        attachment=attachment)


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


def _relay_states(inboxes: Sequence[RelayInbox]) -> tuple[RelayState, ...]:
    """One state per relay, from the inboxes of its two mailboxes: connected and registered
    when both are, the counts summed, the first error."""
    states: dict[str, RelayState] = {}
    for inbox in inboxes:
        state = inbox.state
        merged = states.get(state.address)
        if merged is None:
            states[state.address] = dataclasses.replace(state)
            continue
        merged.connected = merged.connected and state.connected
        merged.registered = merged.registered and state.registered
        merged.pending += state.pending
        merged.received += state.received
        merged.last_error = merged.last_error or state.last_error
        # The push endpoint: a refusal on either mailbox, else registered only if on both.
        if state.wake != merged.wake:
            merged.wake = next((w for w in (merged.wake, state.wake)
                                if w not in (None, "registered")), None)
    return tuple(states.values())


def _b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 4648 section 5), as Web Push writes keys."""
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
