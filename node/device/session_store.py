"""The node's cryptographic state over the database: identity, prekeys and session records.

Session records are cached in memory (the node is the only process using the data directory) and
written through to SQLite by the caller's transaction. The pure core mutates a record only when
an operation succeeds, but a database commit can still fail afterwards; `forget` drops the cached
records of a failed transaction so they are reloaded from what was actually committed.
"""

from __future__ import annotations

from collections.abc import Iterable

from node.device.storage import Database
from node.errors import DataDirError, DecodeError
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.protocol.prekeys import PreKeyStore
from node.protocol.session import SessionRecord

__all__ = ["SessionStore"]

Address = tuple[bytes, bytes]  # (account identity key, device key)


class SessionStore:
    """Prekeys and the session record with each remote device, cached over the database. The
    prekey store is created (and saved) on first use."""

    def __init__(self, db: Database, identity: IdentityKeyPair, device: DeviceKeyPair,
                 *, now: int) -> None:
        self.db = db
        self.identity = identity
        self.device = device
        stored = db.load_prekeys()
        if stored is None:
            self.prekeys = PreKeyStore.create(now=now)
            db.save_prekeys(self.prekeys.to_bytes())
        else:
            try:
                self.prekeys = PreKeyStore.from_bytes(stored)
            except DecodeError as exc:
                raise DataDirError(f"prekeys in {db.path} are damaged: {exc}") from exc
        self._records: dict[Address, SessionRecord] = {}

    def record(self, account: bytes, device: bytes) -> SessionRecord:
        """The (cached) session record with a remote device; empty if none was stored."""
        key = (account, device)
        record = self._records.get(key)
        if record is None:
            stored = self.db.load_session(account, device)
            try:
                record = SessionRecord.from_bytes(stored) if stored else SessionRecord()
            except DecodeError as exc:
                raise DataDirError(f"session state in {self.db.path} is damaged: {exc}") from exc
            self._records[key] = record
        return record

    def save(self, account: bytes, device: bytes) -> None:
        """Write the cached record (inside the caller's transaction)."""
        self.db.save_session(account, device, self._records[(account, device)].to_bytes())

    def save_prekeys(self) -> None:
        """Write the prekey store (inside the caller's transaction)."""
        self.db.save_prekeys(self.prekeys.to_bytes())

    def forget(self, addresses: Iterable[Address], *, prekeys: bool = False) -> None:
        """Drop cached state after a failed commit, so the committed state is reloaded."""
        for address in addresses:
            self._records.pop(address, None)
        if prekeys:
            stored = self.db.load_prekeys()
            if stored is not None:
                self.prekeys = PreKeyStore.from_bytes(stored)

    def adopt(self, account: bytes, device: bytes, record: SessionRecord,
              prekeys: PreKeyStore) -> None:
        """Take a record and prekey store built on copies (an accepted introduction); the caller's
        transaction then saves both."""
        self._records[(account, device)] = record
        self.prekeys = prekeys

    def drop(self, account: bytes, device: bytes) -> None:
        """Forget the cached record with a device (after its stored session was deleted)."""
        self._records.pop((account, device), None)
