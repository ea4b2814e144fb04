"""The relay's SQLite store: sealed envelopes by mailbox, with quotas, TTLs and a global cap.

One database file (relay.db) in WAL mode with synchronous=FULL: a deposit is acknowledged only
after the transaction holding it is committed and on disk, so an acknowledged deposit survives a
kill -9 or a power cut. Calls are synchronous and run on the trio thread, like node/device/storage.py:
a transaction is atomic with respect to every other task without a lock, and batching (one
transaction per burst of deposits from one stream) pays one fsync per burst.

What is stored is exactly what the protocol gives the relay: the mailbox id (a hash of the
recipient device key), the sender-chosen message id, the sealed envelope and its expiry. Nothing
about the depositor (no peer id, no address, no time of deposit beyond what `exp` implies).

Schema:

    messages(seq INTEGER PRIMARY KEY AUTOINCREMENT, box, id, env, exp)   UNIQUE(box, id)
    boxes(box PRIMARY KEY, count, bytes)      per-mailbox totals, kept in the same transactions

`seq` is the fetch cursor: AUTOINCREMENT never reuses a value, so a cursor a client holds stays
valid after deletions. Totals (mailboxes, messages, bytes) are kept in memory, loaded at open and
updated after each commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
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
from node.protocol.mailbox import MAILBOX_FULL, STORAGE_FULL, Item, item_cost

__all__ = ["DepositOutcome", "PendingDeposit", "RelayStore", "StoreLimits", "Totals"]

SCHEMA_VERSION: Final = 1

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
"""}

#: Expired messages deleted per purge transaction: keeps each pause of the event loop short.
PURGE_CHUNK: Final = 2_000

# Outcomes of one deposit (besides an error code).
STORED: Final = "stored"
DUPLICATE: Final = "duplicate"


@dataclass(frozen=True, slots=True)
class StoreLimits:
    mailbox_max_messages: int
    mailbox_max_bytes: int
    storage_max_bytes: int


@dataclass(frozen=True, slots=True)
class PendingDeposit:
    box: bytes
    id: bytes
    env: bytes
    exp: int


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
    existed: bool  # a row for it was in the table when the transaction began

    def fits(self, size: int, limits: StoreLimits) -> bool:
        return (self.count + 1 <= limits.mailbox_max_messages
                and self.bytes + size <= limits.mailbox_max_bytes)


@dataclass(slots=True)
class Totals:
    mailboxes: int = 0
    messages: int = 0
    bytes: int = 0


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
        boxes, count, size = self._conn.execute(
            "SELECT count(*), coalesce(sum(count), 0), coalesce(sum(bytes), 0) FROM boxes"
        ).fetchone()
        self.totals = Totals(boxes, count, size)
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name='messages'").fetchone()
        self.last_seq = row[0] if row else 0

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with sqlite_transaction(self._conn, self.path, self.health):
            yield

    # --- deposits ---------------------------------------------------------------------------------

    def deposit(self, deposits: Sequence[PendingDeposit], *, now: int) -> DepositOutcome:
        """Store a batch of deposits in ONE transaction; return per deposit STORED, DUPLICATE
        (that (box, id) is already held: nothing new is stored) or an error code
        (MAILBOX_FULL, STORAGE_FULL). When this returns, everything STORED is on disk.

        Quotas are checked inside the transaction, against the totals as they stand with the
        earlier deposits of the same batch. A mailbox at its quota first drops its own expired
        messages (the purge task may not have reached them yet).
        """
        execute = self._conn.execute
        results: list[str] = []
        touched: set[bytes] = set()
        boxes: dict[bytes, _BoxState] = {}  # as of now inside the transaction
        added_count = added_bytes = 0
        expired_count = expired_bytes = 0
        max_seq = self.last_seq
        limits = self.limits
        with self._transaction():
            for d in deposits:
                if execute("SELECT 1 FROM messages WHERE box=? AND id=?", (d.box, d.id)).fetchone():
                    results.append(DUPLICATE)
                    continue
                state = boxes.get(d.box)
                if state is None:
                    state = boxes[d.box] = self._box_state(d.box)
                size = len(d.env)
                if not state.fits(size, limits):
                    count, freed = self._drop_expired(d.box, now)
                    state.count -= count
                    state.bytes -= freed
                    expired_count += count
                    expired_bytes += freed
                    if not state.fits(size, limits):
                        results.append(MAILBOX_FULL)
                        continue
                total = self.totals.bytes + added_bytes - expired_bytes
                if total + size > limits.storage_max_bytes:
                    results.append(STORAGE_FULL)
                    continue
                cursor = execute("INSERT INTO messages(box, id, env, exp) VALUES (?, ?, ?, ?)",
                                 (d.box, d.id, d.env, d.exp))
                max_seq = max(max_seq, cursor.lastrowid or 0)
                state.count += 1
                state.bytes += size
                added_count += 1
                added_bytes += size
                results.append(STORED)
                touched.add(d.box)
            delta = self._write_boxes(boxes.values())
        self.totals.mailboxes += delta
        self.totals.messages += added_count - expired_count
        self.totals.bytes += added_bytes - expired_bytes
        self.last_seq = max_seq
        self.deleted_since_checkpoint |= expired_count > 0
        return DepositOutcome(results, touched, expired_count)

    def _box_state(self, box: bytes) -> _BoxState:
        row = self._conn.execute("SELECT count, bytes FROM boxes WHERE box=?", (box,)).fetchone()
        return _BoxState(box, row[0], row[1], True) if row else _BoxState(box, 0, 0, False)

    def _write_boxes(self, states: Iterable[_BoxState]) -> int:
        """Write the per-mailbox totals changed in a transaction (deleting the rows of mailboxes
        now empty); returns the change in the number of mailboxes."""
        delta = 0
        for state in states:
            if state.count > 0:
                self._conn.execute(
                    "INSERT INTO boxes(box, count, bytes) VALUES (?, ?, ?) "
                    "ON CONFLICT(box) DO UPDATE SET count=excluded.count, bytes=excluded.bytes",
                    (state.box, state.count, state.bytes))
                delta += 0 if state.existed else 1
            elif state.existed:
                self._conn.execute("DELETE FROM boxes WHERE box=?", (state.box,))
                delta -= 1
        return delta

    def _drop_expired(self, box: bytes, now: int) -> tuple[int, int]:
        rows = self._conn.execute(
            "DELETE FROM messages WHERE box=? AND exp<=? RETURNING length(env)", (box, now)
        ).fetchall()
        return len(rows), sum(r[0] for r in rows)

    # --- reading --------------------------------------------------------------------------------

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
                f"DELETE FROM messages WHERE box=? AND id IN ({marks}) RETURNING length(env)",
                (box, *ids)).fetchall()
            if not rows:
                return 0
            freed = sum(r[0] for r in rows)
            state = self._box_state(box)
            state.count -= len(rows)
            state.bytes -= freed
            delta = self._write_boxes([state])
        self.totals.mailboxes += delta
        self.totals.messages -= len(rows)
        self.totals.bytes -= freed
        self.deleted_since_checkpoint = True
        return len(rows)

    def purge_expired(self, *, now: int, chunk: int = PURGE_CHUNK) -> int:
        """Delete up to `chunk` expired messages in one transaction; returns how many. Call again
        while it returns `chunk`."""
        with self._transaction():
            rows = self._conn.execute(
                "DELETE FROM messages WHERE seq IN "
                "(SELECT seq FROM messages WHERE exp<=? ORDER BY exp LIMIT ?) "
                "RETURNING box, length(env)", (now, chunk)).fetchall()
            if not rows:
                return 0
            states: dict[bytes, _BoxState] = {}
            for box, size in rows:
                state = states.get(box)
                if state is None:
                    state = states[box] = self._box_state(box)
                state.count -= 1
                state.bytes -= size
            delta = self._write_boxes(states.values())
        self.totals.mailboxes += delta
        self.totals.messages -= len(rows)
        self.totals.bytes -= sum(size for _, size in rows)
        self.deleted_since_checkpoint = True
        return len(rows)

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
