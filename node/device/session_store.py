"""The node's cryptographic state over the database: identity, prekeys and session records.

Session records are cached in memory (the node is the only process using the data directory) and
written through to SQLite by the caller's transaction. The pure core mutates a record only when
an operation succeeds, but a database commit can still fail afterwards; `forget` drops the cached
records of a failed transaction so they are reloaded from what was actually committed.

A record is stored in three parts, so that what one contact can make us store (up to
MAX_SKIPPED_KEYS skipped keys and MAX_ARCHIVED_SESSIONS old sessions) is not rewritten with
every message (PROTOCOL.md section 20, "Skipped keys"): the current session (`sessions`, every
save), the archived sessions (`session_archive`, when they change) and the skipped keys
(`skipped_keys`, one row each, inserted and deleted as they come and go).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from node.device.storage import Database
from node.errors import DataDirError, DecodeError
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.protocol.prekeys import Maintenance, PreKeyStore
from node.protocol.records import PreKeyBundle
from node.protocol.session import SessionRecord

__all__ = ["SessionStore"]

Address = tuple[bytes, bytes]  # (account identity key, device key)
Slot = tuple[bytes, int]  # (header key, message number) of a skipped key


@dataclass
class _Written:
    """What the database holds of one record's skipped keys, to write only what changed."""

    rows: dict[bytes, dict[Slot, int]] = field(default_factory=dict)  # base -> slot -> row id
    stamps: dict[bytes, int] = field(default_factory=dict)  # base -> skipped_stamp written


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
        self._written: dict[Address, _Written] = {}

    def record(self, account: bytes, device: bytes) -> SessionRecord:
        """The (cached) session record with a remote device; empty if none was stored."""
        key = (account, device)
        record = self._records.get(key)
        if record is None:
            written = _Written()
            head = self.db.load_session(account, device)
            if head is None:
                record = SessionRecord()
            else:
                rows = self.db.load_skipped_keys(account, device)
                for row_id, base, hk, n, _ in rows:
                    written.rows.setdefault(base, {})[(hk, n)] = row_id
                try:
                    record = SessionRecord.from_parts(
                        head, self.db.load_session_archive(account, device),
                        [(base, (hk, n), mk) for _, base, hk, n, mk in rows])
                except DecodeError as exc:
                    raise DataDirError(
                        f"session state in {self.db.path} is damaged: {exc}") from exc
            self._records[key] = record
            self._written[key] = written
        return record

    def save(self, account: bytes, device: bytes) -> None:
        """Write the cached record (inside the caller's transaction): the current session, and
        the archived sessions and skipped keys only where they changed."""
        key = (account, device)
        record = self._records[key]
        written = self._written.setdefault(key, _Written())
        self.db.save_session(account, device, record.head_bytes())
        if record.archive_changed:
            self.db.save_session_archive(account, device, record.archive_bytes())
            record.archive_changed = False
        sessions = record.sessions()
        live = {s.base_key for s in sessions}
        for base in [b for b in written.rows if b not in live]:  # sessions dropped from the record
            self.db.delete_skipped_keys(written.rows.pop(base).values())
            written.stamps.pop(base, None)
        for session in sessions:
            ratchet = session.ratchet
            if written.stamps.get(session.base_key) == ratchet.skipped_stamp:
                continue
            have = written.rows.setdefault(session.base_key, {})
            gone = [slot for slot in have if slot not in ratchet.skipped]
            self.db.delete_skipped_keys(have.pop(slot) for slot in gone)
            new = [(slot, mk) for slot, mk in ratchet.skipped.items() if slot not in have]
            ids = self.db.add_skipped_keys(
                account, device, [(session.base_key, hk, n, mk) for (hk, n), mk in new])
            have.update(zip((slot for slot, _ in new), ids, strict=True))
            written.stamps[session.base_key] = ratchet.skipped_stamp

    def save_prekeys(self) -> None:
        """Write the prekey store (inside the caller's transaction)."""
        self.db.save_prekeys(self.prekeys.to_bytes())

    def hand_out_bundle(self, *, now: int, seq: int, expires: int) -> PreKeyBundle:
        """A bundle for one requester (PROTOCOL.md section 14.2) with one-time prekeys nobody
        was given yet, the store saved before the bundle leaves (a key handed out twice would
        make one of two first messages fail) and its pools refilled when low."""
        try:
            with self.db.transaction():
                bundle = self.prekeys.bundle(self.identity, self.device, seq=seq,
                                             expires=expires, now=now)
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
            self._written.pop(address, None)
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
        self._written.pop((account, device), None)
