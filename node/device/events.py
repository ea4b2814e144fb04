"""Events a node hands to the embedding program (`Node.events()`).

Frozen, keyword-only dataclasses. Events are notifications: the database is the source of truth,
so a program that falls behind is told so (`EventsDropped`) and can re-read history instead of
stalling the node.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
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
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """Base class of every event."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageReceived(Event):
    """A message from a contact was decrypted and committed to the history (exactly once)."""

    message_id: str
    contact: str
    text: str
    sent_at_ms: int
    received_at_ms: int
    #: In a group (`contact` is then the group's name): the member who wrote it.
    sender: str | None = None


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
