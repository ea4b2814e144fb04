"""Receiving: messages are decoded with limits, de-duplicated by message id, decrypted,
committed to SQLite, and only then acknowledged and announced as events.

Messages come from a device's direct stream (the device is the one the connection authenticated)
or from our relays (the device is the one a sealed envelope claims; decryption proves it, since
only that device's session decrypts). A burst is one batch: one transaction, one acknowledgement.
A crash before the commit means the sender resends or the relay still holds the envelope; a crash
after it means the repeat is recognised as a duplicate and acknowledged again. Either way the user
sees each message exactly once.

A device we do not know may only introduce itself: its first message must be a prekey message
carrying an intro with the token of one of our invites; then it becomes a contact. Anything else
from it is refused. Messages that came through a relay are confirmed to their sender with a
receipt (queued like a message), since the sender cannot see the relay's acknowledgement.
"""

from __future__ import annotations

import json
import logging
import os
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from node.device.config import MAX_BATCH, MAX_CONSECUTIVE_FAILURES, MAX_FRAMES_PER_S, MAX_NAME_CHARS
from node.device.eventbus import EventBus
from node.device.events import ContactAdded, Event, MessageReceived
from node.device.session_store import SessionStore
from node.device.storage import Contact, Database
from node.errors import (
    DecodeError,
    DecryptionFailed,
    LimitExceeded,
    NodeError,
    RemoteError,
)
from node.net import FrameStream
from node.protocol.content import MAX_RECEIPT_IDS, Intro, Receipt, Text, decode_content
from node.protocol.keys import IdentityKey
from node.protocol.prekeys import PreKeyStore
from node.protocol.session import PREKEY_MESSAGE_TYPE, SessionRecord, prekey_message_sender
from node.protocol.wire import MAX_ACK_IDS, Ack, Msg, Nack, decode_frame, encode_frame

log = logging.getLogger("pigeon.inbound")

__all__ = ["Inbound", "Incoming", "PeerMisbehaving", "clean_name"]


class PeerMisbehaving(RemoteError):
    """A peer flooded frames or kept sending what cannot be accepted; it is disconnected."""


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, count: int) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if count > self.tokens:
            return False
        self.tokens -= count
        return True


@dataclass(frozen=True, slots=True)
class Incoming:
    """One session message to receive: from a direct stream, or out of a sealed envelope."""

    device: bytes  # the sending device (authenticated by the transport, or claimed by the envelope)
    peer_id: str
    message_id: bytes
    message: bytes
    claimed_account: bytes | None = None  # the envelope's sender account; None on direct streams


@dataclass
class BatchResult:
    acks: list[bytes] = field(default_factory=list)
    nacks: list[tuple[bytes, str]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    failures: int = 0  # messages refused in this batch
    accepted: int = 0
    error: NodeError | None = None  # a frame that breaks the stream (after the good ones)
    receipts_for: set[bytes] = field(default_factory=set)  # devices with a receipt queued


class Inbound:
    def __init__(
        self,
        *,
        db: Database,
        sessions: SessionStore,
        bus: EventBus,
        now_ms: Callable[[], int],
        on_device_active: Callable[[bytes], None],
        disconnect: Callable[[str], Awaitable[None]],
        on_receipt: Callable[[bytes, Sequence[bytes]], list[Event]],
    ) -> None:
        self.db = db
        self.sessions = sessions
        self.bus = bus
        self.now_ms = now_ms
        self.on_device_active = on_device_active  # wakes the device's delivery lane
        self.disconnect = disconnect
        self.on_receipt = on_receipt  # marks our messages delivered (inside our transaction)

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
        bucket = TokenBucket(MAX_FRAMES_PER_S, 2 * MAX_FRAMES_PER_S)
        consecutive_failures = 0
        self.on_device_active(device)
        while True:
            frames = await stream.receive_batch(MAX_BATCH)
            if not frames:
                return
            if not bucket.take(len(frames)):
                raise PeerMisbehaving(f"more than {MAX_FRAMES_PER_S} frames/s: flooding")
            items, error = _decode_frames(device, stream.remote_peer_id, frames)
            result = self.process(items)
            result.error = result.error or error
            # Announce the batch as soon as it is committed, before acking it: if the ack write
            # fails (the sender's stream was reset), the commit stands and the resend is only
            # acked as a duplicate, so events published after the write would be lost for good.
            self.publish(result)
            replies = [encode_frame(Ack(tuple(result.acks[i:i + MAX_ACK_IDS])))
                       for i in range(0, len(result.acks), MAX_ACK_IDS)]
            replies += [encode_frame(Nack(mid, code)) for mid, code in result.nacks]
            if replies:
                await stream.send(replies)
            if result.error is not None:
                raise result.error
            consecutive_failures = 0 if result.accepted else consecutive_failures + result.failures
            if consecutive_failures > MAX_CONSECUTIVE_FAILURES:
                raise PeerMisbehaving(f"{consecutive_failures} frames in a row refused")

    def publish(self, result: BatchResult) -> None:
        """After the commit: events out, and lanes woken for the receipts queued."""
        for event in result.events:
            self.bus.publish(event)
        for device in result.receipts_for:
            self.on_device_active(device)

    # --- one batch (synchronous: one transaction) -------------------------------------------------

    def process(self, items: Sequence[Incoming]) -> BatchResult:
        """Receive `items` in one transaction. `result.acks` lists the ids whose sender (or
        relay) may forget them: committed now, or before (duplicates)."""
        result = BatchResult()
        now = self.now_ms()
        contacts: dict[bytes, Contact | None] = {}  # device -> contact, within this batch
        seen: dict[bytes, set[bytes]] = {}  # account -> ids accepted before or in this batch
        texts: dict[int, tuple[Contact, list[tuple[bytes, str, str, int]]]] = {}
        relayed: dict[bytes, tuple[Contact, list[bytes]]] = {}  # device -> ids to confirm
        touched: set[tuple[bytes, bytes]] = set()
        prekeys_used = False
        try:
            with self.db.transaction():
                for item in items:
                    if item.device not in contacts:
                        known = self.db.device(item.device)
                        contacts[item.device] = \
                            self.db.contact_by_id(known.contact_id) if known else None
                    contact = contacts[item.device]
                    if contact is None:
                        contact = self._introduce(item, result)
                        if contact is None:
                            continue
                        contacts[item.device] = contact
                        touched.add((contact.account, item.device))
                        prekeys_used = True
                        if item.claimed_account is not None:
                            relayed.setdefault(item.device, (contact, []))[1].append(
                                item.message_id)
                        continue
                    if item.claimed_account is not None and item.claimed_account != contact.account:
                        # An envelope naming one account for a device of another.
                        result.nacks.append((item.message_id, "unknown-sender"))
                        result.failures += 1
                        continue
                    if contact.account not in seen:
                        seen[contact.account] = self.db.seen_among(
                            contact.account, [i.message_id for i in items])
                    if item.message_id in seen[contact.account]:
                        result.acks.append(item.message_id)  # a repeat: ack again, show nothing
                        continue
                    record = self.sessions.record(contact.account, item.device)
                    try:
                        plaintext = record.decrypt(
                            item.message,
                            identity=self.sessions.identity,
                            remote_identity=IdentityKey(contact.account),
                            prekeys=self.sessions.prekeys,
                        )
                    except (DecryptionFailed, LimitExceeded) as exc:
                        log.info("message %s from %s refused: %s", item.message_id.hex(),
                                 contact.name, exc)
                        result.nacks.append((item.message_id, "undecryptable"))
                        result.failures += 1
                        continue
                    touched.add((contact.account, item.device))
                    prekeys_used |= item.message[0] == PREKEY_MESSAGE_TYPE
                    seen[contact.account].add(item.message_id)
                    self.db.mark_seen(contact.account, [item.message_id], now_ms=now)
                    kind = self._deliver(contact, item, plaintext, result, texts, now)
                    if item.claimed_account is not None and kind in ("text", "intro"):
                        relayed.setdefault(item.device, (contact, []))[1].append(item.message_id)
                for contact, rows in texts.values():
                    self.db.insert_incoming(contact=contact, messages=rows, received_at_ms=now)
                for device, (contact, ids) in relayed.items():
                    self._queue_receipt(contact, device, ids, now)
                    result.receipts_for.add(device)
                for account, device in touched:
                    self.sessions.save(account, device)
                if prekeys_used:
                    self.sessions.save_prekeys()
        except BaseException:
            self.sessions.forget(touched, prekeys=prekeys_used)
            raise
        return result

    def _deliver(self, contact: Contact, item: Incoming, plaintext: bytes, result: BatchResult,
                 texts: dict[int, tuple[Contact, list[tuple[bytes, str, str, int]]]],
                 now: int) -> str | None:
        """Act on one decrypted message; returns its content kind (None if malformed)."""
        try:
            content = decode_content(plaintext)
            if content.id != item.message_id:
                raise DecodeError("content id differs from frame id")
        except DecodeError as exc:
            log.info("message %s from %s is malformed: %s", item.message_id.hex(), contact.name,
                     exc)
            result.nacks.append((item.message_id, "malformed"))
            result.failures += 1
            return None
        result.accepted += 1
        result.acks.append(item.message_id)
        if isinstance(content, Text):
            texts.setdefault(contact.id, (contact, []))[1].append(
                (content.id, "text", content.body, content.sent_at_ms))
            result.events.append(MessageReceived(
                message_id=content.id.hex(), contact=contact.name, text=content.body,
                sent_at_ms=content.sent_at_ms, received_at_ms=now))
            return "text"
        if isinstance(content, Receipt):
            result.events.extend(self.on_receipt(item.device, content.ids))
            return "receipt"
        self.db.put_device(contact.id, item.device, item.peer_id, content.addrs,
                           relays=content.relays, now_ms=now)
        return "intro"

    def _queue_receipt(self, contact: Contact, device: bytes, ids: list[bytes], now: int) -> None:
        for start in range(0, len(ids), MAX_RECEIPT_IDS):
            chunk = ids[start:start + MAX_RECEIPT_IDS]
            self.db.insert_outgoing(
                contact=contact, messages=[(os.urandom(16), "receipt",
                                            json.dumps([i.hex() for i in chunk]), now)],
                devices=[device], now_ms=now)

    def _introduce(self, item: Incoming, result: BatchResult) -> Contact | None:
        """A message from an unknown device: accept it only as an invited introduction."""
        try:
            sender = prekey_message_sender(item.message)
        except NodeError:
            sender = None
        if (sender is None or self.db.contact_by_account(sender.to_bytes()) is not None
                or item.claimed_account not in (None, sender.to_bytes())):
            # Not a first message, a new device of a known account (not supported yet), or an
            # envelope whose claimed account is not the one in the message.
            result.nacks.append((item.message_id, "unknown-sender"))
            result.failures += 1
            return None
        # Decrypt against copies: nothing is kept unless the introduction is accepted.
        prekeys = PreKeyStore.from_bytes(self.sessions.prekeys.to_bytes())
        record = SessionRecord()
        try:
            plaintext = record.decrypt(item.message, identity=self.sessions.identity,
                                       remote_identity=sender, prekeys=prekeys)
            content = decode_content(plaintext)
        except NodeError as exc:
            log.info("introduction from %s refused: %s", item.peer_id, exc)
            result.nacks.append((item.message_id, "unknown-sender"))
            result.failures += 1
            return None
        now = self.now_ms()
        if (not isinstance(content, Intro) or content.id != item.message_id
                or content.token is None
                or not self.db.invite_is_valid(content.token, now_ms=now)):
            log.info("introduction from %s refused: no valid invite token", item.peer_id)
            result.nacks.append((item.message_id, "unknown-sender"))
            result.failures += 1
            return None
        contact = self.db.add_contact(self._free_name(content.name), sender.to_bytes(), now_ms=now)
        self.db.put_device(contact.id, item.device, item.peer_id, content.addrs,
                           relays=content.relays, now_ms=now)
        self.sessions.adopt(sender.to_bytes(), item.device, record, prekeys)
        self.db.mark_seen(contact.account, [item.message_id], now_ms=now)
        result.accepted += 1
        result.acks.append(item.message_id)
        result.events.append(ContactAdded(contact=contact.name, account_id=sender.account_id()))
        log.info("%s (%s) joined through an invite", contact.name, sender.account_id())
        return contact

    def _free_name(self, suggested: str) -> str:
        # The name must obey the same rules as a name the user types (node._valid_name): no
        # leading '-' (a joiner called "--data-dir=x" would look like an option on the command
        # line) and at most MAX_NAME_CHARS with the "-N" suffix included. Found by
        # tests/test_node.py::test_joiners_with_clashing_or_unprintable_names_get_usable_names.
        name = clean_name(clean_name(suggested).lstrip("-")) or "contact"
        candidate, n = name, 1
        while self.db.contact_by_name(candidate) is not None:
            n += 1
            suffix = f"-{n}"
            candidate = clean_name(name[: MAX_NAME_CHARS - len(suffix)]) + suffix
        return candidate


def clean_name(name: str) -> str:
    """A display name made safe to show and to use as a contact name: no control characters,
    single spaces, at most MAX_NAME_CHARS characters."""
    kept = "".join(c for c in name if unicodedata.category(c)[0] != "C")
    return " ".join(kept.split())[:MAX_NAME_CHARS]



def _decode_frames(device: bytes, peer_id: str, frames: list[bytes]
                   ) -> tuple[list[Incoming], NodeError | None]:
    """The `msg` frames of a direct stream as items, up to the first frame that breaks it."""
    items: list[Incoming] = []
    for raw in frames:
        try:
            frame = decode_frame(raw)
        except NodeError as exc:
            return items, exc
        if not isinstance(frame, Msg):
            return items, DecodeError(f"unexpected {type(frame).__name__} frame on inbound stream")
        items.append(Incoming(device, peer_id, frame.id, frame.message))
    return items, None
