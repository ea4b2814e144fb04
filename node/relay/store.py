"""The relay's SQLite store: sealed envelopes by mailbox, with quotas, TTLs and a global cap.

One database file (relay.db) in WAL mode with synchronous=FULL: a deposit is acknowledged only
after the transaction holding it is committed and on disk, so an acknowledged deposit survives a
kill -9 or a power cut. Calls are synchronous and run on the trio thread, like node/device/storage.py:
a transaction is atomic with respect to every other task without a lock, and batching (one
transaction per burst of deposits from one stream) pays one fsync per burst.

What is stored is exactly what the protocol gives the relay: the mailbox id (a hash of the
recipient device key), the deposit id (PROTOCOL.md section 21: not the message id), the sealed
envelope, its expiry and whether it came with a capability. Nothing about the depositor (no peer
id, no address, no capability, no time of deposit beyond what `exp` implies).

Schema:

    messages(seq INTEGER PRIMARY KEY AUTOINCREMENT, box, id, env, exp, open)   UNIQUE(box, id)
    boxes(box PRIMARY KEY, count, bytes, open_count, open_bytes)   per-mailbox totals (open_*:
                                              deposits without a capability), kept in the same
                                              transactions
    mailboxes(box PRIMARY KEY, seen)          registered mailboxes; seen: last auth, unix s
    caps(box, cap)                            capability hashes each mailbox registered
    wakes(box PRIMARY KEY, url, key, auth)    push endpoints of registered mailboxes
                                              (PROTOCOL.md section 29)

`seq` is the fetch cursor: AUTOINCREMENT never reuses a value, so a cursor a client holds stays
valid after deletions. Totals (mailboxes, messages, bytes) are kept in memory, loaded at open and
updated after each commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from node.files import (
    StorageHealth,
    open_database,
    sqlite_transaction,
    storage_error,
    truncate_wal,
)
from node.protocol.mailbox import (
    MAILBOX_FULL,
    STORAGE_FULL,
    UNKNOWN_MAILBOX,
    Item,
    cap_hash,
    item_cost,
)
from node.relay.config import (
    OPEN_MAILBOX_MAX_BYTES,
    OPEN_MAILBOX_MAX_MESSAGES,
    OPEN_MAX_TTL_S,
    OPEN_STORAGE_MAX_BYTES,
)

__all__ = ["DepositOutcome", "PendingDeposit", "RelayStore", "StoreLimits", "Totals",
           "WakeEndpoint"]

SCHEMA_VERSION: Final = 3

#: The script that takes the database from version n - 1 to n (node/files.py `open_database`).
MIGRATIONS: Final[dict[int, str]] = {1: """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- fetch cursor, never reused
    box BLOB NOT NULL,                      -- SHA-256("pigeon-mailbox-v1" || recipient device key)
    id BLOB NOT NULL,                       -- 16 bytes chosen by the sender
    env BLOB NOT NULL,                      -- the sealed envelope, opaque
    exp INTEGER NOT NULL,                   -- unix seconds: never served from then on
    UNIQUE (box, id)
);
CREATE INDEX messages_by_box ON messages(box);     -- (box, seq): seq is the rowid
CREATE INDEX messages_by_exp ON messages(exp);
CREATE TABLE boxes (
    box BLOB PRIMARY KEY,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL                  -- sum of length(env)
) WITHOUT ROWID;
""", 2: """
-- Deposit capabilities and registered mailboxes (PROTOCOL.md section 21). Mailboxes that hold
-- messages when the store is upgraded count as registered now, so their devices keep getting
-- deposits until they authenticate again (which renews the registration).
CREATE TABLE mailboxes (
    box BLOB PRIMARY KEY,
    seen INTEGER NOT NULL                   -- unix seconds of the last auth
) WITHOUT ROWID;
CREATE TABLE caps (
    box BLOB NOT NULL,
    cap BLOB NOT NULL,                      -- SHA-256("pigeon-deposit-cap-v1" || capability)
    PRIMARY KEY (box, cap)
) WITHOUT ROWID;
ALTER TABLE messages ADD COLUMN open INTEGER NOT NULL DEFAULT 0;  -- 1: deposited without a capability
ALTER TABLE boxes ADD COLUMN open_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE boxes ADD COLUMN open_bytes INTEGER NOT NULL DEFAULT 0;
INSERT INTO mailboxes(box, seen) SELECT box, CAST(strftime('%s', 'now') AS INTEGER) FROM boxes;
""", 3: """
-- Push endpoints (PROTOCOL.md section 29): one per registered mailbox, dropped with it.
CREATE TABLE wakes (
    box BLOB PRIMARY KEY,
    url TEXT NOT NULL,                      -- the push service's URL
    key BLOB NOT NULL,                      -- the device's P-256 public key (p256dh), 65 bytes
    auth BLOB NOT NULL                      -- the Web Push auth secret, 16 bytes
) WITHOUT ROWID;
"""}

#: Expired messages deleted per purge transaction: keeps each pause of the event loop short.
PURGE_CHUNK: Final = 2_000

# Outcomes of one deposit (besides an error code).
STORED: Final = "stored"
DUPLICATE: Final = "duplicate"


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Quotas (node/relay/config.py says why each default). `mailbox_*` bound what contacts
    (deposits with a registered capability) store per mailbox; `open_*` bound deposits without
    one, per mailbox and relay-wide; `storage_max_bytes` bounds everything."""

    mailbox_max_messages: int
    mailbox_max_bytes: int
    storage_max_bytes: int
    open_mailbox_max_messages: int = OPEN_MAILBOX_MAX_MESSAGES
    open_mailbox_max_bytes: int = OPEN_MAILBOX_MAX_BYTES
    open_storage_max_bytes: int = OPEN_STORAGE_MAX_BYTES
    open_max_ttl_s: int = OPEN_MAX_TTL_S
    #: Refuse deposits into mailboxes no device registered ("unknown-mailbox").
    require_registration: bool = True


@dataclass(frozen=True, slots=True)
class WakeEndpoint:
    """A mailbox's push endpoint: the URL and the device's Web Push keys (p256dh, auth)."""

    url: str
    key: bytes
    auth: bytes


@dataclass(frozen=True, slots=True)
class PendingDeposit:
    """One deposit to store: `cap` is the capability it presented (None: a stranger's)."""

    box: bytes
    id: bytes
    env: bytes
    exp: int
    cap: bytes | None = None


@dataclass(slots=True)
class DepositOutcome:
    """Per deposit, STORED, DUPLICATE or an error code; the mailboxes that got new messages; and
    how many expired messages were dropped to make room."""

    results: list[str]
    boxes: set[bytes]
    expired: int = 0

    @property
    def stored(self) -> int:
        return sum(1 for r in self.results if r == STORED)


@dataclass(slots=True)
class _BoxState:
    box: bytes
    count: int
    bytes: int
    open_count: int
    open_bytes: int
    existed: bool  # a row for it was in the table when the transaction began

    def fits(self, size: int, limits: StoreLimits, *, stranger: bool) -> bool:
        if stranger:
            return (self.open_count + 1 <= limits.open_mailbox_max_messages
                    and self.open_bytes + size <= limits.open_mailbox_max_bytes)
        return (self.count - self.open_count + 1 <= limits.mailbox_max_messages
                and self.bytes - self.open_bytes + size <= limits.mailbox_max_bytes)

    def remove(self, size: int, stranger: bool) -> None:
        self.count -= 1
        self.bytes -= size
        if stranger:
            self.open_count -= 1
            self.open_bytes -= size


@dataclass(slots=True)
class Totals:
    """Relay-wide totals; `open_*`: of deposits without a capability (strangers')."""

    mailboxes: int = 0
    messages: int = 0
    bytes: int = 0
    open_messages: int = 0
    open_bytes: int = 0
    registered: int = 0


class RelayStore:
    """Open with `RelayStore.open(path, limits)`; close with `close()`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, limits: StoreLimits) -> None:
        self._conn = conn
        self.path = path
        self.limits = limits
        self.totals = Totals()
        self.last_seq = 0
        self.deleted_since_checkpoint = False
        self.health = StorageHealth()  # the last failure, until a commit succeeds

    @classmethod
    def open(cls, path: Path, limits: StoreLimits) -> RelayStore:
        """Open (creating) the database. DataDirError if it is damaged or from a newer Pigeon."""
        def load(conn: sqlite3.Connection) -> RelayStore:
            store = cls(conn, path, limits)
            store._load_totals()
            return store

        # FULL: a commit returns only once the WAL is fsynced, so "ok" is a promise.
        # open_sqlite turns secure_delete on: an acked or expired envelope is overwritten, not
        # just unlinked, and `checkpoint_if_deleted` clears its copy from the WAL: once a
        # recipient has its messages, the relay's files no longer hold them (nor their mailbox
        # ids).
        return open_database(path, what="Pigeon relay database", schema_version=SCHEMA_VERSION,
                             migrations=MIGRATIONS, synchronous="FULL", load=load)

    def close(self) -> None:
        self._conn.close()

    def _load_totals(self) -> None:
        boxes, count, size, open_count, open_size = self._conn.execute(
            "SELECT count(*), coalesce(sum(count), 0), coalesce(sum(bytes), 0),"
            " coalesce(sum(open_count), 0), coalesce(sum(open_bytes), 0) FROM boxes"
        ).fetchone()
        registered = self._conn.execute("SELECT count(*) FROM mailboxes").fetchone()[0]
        self.totals = Totals(boxes, count, size, open_count, open_size, registered)
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name='messages'").fetchone()
        self.last_seq = row[0] if row else 0

    @contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[None]:
        """`durable=False`: this commit does not wait for the disk (synchronous=NORMAL for it),
        for registrations, which a power cut may undo harmlessly (the device registers again
        whenever it connects); a crash of the process loses nothing (the commit is in the WAL).
        One fsync per `auth` made a relay that hundreds of devices connect to at once slow."""
        if durable:
            with sqlite_transaction(self._conn, self.path, self.health):
                yield
            return
        try:
            self._conn.execute("PRAGMA synchronous=NORMAL")
            with sqlite_transaction(self._conn, self.path, self.health):
                yield
        except sqlite3.Error as exc:  # the PRAGMA (sqlite_transaction converts its own)
            raise self.health.failed(storage_error(exc, self.path, "relaxing a commit")) from exc
        finally:
            with suppress(sqlite3.Error):
                self._conn.execute("PRAGMA synchronous=FULL")

    # --- deposits ---------------------------------------------------------------------------------

    def deposit(self, deposits: Sequence[PendingDeposit], *, now: int) -> DepositOutcome:
        """Store a batch of deposits in ONE transaction; return per deposit STORED, DUPLICATE
        (that (box, id) is already held: nothing new is stored) or an error code
        (MAILBOX_FULL, STORAGE_FULL). When this returns, everything STORED is on disk.

        Checks, in order: the mailbox is registered (UNKNOWN_MAILBOX), the message is already
        held (DUPLICATE), the capability: a deposit whose `cap` hashes to one the mailbox
        registered counts against the mailbox's quotas, any other against the strangers' quotas
        of the mailbox and of the relay (its expiry is shortened to `open_max_ttl_s`), then the
        total storage. Quotas are checked inside the transaction, against the totals as they
        stand with the earlier deposits of the same batch. A mailbox at its quota first drops its
        own expired messages (the purge task may not have reached them yet).
        """
        execute = self._conn.execute
        results: list[str] = []
        touched: set[bytes] = set()
        boxes: dict[bytes, _BoxState] = {}  # as of now inside the transaction
        registered: dict[bytes, bool] = {}
        added_count = added_bytes = added_open = added_open_bytes = 0
        expired_count = expired_bytes = expired_open = expired_open_bytes = 0
        max_seq = self.last_seq
        limits = self.limits
        with self._transaction():
            for d in deposits:
                known = registered.get(d.box)
                if known is None:
                    known = registered[d.box] = not limits.require_registration or bool(execute(
                        "SELECT 1 FROM mailboxes WHERE box=?", (d.box,)).fetchone())
                if not known:
                    results.append(UNKNOWN_MAILBOX)
                    continue
                if execute("SELECT 1 FROM messages WHERE box=? AND id=?", (d.box, d.id)).fetchone():
                    results.append(DUPLICATE)
                    continue
                stranger = d.cap is None or not execute(
                    "SELECT 1 FROM caps WHERE box=? AND cap=?", (d.box, cap_hash(d.cap))).fetchone()
                state = boxes.get(d.box)
                if state is None:
                    state = boxes[d.box] = self._box_state(d.box)
                size = len(d.env)
                if not state.fits(size, limits, stranger=stranger):
                    for freed, was_open in self._drop_expired(d.box, now):
                        state.remove(freed, was_open)
                        expired_count += 1
                        expired_bytes += freed
                        expired_open += was_open
                        expired_open_bytes += freed if was_open else 0
                    if not state.fits(size, limits, stranger=stranger):
                        results.append(MAILBOX_FULL)
                        continue
                total = self.totals.bytes + added_bytes - expired_bytes
                if total + size > limits.storage_max_bytes:
                    results.append(STORAGE_FULL)
                    continue
                exp = d.exp
                if stranger:
                    total_open = self.totals.open_bytes + added_open_bytes - expired_open_bytes
                    if total_open + size > limits.open_storage_max_bytes:
                        results.append(STORAGE_FULL)
                        continue
                    exp = min(exp, now + limits.open_max_ttl_s)
                cursor = execute(
                    "INSERT INTO messages(box, id, env, exp, open) VALUES (?, ?, ?, ?, ?)",
                    (d.box, d.id, d.env, exp, int(stranger)))
                max_seq = max(max_seq, cursor.lastrowid or 0)
                state.count += 1
                state.bytes += size
                added_count += 1
                added_bytes += size
                if stranger:
                    state.open_count += 1
                    state.open_bytes += size
                    added_open += 1
                    added_open_bytes += size
                results.append(STORED)
                touched.add(d.box)
            delta = self._write_boxes(boxes.values())
        self.totals.mailboxes += delta
        self.totals.messages += added_count - expired_count
        self.totals.bytes += added_bytes - expired_bytes
        self.totals.open_messages += added_open - expired_open
        self.totals.open_bytes += added_open_bytes - expired_open_bytes
        self.last_seq = max_seq
        self.deleted_since_checkpoint |= expired_count > 0
        return DepositOutcome(results, touched, expired_count)

    def _box_state(self, box: bytes) -> _BoxState:
        row = self._conn.execute("SELECT count, bytes, open_count, open_bytes FROM boxes"
                                 " WHERE box=?", (box,)).fetchone()
        if row is None:
            return _BoxState(box, 0, 0, 0, 0, False)
        return _BoxState(box, row[0], row[1], row[2], row[3], True)

    def _write_boxes(self, states: Iterable[_BoxState]) -> int:
        """Write the per-mailbox totals changed in a transaction (deleting the rows of mailboxes
        now empty); returns the change in the number of mailboxes."""
        delta = 0
        for state in states:
            if state.count > 0:
                self._conn.execute(
                    "INSERT INTO boxes(box, count, bytes, open_count, open_bytes)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT(box) DO UPDATE SET count=excluded.count,"
                    " bytes=excluded.bytes, open_count=excluded.open_count,"
                    " open_bytes=excluded.open_bytes",
                    (state.box, state.count, state.bytes, state.open_count, state.open_bytes))
                delta += 0 if state.existed else 1
            elif state.existed:
                self._conn.execute("DELETE FROM boxes WHERE box=?", (state.box,))
                delta -= 1
        return delta

    def _drop_expired(self, box: bytes, now: int) -> list[tuple[int, bool]]:
        """Delete the expired messages of `box`; (size, open) of each."""
        rows = self._conn.execute(
            "DELETE FROM messages WHERE box=? AND exp<=? RETURNING length(env), open", (box, now)
        ).fetchall()
        return [(size, bool(was_open)) for size, was_open in rows]

    # --- registration -----------------------------------------------------------------------------

    def is_registered(self, box: bytes) -> bool:
        """Whether a device registered `box` (and its registration has not lapsed)."""
        return bool(self._conn.execute("SELECT 1 FROM mailboxes WHERE box=?", (box,)).fetchone())

    def register(self, box: bytes, *, now: int, max_mailboxes: int) -> bool:
        """Register `box` (its device authenticated now), or renew its registration. False if
        it is new and `max_mailboxes` are registered already (nothing changes)."""
        with self._transaction(durable=False):
            renewed = self._conn.execute(
                "UPDATE mailboxes SET seen=? WHERE box=?", (now, box)).rowcount
            if not renewed:
                if self.totals.registered >= max_mailboxes:
                    return False
                self._conn.execute("INSERT INTO mailboxes(box, seen) VALUES (?, ?)", (box, now))
        if not renewed:
            self.totals.registered += 1
        return True

    def set_caps(self, box: bytes, hashes: Sequence[bytes]) -> None:
        """Replace the capability hashes registered for `box` (a registered mailbox)."""
        with self._transaction(durable=False):
            self._conn.execute("DELETE FROM caps WHERE box=?", (box,))
            self._conn.executemany("INSERT OR IGNORE INTO caps(box, cap) VALUES (?, ?)",
                                   [(box, h) for h in hashes])

    def caps_of(self, box: bytes) -> set[bytes]:
        """The capability hashes registered for `box`."""
        return {row[0] for row in self._conn.execute("SELECT cap FROM caps WHERE box=?", (box,))}

    def set_wake(self, box: bytes, endpoint: WakeEndpoint | None) -> None:
        """Store the push endpoint of `box` (a registered mailbox), replacing any; None removes
        it. Durable: a relay that restarts keeps waking the device."""
        with self._transaction():
            if endpoint is None:
                self._conn.execute("DELETE FROM wakes WHERE box=?", (box,))
            else:
                self._conn.execute(
                    "INSERT OR REPLACE INTO wakes(box, url, key, auth) VALUES (?, ?, ?, ?)",
                    (box, endpoint.url, endpoint.key, endpoint.auth))

    def wake_of(self, box: bytes) -> WakeEndpoint | None:
        """The push endpoint registered for `box`, if any."""
        row = self._conn.execute("SELECT url, key, auth FROM wakes WHERE box=?", (box,)).fetchone()
        return None if row is None else WakeEndpoint(row[0], bytes(row[1]), bytes(row[2]))

    def drop_lapsed(self, *, before: int) -> int:
        """Forget the registrations (and capabilities) of mailboxes whose device has not
        authenticated since `before`; their messages stay until they expire. Returns how many."""
        with self._transaction():
            rows = self._conn.execute(
                "DELETE FROM mailboxes WHERE seen<? RETURNING box", (before,)).fetchall()
            self._conn.executemany("DELETE FROM caps WHERE box=?", rows)
            self._conn.executemany("DELETE FROM wakes WHERE box=?", rows)
        self.totals.registered -= len(rows)
        return len(rows)

    # --- reading --------------------------------------------------------------------------------

    def waiting_wakes(self, limit: int) -> list[bytes]:
        """Mailboxes with a push endpoint that hold messages (at most `limit`): the ones a relay
        that starts again wakes (PROTOCOL.md section 29 "When"), since due wake-ups are not
        stored. StorageError if the database cannot be read."""
        try:
            return [row[0] for row in self._conn.execute(
                "SELECT w.box FROM wakes w JOIN boxes b ON b.box=w.box WHERE b.count>0 LIMIT ?",
                (limit,))]
        except sqlite3.Error as exc:
            raise self.health.failed(storage_error(exc, self.path, "reading push endpoints")
                                     ) from exc


    def fetch(self, box: bytes, *, after: int, limit: int, budget: int, now: int
              ) -> tuple[list[Item], bool]:
        """Unexpired messages of `box` with seq > `after`, oldest first: at most `limit` of them and
        at most `budget` bytes of frame (`item_cost` each; the first always fits, since envelopes
        are smaller than a frame). `more` says whether further messages follow. StorageError if
        the database cannot be read."""
        items: list[Item] = []
        used = 0
        try:
            cursor = self._conn.execute(
                "SELECT seq, id, env, exp FROM messages WHERE box=? AND seq>? AND exp>?"
                " ORDER BY seq", (box, min(after, 2**63 - 1), now))
            try:
                for seq, mid, env, exp in cursor:  # read lazily: a page never loads more
                    cost = item_cost(len(env))
                    if len(items) >= limit or (items and used + cost > budget):
                        return items, True
                    items.append(Item(seq=seq, id=mid, env=env, exp=exp))
                    used += cost
            finally:
                cursor.close()
        except sqlite3.Error as exc:
            raise self.health.failed(storage_error(exc, self.path, "reading a mailbox")) from exc
        return items, False

    # --- deleting ---------------------------------------------------------------------------------

    def ack(self, box: bytes, ids: Sequence[bytes]) -> int:
        """Delete the messages `ids` of `box` (and only of `box`); returns how many were held."""
        if not ids:
            return 0
        with self._transaction():
            marks = ",".join("?" * len(ids))
            rows = self._conn.execute(
                f"DELETE FROM messages WHERE box=? AND id IN ({marks})"
                " RETURNING length(env), open", (box, *ids)).fetchall()
            if not rows:
                return 0
            state = self._box_state(box)
            for size, was_open in rows:
                state.remove(size, bool(was_open))
            delta = self._write_boxes([state])
        self._forget(delta, [(size, bool(was_open)) for size, was_open in rows])
        self.deleted_since_checkpoint = True
        return len(rows)

    def purge_expired(self, *, now: int, chunk: int = PURGE_CHUNK) -> int:
        """Delete up to `chunk` expired messages in one transaction; returns how many. Call again
        while it returns `chunk`."""
        with self._transaction():
            rows = self._conn.execute(
                "DELETE FROM messages WHERE seq IN "
                "(SELECT seq FROM messages WHERE exp<=? ORDER BY exp LIMIT ?) "
                "RETURNING box, length(env), open", (now, chunk)).fetchall()
            if not rows:
                return 0
            states: dict[bytes, _BoxState] = {}
            for box, size, was_open in rows:
                state = states.get(box)
                if state is None:
                    state = states[box] = self._box_state(box)
                state.remove(size, bool(was_open))
            delta = self._write_boxes(states.values())
        self._forget(delta, [(size, bool(was_open)) for _, size, was_open in rows])
        self.deleted_since_checkpoint = True
        return len(rows)

    def _forget(self, delta: int, removed: Sequence[tuple[int, bool]]) -> None:
        """Totals after a committed deletion of `removed` ((size, open) each)."""
        self.totals.mailboxes += delta
        self.totals.messages -= len(removed)
        self.totals.bytes -= sum(size for size, _ in removed)
        self.totals.open_messages -= sum(1 for _, was_open in removed if was_open)
        self.totals.open_bytes -= sum(size for size, was_open in removed if was_open)

    def checkpoint(self) -> None:
        """Fold the WAL into the database file (at shutdown: leaves one file behind)."""
        if truncate_wal(self._conn):
            self.deleted_since_checkpoint = False

    def checkpoint_if_deleted(self) -> bool:
        """`checkpoint` if messages were deleted (acked or expired) since the last one, so their
        copies leave the WAL too. Called on a timer (the purge loop), not per ack: a checkpoint
        writes back every page changed since the previous one. True if it checkpointed."""
        if not self.deleted_since_checkpoint:
            return False
        self.checkpoint()
        return not self.deleted_since_checkpoint
