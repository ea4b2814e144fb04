"""Receiving: frames from a device's stream are decoded with limits, de-duplicated by message id,
decrypted, committed to SQLite, and only then acknowledged and announced as events.

A burst of frames is one batch: one transaction, one ack frame. A crash before the commit means
the sender resends (nothing was acked); a crash after it means the resend is recognised as a
duplicate and acked again. Either way the user sees each message exactly once.

The sending device is the one the connection authenticated. A device we do not know may only
introduce itself: its first message must be a prekey message carrying an intro with the token of
one of our invites; then it becomes a contact. Anything else from it is refused.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from node.config import MAX_BATCH, MAX_CONSECUTIVE_FAILURES, MAX_FRAMES_PER_S, MAX_NAME_CHARS
from node.errors import (
    DecodeError,
    DecryptionFailed,
    LimitExceeded,
    NodeError,
    RemoteError,
)
from node.eventbus import EventBus
from node.events import ContactAdded, Event, MessageReceived
from node.protocol.content import Intro, Text, decode_content
from node.protocol.keys import IdentityKey
from node.protocol.prekeys import PreKeyStore
from node.protocol.session import PREKEY_MESSAGE_TYPE, SessionRecord, prekey_message_sender
from node.protocol.wire import MAX_ACK_IDS, Ack, Msg, Nack, decode_frame, encode_frame
from node.sessions import SessionStore
from node.storage import Contact, Database
from node.transport import FrameStream

log = logging.getLogger("pigeon.inbound")

__all__ = ["Inbound", "PeerMisbehaving", "clean_name"]


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


@dataclass
class BatchResult:
    acks: list[bytes] = field(default_factory=list)
    nacks: list[tuple[bytes, str]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    failures: int = 0  # frames refused in this batch
    accepted: int = 0
    error: NodeError | None = None  # a frame that breaks the stream (after the good ones)


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
    ) -> None:
        self.db = db
        self.sessions = sessions
        self.bus = bus
        self.now_ms = now_ms
        self.on_device_active = on_device_active
        self.disconnect = disconnect

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
            result = self.process(device, stream.remote_peer_id, frames)
            # Announce the batch as soon as it is committed, before acking it: if the ack write
            # fails (the sender's stream was reset), the commit stands and the resend is only
            # acked as a duplicate, so events published after the write were lost for good
            # (found by tests/test_node.py::
            # test_sender_stopped_mid_delivery_resumes_without_loss_or_duplicates).
            for event in result.events:
                self.bus.publish(event)
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

    # --- one batch (synchronous: one transaction) -----------------------------------------------

    def process(self, device: bytes, peer_id: str, frames: list[bytes]) -> BatchResult:
        result = BatchResult()
        messages: list[Msg] = []
        for raw in frames:
            try:
                frame = decode_frame(raw)
            except NodeError as exc:
                result.error = exc
                break
            if not isinstance(frame, Msg):
                result.error = DecodeError(f"unexpected {type(frame).__name__} frame on inbound stream")
                break
            messages.append(frame)
        known = self.db.device(device)
        contact = self.db.contact_by_id(known.contact_id) if known else None
        touched: set[tuple[bytes, bytes]] = set()
        prekeys_used = False
        seen: set[bytes] | None = None  # ids accepted before or in this batch
        accepted: list[bytes] = []
        texts: list[tuple[bytes, str, str, int]] = []
        now = self.now_ms()
        try:
            with self.db.transaction():
                for frame in messages:
                    if contact is None:
                        contact = self._introduce(device, peer_id, frame, result)
                        if contact is not None:
                            touched.add((contact.account, device))
                            prekeys_used = True
                        continue
                    if seen is None:
                        seen = self.db.seen_among(contact.account, [m.id for m in messages])
                    if frame.id in seen:
                        result.acks.append(frame.id)  # a resend: ack again, show nothing
                        continue
                    record = self.sessions.record(contact.account, device)
                    try:
                        plaintext = record.decrypt(
                            frame.message,
                            identity=self.sessions.identity,
                            remote_identity=IdentityKey(contact.account),
                            prekeys=self.sessions.prekeys,
                        )
                    except (DecryptionFailed, LimitExceeded) as exc:
                        log.info("message %s from %s refused: %s", frame.id.hex(), contact.name, exc)
                        result.nacks.append((frame.id, "undecryptable"))
                        result.failures += 1
                        continue
                    touched.add((contact.account, device))
                    prekeys_used |= frame.message[0] == PREKEY_MESSAGE_TYPE
                    seen.add(frame.id)
                    accepted.append(frame.id)
                    self._deliver(contact, device, peer_id, frame, plaintext, result, texts, now)
                if contact is not None:
                    self.db.mark_seen(contact.account, accepted, now_ms=now)
                    self.db.insert_incoming(contact=contact, messages=texts, received_at_ms=now)
                for account, dev in touched:
                    self.sessions.save(account, dev)
                if prekeys_used:
                    self.sessions.save_prekeys()
        except BaseException:
            self.sessions.forget(touched, prekeys=prekeys_used)
            raise
        return result

    def _deliver(self, contact: Contact, device: bytes, peer_id: str, frame: Msg,
                 plaintext: bytes, result: BatchResult, texts: list[tuple[bytes, str, str, int]],
                 now: int) -> None:
        """Act on one decrypted message: texts are collected for one insert per batch."""
        try:
            content = decode_content(plaintext)
            if content.id != frame.id:
                raise DecodeError("content id differs from frame id")
        except DecodeError as exc:
            log.info("message %s from %s is malformed: %s", frame.id.hex(), contact.name, exc)
            result.nacks.append((frame.id, "malformed"))
            result.failures += 1
            return
        result.accepted += 1
        result.acks.append(frame.id)
        if isinstance(content, Text):
            texts.append((content.id, "text", content.body, content.sent_at_ms))
            result.events.append(MessageReceived(
                message_id=content.id.hex(), contact=contact.name, text=content.body,
                sent_at_ms=content.sent_at_ms, received_at_ms=now))
        elif isinstance(content, Intro):
            self.db.put_device(contact.id, device, peer_id, content.addrs, now_ms=now)

    def _introduce(self, device: bytes, peer_id: str, frame: Msg, result: BatchResult
                   ) -> Contact | None:
        """A message from an unknown device: accept it only as an invited introduction."""
        try:
            sender = prekey_message_sender(frame.message)
        except NodeError:
            sender = None
        if sender is None or self.db.contact_by_account(sender.to_bytes()) is not None:
            # Not a first message, or a new device of a known account (not supported yet).
            result.nacks.append((frame.id, "unknown-sender"))
            result.failures += 1
            return None
        # Decrypt against copies: nothing is kept unless the introduction is accepted.
        prekeys = PreKeyStore.from_bytes(self.sessions.prekeys.to_bytes())
        record = SessionRecord()
        try:
            plaintext = record.decrypt(frame.message, identity=self.sessions.identity,
                                       remote_identity=sender, prekeys=prekeys)
            content = decode_content(plaintext)
        except NodeError as exc:
            log.info("introduction from %s refused: %s", peer_id, exc)
            result.nacks.append((frame.id, "unknown-sender"))
            result.failures += 1
            return None
        now = self.now_ms()
        if (not isinstance(content, Intro) or content.id != frame.id or content.token is None
                or not self.db.invite_is_valid(content.token, now_ms=now)):
            log.info("introduction from %s refused: no valid invite token", peer_id)
            result.nacks.append((frame.id, "unknown-sender"))
            result.failures += 1
            return None
        contact = self.db.add_contact(self._free_name(content.name), sender.to_bytes(), now_ms=now)
        self.db.put_device(contact.id, device, peer_id, content.addrs, now_ms=now)
        self.sessions.adopt(sender.to_bytes(), device, record, prekeys)
        self.db.mark_seen(contact.account, [frame.id], now_ms=now)
        result.accepted += 1
        result.acks.append(frame.id)
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

