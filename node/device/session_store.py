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
from node.protocol.prekeys import Maintenance, PreKeyStore
from node.protocol.records import PreKeyBundle
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

    def hand_out_bundle(self, *, now: int, seq: int, expires: int) -> PreKeyBundle:
        """A bundle for one requester (PROTOCOL.md section 14.2) with one-time prekeys nobody
        was given yet, the store saved before the bundle leaves (a key handed out twice would
        make one of two first messages fail) and its pools refilled when low."""
        try:
            with self.db.transaction():
                bundle = self.prekeys.bundle(self.identity, self.device.public, seq=seq,
                                             expires=expires)
                self.prekeys.refill(now=now)
                self.save_prekeys()
        except BaseException:
            self.forget((), prekeys=True)
            raise
        return bundle

    def maintain_prekeys(self, *, now: int) -> Maintenance:
        """Rotate, delete and refill prekeys as due at `now` (`PreKeyStore.maintain`), saved in
        one transaction; deleted keys are then cleared from the write-ahead log too, so they are
        gone from every file (PROTOCOL.md section 20, "Deleted data on disk")."""
        try:
            with self.db.transaction():
                done = self.prekeys.maintain(now=now)
                if done.changed:
                    self.save_prekeys()
        except BaseException:
            self.forget((), prekeys=True)
            raise
        if done.deleted:
            self.db.truncate_wal()
        return done

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
