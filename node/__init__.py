"""Pigeon: a peer-to-peer, end-to-end-encrypted messenger node.

    from node import Node, Config

    async with Node.open("~/.pigeon", Config()) as node:
        await node.send("bob", "hello")

The names below are the public API; everything else is internal and may change. They are loaded
on first use (PEP 562 module `__getattr__`), so `import node.protocol` or `pigeon --help` does not
pay for libp2p, trio or SQLite.

The packages, by role (each one's docstring says what it may import; tests/test_layers.py
enforces it):

- `node.protocol`: pure wire formats and cryptography, and the sans-IO delivery machines.
- `node.net`: everything that touches libp2p, zeroconf and network interfaces.
- `node.device`: the device node (the `Node` API) and its storage.
- `node.relay`: the relay service; it never imports `node.device`.
- `node.cli`: the `pigeon` command.
- shared: `node.errors`, `node.clock`, `node.files`, `node.rpc`, `node.config_file`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.device.config import Config
    from node.device.events import (
        AttachmentFailed,
        AttachmentInfo,
        AttachmentSaved,
        ContactAdded,
        ContactOffline,
        ContactOnline,
        DeviceAdded,
        DeviceRemoved,
        Event,
        EventsDropped,
        GroupChanged,
        MessageDelivered,
        MessageFailed,
        MessageReceived,
        MessageSent,
        MessagesRead,
        TransferProgress,
    )
    from node.device.groups import GroupInfo, GroupMember
    from node.device.node import (
        ContactInfo,
        ContactStatus,
        DeviceInfo,
        HistoryEntry,
        Node,
        Status,
    )
    from node.device.setup import init_data_dir
    from node.errors import (
        ConfigError,
        ContactError,
        DataDirError,
        DataDirLocked,
        DecodeError,
        DecryptionFailed,
        DeviceError,
        GroupError,
        InvalidMessage,
        InvalidRecord,
        InviteError,
        LimitExceeded,
        LocalError,
        MediaError,
        NodeError,
        NotRunning,
        RelayRefused,
        RemoteError,
        StorageError,
        TransportError,
    )

#: Where each public name lives.
_HOMES: dict[str, str] = {
    **dict.fromkeys(
        ["ConfigError", "ContactError", "DataDirError", "DataDirLocked", "DecodeError",
         "DecryptionFailed", "DeviceError", "GroupError", "InvalidMessage", "InvalidRecord",
         "InviteError", "LimitExceeded", "LocalError", "MediaError", "NodeError", "NotRunning",
         "RelayRefused", "RemoteError", "StorageError", "TransportError"], "node.errors"),
    **dict.fromkeys(
        ["AttachmentFailed", "AttachmentInfo", "AttachmentSaved", "TransferProgress",
         "ContactAdded", "ContactOffline", "ContactOnline", "DeviceAdded", "DeviceRemoved", "Event",
         "EventsDropped", "GroupChanged", "MessageDelivered", "MessageFailed", "MessageReceived",
         "MessageSent", "MessagesRead"],
        "node.device.events"),
    **dict.fromkeys(
        ["ContactInfo", "ContactStatus", "DeviceInfo", "HistoryEntry", "Node", "Status"],
        "node.device.node"),
    "init_data_dir": "node.device.setup",
    "Config": "node.device.config",
    **dict.fromkeys(["GroupInfo", "GroupMember"], "node.device.groups"),
    **dict.fromkeys(["HistoryProgress", "LinkResult", "link_new_device"], "node.device.linking"),
}

__all__ = [
    "AttachmentFailed",
    "AttachmentInfo",
    "AttachmentSaved",
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
    "DeviceAdded",
    "DeviceError",
    "DeviceInfo",
    "DeviceRemoved",
    "Event",
    "EventsDropped",
    "GroupChanged",
    "GroupError",
    "GroupInfo",
    "GroupMember",
    "HistoryEntry",
    "HistoryProgress",
    "InvalidMessage",
    "InvalidRecord",
    "InviteError",
    "LimitExceeded",
    "LinkResult",
    "LocalError",
    "MediaError",
    "MessageDelivered",
    "MessageFailed",
    "MessageReceived",
    "MessageSent",
    "MessagesRead",
    "Node",
    "NodeError",
    "NotRunning",
    "RelayRefused",
    "RemoteError",
    "Status",
    "StorageError",
    "TransferProgress",
    "TransportError",
    "init_data_dir",
    "link_new_device",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'node' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
