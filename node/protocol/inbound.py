"""Receiving, decided without I/O (PROTOCOL.md sections 13 "Direct messaging", 14 "Invites and
introductions" and 21 "Relay mailbox").

Messages come from a device's direct stream (the device is the one the connection authenticated)
or from our relays (the device is the one a sealed envelope claims; decryption proves it, since
only that device's session decrypts). A burst is one batch, and the machine turns it into one
`Plan`: everything to write in ONE transaction, the notices to announce after the commit, and the
acks and nacks to send after that.

The machine reads through an `InboundView` and never writes: sessions and prekeys are decrypted
on copies, and the copies that advanced are in the plan (decrypt on a copy, commit on success:
libsignal's rule). So a plan that is never applied (the shell crashed before its commit) changed
nothing, and the same frames fed again are decided the same way; once a plan is applied, the same
frames are duplicates, acknowledged again and shown never. Either way the user sees each message
exactly once.

A device we do not know may only introduce itself: its first message must be a prekey message
carrying an intro with the token of one of our invites (section 14); then it becomes a contact.
Anything else from it is refused. Messages that came through a relay are confirmed to their
sender with a receipt (queued like a message), since the sender cannot see the relay's ack.

Anyone holding our public bundle can make a first message, and deciding one costs a PQXDH
agreement before its AEAD check can fail. A `StrangerGate`, kept by the shell across batches and
streams, bounds that work (PROTOCOL.md section 20 "Work a stranger can cause"): a first message
refused once is remembered by its hash, so its replay costs one hash; and on direct streams the
first messages of unknown devices share one token bucket, beyond which they are deferred (neither
acked nor refused, and the stream ends) before anything is derived. Contacts are never charged.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Protocol

from node.errors import (
    DecodeError,
    DecryptionFailed,
    InvalidRecord,
    LimitExceeded,
    NodeError,
    RemoteError,
)
from node.protocol.attachment import Descriptor
from node.protocol.binding import verify_binding
from node.protocol.content import (
    MAX_RECEIPT_IDS,
    Content,
    DeviceHint,
    DeviceListUpdate,
    File,
    GroupMessage,
    GroupOps,
    Intro,
    Receipt,
    SenderKey,
    Sync,
    SyncOp,
    Text,
    Transcript,
    decode_content,
)
from node.protocol.devicelist import DeviceList
from node.protocol.keys import DeviceKey, IdentityKey, IdentityKeyPair
from node.protocol.prekeys import PreKeyStore
from node.protocol.ratelimit import TokenBucket
from node.protocol.session import PREKEY_MESSAGE_TYPE, SessionRecord, prekey_message_sender
from node.protocol.wire import MAX_ACK_IDS, Ack, Msg, Nack, NackCode, decode_frame, encode_frame

__all__ = [
    "ContactRef",
    "DeliveryConfirmed",
    "DeviceListReceived",
    "DeviceUpdate",
    "InboundLimits",
    "InboundStream",
    "InboundView",
    "Incoming",
    "NewContact",
    "Notice",
    "PeerMisbehaving",
    "Plan",
    "QueuedReceipt",
    "ReceivedGroupContent",
    "ReceivedText",
    "ReceivedTranscript",
    "Refusal",
    "StrangerGate",
    "SyncChange",
    "clean_name",
    "decide_batch",
    "decode_frames",
]


class PeerMisbehaving(RemoteError):
    """A peer flooded frames or kept sending what cannot be accepted. Raised (by the shell) after
    the replies of the batch are written; the peer's stream is reset and the peer disconnected.
    Nothing to do locally: a genuine peer that lost its state recovers by reconnecting."""


# --- what goes in ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Incoming:
    """One session message to receive: from a direct stream, or out of a sealed envelope."""

    device: bytes  # the sending device (authenticated by the transport, or claimed by the envelope)
    peer_id: str
    message_id: bytes
    message: bytes
    claimed_account: bytes | None = None  # the envelope's sender account; None on direct streams


@dataclass(frozen=True, slots=True)
class ContactRef:
    """A contact as the machine needs it: its account (identity key bytes) and its name."""

    account: bytes
    name: str


@dataclass(frozen=True, kw_only=True, slots=True)
class InboundLimits:
    """The receiver's limits (PROTOCOL.md section 13 "Limits"), handed in by the shell."""

    frames_per_s: int  # token bucket rate; the burst is twice it
    max_consecutive_failures: int  # refused messages in a row before the peer is cut off
    max_name_chars: int  # longest contact name

    def __post_init__(self) -> None:
        if self.frames_per_s <= 0 or self.max_consecutive_failures < 0 or self.max_name_chars < 8:
            raise ValueError("inbound limits must be positive (names at least 8 characters)")


class InboundView(Protocol):
    """What the machine reads, and all it reads: the shell implements it over its database and
    session store, tests in memory. Nothing the machine gets from it is mutated."""

    @property
    def identity(self) -> IdentityKeyPair:
        """Our account's identity key pair."""
        ...

    def contact_of_device(self, device: bytes) -> ContactRef | None:
        """The contact `device` belongs to, if it is a known device."""
        ...

    def contact_of_account(self, account: bytes) -> ContactRef | None:
        """The contact with this account, if any."""
        ...

    def seen_among(self, account: bytes, message_ids: Sequence[bytes]) -> Set[bytes]:
        """Which of `message_ids` were accepted from `account` before."""
        ...

    def session(self, account: bytes, device: bytes) -> SessionRecord:
        """The stored session record with (account, device); an empty one if there is none."""
        ...

    def prekeys(self) -> PreKeyStore:
        """Our private prekeys as stored."""
        ...

    def invite_is_valid(self, token: bytes, *, now_ms: int) -> bool:
        """Whether `token` is the token of one of our invites, unexpired at `now_ms`."""
        ...

    def name_taken(self, name: str) -> bool:
        """Whether a contact is named `name`."""
        ...


# --- what comes out -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class NewContact:
    """An accepted introduction: add the contact with its device. Announced as a contact added."""

    account: bytes
    account_id: str  # the account's text form, for the announcement
    name: str  # made unique among our contacts
    device: bytes
    peer_id: str
    addrs: tuple[str, ...]
    relays: tuple[str, ...]
    #: The device's verified binding to `account` (PROTOCOL.md section 4 "Binding"), or None
    #: for a direct intro without one (the transport authenticated the device).
    binding: bytes | None = None
    cap: bytes | None = None  # its deposit capability for its mailbox (section 21)
    box: bytes | None = None  # its contacts' mailbox (section 21)
    #: When `addrs` and `relays` were current, by the device's clock (section 21 "Where a
    #: device is").
    seen_at_ms: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceUpdate:
    """A known contact's device introduced itself again (or a device list hinted where a
    device is): store its addresses, relays and deposit capability, the addresses and relays
    only if not older than what is stored (section 21 "Where a device is")."""

    account: bytes
    device: bytes
    peer_id: str
    addrs: tuple[str, ...]
    relays: tuple[str, ...]
    cap: bytes | None = None
    box: bytes | None = None
    #: When `addrs` and `relays` were current, by the device's clock: an intro's `ts`,
    #: a device-list's `ts` for the sender's hint about itself; 0 when unknown (it then
    #: only fills what is unknown).
    seen_at_ms: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceivedText:
    """A text to insert into the history, and to announce."""

    account: bytes
    contact: str
    message_id: bytes
    body: str
    sent_at_ms: int
    #: A file message (PROTOCOL.md section 26.4): its attachment; `body` is then the caption.
    attachment: Descriptor | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncChange:
    """A change another device of our account made (PROTOCOL.md section 25.6): apply it to the
    contact with identity key `account`. A `read` names the newest message read (`read_id`) and
    its sender timestamp (`read_sent_at_ms`)."""

    op: SyncOp
    account: bytes
    name: str
    devices: tuple[tuple[bytes, tuple[str, ...], tuple[str, ...]], ...]
    read_id: bytes | None = None
    read_sent_at_ms: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceivedTranscript:
    """A text or file (`attachment`, `body` its caption) another device of our account sent to
    account `to` (PROTOCOL.md sections 25.5, 26.4): the shell adds it to that conversation as
    sent, unless the history has it already."""

    to: bytes
    message_id: bytes
    body: str
    sent_at_ms: int
    attachment: Descriptor | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceivedGroupContent:
    """A group content (PROTOCOL.md section 27.5) from `device` of `account`: the shell's group
    module checks it against the group's state and applies it in the batch's transaction."""

    account: bytes
    device: bytes
    content: GroupOps | SenderKey | GroupMessage


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceListReceived:
    """A verified device list of a contact's account or of our own (`own`), from one of its
    devices (PROTOCOL.md section 25.4). The shell keeps it if it is newer than the stored one,
    and then adds and removes devices to match."""

    account: bytes
    contact: str
    own: bool
    device_list: DeviceList
    signed: bytes
    hints: tuple[DeviceHint, ...]
    #: The device this list came from when it was that device's first message, unknown to us
    #: until then (it is added by the same plan).
    new_device: bytes | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class DeliveryConfirmed:
    """A receipt from `device`: our messages `ids` were committed by it. The shell marks them
    delivered inside the transaction and announces what that delivered."""

    device: bytes
    ids: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class QueuedReceipt:
    """A receipt to queue for `device` (of contact `account`) for messages that came through a
    relay; at most MAX_RECEIPT_IDS ids each."""

    account: bytes
    device: bytes
    ids: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Refusal:
    """A message refused for good: `code` (one of wire.NACK_CODES) goes to the sender, `reason`
    only to the local log."""

    message_id: bytes
    code: NackCode
    reason: str


#: What is announced after the commit, in the order the messages came.
Notice = NewContact | ReceivedText | DeliveryConfirmed | DeviceListReceived | ReceivedTranscript


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What to do with one batch. The shell applies the writes in ONE transaction (new contacts,
    device updates, seen ids, receipts received, texts, receipts to queue, sessions, prekeys),
    then announces `notices`, then sends `acks` and `nacks`, then raises `error` if any."""

    now_ms: int  # the time the batch was received: stored with what it writes
    new_contacts: tuple[NewContact, ...] = ()
    device_updates: tuple[DeviceUpdate, ...] = ()
    seen: tuple[tuple[bytes, bytes], ...] = ()  # (account, message id) accepted now
    texts: tuple[ReceivedText, ...] = ()
    syncs: tuple[SyncChange, ...] = ()  # changes from our other devices, in order
    transcripts: tuple[ReceivedTranscript, ...] = ()
    device_lists: tuple[DeviceListReceived, ...] = ()
    groups: tuple[ReceivedGroupContent, ...] = ()  # group contents, in order (section 27)
    confirmations: tuple[DeliveryConfirmed, ...] = ()
    receipts: tuple[QueuedReceipt, ...] = ()
    sessions: tuple[tuple[bytes, bytes, SessionRecord], ...] = ()  # (account, device, record)
    prekeys: PreKeyStore | None = None  # the prekey store to save, if a prekey message changed it
    notices: tuple[Notice, ...] = ()
    acks: tuple[bytes, ...] = ()  # ids the sender (or relay) may forget: committed now or before
    nacks: tuple[Refusal, ...] = ()
    accepted: int = 0
    failures: int = 0  # messages refused in this batch
    error: NodeError | None = None  # what ends the stream, after the replies
    # First messages of unknown devices over the strangers' budget: neither acked nor refused,
    # so the sender (or the relay) still holds them, and nothing was derived for them.
    deferred: tuple[bytes, ...] = ()

    def reply_frames(self) -> list[bytes]:
        """The frames to answer a direct stream with: the acks (in frames of at most MAX_ACK_IDS
        ids), then one nack per refused message."""
        replies = [encode_frame(Ack(self.acks[i:i + MAX_ACK_IDS]))
                   for i in range(0, len(self.acks), MAX_ACK_IDS)]
        replies += [encode_frame(Nack(r.message_id, r.code)) for r in self.nacks]
        return replies


# --- the machines ---------------------------------------------------------------------------------


class StrangerGate:
    """What unknown devices' first messages may cost us, across batches and streams (PROTOCOL.md
    section 20 "Work a stranger can cause"). Held by the shell for the node's lifetime.

    - `per_s` / `burst`: a token bucket shared by all unknown devices on direct streams; each
      first message decrypted takes one token, and one that finds none is deferred. Peer ids are
      free to make, so a per-peer bucket would bound nothing.
    - `remember`: how many refused first messages are remembered (SHA-256 of the bytes, oldest
      forgotten first), so that a replay is refused for the cost of one hash."""

    def __init__(self, *, per_s: float, burst: int, remember: int, now: float) -> None:
        if remember <= 0:
            raise ValueError("a stranger gate must remember at least one refusal")
        self._bucket = TokenBucket(per_s, burst, now=now)
        self._remember = remember
        self._refused: OrderedDict[bytes, None] = OrderedDict()

    @staticmethod
    def digest(message: bytes) -> bytes:
        """What a first message is remembered by."""
        return hashlib.sha256(message).digest()

    def refused_before(self, digest: bytes) -> bool:
        """Whether the first message with this digest was refused (and is still remembered)."""
        return digest in self._refused

    def refused(self, digest: bytes) -> None:
        """Remember a refused first message, forgetting the oldest beyond `remember`."""
        self._refused[digest] = None
        self._refused.move_to_end(digest)
        while len(self._refused) > self._remember:
            self._refused.popitem(last=False)

    def admit(self, *, now: float) -> bool:
        """Take the budget for decrypting one first message at monotonic time `now`."""
        return self._bucket.take(1, now=now)


class InboundStream:
    """The receiving side of one direct stream from `device`: its flood limit (a token bucket)
    and its count of refusals in a row, across the batches read from it."""

    def __init__(self, *, device: bytes, peer_id: str, limits: InboundLimits, now: float,
                 gate: StrangerGate | None = None) -> None:
        self.device = device
        self.peer_id = peer_id
        self.limits = limits
        self.gate = gate
        # Burst twice the rate, as PROTOCOL.md section 13 "Limits" says (20,000/s, burst 40,000).
        self._bucket = TokenBucket(limits.frames_per_s, 2 * limits.frames_per_s, now=now)
        self._consecutive_failures = 0

    def receive(self, frames: Sequence[bytes], *, now: float, now_ms: int,
                view: InboundView) -> Plan:
        """Decide about one batch of raw frames read together, at monotonic time `now` (seconds)
        and Unix time `now_ms`. A flood gives a plan with nothing but its error; a frame that
        breaks the stream gives a plan for the frames before it, with that frame's error."""
        if not self._bucket.take(len(frames), now=now):
            return Plan(now_ms=now_ms, error=PeerMisbehaving(
                f"more than {self.limits.frames_per_s} frames/s: flooding"))
        items, error = decode_frames(self.device, self.peer_id, frames)
        plan = decide_batch(items, view=view, now_ms=now_ms,
                            max_name_chars=self.limits.max_name_chars, gate=self.gate,
                            budget_now=now)
        if error is None:
            self._consecutive_failures = (
                0 if plan.accepted else self._consecutive_failures + plan.failures)
            if self._consecutive_failures > self.limits.max_consecutive_failures:
                error = PeerMisbehaving(f"{self._consecutive_failures} frames in a row refused")
            elif plan.deferred:
                # Over the strangers' budget: end the stream, so an attacker cannot keep it busy;
                # a genuine newcomer's sender writes the message again when it reconnects.
                error = PeerMisbehaving(
                    f"{len(plan.deferred)} first messages from unknown devices over the budget")
        return plan if error is None else replace(plan, error=error)

    def defer(self, frames: Sequence[bytes], *, now_ms: int) -> Plan:
        """The plan for a batch whose commit failed for a local reason (a full disk): nothing
        is written, and every message of it gets `nack` `retry-later` (PROTOCOL.md section 13),
        so the sender writes it again shortly instead of failing it or waiting out a backoff."""
        items, _ = decode_frames(self.device, self.peer_id, frames)
        return Plan(now_ms=now_ms, nacks=tuple(
            Refusal(message_id=i.message_id, code="retry-later", reason="cannot store it now")
            for i in items))


def decode_frames(device: bytes, peer_id: str, frames: Sequence[bytes]
                  ) -> tuple[list[Incoming], NodeError | None]:
    """The `msg` frames of a direct stream from `device` as items, up to the first frame that
    breaks the stream (PROTOCOL.md section 13: anything else on it is a protocol violation), and
    that frame's error."""
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


def decide_batch(items: Sequence[Incoming], *, view: InboundView, now_ms: int,
                 max_name_chars: int, gate: StrangerGate | None = None,
                 budget_now: float | None = None) -> Plan:
    """Decide about `items` received together at `now_ms` (from a direct stream or a relay).
    With a `gate`, refused first messages are remembered and their replays refused by hash; with
    `budget_now` too (direct streams), unknown devices' first messages are charged to its budget
    at that monotonic time, and deferred when it is spent."""
    return _Batch(items, view, now_ms, max_name_chars, gate, budget_now).run()


def clean_name(name: str, *, max_chars: int) -> str:
    """A display name made safe to show and to use as a contact name: no control characters,
    single spaces, at most `max_chars` characters."""
    kept = "".join(c for c in name if unicodedata.category(c)[0] != "C")
    return " ".join(kept.split())[:max_chars]


#: Content kinds that came through a relay and are confirmed with a receipt (receipts are not).
RECEIPTED_KINDS = frozenset({"text", "intro", "sync", "device-list", "transcript", "file",
                             "group-ops", "sender-key", "group"})


@dataclass
class _Relayed:
    account: bytes
    ids: list[bytes] = field(default_factory=list)


class _Batch:
    """The decisions about one batch, accumulated item by item into a plan."""

    def __init__(self, items: Sequence[Incoming], view: InboundView, now_ms: int,
                 max_name_chars: int, gate: StrangerGate | None = None,
                 budget_now: float | None = None) -> None:
        self.items = items
        self.view = view
        self.now_ms = now_ms
        self.max_name_chars = max_name_chars
        self.gate = gate
        self.budget_now = budget_now
        self.deferred: list[bytes] = []
        self.contacts: dict[bytes, ContactRef | None] = {}  # device -> contact, within the batch
        self.seen: dict[bytes, set[bytes]] = {}  # account -> ids accepted before or in the batch
        self.records: dict[tuple[bytes, bytes], SessionRecord] = {}  # working copies
        self.touched: dict[tuple[bytes, bytes], None] = {}  # records advanced (ordered set)
        self.prekeys: PreKeyStore | None = None  # working copy, made on first need
        self.prekeys_changed = False
        self.new_contacts: list[NewContact] = []
        self.device_updates: list[DeviceUpdate] = []
        self.marked: list[tuple[bytes, bytes]] = []
        self.texts: list[ReceivedText] = []
        self.syncs: list[SyncChange] = []
        self.transcripts: list[ReceivedTranscript] = []
        self.device_lists: list[DeviceListReceived] = []
        self.groups: list[ReceivedGroupContent] = []
        self.confirmations: list[DeliveryConfirmed] = []
        self.relayed: dict[bytes, _Relayed] = {}  # device -> ids to confirm with a receipt
        self.notices: list[Notice] = []
        self.acks: list[bytes] = []
        self.nacks: list[Refusal] = []
        self.accepted = 0

    def run(self) -> Plan:
        for item in self.items:
            self._one(item)
        receipts = tuple(
            QueuedReceipt(account=r.account, device=device,
                          ids=tuple(r.ids[i:i + MAX_RECEIPT_IDS]))
            for device, r in self.relayed.items()
            for i in range(0, len(r.ids), MAX_RECEIPT_IDS))
        return Plan(
            now_ms=self.now_ms,
            new_contacts=tuple(self.new_contacts),
            device_updates=tuple(self.device_updates),
            seen=tuple(self.marked),
            texts=tuple(self.texts),
            syncs=tuple(self.syncs),
            transcripts=tuple(self.transcripts),
            device_lists=tuple(self.device_lists),
            groups=tuple(self.groups),
            confirmations=tuple(self.confirmations),
            receipts=receipts,
            sessions=tuple((account, device, self.records[(account, device)])
                           for account, device in self.touched),
            prekeys=self.prekeys if self.prekeys_changed else None,
            notices=tuple(self.notices),
            acks=tuple(self.acks),
            nacks=tuple(self.nacks),
            accepted=self.accepted,
            failures=len(self.nacks),
            deferred=tuple(self.deferred),
        )

    # --- one item ---------------------------------------------------------------------------------

    def _one(self, item: Incoming) -> None:
        if item.device not in self.contacts:
            self.contacts[item.device] = self.view.contact_of_device(item.device)
        contact = self.contacts[item.device]
        if contact is None:
            self._introduce(item)
            return
        if item.claimed_account is not None and item.claimed_account != contact.account:
            self._refuse(item, "unknown-sender",
                         f"an envelope naming another account for a device of {contact.name}")
            return
        seen = self._seen(contact.account)
        if item.message_id in seen:
            self.acks.append(item.message_id)  # a repeat: ack again, show nothing
            return
        address = (contact.account, item.device)
        record = self._record(address)
        try:
            plaintext = record.decrypt(
                item.message,
                identity=self.view.identity,
                remote_identity=IdentityKey(contact.account),
                prekeys=self._prekeys(),
            )
        except (DecryptionFailed, LimitExceeded) as exc:
            self._refuse(item, "undecryptable", f"from {contact.name}: {exc}")
            return
        # The session advanced: it is saved even if the content turns out malformed, and the id
        # is taken, so a resend of the same bytes is a duplicate.
        self.touched[address] = None
        self.prekeys_changed |= item.message[0] == PREKEY_MESSAGE_TYPE
        seen.add(item.message_id)
        self.marked.append((contact.account, item.message_id))
        kind = self._deliver(contact, item, plaintext)
        if item.claimed_account is not None and kind in RECEIPTED_KINDS:
            self._relayed(contact.account, item)

    def _deliver(self, contact: ContactRef, item: Incoming, plaintext: bytes) -> str | None:
        """Act on one decrypted message; returns its content kind (None if malformed)."""
        try:
            content = decode_content(plaintext)
            if content.id != item.message_id:
                raise DecodeError("content id differs from frame id")
        except DecodeError as exc:
            self._refuse(item, "malformed", f"from {contact.name}: {exc}")
            return None
        own = contact.account == self.view.identity.public.to_bytes()
        if isinstance(content, Text | Intro | File) and own:
            # Our own devices send us transcripts, syncs and device lists, never texts or intros.
            self._refuse(item, "malformed", f"a {type(content).__name__} from our own device")
            return None
        if isinstance(content, Transcript) and not own:
            self._refuse(item, "malformed", f"a transcript from {contact.name}")
            return None
        if isinstance(content, Sync) and not own:
            # Only our own devices change our contacts (section 25.6).
            self._refuse(item, "malformed", f"from {contact.name}: a sync from another account")
            return None
        if isinstance(content, DeviceListUpdate):
            received = self._device_list(contact, content)
            if received is None:
                self._refuse(item, "malformed", f"a device list from {contact.name} that does"
                             " not verify or is not its account's")
                return None
            self.accepted += 1
            self.acks.append(item.message_id)
            self.device_lists.append(received)
            self.notices.append(received)
            # The sender's hint about itself says where it is now, as an intro does; the
            # device that added it knew only its link code's addresses (section 25.4).
            # Its `ts` dates it, as an intro's does (section 21 "Where a device is").
            hint = next((h for h in content.hints if h.device == item.device), None)
            if hint is not None:
                self.device_updates.append(DeviceUpdate(
                    account=contact.account, device=item.device, peer_id=item.peer_id,
                    addrs=hint.addrs, relays=hint.relays, seen_at_ms=content.sent_at_ms))
            return "device-list"
        self.accepted += 1
        self.acks.append(item.message_id)
        if isinstance(content, GroupOps | SenderKey | GroupMessage):
            # From a contact's device or our own (our other devices are members too); the
            # group's own rules (membership, signatures) are the shell's to check against state.
            self.groups.append(ReceivedGroupContent(account=contact.account, device=item.device,
                                                    content=content))
            return {GroupOps: "group-ops", SenderKey: "sender-key",
                    GroupMessage: "group"}[type(content)]
        if isinstance(content, Sync):
            self.syncs.append(SyncChange(op=content.op, account=content.account,
                                         name=content.name, devices=content.devices,
                                         read_id=content.read_id,
                                         read_sent_at_ms=content.read_sent_at_ms))
            return "sync"
        if isinstance(content, Transcript):
            transcript = ReceivedTranscript(to=content.to, message_id=content.id,
                                            body=content.body, sent_at_ms=content.sent_at_ms,
                                            attachment=content.attachment)
            self.transcripts.append(transcript)
            self.notices.append(transcript)
            return "transcript"
        if isinstance(content, Text):
            text = ReceivedText(account=contact.account, contact=contact.name,
                                message_id=content.id, body=content.body,
                                sent_at_ms=content.sent_at_ms)
            self.texts.append(text)
            self.notices.append(text)
            return "text"
        if isinstance(content, File):
            text = ReceivedText(account=contact.account, contact=contact.name,
                                message_id=content.id, body=content.caption,
                                sent_at_ms=content.sent_at_ms, attachment=content.attachment)
            self.texts.append(text)
            self.notices.append(text)
            return "file"
        if isinstance(content, Receipt):
            confirmed = DeliveryConfirmed(device=item.device, ids=content.ids)
            self.confirmations.append(confirmed)
            self.notices.append(confirmed)
            return "receipt"
        self.device_updates.append(DeviceUpdate(
            account=contact.account, device=item.device, peer_id=item.peer_id,
            addrs=content.addrs, relays=content.relays, cap=content.cap, box=content.box,
            seen_at_ms=content.seen_at_ms))
        return "intro"

    def _introduce(self, item: Incoming) -> None:
        """A message from an unknown device: accept it only as an invited introduction. Cheap
        checks first: the memory of refused first messages, the claimed sender, the budget; only
        then the PQXDH agreement and decryption."""
        digest = b""
        if self.gate is not None:
            digest = self.gate.digest(item.message)
            if self.gate.refused_before(digest):
                self._refuse(item, "unknown-sender", "a first message refused before")
                return
        try:
            sender: IdentityKey | None = prekey_message_sender(item.message)
        except NodeError:
            sender = None
        if sender is None:
            self._refuse(item, "unknown-sender", "not a first message, from an unknown device")
            return
        account = sender.to_bytes()
        known = self.view.contact_of_account(account)
        if known is None and any(c.account == account for c in self.new_contacts):
            self._refuse(item, "unknown-sender", "a second new device of a joining account")
            return
        if item.claimed_account not in (None, account):
            self._refuse(item, "unknown-sender",
                         "an envelope whose claimed account is not the one in the message")
            return
        if (self.gate is not None and self.budget_now is not None
                and not self.gate.admit(now=self.budget_now)):
            self.deferred.append(item.message_id)
            return
        if known is not None:
            self._new_device(item, known, sender, digest)
            return
        opened = self._open_first(item, sender, digest, "introduction")
        if opened is None:
            return
        record, prekeys, content = opened
        if (not isinstance(content, Intro) or content.id != item.message_id
                or content.token is None
                or not self.view.invite_is_valid(content.token, now_ms=self.now_ms)):
            self._refuse_first(item, digest,
                               f"introduction from {item.peer_id}: no valid invite token")
            return
        problem = _binding_problem(item, sender, content)
        if problem is not None:
            self._refuse_first(item, digest, f"introduction from {item.peer_id}: {problem}")
            return
        contact = NewContact(
            account=account, account_id=sender.account_id(), name=self._free_name(content.name),
            device=item.device, peer_id=item.peer_id, addrs=content.addrs,
            relays=content.relays, binding=content.binding, cap=content.cap, box=content.box,
            seen_at_ms=content.seen_at_ms)
        self.new_contacts.append(contact)
        self.notices.append(contact)
        self.contacts[item.device] = ContactRef(account, contact.name)
        address = (account, item.device)
        self.records[address] = record
        self.touched[address] = None
        self.prekeys, self.prekeys_changed = prekeys, True
        self.seen[account] = {item.message_id}
        self.marked.append((account, item.message_id))
        self.accepted += 1
        self.acks.append(item.message_id)
        if item.claimed_account is not None:
            self._relayed(account, item)

    def _open_first(self, item: Incoming, sender: IdentityKey, digest: bytes, what: str
                    ) -> tuple[SessionRecord, PreKeyStore, Content] | None:
        """Decrypt a first (prekey) message against copies of the prekeys and a new session
        record: nothing is kept unless the caller accepts it. None (and refused) if it does not
        decrypt or decode."""
        prekeys = PreKeyStore.from_bytes(self._prekeys().to_bytes())
        record = SessionRecord()
        try:
            plaintext = record.decrypt(item.message, identity=self.view.identity,
                                       remote_identity=sender, prekeys=prekeys)
            return record, prekeys, decode_content(plaintext)
        except NodeError as exc:
            self._refuse_first(item, digest, f"{what} from {item.peer_id}: {exc}")
            return None

    def _new_device(self, item: Incoming, contact: ContactRef, sender: IdentityKey,
                    digest: bytes) -> None:
        """A first message from a device we do not know of a known account (a contact's or our
        own): accepted only if it carries that account's signed device list naming the device
        (PROTOCOL.md section 25.4), which a device sends first in every session it starts."""
        opened = self._open_first(item, sender, digest, "first message")
        if opened is None:
            return
        record, prekeys, content = opened
        received = self._device_list(contact, content) \
            if isinstance(content, DeviceListUpdate) and content.id == item.message_id else None
        if received is None or item.device not in {
                d.to_bytes() for d in received.device_list.devices}:
            whose = contact.name or "our account"
            self._refuse_first(item, digest, f"a new device {item.peer_id} of {whose} without"
                               " a device list naming it")
            return
        hint = next((h for h in received.hints if h.device == item.device), None)
        self.device_updates.append(DeviceUpdate(
            account=contact.account, device=item.device, peer_id=item.peer_id,
            addrs=hint.addrs if hint else (), relays=hint.relays if hint else (),
            seen_at_ms=content.sent_at_ms if hint else 0))
        self.contacts[item.device] = contact
        address = (contact.account, item.device)
        self.records[address] = record
        self.touched[address] = None
        self.prekeys, self.prekeys_changed = prekeys, True
        self._seen(contact.account).add(item.message_id)
        self.marked.append((contact.account, item.message_id))
        self.accepted += 1
        self.acks.append(item.message_id)
        received = replace(received, new_device=item.device)
        self.device_lists.append(received)
        self.notices.append(received)
        if item.claimed_account is not None:
            self._relayed(contact.account, item)

    def _device_list(self, contact: ContactRef, content: object) -> DeviceListReceived | None:
        """The verified device list of a device-list update from `contact`'s device, or None
        if it does not verify at the batch's time or is not the contact's account's."""
        if not isinstance(content, DeviceListUpdate):
            return None
        try:
            device_list = DeviceList.verify(content.signed_list, now=self.now_ms // 1000)
        except InvalidRecord:
            return None
        if device_list.identity.to_bytes() != contact.account:
            return None
        return DeviceListReceived(
            account=contact.account, contact=contact.name,
            own=contact.account == self.view.identity.public.to_bytes(),
            device_list=device_list, signed=content.signed_list, hints=content.hints)

    # --- helpers ----------------------------------------------------------------------------------

    def _refuse(self, item: Incoming, code: NackCode, reason: str) -> None:
        self.nacks.append(Refusal(message_id=item.message_id, code=code, reason=reason))

    def _refuse_first(self, item: Incoming, digest: bytes, reason: str) -> None:
        # Refused for good after the expensive part: the same bytes will be refused again
        # (prekeys only ever go away, invites only expire), so remember them.
        self._refuse(item, "unknown-sender", reason)
        if self.gate is not None:
            self.gate.refused(digest)

    def _relayed(self, account: bytes, item: Incoming) -> None:
        self.relayed.setdefault(item.device, _Relayed(account)).ids.append(item.message_id)

    def _seen(self, account: bytes) -> set[bytes]:
        seen = self.seen.get(account)
        if seen is None:
            seen = self.seen[account] = set(
                self.view.seen_among(account, [i.message_id for i in self.items]))
        return seen

    def _record(self, address: tuple[bytes, bytes]) -> SessionRecord:
        record = self.records.get(address)
        if record is None:
            # A copy without a serialization round trip: a record may hold MAX_SKIPPED_KEYS
            # skipped keys, which would cost ~25 ms to decode per batch.
            record = self.records[address] = self.view.session(*address).copy()
        return record

    def _prekeys(self) -> PreKeyStore:
        if self.prekeys is None:
            self.prekeys = PreKeyStore.from_bytes(self.view.prekeys().to_bytes())
        return self.prekeys

    def _free_name(self, suggested: str) -> str:
        # The name must obey the same rules as a name the user types (node._valid_name): no
        # leading '-' (a joiner called "--data-dir=x" would look like an option on the command
        # line) and at most max_name_chars with the "-N" suffix included. Found by
        # tests/test_node.py::test_joiners_with_clashing_or_unprintable_names_get_usable_names.
        limit = self.max_name_chars
        name = clean_name(clean_name(suggested, max_chars=limit).lstrip("-"),
                          max_chars=limit) or "contact"
        taken = {c.name for c in self.new_contacts}
        candidate, n = name, 1
        while candidate in taken or self.view.name_taken(candidate):
            n += 1
            suffix = f"-{n}"
            candidate = clean_name(name[: limit - len(suffix)], max_chars=limit) + suffix
        return candidate


def _binding_problem(item: Incoming, sender: IdentityKey, intro: Intro) -> str | None:
    """Why an introduction does not prove its device belongs to `sender`, or None (PROTOCOL.md
    section 14). Out of a sealed envelope the device is only claimed, so the intro must carry
    the device's binding to the sender's account; on a direct stream the transport
    authenticated the device, and a binding, if sent, must still verify."""
    if intro.binding is None:
        return "a device claimed without its binding" if item.claimed_account is not None \
            else None
    try:
        verify_binding(DeviceKey.from_bytes(item.device), sender, intro.binding)
    except NodeError as exc:
        return f"the device's binding does not verify ({exc})"
    return None
