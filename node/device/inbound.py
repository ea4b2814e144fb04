"""Receiving: the trio shell around the inbound machine (node.protocol.inbound).

It reads frames from direct streams (and takes batches fetched from relays), lets the machine
decide, applies the machine's plan in ONE SQLite transaction, then announces the events, then
writes the acks and nacks, and disconnects a peer the machine found misbehaving. A crash before
the commit means the sender resends or the relay still holds the envelope; a crash after it means
the repeat is recognised as a duplicate and acknowledged again. Either way the user sees each
message exactly once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import trio

from node.clock import Clock
from node.device.config import MAX_BATCH, MAX_CONSECUTIVE_FAILURES, MAX_FRAMES_PER_S, MAX_NAME_CHARS
from node.device.eventbus import EventBus
from node.device.events import (
    AttachmentInfo,
    ContactAdded,
    Event,
    MessageReceived,
    MessageSent,
    MessagesRead,
)
from node.device.session_store import SessionStore
from node.device.storage import Contact, Database, NewMessage
from node.errors import ContactError, NodeError, StorageError
from node.protocol import inbound as machine
from node.protocol.inbound import ContactRef, Incoming, PeerMisbehaving, Plan
from node.protocol.keys import DeviceKey, IdentityKeyPair
from node.protocol.prekeys import PreKeyStore
from node.protocol.session import SessionRecord

if TYPE_CHECKING:
    from node.net import FrameStream

log = logging.getLogger("pigeon.inbound")

#: First messages from unknown devices decrypted per second on direct streams, all such devices
#: together (PROTOCOL.md section 20 "Work a stranger can cause"). Each costs a PQXDH agreement
#: (~1-2.5 ms), so strangers get at most ~5 % of a core; invitations are made by people, rarely.
STRANGER_FIRST_MESSAGES_PER_S = 20
#: The strangers' burst: a few introductions at once (a whole group joining) pass undelayed.
STRANGER_FIRST_MESSAGES_BURST = 40
#: Refused first messages remembered (by SHA-256, 32 bytes each), so replays cost one hash.
REFUSED_FIRST_MESSAGES_REMEMBERED = 16_384

__all__ = ["BatchResult", "Inbound", "Incoming", "PeerMisbehaving", "clean_name"]


def clean_name(name: str) -> str:
    """A display name made safe to show and to use as a contact name: no control characters,
    single spaces, at most MAX_NAME_CHARS characters."""
    return machine.clean_name(name, max_chars=MAX_NAME_CHARS)


def _limits() -> machine.InboundLimits:
    # Read at each use, not at import: tests lower MAX_FRAMES_PER_S on this module.
    return machine.InboundLimits(frames_per_s=MAX_FRAMES_PER_S,
                                 max_consecutive_failures=MAX_CONSECUTIVE_FAILURES,
                                 max_name_chars=MAX_NAME_CHARS)


@dataclass
class BatchResult:
    """An applied plan and the events it makes, to publish now that it is committed."""

    plan: Plan
    events: list[Event] = field(default_factory=list)
    #: Devices we can encrypt to since this batch and could not before (their first message).
    usable: list[bytes] = field(default_factory=list)
    #: Known devices that told us of other relays in this batch (PROTOCOL.md section 28.3).
    moved: list[bytes] = field(default_factory=list)

    @property
    def acks(self) -> tuple[bytes, ...]:
        """Ids whose sender (or relay) may forget them: committed now, or before (duplicates)."""
        return self.plan.acks

    @property
    def nacks(self) -> list[tuple[bytes, str]]:
        """(id, code) of the messages refused for good."""
        return [(r.message_id, r.code) for r in self.plan.nacks]

    @property
    def accepted(self) -> int:
        """Messages accepted in this batch (duplicates not counted)."""
        return self.plan.accepted

    @property
    def failures(self) -> int:
        """Messages refused in this batch."""
        return self.plan.failures

    @property
    def error(self) -> NodeError | None:
        """What ends the stream, after the replies are written."""
        return self.plan.error

    @property
    def receipts_for(self) -> set[bytes]:
        """Devices with a receipt queued in this batch (their lanes are woken)."""
        return {r.device for r in self.plan.receipts}


class _StoreView:
    """The machine's reads, over the node's database and session store (inside the batch's
    transaction, so they see what the batch's own writes will build on)."""

    def __init__(self, db: Database, sessions: SessionStore) -> None:
        self._db = db
        self._sessions = sessions

    @property
    def identity(self) -> IdentityKeyPair:
        return self._sessions.identity

    def contact_of_device(self, device: bytes) -> ContactRef | None:
        known = self._db.device(device)
        contact = self._db.contact_by_id(known.contact_id) if known else None
        return ContactRef(contact.account, contact.name) if contact else None

    def contact_of_account(self, account: bytes) -> ContactRef | None:
        contact = self._db.contact_by_account(account)
        return ContactRef(contact.account, contact.name) if contact else None

    def seen_among(self, account: bytes, message_ids: Sequence[bytes]) -> set[bytes]:
        return self._db.seen_among(account, message_ids)

    def session(self, account: bytes, device: bytes) -> SessionRecord:
        return self._sessions.record(account, device)

    def prekeys(self) -> PreKeyStore:
        return self._sessions.prekeys

    def invite_is_valid(self, token: bytes, *, now_ms: int) -> bool:
        return self._db.invite_is_valid(token, now_ms=now_ms)

    def name_taken(self, name: str) -> bool:
        return self._db.contact_by_name(name) is not None


class Inbound:
    """Receives messages for the node: `handle_stream` serves direct streams, `process` takes
    batches from relays; `publish` announces a committed batch."""

    def __init__(
        self,
        *,
        db: Database,
        sessions: SessionStore,
        bus: EventBus,
        clock: Clock,
        on_device_active: Callable[[bytes], None],
        disconnect: Callable[[str], Awaitable[None]],
        on_receipt: Callable[[bytes, Sequence[bytes]], list[Event]],
        on_device_list: Callable[[machine.DeviceListReceived], list[Event]] | None = None,
        on_new_sessions: Callable[[bool], None] | None = None,
        on_group: Callable[[machine.ReceivedGroupContent, int], list[Event]] | None = None,
        on_files: Callable[[], None] | None = None,
        on_relays_changed: Callable[[Sequence[bytes]], None] | None = None,
    ) -> None:
        self.db = db
        self.sessions = sessions
        self.bus = bus
        self.clock = clock
        self.on_device_active = on_device_active  # wakes the device's delivery lane
        self.disconnect = disconnect
        self.on_receipt = on_receipt  # marks our messages delivered (inside our transaction)
        # Applies a verified device list (inside our transaction; PROTOCOL.md section 25.4).
        self.on_device_list = on_device_list
        # After a commit that added contacts (True) or made a session usable that was not: the
        # node gives those devices our deposit capability (PROTOCOL.md section 21).
        self.on_new_sessions = on_new_sessions
        # Applies a group content (inside our transaction; PROTOCOL.md section 27.5).
        self.on_group = on_group
        # Wakes the downloads after file messages arrived (PROTOCOL.md section 26.5).
        self.on_files = on_files
        # After a commit in which known devices named other relays: what waits for them at
        # the old ones is deposited again at the new (PROTOCOL.md section 28.3).
        self.on_relays_changed = on_relays_changed
        self._view = _StoreView(db, sessions)
        self.gate = machine.StrangerGate(
            per_s=STRANGER_FIRST_MESSAGES_PER_S, burst=STRANGER_FIRST_MESSAGES_BURST,
            remember=REFUSED_FIRST_MESSAGES_REMEMBERED, now=clock.monotonic())

    # --- direct streams -----------------------------------------------------------------------------

    async def handle_stream(self, stream: FrameStream) -> None:
        """Serve one inbound /pigeon/msg stream until it ends. Raises a RemoteError (which the
        transport logs, and which resets the stream) when the peer misbehaves; a flooding or
        persistently refused peer is also disconnected, so a new stream does not buy it a fresh
        allowance."""
        try:
            await self._serve(stream)
        except PeerMisbehaving as exc:
            # Logged here: the transport's own "stream ended" line is lost with the connection.
            log.warning("stream %r ended: PeerMisbehaving: %s; disconnecting the peer", stream, exc)
            with trio.CancelScope(shield=True):
                await self.disconnect(stream.remote_peer_id)
            raise

    async def _serve(self, stream: FrameStream) -> None:
        device = stream.remote_public_key
        receiver = machine.InboundStream(device=device, peer_id=stream.remote_peer_id,
                                         limits=_limits(), now=self.clock.monotonic(),
                                         gate=self.gate)
        self.on_device_active(device)
        while True:
            frames = await stream.receive_batch(MAX_BATCH)
            if not frames:
                return
            try:
                result = self._commit(partial(receiver.receive, frames,
                                              now=self.clock.monotonic(),
                                              now_ms=self.clock.now_ms(), view=self._view))
            except StorageError as exc:
                # Our disk, not the peer: nothing was committed, so ask for the messages again
                # shortly (the sender closes this stream and writes them on a new one).
                log.warning("cannot store messages from %s now: %s; asked to retry later",
                            stream.remote_peer_id, exc)
                await stream.send(receiver.defer(frames, now_ms=self.clock.now_ms())
                                  .reply_frames())
                return
            # Announce the batch as soon as it is committed, before acking it: if the ack write
            # fails (the sender's stream was reset), the commit stands and the resend is only
            # acked as a duplicate, so events published after the write would be lost for good.
            self.publish(result)
            replies = result.plan.reply_frames()
            if replies:
                await stream.send(replies)
            if result.error is not None:
                raise result.error

    def publish(self, result: BatchResult) -> None:
        """After the commit: events out, and lanes woken for the receipts queued."""
        for event in result.events:
            self.bus.publish(event)
        for device in result.receipts_for:
            self.on_device_active(device)
        if self.on_new_sessions is not None and (result.plan.new_contacts or result.usable):
            self.on_new_sessions(bool(result.plan.new_contacts))
        if self.on_relays_changed is not None and result.moved:
            self.on_relays_changed(result.moved)

    # --- one batch (synchronous: one transaction) -------------------------------------------------

    def process(self, items: Sequence[Incoming]) -> BatchResult:
        """Receive `items` (from a relay) in one transaction. `result.acks` lists the ids whose
        sender (or relay) may forget them: committed now, or before (duplicates)."""
        # Relayed first messages share the memory of refusals but not the budget: each deposit
        # is decided once and then deleted, and the relay client hands them over in slices.
        return self._commit(partial(machine.decide_batch, items, view=self._view,
                                    now_ms=self.clock.now_ms(), max_name_chars=MAX_NAME_CHARS,
                                    gate=self.gate))

    def _commit(self, decide: Callable[[], Plan]) -> BatchResult:
        """Decide (reading inside the transaction) and apply the plan, all in one transaction.
        Synchronous: no other task runs between the reads and the commit."""
        plan: Plan | None = None
        held = self.sessions.prekeys.private_key_count()
        try:
            with self.db.transaction():
                plan = decide()
                events, usable, moved = self._write(plan)
        except BaseException:
            if plan is not None:
                # The cached records now hold the plan's copies, and the COMMIT itself may have
                # failed (a full disk) after every write went through: reload what was
                # committed, or the next try decrypts with keys the database never saw used.
                self.sessions.forget([(account, device) for account, device, _ in plan.sessions],
                                     prekeys=plan.prekeys is not None)
            raise
        if plan.prekeys is not None and plan.prekeys.private_key_count() < held:
            # One-time prekeys were used and deleted: clear their copies from the WAL too, so
            # a recorded first message cannot be decrypted from the files (PROTOCOL.md
            # section 20, "Deleted data on disk"). First messages are few; this is not per
            # message.
            self.db.truncate_wal()
        for refusal in plan.nacks:
            log.info("message %s refused (%s): %s", refusal.message_id.hex(), refusal.code,
                     refusal.reason)
        for new in plan.new_contacts:
            log.info("%s (%s) joined through an invite", new.name, new.account_id)
        return BatchResult(plan, events, usable, moved)

    def _transcript(self, transcript: machine.ReceivedTranscript, now_ms: int) -> list[Event]:
        """A text another device of our account sent: into that conversation, as sent
        (PROTOCOL.md section 25.5). One for a conversation this device does not have is
        dropped (the contact was removed here, or not yet synced)."""
        contact = self.db.contact_by_account(transcript.to)
        if contact is None or self.db.is_own(contact):
            log.info("transcript %s for a conversation this device does not have",
                     transcript.message_id.hex())
            return []
        attachment = transcript.attachment
        if not self.db.insert_transcripts(
                contact=contact, now_ms=now_ms, kind="text" if attachment is None else "file",
                messages=[(transcript.message_id, transcript.body, transcript.sent_at_ms)]):
            return []
        if attachment is not None:  # downloaded from the sending device, as a recipient does
            self.db.add_transcript_attachment(contact, transcript.message_id,
                                              attachment.to_bytes(), attachment.sha256,
                                              now_ms=now_ms)
        return [MessageSent(message_id=transcript.message_id.hex(), contact=contact.name)]

    def _write(self, plan: Plan) -> tuple[list[Event], list[bytes], list[bytes]]:
        """Apply `plan`; returns the events to publish after the commit, the devices whose
        session became usable for sending, and the known devices whose relays changed."""
        db, now = self.db, plan.now_ms
        contacts: dict[bytes, Contact] = {}
        usable: list[bytes] = []

        def contact(account: bytes) -> Contact:
            found = contacts.get(account) or db.contact_by_account(account)
            if found is None:  # the machine names only contacts it read in this transaction
                raise StorageError("a contact vanished inside its own transaction")
            contacts[account] = found
            return found

        for new in plan.new_contacts:
            contacts[new.account] = added = db.add_contact(new.name, new.account, now_ms=now)
            db.put_device(added.id, new.device, new.peer_id, new.addrs, relays=new.relays,
                          binding=new.binding, cap=new.cap, box=new.box,
                          seen_at_ms=new.seen_at_ms, now_ms=now)
        # Our cached records become the machine's advanced copies (saved below), so what the
        # receipts received do to them (delivery acknowledges sessions) builds on them.
        prekeys = plan.prekeys if plan.prekeys is not None else self.sessions.prekeys
        for account, device, record in plan.sessions:
            if record.can_encrypt and not self.sessions.record(account, device).can_encrypt:
                usable.append(device)
            self.sessions.adopt(account, device, record, prekeys)
        seen: dict[bytes, list[bytes]] = {}
        for account, message_id in plan.seen:
            seen.setdefault(account, []).append(message_id)
        for account, ids in seen.items():
            db.mark_seen(account, ids, now_ms=now)
        moved: list[bytes] = []
        for update in plan.device_updates:
            known = db.device(update.device)
            # Moved: relays we knew were replaced by others. Not information older than what
            # we hold, which is not applied (PROTOCOL.md section 21 "Where a device is").
            if db.put_device(contact(update.account).id, update.device, update.peer_id,
                             update.addrs, relays=update.relays, cap=update.cap,
                             box=update.box, seen_at_ms=update.seen_at_ms, now_ms=now):
                stored = db.device(update.device)
                if (known is not None and known.relays and stored is not None
                        and set(known.relays) != set(stored.relays)):
                    moved.append(update.device)
        events: list[Event] = []
        for change in plan.syncs:
            events.extend(self._apply_sync(change, now))
            contacts.pop(change.account, None)
        for notice in plan.notices:
            if isinstance(notice, machine.ReceivedText):
                events.append(MessageReceived(
                    message_id=notice.message_id.hex(), contact=notice.contact, text=notice.body,
                    sent_at_ms=notice.sent_at_ms, received_at_ms=now,
                    attachment=AttachmentInfo.of(notice.attachment, "offered")
                    if notice.attachment is not None else None))
            elif isinstance(notice, machine.NewContact):
                events.append(ContactAdded(contact=notice.name, account_id=notice.account_id))
            elif isinstance(notice, machine.DeliveryConfirmed):
                events.extend(self.on_receipt(notice.device, notice.ids))
            elif isinstance(notice, machine.DeviceListReceived):
                if self.on_device_list is not None:
                    events.extend(self.on_device_list(notice))
            else:
                events.extend(self._transcript(notice, now))
        texts: dict[bytes, list[NewMessage]] = {}
        files: dict[bytes, list[tuple[bytes, bytes, bytes]]] = {}
        for text in plan.texts:
            texts.setdefault(text.account, []).append(
                (text.message_id, "text" if text.attachment is None else "file", text.body,
                 text.sent_at_ms))
            if text.attachment is not None:
                files.setdefault(text.account, []).append(
                    (text.message_id, text.attachment.to_bytes(), text.attachment.sha256))
        for account, rows in texts.items():
            db.insert_incoming(contact=contact(account), messages=rows, received_at_ms=now)
        if self.on_group is not None:
            for item in plan.groups:
                events.extend(self.on_group(item, now))
        for account, attachments in files.items():
            db.add_incoming_attachments(contact(account), attachments, now_ms=now)
        if (files or any(t.attachment for t in plan.transcripts)) and self.on_files is not None:
            self.on_files()
        for receipt in plan.receipts:
            body = json.dumps([i.hex() for i in receipt.ids])
            db.insert_outgoing(contact=contact(receipt.account),
                               messages=[(os.urandom(16), "receipt", body, now)],
                               devices=[receipt.device], now_ms=now)
        for account, device, _ in plan.sessions:
            self.sessions.save(account, device)
        if plan.prekeys is not None:
            self.sessions.save_prekeys()
        return events, usable, moved

    def _apply_sync(self, change: machine.SyncChange, now: int) -> list[Event]:
        """A contact added, renamed or removed on another device of our account (PROTOCOL.md
        section 25.6), or its messages read there, inside the batch's transaction; returns the
        events to announce. A name taken here by someone else keeps this device's names as they
        are (logged): names are this account's own labels."""
        db = self.db
        existing = db.contact_by_account(change.account)
        if existing is not None and db.is_own(existing):
            return []
        if change.op == "read":
            return self._apply_read(existing, change, now)
        name = clean_name(change.name)
        try:
            if change.op == "contact-remove":
                if existing is not None:
                    for d in db.devices(existing.id):
                        self.sessions.drop(existing.account, d.device)
                    db.remove_contact(existing)
                return []
            if existing is None and change.op == "contact-add" and name:
                existing = db.add_contact(name, change.account, now_ms=now)
            elif existing is not None and name and name != existing.name:
                existing = db.rename_contact(existing, name)
        except ContactError as exc:
            log.info("a contact change from another device of ours was not applied: %s", exc)
        if existing is not None and change.op == "contact-add":
            for device, addrs, relays in change.devices:
                try:
                    peer_id = DeviceKey.from_bytes(device).peer_id()
                except NodeError:
                    continue
                # A sync carries no time for where the device is: it fills only what is
                # unknown here (PROTOCOL.md section 21 "Where a device is").
                db.put_device(existing.id, device, peer_id, addrs, relays=relays, seen_at_ms=0,
                              now_ms=now)
        return []

    def _apply_read(self, contact: Contact | None, change: machine.SyncChange, now: int
                    ) -> list[Event]:
        """Another device of ours read the contact's messages up to one (PROTOCOL.md section
        25.6, `read`): everything here sent at or before it becomes read, and the contact's
        read mark rises, so what arrives later and is older is filed as read too. A mark below
        the one here changes nothing. A contact this device does not have is dropped (removed
        here, or its `contact-add` is still on the way), like a transcript's (section 25.5)."""
        if contact is None or change.read_sent_at_ms is None:
            log.info("a read sync for a conversation this device does not have")
            return []
        up_to = change.read_sent_at_ms
        if change.read_id is not None:
            # The message itself, if here, whatever the sender's clock said of it.
            named = self.db.newest_incoming(contact, change.read_id)
            if named is not None:
                up_to = max(up_to, named.sent_at_ms)
        count, _ = self.db.mark_read(contact, up_to_ms=up_to, now_ms=now)
        return [MessagesRead(contact=contact.name, count=count)] if count else []
