"""Pigeon: a peer-to-peer, end-to-end-encrypted messenger node.

    from node import Node, Config

    async with Node.open("~/.pigeon", Config()) as node:
        await node.send("bob", "hello")

The names below are the public API; everything else is internal and may change.
"""

from node.config import Config
from node.errors import (
    ConfigError,
    ContactError,
    DataDirError,
    DataDirLocked,
    DecodeError,
    DecryptionFailed,
    InvalidMessage,
    InvalidRecord,
    InviteError,
    LimitExceeded,
    LocalError,
    NodeError,
    NotRunning,
    RelayRefused,
    RemoteError,
    StorageError,
    TransportError,
)
from node.events import (
    ContactAdded,
    ContactOffline,
    ContactOnline,
    Event,
    EventsDropped,
    MessageDelivered,
    MessageFailed,
    MessageReceived,
    MessageSent,
)
from node.node import ContactInfo, ContactStatus, HistoryEntry, Node, Status, init_data_dir

__all__ = [
    "Config",
    "ConfigError",
    "ContactAdded",
    "ContactError",
    "ContactInfo",
    "ContactOffline",
    "ContactOnline",
    "ContactStatus",
    "DataDirError",
    "DataDirLocked",
    "DecodeError",
    "DecryptionFailed",
    "Event",
    "EventsDropped",
    "HistoryEntry",
    "InvalidMessage",
    "InvalidRecord",
    "InviteError",
    "LimitExceeded",
    "LocalError",
    "MessageDelivered",
    "MessageFailed",
    "MessageReceived",
    "MessageSent",
    "Node",
    "NodeError",
    "NotRunning",
    "RelayRefused",
    "RemoteError",
    "Status",
    "StorageError",
    "TransportError",
    "init_data_dir",
]
