"""A relay's data directory. Apart from the service (node/relay/service.py) so that `pigeon relay
status`, which only needs the control socket's path, loads no network stack."""

from __future__ import annotations

from node.files import LockedDirectory, load_or_create_key_file
from node.protocol.keys import DeviceKeyPair

__all__ = ["RelayDir"]


class RelayDir(LockedDirectory):
    """Files of a relay's data directory: relay.key, relay.db, relay.lock, relay.sock."""

    LOCK_NAME = "relay.lock"
    HOLDER = "pigeon relay"
    HINT = "; stop it first, or give this one its own --data-dir"

    key_file = property(lambda self: self.path / "relay.key")
    database_file = property(lambda self: self.path / "relay.db")
    socket_file = property(lambda self: self.path / "relay.sock")

    def load_or_create_key(self) -> DeviceKeyPair:
        """The relay's Ed25519 host key (its peer id), created on first start. The same key file
        format as the node's (node/files.py), kind "relay"."""
        return load_or_create_key_file(self.key_file, "relay", DeviceKeyPair)
