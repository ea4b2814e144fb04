"""The data directory: key files, the database, the lock and the control socket.

Layout (PROTOCOL.md does not cover it; it is local):

    identity.key   the account's identity key      (mode 0600, written once, never rewritten)
    device.key     this device's key               (mode 0600, written once, never rewritten)
    pigeon.db      SQLite database (WAL)           contacts, sessions, prekeys, messages, outbox
    pigeon.lock    held (flock) by the process that has the node open
    pigeon.sock    the daemon's control socket (JSON-RPC 2.0), present while `pigeon run` runs

Key files are read and written by `node.files` (their format is described there).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import platformdirs

from node.errors import DataDirError
from node.files import LockedDirectory, create_key_file, read_key_file
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair

__all__ = ["DataDir", "default_data_dir"]

ENV_HOME: Final = "PIGEON_HOME"


def default_data_dir() -> Path:
    """`$PIGEON_HOME`, else the platform's user data directory (e.g. ~/.local/share/pigeon)."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("pigeon", appauthor=False))


class DataDir(LockedDirectory):
    """Paths and files of one data directory. `lock()` before opening the database."""

    LOCK_NAME = "pigeon.lock"
    HOLDER = "Pigeon process"
    HINT = ": a running `pigeon run`? (commands use it automatically when it runs)"

    @property
    def identity_file(self) -> Path:
        """The account's identity key file."""
        return self.path / "identity.key"

    @property
    def device_file(self) -> Path:
        """This device's key file (also its libp2p host key)."""
        return self.path / "device.key"

    @property
    def database_file(self) -> Path:
        """The node's SQLite database."""
        return self.path / "pigeon.db"

    @property
    def socket_file(self) -> Path:
        """The control socket a running daemon serves (`pigeon run`)."""
        return self.path / "pigeon.sock"

    def is_initialized(self) -> bool:
        """Whether `pigeon init` has created the keys here."""
        return self.identity_file.exists()

    # --- keys -------------------------------------------------------------------------------------

    def create_keys(self) -> tuple[IdentityKeyPair, DeviceKeyPair]:
        """Generate and write both key files. DataDirError if they exist already."""
        if self.identity_file.exists() or self.device_file.exists():
            raise DataDirError(f"{self.path} already holds an identity; not overwriting it")
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        device = create_key_file(self.device_file, "device", DeviceKeyPair)
        identity = create_key_file(self.identity_file, "identity", IdentityKeyPair)
        return identity, device

    def load_keys(self) -> tuple[IdentityKeyPair, DeviceKeyPair]:
        """Read both key files; DataDirError naming the file if one is missing or damaged."""
        if not self.identity_file.exists():
            raise DataDirError(f"{self.path} is not initialised: run `pigeon init` first")
        identity = read_key_file(self.identity_file, "identity", IdentityKeyPair)
        device = read_key_file(self.device_file, "device", DeviceKeyPair)
        return identity, device
