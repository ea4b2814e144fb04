"""Events a node hands to the embedding program (`Node.events()`).

Frozen, keyword-only dataclasses. Events are notifications: the database is the source of truth,
so a program that falls behind is told so (`EventsDropped`) and can re-read history instead of
stalling the node.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.protocol.attachment import Descriptor

__all__ = [
    "AttachmentFailed",
    "AttachmentInfo",
    "AttachmentSaved",
    "ContactAdded",
    "ContactOffline",
    "ContactOnline",
    "DeviceAdded",
    "DeviceRemoved",
    "Event",
    "EventsDropped",
    "GroupChanged",
    "MessageDelivered",
    "MessageFailed",
    "MessageReceived",
    "MessageSent",
    "MessagesRead",
    "TransferProgress",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """Base class of every event."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AttachmentInfo:
    """What the user sees of a file message's attachment (PROTOCOL.md section 26.1): its name,
    media type and size (of the file as restored), image dimensions, and where it stands:
    sent: "ready" (its encrypted copy is served from the data directory); received: "offered"
    (not downloaded yet), "downloading", "done" (`path` is the file) or "failed" (`error`)."""

    name: str
    media_type: str
    size: int
    state: str
    width: int | None = None
    height: int | None = None
    #: Bytes of the encrypted blob that travels (the transfer's total).
    blob_size: int = 0
    thumbnail: bool = False
    path: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, descriptor: Descriptor, state: str, *, path: str | None = None,
           error: str | None = None) -> AttachmentInfo:
        """What the user sees of the attachment `descriptor` describes."""
        size = descriptor.original_size if descriptor.original_size is not None \
            else descriptor.size
        return cls(name=descriptor.name, media_type=descriptor.media_type, size=size,
                   state=state, width=descriptor.width, height=descriptor.height,
                   blob_size=descriptor.ciphertext_size,
                   thumbnail=descriptor.thumbnail is not None, path=path, error=error)


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageReceived(Event):
    """A message from a contact was decrypted and committed to the history (exactly once).
    A file message (PROTOCOL.md section 26.4) has `attachment`, and its caption as `text`."""

    message_id: str
    contact: str
    text: str
    sent_at_ms: int
    received_at_ms: int
    #: In a group (`contact` is then the group's name): the member who wrote it.
    sender: str | None = None
    attachment: AttachmentInfo | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class TransferProgress(Event):
    """Bytes of an attachment's blob moved so far: `direction` "in" for a download, "out"
    for what a device or relay fetched from us. Published at most a few times a second per
    transfer, and once when it completes."""

    message_id: str
    contact: str
    direction: str
    done_bytes: int
    total_bytes: int


@dataclass(frozen=True, kw_only=True, slots=True)
class AttachmentSaved(Event):
    """A received attachment was downloaded, every chunk and its hash checked, and stored at
    `path` (in the data directory's content-addressed store)."""

    message_id: str
    contact: str
    path: str


@dataclass(frozen=True, kw_only=True, slots=True)
class AttachmentFailed(Event):
    """A download stopped (`reason`); it is tried again later or on `Node.save`."""

    message_id: str
    contact: str
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageSent(Event):
    """An outgoing message was written to a recipient device's stream (not yet confirmed), or
    another device of our account sent it and this one got its sent transcript (PROTOCOL.md
    section 25.5)."""

    message_id: str
    contact: str


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageDelivered(Event):
    """A device of the recipient confirmed it committed the message (an end-to-end ack; the
    first one of the account's devices, PROTOCOL.md section 25.5)."""

    message_id: str
    contact: str


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageFailed(Event):
    """A message will not be delivered; `reason` says why (shown to the user)."""

    message_id: str
    contact: str
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class MessagesRead(Event):
    """`count` incoming messages of the contact became read: here (`Node.mark_read`), or on
    another device of our account, which told this one (PROTOCOL.md section 25.6, `read`)."""

    contact: str
    count: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ContactOnline(Event):
    """A device of the contact is connected."""

    contact: str
    peer_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ContactOffline(Event):
    """The last connection to a device of the contact closed."""

    contact: str
    peer_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ContactAdded(Event):
    """Someone used one of our invites and is now a contact (named after their display name)."""

    contact: str
    account_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class EventsDropped(Event):
    """This subscriber fell behind and `count` events were not delivered to it. Re-read state
    (history, status) to catch up."""

    count: int


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceAdded(Event):
    """A device joined an account's device list: ours (`contact` None) or a contact's."""

    contact: str | None
    peer_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceRemoved(Event):
    """A device left an account's device list: ours (`contact` None) or a contact's."""

    contact: str | None
    peer_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupChanged(Event):
    """A group's membership or name changed, or we were added to a group (PROTOCOL.md section
    27): `change` says what, as the group's history shows it; `by` is who did it."""

    group: str
    change: str
    by: str
