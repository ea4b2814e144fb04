"""SQLite storage of one node: one database file in WAL mode, behind small typed methods.

Calls are synchronous and run on the trio thread: a transaction is then atomic with respect to
every other task without any lock, and with batching (one transaction per batch of messages) the
cost is tens of microseconds per commit ("normal") or one fsync ("full"). Nothing here knows
about trio or libp2p.

Schema changes go through MIGRATIONS: the database records its version in `meta`, and a database
written by a newer Pigeon is refused instead of being half-understood.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

from node.device.config import Durability
from node.errors import ContactError, DataDirError
from node.files import (
    StorageHealth,
    open_database,
    sqlite_transaction,
    storage_error,
    truncate_wal,
)
from node.protocol.content import ContentKind
from node.protocol.directory import next_seq
from node.protocol.states import Direction, MessageState, OutboxState

__all__ = ["AttachmentRow", "Contact", "Database", "Device", "DeviceState", "MessageRow",
           "NewMessage", "OutboxRow"]

SCHEMA_VERSION: Final = 12

MIGRATIONS: Final[dict[int, str]] = {
    1: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
    CREATE TABLE contacts (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        account BLOB NOT NULL UNIQUE,      -- identity key (32 bytes)
        added_at INTEGER NOT NULL          -- ms
    );
    CREATE TABLE devices (
        device BLOB PRIMARY KEY,           -- device key (32 bytes)
        contact_id INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
        peer_id TEXT NOT NULL UNIQUE,
        addrs TEXT NOT NULL,               -- JSON array of multiaddrs
        relays TEXT NOT NULL DEFAULT '[]', -- JSON array: relays holding the device's mailbox
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX devices_by_contact ON devices(contact_id);
    CREATE TABLE sessions (
        account BLOB NOT NULL,
        device BLOB NOT NULL,
        record BLOB NOT NULL,              -- SessionRecord.to_bytes()
        PRIMARY KEY (account, device)
    ) WITHOUT ROWID;
    CREATE TABLE prekeys (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        store BLOB NOT NULL                -- PreKeyStore.to_bytes()
    );
    CREATE TABLE invites (
        token BLOB PRIMARY KEY,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL        -- ms
    ) WITHOUT ROWID;
    CREATE TABLE messages (
        rowid INTEGER PRIMARY KEY,
        id BLOB NOT NULL,                  -- 16 bytes, chosen by the sender
        contact_id INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
        direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
        kind TEXT NOT NULL,                -- 'text' | 'intro'
        body TEXT NOT NULL,
        sent_at INTEGER NOT NULL,          -- sender's clock, ms, increasing per sending device
        received_at INTEGER,               -- ms, incoming only
        state TEXT NOT NULL,               -- out: pending|sent|relayed|delivered|failed; in: received
        error TEXT,
        updated_at INTEGER NOT NULL,
        UNIQUE (contact_id, direction, id)
    );
    CREATE INDEX messages_by_time ON messages(contact_id, sent_at, rowid);
    CREATE INDEX messages_by_id ON messages(id);
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- send order; never reused (lanes track it)
        message_rowid INTEGER NOT NULL REFERENCES messages(rowid) ON DELETE CASCADE,
        account BLOB NOT NULL,
        device BLOB NOT NULL,
        payload BLOB,                      -- encrypted session message; NULL until encrypted
        session_base BLOB,                 -- base key of the session that encrypted it
        state TEXT NOT NULL,               -- pending | sent | relayed
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        error TEXT,
        UNIQUE (message_rowid, device)
    );
    CREATE INDEX outbox_by_device ON outbox(device, seq);
    CREATE TABLE seen (
        account BLOB NOT NULL,             -- sender account: ids are namespaced by sender
        id BLOB NOT NULL,
        seen_at INTEGER NOT NULL,
        PRIMARY KEY (account, id)
    ) WITHOUT ROWID;
    """,
    # Multi-device accounts (PROTOCOL.md section 25): the account's own devices are rows of
    # `devices` under one hidden contact row (`own` = 1, name ''), so reaching them (sessions,
    # lanes, relays) works exactly as for a contact's devices; and the newest verified device
    # list of every account we know (our own included) is kept whole, to compare versions and
    # to hand on.
    2: """
    ALTER TABLE contacts ADD COLUMN own INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX contacts_own ON contacts(own) WHERE own = 1;
    CREATE TABLE device_lists (
        account BLOB PRIMARY KEY,          -- identity key
        seq INTEGER NOT NULL,
        record BLOB NOT NULL               -- the signed device list (node.protocol.devicelist)
    ) WITHOUT ROWID;
    """,
    # Linking (PROTOCOL.md section 25.2): the nonces of link codes this device approved, so a
    # code works once.
    3: """
    CREATE TABLE link_codes (
        nonce BLOB PRIMARY KEY,            -- the code's 16-byte nonce
        used_at INTEGER NOT NULL           -- ms
    ) WITHOUT ROWID;
    """,
    # The parts of a session record that change rarely, kept apart so that a message rewrites
    # only the current session (`sessions.record`, from now on without skipped keys or archived
    # sessions; rows written before keep the whole record until their next save).
    4: """
    CREATE TABLE session_archive (
        account BLOB NOT NULL,
        device BLOB NOT NULL,
        sessions BLOB NOT NULL,            -- archived sessions (SessionRecord.to_parts()[1])
        PRIMARY KEY (account, device)
    ) WITHOUT ROWID;
    CREATE TABLE skipped_keys (
        id INTEGER PRIMARY KEY,            -- order of storing: oldest first
        account BLOB NOT NULL,
        device BLOB NOT NULL,
        base BLOB NOT NULL,                -- base key of the session the key belongs to
        hk BLOB NOT NULL,                  -- header key of its chain
        n INTEGER NOT NULL,                -- message number
        mk BLOB NOT NULL                   -- message key
    );
    CREATE INDEX skipped_keys_by_device ON skipped_keys(account, device);
    """,
    5: """
    -- The device's binding to its contact's account (PROTOCOL.md section 4 "Binding"), from
    -- the bundle it was added with; NULL when nothing proved it (rows from before bindings,
    -- devices that introduced themselves). A proven claim takes an unproven device over.
    ALTER TABLE devices ADD COLUMN binding BLOB;
    """,
    # Fan-out (PROTOCOL.md section 25.5): an outbox row goes when its device confirms it, so the
    # devices that confirmed a message are remembered here, for the per-device states that
    # `history` and `status` show. `account` is the confirming device's account: ours for a
    # sent transcript, the contact's for the message itself.
    6: """
    CREATE TABLE delivered_to (
        message_rowid INTEGER NOT NULL REFERENCES messages(rowid) ON DELETE CASCADE,
        device BLOB NOT NULL,
        account BLOB NOT NULL,
        at INTEGER NOT NULL,               -- ms
        PRIMARY KEY (message_rowid, device)
    ) WITHOUT ROWID;
    """,
    7: """
    -- Deposit capabilities (PROTOCOL.md section 21): the one each device gave us for its
    -- mailbox (NULL: none yet, we deposit as a stranger), the id of that mailbox (NULL: the one
    -- derived from the device key), and whether we gave it ours.
    ALTER TABLE devices ADD COLUMN cap BLOB;
    ALTER TABLE devices ADD COLUMN box BLOB;
    ALTER TABLE devices ADD COLUMN cap_sent INTEGER NOT NULL DEFAULT 0;
    """,
    # Read state of incoming messages, kept alike on all the account's devices (PROTOCOL.md
    # section 25.6, `read`): when each was read here (NULL: unread), and per contact the newest
    # sender timestamp read up to, so a message that arrives later but is older by that clock is
    # filed as read. Messages received before this version count as read: there was no unread
    # state to keep, and a flood of old "unread" messages would hide the new ones.
    8: """
    ALTER TABLE messages ADD COLUMN read_at INTEGER;     -- ms; incoming only; NULL: unread
    ALTER TABLE contacts ADD COLUMN read_upto INTEGER NOT NULL DEFAULT 0;  -- sender ts, ms
    UPDATE messages SET read_at = coalesce(received_at, updated_at) WHERE direction = 'in';
    CREATE INDEX messages_unread ON messages(contact_id, sent_at)
        WHERE direction = 'in' AND kind = 'text' AND read_at IS NULL;
    """,
    # Attachments (PROTOCOL.md section 26): one row per file message, sent or received. The
    # descriptor holds the key; `hash` (its SHA-256 of the blob) names the blob on disk. Sent:
    # 'ready' once the blob is encrypted into the data directory. Received: 'offered' until a
    # download starts, 'downloading', 'done' (the file is in the content-addressed store) or
    # 'failed' (with the reason; a `save` tries again). A sent blob is deleted after
    # `Config.sent_blob_keep_s` (then 'expired').
    9: """
    CREATE TABLE attachments (
        message_rowid INTEGER PRIMARY KEY REFERENCES messages(rowid) ON DELETE CASCADE,
        descriptor BLOB NOT NULL,
        hash BLOB NOT NULL,
        state TEXT NOT NULL,
        file TEXT,                         -- received: name of the file in the store once done
        error TEXT,
        updated_at INTEGER NOT NULL        -- ms
    );
    CREATE INDEX attachments_by_hash ON attachments(hash);
    -- Uploads of sent blobs to a recipient device's relays (PROTOCOL.md section 26.6), for
    -- a device that was offline: one row per (message, relay, mailbox); state 'pending' (with
    -- the relay's refusal code or the failure, shown to the user) or 'done'.
    CREATE TABLE attachment_uploads (
        message_rowid INTEGER NOT NULL REFERENCES messages(rowid) ON DELETE CASCADE,
        relay TEXT NOT NULL,
        box BLOB NOT NULL,
        state TEXT NOT NULL,
        error TEXT,
        PRIMARY KEY (message_rowid, relay, box)
    ) WITHOUT ROWID;
    """,
    # Groups (PROTOCOL.md section 27). A group's conversation is a hidden row of `contacts`
    # (`own` = 2, `account` = the group id, `name` = the group's name here, unique), so its
    # messages, notices, outbox rows and read state work as a contact's do; `groups` holds
    # whether we are still a member. `group_ops` the signed operations (the state is computed
    # from them, node.protocol.groups); `own_chains` this device's sender chain per group and
    # `chain_given` which devices were given its current one; `peer_chains` the chains other
    # member devices gave us; `group_held` group messages waiting for their chain;
    # `group_payloads` the sender-key message of each group text we queued (one for all
    # devices); `messages.sender` the member account that wrote an incoming group text.
    10: """
    CREATE TABLE groups (
        id BLOB PRIMARY KEY,               -- the group id (32 bytes)
        contact_id INTEGER NOT NULL UNIQUE REFERENCES contacts(id) ON DELETE CASCADE,
        member INTEGER NOT NULL DEFAULT 1, -- 0: we left or were removed
        joined_at INTEGER NOT NULL         -- ms
    ) WITHOUT ROWID;
    CREATE TABLE group_ops (
        group_id BLOB NOT NULL,
        hash BLOB NOT NULL,                -- SHA-256 of the op's body
        op BLOB NOT NULL,                  -- the signed operation
        PRIMARY KEY (group_id, hash)
    ) WITHOUT ROWID;
    CREATE TABLE own_chains (
        group_id BLOB PRIMARY KEY,
        state BLOB NOT NULL                -- SenderChain.to_bytes()
    ) WITHOUT ROWID;
    CREATE TABLE chain_given (
        group_id BLOB NOT NULL,
        key_id BLOB NOT NULL,
        device BLOB NOT NULL,
        PRIMARY KEY (group_id, key_id, device)
    ) WITHOUT ROWID;
    CREATE TABLE peer_chains (
        group_id BLOB NOT NULL,
        device BLOB NOT NULL,
        key_id BLOB NOT NULL,
        state BLOB NOT NULL,               -- ReceiverChain.to_bytes()
        at INTEGER NOT NULL,               -- ms received: the older ones go first
        PRIMARY KEY (group_id, device, key_id)
    ) WITHOUT ROWID;
    CREATE TABLE group_held (
        rowid INTEGER PRIMARY KEY,
        group_id BLOB NOT NULL,
        account BLOB NOT NULL,
        device BLOB NOT NULL,
        id BLOB NOT NULL,                  -- message id
        sent_at INTEGER NOT NULL,
        message BLOB NOT NULL              -- the sender-key message
    );
    CREATE INDEX group_held_by_device ON group_held(group_id, device);
    CREATE TABLE group_payloads (
        message_rowid INTEGER PRIMARY KEY REFERENCES messages(rowid) ON DELETE CASCADE,
        payload BLOB NOT NULL
    );
    ALTER TABLE messages ADD COLUMN sender BLOB;
    CREATE INDEX messages_group_control ON messages(rowid)
        WHERE kind IN ('sender-key', 'group-ops');
    """,
    # Received files are news like texts (PROTOCOL.md section 25.6, `read`): they count as
    # unread until read. Files received before this version count as read, as the texts did
    # when the read state came (version 8): they were shown long ago.
    11: """
    UPDATE messages SET read_at = coalesce(received_at, updated_at)
        WHERE direction = 'in' AND kind = 'file' AND read_at IS NULL;
    DROP INDEX messages_unread;
    CREATE INDEX messages_unread ON messages(contact_id, sent_at)
        WHERE direction = 'in' AND kind IN ('text', 'file') AND read_at IS NULL;
    """,
    # How fresh a device's addresses and relays are (PROTOCOL.md section 21 "Where a device
    # is"): the sender-clock time (ms) at which what is stored was current, 0 when unknown. Rows
    # from before have no stamp: the first stamped information replaces them.
    12: """
    ALTER TABLE devices ADD COLUMN seen_at INTEGER NOT NULL DEFAULT 0;
    """,
}


NewMessage = tuple[bytes, ContentKind, str, int]
"""A message to write to the history: (id, kind, body, sent_at_ms)."""


@dataclass(frozen=True, slots=True)
class Contact:
    """A row of `contacts`: a person, known by the name we gave them and their identity key."""

    id: int
    name: str
    account: bytes
    added_at_ms: int


@dataclass(frozen=True, slots=True)
class Device:
    """A row of `devices`: one of a contact's devices, with where to reach it."""

    device: bytes
    contact_id: int
    peer_id: str
    addrs: tuple[str, ...]
    relays: tuple[str, ...] = ()
    #: The deposit capability this device gave us for its mailbox (PROTOCOL.md section 21).
    cap: bytes | None = None
    #: The id of its contacts' mailbox (None: the one derived from the device key).
    box: bytes | None = None
    #: When `addrs` and `relays` were current, by the device's clock (ms; 0: unknown), as
    #: PROTOCOL.md section 21 "Where a device is" defines it.
    seen_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A row of `messages`: one message of the history, incoming or outgoing."""

    rowid: int
    id: bytes
    contact_id: int
    direction: Direction
    kind: ContentKind
    body: str
    sent_at_ms: int
    received_at_ms: int | None
    state: MessageState
    error: str | None
    #: When an incoming message was read here (ms), None while unread (and for outgoing ones).
    read_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A row of `outbox` with its message: one recipient device's copy, until it is confirmed."""

    seq: int
    message_rowid: int
    message_id: bytes
    kind: ContentKind
    body: str
    sent_at_ms: int
    account: bytes
    device: bytes
    payload: bytes | None
    session_base: bytes | None
    state: OutboxState
    attempts: int
    created_at_ms: int
    #: The account of the message's conversation: `account` unless this row is a sent
    #: transcript to one of our own devices (PROTOCOL.md section 25.5).
    conversation: bytes = b""

    @property
    def transcript(self) -> bool:
        """Whether this row carries a copy of our message to one of our own devices."""
        return self.account != self.conversation


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Where one message stands with one device it was queued for (PROTOCOL.md section 25.5):
    `own` for our own other devices (the sent transcript)."""

    device: bytes
    peer_id: str
    own: bool
    state: str  # pending | sent | relayed | delivered


@dataclass(frozen=True, slots=True)
class AttachmentRow:
    """A row of `attachments` with its message: one file sent or received (PROTOCOL.md
    section 26)."""

    message_rowid: int
    message_id: bytes
    contact_id: int
    direction: Direction
    descriptor: bytes
    hash: bytes
    state: str  # out: ready | expired; in: offered | downloading | done | failed
    file: str | None
    error: str | None


class Database:
    """The node's database. Open with `Database.open(path, durability=...)`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, full: bool = True) -> None:
        self._conn = conn
        self.path = path
        self._full = full  # synchronous=FULL: every commit waits for the disk
        self._in_transaction = False
        self.health = StorageHealth()  # the last failure, until a commit succeeds

    @classmethod
    def open(cls, path: Path, *, durability: Durability = "full", create: bool = False) -> Self:
        """Open (migrating) the database; with `create`, make a new one if there is none.

        DataDirError if it is damaged, newer than this Pigeon, or (without `create`) missing or
        empty: an initialised data directory whose database vanished has lost its contacts and
        sessions, and silently starting afresh would hide that.
        """
        if not create and (not path.exists() or path.stat().st_size == 0):
            raise DataDirError(
                f"{path} is missing or empty although the keys exist: restore it from a backup,"
                " or move the data directory away and run `pigeon init` again")
        full = durability == "full"
        return open_database(
            path, what="Pigeon database", schema_version=SCHEMA_VERSION, migrations=MIGRATIONS,
            synchronous="FULL" if full else "NORMAL", pragmas=("foreign_keys=ON",),
            load=lambda conn: cls(conn, path, full=full))

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    # --- transactions ---------------------------------------------------------------------------

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; ROLLBACK on any exception. Nested calls join the outer one.

        `durable=False` commits without waiting for the disk (synchronous=NORMAL for this one
        commit) when the database is in "full" mode: for bookkeeping whose loss in a power cut
        only causes a harmless repeat (a resend that the receiver de-duplicates). A crash of the
        process still loses nothing: the commit is in the WAL.
        """
        if self._in_transaction:
            yield
            return
        relax = not durable and self._full
        try:
            if relax:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            with sqlite_transaction(self._conn, self.path, self.health):
                self._in_transaction = True
                try:
                    yield
                finally:
                    self._in_transaction = False
        except sqlite3.Error as exc:  # the PRAGMAs (sqlite_transaction converts its own)
            raise self.health.failed(
                storage_error(exc, self.path, "setting the durability")) from exc
        finally:
            if relax:
                with suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA synchronous=FULL")

    def truncate_wal(self) -> None:
        """After deletions: clear what was deleted from the WAL too (node/files.py
        `truncate_wal`). Call after a batch of deletions, not per row."""
        truncate_wal(self._conn)

    def _q(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise self.health.failed(storage_error(exc, self.path, "reading or writing")) from exc

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self._conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise self.health.failed(storage_error(exc, self.path, "writing")) from exc

    # --- meta -----------------------------------------------------------------------------------

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The value stored under `key` in `meta`, or `default`."""
        rows = self._q("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else default

    def get_meta_json(self, key: str) -> Any:
        """The JSON value stored under `key` in `meta`; None if there is none or it does not
        parse (the caller checks its shape: a damaged value must not stop the node)."""
        raw = self.get_meta(key)
        try:
            return json.loads(raw) if raw else None
        except (TypeError, ValueError):
            return None

    def set_meta(self, key: str, value: Any) -> None:
        """Store `value` under `key` in `meta`."""
        self._q("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # --- prekeys and sessions ---------------------------------------------------------------------

    def load_prekeys(self) -> bytes | None:
        """The serialized prekey store (`PreKeyStore.to_bytes()`), or None before the first."""
        rows = self._q("SELECT store FROM prekeys WHERE id=1")
        return rows[0][0] if rows else None

    def save_prekeys(self, store: bytes) -> None:
        """Replace the serialized prekey store."""
        self._q("INSERT OR REPLACE INTO prekeys(id, store) VALUES (1, ?)", (store,))

    def load_session(self, account: bytes, device: bytes) -> bytes | None:
        """The serialized session record with a remote device, or None if there is none."""
        rows = self._q("SELECT record FROM sessions WHERE account=? AND device=?", (account, device))
        return rows[0][0] if rows else None

    def save_session(self, account: bytes, device: bytes, record: bytes) -> None:
        """Replace the serialized session record with a remote device."""
        self._q(
            "INSERT OR REPLACE INTO sessions(account, device, record) VALUES (?, ?, ?)",
            (account, device, record),
        )

    def load_session_archive(self, account: bytes, device: bytes) -> bytes | None:
        """The archived sessions with a remote device (`SessionRecord.to_parts()[1]`), or None."""
        rows = self._q("SELECT sessions FROM session_archive WHERE account=? AND device=?",
                       (account, device))
        return rows[0][0] if rows else None

    def save_session_archive(self, account: bytes, device: bytes, sessions: bytes) -> None:
        """Replace the archived sessions with a remote device."""
        self._q("INSERT OR REPLACE INTO session_archive(account, device, sessions)"
                " VALUES (?, ?, ?)", (account, device, sessions))

    def load_skipped_keys(self, account: bytes, device: bytes
                          ) -> list[tuple[int, bytes, bytes, int, bytes]]:
        """The skipped message keys of the sessions with a remote device, oldest first, as
        `(row id, session base key, header key, N, message key)`."""
        return [(int(i), bytes(b), bytes(hk), int(n), bytes(mk)) for i, b, hk, n, mk in self._q(
            "SELECT id, base, hk, n, mk FROM skipped_keys WHERE account=? AND device=?"
            " ORDER BY id", (account, device))]

    def add_skipped_keys(self, account: bytes, device: bytes,
                         keys: Sequence[tuple[bytes, bytes, int, bytes]]) -> list[int]:
        """Store skipped keys `(session base key, header key, N, message key)`, in order;
        returns their row ids."""
        if not keys:
            return []
        first = int(self._q("SELECT coalesce(max(id), 0) + 1 FROM skipped_keys")[0][0])
        ids = list(range(first, first + len(keys)))
        self._many("INSERT INTO skipped_keys(id, account, device, base, hk, n, mk)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [(i, account, device, *key) for i, key in zip(ids, keys, strict=True)])
        return ids

    def delete_skipped_keys(self, ids: Iterable[int]) -> None:
        """Delete skipped keys by row id (used, evicted, or of a dropped session)."""
        self._many("DELETE FROM skipped_keys WHERE id=?", [(i,) for i in ids])

    # --- invites ----------------------------------------------------------------------------------

    def add_invite(self, token: bytes, *, now_ms: int, expires_ms: int) -> None:
        """Remember the token of an invite we issued, valid until `expires_ms`."""
        self._q("INSERT INTO invites(token, created_at, expires_at) VALUES (?, ?, ?)",
                (token, now_ms, expires_ms))

    def invite_is_valid(self, token: bytes, *, now_ms: int) -> bool:
        """Whether `token` is one of our invites and has not expired."""
        return bool(self._q("SELECT 1 FROM invites WHERE token=? AND expires_at>?", (token, now_ms)))

    # --- linking --------------------------------------------------------------------------------

    def link_code_used(self, nonce: bytes) -> bool:
        """Whether this device approved the link code with `nonce` already."""
        return bool(self._q("SELECT 1 FROM link_codes WHERE nonce=?", (nonce,)))

    def mark_link_code_used(self, nonce: bytes, *, now_ms: int) -> None:
        """Remember an approved link code (inside the caller's transaction)."""
        self._q("INSERT OR IGNORE INTO link_codes(nonce, used_at) VALUES (?, ?)", (nonce, now_ms))

    def history_range(self, *, since_ms: int, cap: int) -> tuple[int, int, int]:
        """A history transfer's bounds over the contacts' text messages (not the own row's):
        (after, until, count) where (after, until] in row order holds the last `cap` messages
        sent since `since_ms`."""
        until = int(self._q("SELECT coalesce(max(rowid), 0) FROM messages")[0][0])
        rows = self._q(
            "SELECT m.rowid FROM messages m JOIN contacts c ON c.id=m.contact_id"
            " WHERE c.own=0 AND m.kind='text' AND m.sent_at>=? AND m.rowid<=?"
            " ORDER BY m.rowid DESC LIMIT ?", (since_ms, until, cap))
        if not rows:
            return until, until, 0
        return int(rows[-1][0]) - 1, until, len(rows)

    def history_count(self, *, after: int, until: int, since_ms: int) -> int:
        """How many messages a transfer still has after cursor `after`."""
        return int(self._q(
            "SELECT count(*) FROM messages m JOIN contacts c ON c.id=m.contact_id"
            " WHERE c.own=0 AND m.kind='text' AND m.sent_at>=? AND m.rowid>? AND m.rowid<=?",
            (since_ms, after, until))[0][0])

    def history_chunk(self, *, after: int, until: int, since_ms: int, limit: int
                      ) -> list[tuple[int, bytes, MessageRow]]:
        """(rowid, contact account, message) of the next messages of a transfer, in row order."""
        rows = self._q(
            "SELECT m.rowid, c.account, m.rowid, m.id, m.contact_id, m.direction, m.kind, m.body,"
            " m.sent_at, m.received_at, m.state, m.error FROM messages m"
            " JOIN contacts c ON c.id=m.contact_id"
            " WHERE c.own=0 AND m.kind='text' AND m.sent_at>=? AND m.rowid>? AND m.rowid<=?"
            " ORDER BY m.rowid LIMIT ?", (since_ms, after, until, limit))
        return [(int(r[0]), bytes(r[1]), MessageRow(*r[2:])) for r in rows]

    def insert_history(self, rows: Sequence[tuple[int, bytes, Direction, str, int, int | None,
                                                  MessageState]], *, now_ms: int) -> int:
        """Messages copied from another device of the account: (contact id, id, direction,
        body, sent_at, received_at, state). A message already here (same contact, direction and
        id) is left as it is, so a repeated chunk adds nothing. Returns how many were new."""
        added = 0
        for contact_id, message_id, direction, body, sent_at, received_at, state in rows:
            # The transfer carries no read state: the past comes as read (PROTOCOL.md section
            # 25.6, `read`), not as a flood of unread messages on the new device.
            added += len(self._q(
                "INSERT INTO messages(id, contact_id, direction, kind, body, sent_at,"
                " received_at, state, updated_at, read_at)"
                " VALUES (?1, ?2, ?3, 'text', ?4, ?5, ?6, ?7, ?8, iif(?3='in', ?8, NULL))"
                " ON CONFLICT(contact_id, direction, id) DO NOTHING RETURNING 1",
                (message_id, contact_id, direction, body, sent_at, received_at, state, now_ms)))
        return added

    # --- contacts and devices ----------------------------------------------------------------------

    def add_contact(self, name: str, account: bytes, *, now_ms: int) -> Contact:
        """Add a contact; ContactError if the account or the name is taken."""
        try:
            cur = self._conn.execute(
                "INSERT INTO contacts(name, account, added_at) VALUES (?, ?, ?)",
                (name, account, now_ms),
            )
        except sqlite3.IntegrityError as exc:
            if self.contact_by_account(account) is not None:
                raise ContactError("that account is already a contact") from exc
            raise ContactError(f"a contact named {name!r} exists already") from exc
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path, "adding a contact") from exc
        return Contact(int(cur.lastrowid or 0), name, account, now_ms)

    def put_device(self, contact_id: int, device: bytes, peer_id: str, addrs: Iterable[str],
                   *, seen_at_ms: int, relays: Iterable[str] | None = None,
                   binding: bytes | None = None, cap: bytes | None = None,
                   box: bytes | None = None, now_ms: int) -> bool:
        """Add or refresh a contact's device; whether its addresses or relays changed.

        `seen_at_ms` is when `addrs` and `relays` were current by the device's clock (0: the
        source carries no such time). They replace the stored ones only when not older than
        what is stored (PROTOCOL.md section 21 "Where a device is"); unstamped information
        (0) otherwise only fills an empty list. `relays=None` keeps the known relays,
        `binding=None` the known binding, `cap=None` and `box=None` the known deposit
        capability and mailbox: those apply whatever the stamp. A device held by another
        contact is left alone: `release_device` first (the caller decides, by the bindings,
        whose it is)."""
        new_addrs = list(addrs)
        new_relays = list(relays) if relays is not None else None
        rows = self._q("SELECT contact_id, addrs, relays, seen_at FROM devices WHERE device=?",
                       (device,))
        if rows and rows[0][0] != contact_id:
            return False
        old_addrs: list[str] = json.loads(rows[0][1]) if rows else []
        old_relays: list[str] = json.loads(rows[0][2]) if rows else []
        stored_at = int(rows[0][3]) if rows else 0
        newer = seen_at_ms >= stored_at
        fills = seen_at_ms == 0  # unstamped: only where nothing is known
        if not (newer or (fills and not old_addrs)):
            new_addrs = old_addrs
        if new_relays is None or not (newer or (fills and not old_relays)):
            new_relays = old_relays
        self._q(
            "INSERT INTO devices(device, contact_id, peer_id, addrs, relays, binding, updated_at,"
            " cap, box, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(device) DO UPDATE SET addrs=excluded.addrs, relays=excluded.relays,"
            " binding=coalesce(excluded.binding, binding), updated_at=excluded.updated_at,"
            " cap=coalesce(excluded.cap, cap), box=coalesce(excluded.box, box),"
            " seen_at=excluded.seen_at WHERE contact_id=excluded.contact_id",
            (device, contact_id, peer_id, json.dumps(new_addrs), json.dumps(new_relays), binding,
             now_ms, cap, box, max(stored_at, seen_at_ms)),
        )
        return (new_addrs, new_relays) != (old_addrs, old_relays)

    def next_location_stamp(self, now_ms: int) -> int:
        """The time to stamp this device's own addresses and relays with, in an intro or a
        device record (PROTOCOL.md sections 11 and 23.6): unix ms, strictly above every stamp
        used before, so a clock stepped back does not make newer information look older. Intros
        and records share the sequence (meta `directory_seq`)."""
        stamp = next_seq(now_ms, int(self.get_meta("directory_seq", 0) or 0))
        self.set_meta("directory_seq", stamp)
        return stamp

    def device_binding(self, device: bytes) -> bytes | None:
        """The stored binding of a device to its contact's account, or None if none proved it."""
        rows = self._q("SELECT binding FROM devices WHERE device=?", (device,))
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None

    def release_device(self, device: bytes, reason: str, *, now_ms: int) -> None:
        """Take a device away from the contact holding it: its row and that contact's session
        with it go, and messages queued only for it fail with `reason` (they were encrypted for
        whoever claimed it)."""
        known = self.device(device)
        contact = self.contact_by_id(known.contact_id) if known is not None else None
        if contact is None:
            return
        with self.transaction():
            self._q("DELETE FROM sessions WHERE account=? AND device=?", (contact.account, device))
            rowids = [r[0] for r in self._q(
                "DELETE FROM outbox WHERE account=? AND device=? RETURNING message_rowid",
                (contact.account, device))]
            for rowid in rowids:
                self._q("UPDATE messages SET state='failed', error=?, updated_at=? WHERE rowid=?"
                        " AND NOT EXISTS (SELECT 1 FROM outbox WHERE message_rowid=?)",
                        (reason, now_ms, rowid, rowid))
            self._q("DELETE FROM devices WHERE device=?", (device,))

    def devices_owed_cap(self) -> list[Device]:
        """Devices of contacts we have not yet sent our deposit capability (in an intro). Not
        our own devices: they derive theirs from the account key (`mailbox.own_cap`)."""
        return [_device(r) for r in self._q(
            self._DEVICE_SELECT + " WHERE cap_sent=0 AND contact_id NOT IN"
            " (SELECT id FROM contacts WHERE own=1)")]

    def owe_cap_again(self) -> None:
        """Every contact device is owed an intro again (what it carries changed)."""
        self._q("UPDATE devices SET cap_sent=0 WHERE contact_id NOT IN"
                " (SELECT id FROM contacts WHERE own=1)")

    def mark_cap_sent(self, devices: Iterable[bytes]) -> None:
        """An intro carrying our capability is queued for these devices."""
        for device in devices:
            self._q("UPDATE devices SET cap_sent=1 WHERE device=?", (device,))

    def valid_invite_tokens(self, *, now_ms: int) -> list[bytes]:
        """Tokens of our invites that have not expired."""
        return [r[0] for r in self._q("SELECT token FROM invites WHERE expires_at>?", (now_ms,))]

    def contacts(self) -> list[Contact]:
        """Every contact, by name (not the account's own row, `own_contact`)."""
        return [Contact(*r) for r in self._q(
            "SELECT id, name, account, added_at FROM contacts WHERE own=0 ORDER BY name")]

    def contact_by_name(self, name: str) -> Contact | None:
        """The contact called `name`, or None."""
        rows = self._q("SELECT id, name, account, added_at FROM contacts WHERE name=? AND own=0",
                       (name,))
        return Contact(*rows[0]) if rows else None

    def own_contact(self, account: bytes, *, now_ms: int) -> Contact:
        """The hidden contact row of our own account (made on first use): its devices are our
        other devices."""
        rows = self._q("SELECT id, name, account, added_at FROM contacts WHERE own=1")
        if rows:
            return Contact(*rows[0])
        cur = self._conn.execute(
            "INSERT INTO contacts(name, account, added_at, own) VALUES ('', ?, ?, 1)",
            (account, now_ms))
        return Contact(int(cur.lastrowid or 0), "", account, now_ms)

    def is_own(self, contact: Contact) -> bool:
        """Whether `contact` is our own account's row."""
        return bool(self._q("SELECT 1 FROM contacts WHERE id=? AND own=1", (contact.id,)))

    def device_list(self, account: bytes) -> tuple[int, bytes] | None:
        """The newest signed device list stored for `account` as (seq, record), or None."""
        rows = self._q("SELECT seq, record FROM device_lists WHERE account=?", (account,))
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def put_device_list(self, account: bytes, seq: int, record: bytes) -> bool:
        """Store a verified device list unless one with an equal or higher seq is stored;
        whether it was stored."""
        return bool(self._q(
            "INSERT INTO device_lists(account, seq, record) VALUES (?, ?, ?)"
            " ON CONFLICT(account) DO UPDATE SET seq=excluded.seq, record=excluded.record"
            " WHERE excluded.seq > device_lists.seq RETURNING 1", (account, seq, record)))

    def remove_device(self, device: bytes) -> None:
        """Forget one device of a contact (or of our own account) and its session; messages
        still waiting for it are dropped from the outbox."""
        rows = self._q("SELECT c.account FROM devices d JOIN contacts c ON c.id=d.contact_id"
                       " WHERE d.device=?", (device,))
        with self.transaction():
            if rows:
                for table in ("sessions", "session_archive", "skipped_keys"):
                    self._q(f"DELETE FROM {table} WHERE account=? AND device=?",
                            (rows[0][0], device))
            self._q("DELETE FROM outbox WHERE device=?", (device,))
            self._q("DELETE FROM devices WHERE device=?", (device,))

    def contact_by_account(self, account: bytes) -> Contact | None:
        """The contact with this identity key, or None."""
        rows = self._q("SELECT id, name, account, added_at FROM contacts WHERE account=?",
                       (account,))
        return Contact(*rows[0]) if rows else None

    def contact_by_id(self, contact_id: int) -> Contact | None:
        """The contact with this row id, or None."""
        rows = self._q("SELECT id, name, account, added_at FROM contacts WHERE id=?", (contact_id,))
        return Contact(*rows[0]) if rows else None

    _DEVICE_SELECT = ("SELECT device, contact_id, peer_id, addrs, relays, cap, box, seen_at"
                      " FROM devices")

    def devices(self, contact_id: int | None = None) -> list[Device]:
        """The devices of one contact, or of every contact."""
        rows = self._q(self._DEVICE_SELECT + " WHERE contact_id=?", (contact_id,)) \
            if contact_id is not None else self._q(self._DEVICE_SELECT)
        return [_device(r) for r in rows]

    def device_keys(self, contact_id: int) -> list[bytes]:
        """The contact's device keys, as `devices()` lists them, without decoding addresses."""
        return [r[0] for r in self._q("SELECT device FROM devices WHERE contact_id=?",
                                      (contact_id,))]

    def device(self, device: bytes) -> Device | None:
        """The device with this key, or None."""
        rows = self._q(self._DEVICE_SELECT + " WHERE device=?", (device,))
        return _device(rows[0]) if rows else None

    def devices_without_session(self, *, except_device: bytes, limit: int
                                ) -> list[tuple[Device, bytes]]:
        """Devices (of contacts and of our own account) we have no stored session with, each
        with its account; without reading any session record."""
        rows = self._q(
            "SELECT d.device, d.contact_id, d.peer_id, d.addrs, d.relays, d.cap, d.box,"
            " d.seen_at, c.account FROM devices d JOIN contacts c ON c.id = d.contact_id"
            " WHERE d.device != ? AND NOT EXISTS (SELECT 1 FROM sessions s"
            " WHERE s.account = c.account AND s.device = d.device) LIMIT ?",
            (except_device, limit))
        return [(_device(r[:8]), r[8]) for r in rows]

    def device_by_peer_id(self, peer_id: str) -> Device | None:
        """The device with this libp2p peer id, or None."""
        rows = self._q("SELECT device FROM devices WHERE peer_id=?", (peer_id,))
        return self.device(rows[0][0]) if rows else None

    def rename_contact(self, contact: Contact, name: str) -> Contact:
        """The contact under its new name; ContactError if another contact has that name."""
        if name != contact.name:
            try:
                self._conn.execute("UPDATE contacts SET name=? WHERE id=?", (name, contact.id))
            except sqlite3.IntegrityError as exc:
                raise ContactError(f"a contact named {name!r} exists already") from exc
            except sqlite3.Error as exc:
                raise storage_error(exc, self.path, "renaming a contact") from exc
        return Contact(contact.id, name, contact.account, contact.added_at_ms)

    def remove_contact(self, contact: Contact) -> None:
        """Forget the contact, its devices, sessions, history, undelivered messages and the ids
        of messages accepted from it."""
        with self.transaction():
            self._q("DELETE FROM seen WHERE account=?", (contact.account,))
            for d in self.devices(contact.id):
                for table in ("sessions", "session_archive", "skipped_keys"):
                    self._q(f"DELETE FROM {table} WHERE account=? AND device=?",
                            (contact.account, d.device))
            self._q("DELETE FROM contacts WHERE id=?", (contact.id,))
        # Rare and asked for by the user: the history goes from the WAL at once, too (after the
        # commit: inside a caller's transaction it is left to SQLite's next checkpoint).
        if not self._in_transaction:
            self.truncate_wal()

    # --- messages ---------------------------------------------------------------------------------

    def last_sent_at(self) -> int:
        """The latest sender timestamp of our own messages (0 before the first)."""
        rows = self._q("SELECT max(sent_at) FROM messages WHERE direction='out'")
        return int(rows[0][0] or 0)

    def insert_outgoing(self, *, contact: Contact, messages: Sequence[NewMessage],
                        devices: Sequence[bytes], now_ms: int,
                        copies: Sequence[tuple[bytes, bytes]] = ()) -> list[int]:
        """Messages `(id, kind, body, sent_at_ms)` and one outbox row per message and recipient
        device, all in one transaction. Returns the messages' rowids. `copies` are
        `(account, device)` of our own other devices that get each message as a sent
        transcript (PROTOCOL.md section 25.5)."""
        with self.transaction():
            first = self._q("SELECT coalesce(max(rowid), 0) + 1 FROM messages")[0][0]
            # Explicit rowids (the table is written only here and in insert_incoming, inside
            # transactions) let one executemany insert the whole batch.
            rowids = list(range(first, first + len(messages)))
            self._many(
                "INSERT INTO messages(rowid, id, contact_id, direction, kind, body, sent_at, state,"
                " updated_at) VALUES (?, ?, ?, 'out', ?, ?, ?, 'pending', ?)",
                [(rowid, message_id, contact.id, kind, body, sent_at_ms, now_ms)
                 for rowid, (message_id, kind, body, sent_at_ms) in zip(rowids, messages,
                                                                         strict=True)],
            )
            self._many(
                "INSERT INTO outbox(message_rowid, account, device, state, created_at)"
                " VALUES (?, ?, ?, 'pending', ?)",
                [(rowid, account, device, now_ms) for rowid in rowids
                 for account, device in [*((contact.account, d) for d in devices), *copies]],
            )
        return rowids

    def insert_transcripts(self, *, contact: Contact, messages: Sequence[tuple[bytes, str, int]],
                           now_ms: int, kind: ContentKind = "text") -> int:
        """Texts (or files: their captions) another device of our account sent to `contact`,
        `(id, body, sent_at_ms)`, as outgoing messages in state "sent" (inside the caller's
        transaction); one already in the history is skipped. Returns how many were new."""
        return len(self._q(
            "INSERT INTO messages(id, contact_id, direction, kind, body, sent_at, state,"
            " updated_at) SELECT column1, ?, 'out', ?, column2, column3, 'sent', ? FROM"
            f" (VALUES {','.join(['(?, ?, ?)'] * len(messages))})"
            " WHERE true ON CONFLICT(contact_id, direction, id) DO NOTHING RETURNING 1",
            (contact.id, kind, now_ms, *(v for m in messages for v in m)))) if messages else 0

    def insert_notice(self, *, contact: Contact, message_id: bytes, body: str,
                      now_ms: int) -> None:
        """A line of the contact's history that no one wrote, such as "device added" (kind
        "notice"; inside the caller's transaction)."""
        self._q("INSERT INTO messages(id, contact_id, direction, kind, body, sent_at, received_at,"
                " state, updated_at) VALUES (?, ?, 'in', 'notice', ?, ?, ?, 'received', ?)",
                (message_id, contact.id, body, now_ms, now_ms, now_ms))

    def insert_incoming(self, *, contact: Contact,
                        messages: Sequence[NewMessage], received_at_ms: int
                        ) -> None:
        """Received messages `(id, kind, body, sent_at_ms)` (inside the caller's transaction)."""
        self._many(
            # The history's ids are unique forever; `seen_among` reports them, so a repeat is
            # never decided as new: DO NOTHING only keeps a slip from being a crash.
            # A text no newer than what was read up to is filed as read (PROTOCOL.md section
            # 25.6, `read`): every device then agrees, whatever order the sync and it came in.
            "INSERT INTO messages(id, contact_id, direction, kind, body, sent_at, received_at,"
            " state, updated_at, read_at) VALUES (?1, ?2, 'in', ?3, ?4, ?5, ?6, 'received', ?7,"
            " iif(?3 IN ('text', 'file') AND ?5 <= (SELECT read_upto FROM contacts WHERE id = ?2), ?6,"
            " NULL)) ON CONFLICT(contact_id, direction, id) DO NOTHING",
            [(mid, contact.id, kind, body, sent_at, received_at_ms, received_at_ms)
             for mid, kind, body, sent_at in messages],
        )

    def seen_among(self, account: bytes, message_ids: Sequence[bytes]) -> set[bytes]:
        """Which of these ids were already accepted from `account`: remembered in `seen`, or
        still in the history. `seen` forgets ids after SEEN_RETENTION_S, the history keeps them
        (its ids are unique), so an id the contact uses again after that is a duplicate too."""
        if not message_ids:
            return set()
        marks = ",".join("?" * len(message_ids))
        return {r[0] for r in self._q(
            f"SELECT id FROM seen WHERE account=? AND id IN ({marks})"
            " UNION SELECT m.id FROM messages m JOIN contacts c ON c.id=m.contact_id"
            f" WHERE c.account=? AND m.direction='in' AND m.id IN ({marks})",
            (account, *message_ids, account, *message_ids))}

    def mark_seen(self, account: bytes, message_ids: Sequence[bytes], *, now_ms: int) -> None:
        """Remember these ids as accepted from `account` (inside the caller's transaction)."""
        self._many(
            "INSERT OR IGNORE INTO seen(account, id, seen_at) VALUES (?, ?, ?)",
            [(account, mid, now_ms) for mid in message_ids])

    def prune_seen(self, *, before_ms: int) -> int:
        """Forget accepted ids older than `before_ms` (senders have long given up on them)."""
        return len(self._q("DELETE FROM seen WHERE seen_at<? RETURNING 1", (before_ms,)))

    def history(self, contact: Contact, *, limit: int = 50, kinds: Sequence[ContentKind] = ("text",)
                ) -> list[MessageRow]:
        """The last `limit` messages with the contact, oldest first."""
        marks = ",".join("?" * len(kinds))
        rows = self._q(
            "SELECT rowid, id, contact_id, direction, kind, body, sent_at, received_at, state,"
            f" error, read_at FROM messages WHERE contact_id=? AND kind IN ({marks})"
            " ORDER BY sent_at DESC, rowid DESC LIMIT ?",
            (contact.id, *kinds, limit),
        )
        return [MessageRow(*r) for r in reversed(rows)]

    # --- read state (PROTOCOL.md section 25.6, `read`) --------------------------------------------

    def newest_incoming(self, contact: Contact, message_id: bytes | None = None
                        ) -> MessageRow | None:
        """The incoming text or file with `message_id` from the contact, or (None) the newest
        one in the history's order; None if there is no such message."""
        where, args = ("AND id=?", (message_id,)) if message_id is not None else ("", ())
        rows = self._q(
            "SELECT rowid, id, contact_id, direction, kind, body, sent_at, received_at, state,"
            " error, read_at FROM messages WHERE contact_id=? AND direction='in'"
            f" AND kind IN ('text', 'file') {where} ORDER BY sent_at DESC, rowid DESC LIMIT 1",
            (contact.id, *args))
        return MessageRow(*rows[0]) if rows else None

    def mark_read(self, contact: Contact, *, up_to_ms: int, now_ms: int) -> tuple[int, bool]:
        """Mark read every unread incoming text or file of the contact sent at or before
        `up_to_ms` (by the contact's clock), and raise the contact's read mark to it. Returns
        how many became read, and whether the mark rose (an older mark changes nothing: read
        stays read)."""
        with self.transaction():
            rose = bool(self._q("UPDATE contacts SET read_upto=? WHERE id=? AND read_upto<?"
                                " RETURNING 1", (up_to_ms, contact.id, up_to_ms)))
            count = len(self._q(
                "UPDATE messages SET read_at=? WHERE contact_id=? AND direction='in'"
                " AND kind IN ('text', 'file') AND read_at IS NULL AND sent_at<=? RETURNING 1",
                (now_ms, contact.id, up_to_ms)))
        return count, rose

    def unread_counts(self) -> dict[int, int]:
        """Unread incoming texts and files per contact id (contacts with none are left out)."""
        return {int(c): int(n) for c, n in self._q(
            "SELECT contact_id, count(*) FROM messages WHERE direction='in'"
            " AND kind IN ('text', 'file') AND read_at IS NULL GROUP BY contact_id")}

    def message(self, message_id: bytes, direction: Direction = "out") -> MessageRow | None:
        """The message with this id in this direction, or None."""
        rows = self._q(
            "SELECT rowid, id, contact_id, direction, kind, body, sent_at, received_at, state,"
            " error FROM messages WHERE id=? AND direction=?", (message_id, direction))
        return MessageRow(*rows[0]) if rows else None

    # --- attachments (PROTOCOL.md section 26) ---------------------------------------------------

    _ATTACHMENT_SELECT = (
        "SELECT a.message_rowid, m.id, m.contact_id, m.direction, a.descriptor, a.hash, a.state,"
        " a.file, a.error FROM attachments a JOIN messages m ON m.rowid = a.message_rowid")

    def add_attachment(self, message_rowid: int, descriptor: bytes, blob_hash: bytes, *,
                       state: str, now_ms: int) -> None:
        """The attachment of a file message (inside the caller's transaction)."""
        self._q("INSERT OR IGNORE INTO attachments(message_rowid, descriptor, hash, state,"
                " updated_at) VALUES (?, ?, ?, ?, ?)",
                (message_rowid, descriptor, blob_hash, state, now_ms))

    def add_incoming_attachments(self, contact: Contact,
                                 attachments: Sequence[tuple[bytes, bytes, bytes]], *,
                                 now_ms: int) -> None:
        """Attachments `(message id, descriptor, hash)` of file messages just received from
        `contact` (inside the caller's transaction, after `insert_incoming`)."""
        self._many(
            "INSERT OR IGNORE INTO attachments(message_rowid, descriptor, hash, state, updated_at)"
            " SELECT rowid, ?, ?, 'offered', ? FROM messages WHERE contact_id=? AND"
            " direction='in' AND id=?",
            [(descriptor, blob_hash, now_ms, contact.id, mid)
             for mid, descriptor, blob_hash in attachments])

    def add_transcript_attachment(self, contact: Contact, message_id: bytes, descriptor: bytes,
                                  blob_hash: bytes, *, now_ms: int) -> None:
        """The attachment of a file another device of our account sent to `contact` (inside
        the caller's transaction, after `insert_transcripts`): 'offered', downloaded from that
        device like a received one (PROTOCOL.md section 26.4)."""
        self._q("INSERT OR IGNORE INTO attachments(message_rowid, descriptor, hash, state,"
                " updated_at) SELECT rowid, ?, ?, 'offered', ? FROM messages WHERE contact_id=?"
                " AND direction='out' AND id=?",
                (descriptor, blob_hash, now_ms, contact.id, message_id))

    def attachment(self, message_id: bytes) -> AttachmentRow | None:
        """The attachment of the file message with this id (received first, then sent)."""
        rows = self._q(self._ATTACHMENT_SELECT + " WHERE m.id=? ORDER BY m.direction='out'"
                       " LIMIT 1", (message_id,))
        return AttachmentRow(*rows[0]) if rows else None

    def attachment_of_row(self, message_rowid: int) -> AttachmentRow | None:
        """The attachment of the message with this rowid, or None."""
        rows = self._q(self._ATTACHMENT_SELECT + " WHERE a.message_rowid=?", (message_rowid,))
        return AttachmentRow(*rows[0]) if rows else None

    def attachments_of(self, rowids: Sequence[int]) -> dict[int, AttachmentRow]:
        """The attachments of these messages, by message rowid (for the history)."""
        if not rowids:
            return {}
        marks = ",".join("?" * len(rowids))
        return {r[0]: AttachmentRow(*r) for r in self._q(
            self._ATTACHMENT_SELECT + f" WHERE a.message_rowid IN ({marks})", tuple(rowids))}

    def outgoing_attachments(self, blob_hash: bytes) -> list[AttachmentRow]:
        """Our sent attachments whose blob has this hash (what a blob request may ask for)."""
        return [AttachmentRow(*r) for r in self._q(
            self._ATTACHMENT_SELECT + " WHERE a.hash=? AND m.direction='out'", (blob_hash,))]

    def attachments_in_state(self, *states: str) -> list[AttachmentRow]:
        """Attachments in one of these states, oldest first."""
        marks = ",".join("?" * len(states))
        return [AttachmentRow(*r) for r in self._q(
            self._ATTACHMENT_SELECT + f" WHERE a.state IN ({marks})"
            " ORDER BY a.message_rowid", states)]

    def set_attachment_state(self, message_rowid: int, state: str, *, now_ms: int,
                             file: str | None = None, error: str | None = None) -> None:
        """Move an attachment to `state` (with the stored file's name, or why it failed)."""
        self._q("UPDATE attachments SET state=?, file=coalesce(?, file), error=?, updated_at=?"
                " WHERE message_rowid=?", (state, file, error, now_ms, message_rowid))

    def sent_blobs_older_than(self, before_ms: int) -> list[bytes]:
        """Hashes of sent blobs still kept ('ready') whose every message was sent before
        `before_ms`: nobody fetches them any more."""
        return [r[0] for r in self._q(
            "SELECT a.hash FROM attachments a JOIN messages m ON m.rowid = a.message_rowid"
            " WHERE m.direction='out' AND a.state='ready' GROUP BY a.hash"
            " HAVING max(m.sent_at) < ?", (before_ms,))]

    def expire_sent_blob(self, blob_hash: bytes, *, now_ms: int) -> None:
        """The sent blob `blob_hash` was deleted: its attachments become 'expired'."""
        self._q("UPDATE attachments SET state='expired', updated_at=? WHERE hash=? AND"
                " message_rowid IN (SELECT rowid FROM messages WHERE direction='out')",
                (now_ms, blob_hash))

    def files_waiting_at_relays(self) -> list[tuple[int, bytes]]:
        """(message rowid, device) of sent file messages whose envelope waits at the relays of
        a recipient device, or of one of our own devices (its sent transcript), that was
        offline: their blobs go there too."""
        return [(int(r[0]), r[1]) for r in self._q(
            "SELECT o.message_rowid, o.device FROM outbox o JOIN messages m"
            " ON m.rowid = o.message_rowid WHERE m.kind='file' AND o.state='relayed'"
            " ORDER BY o.seq")]

    def upload_state(self, message_rowid: int, relay: str, box: bytes) -> str | None:
        """'done', 'pending' or None (not tried yet) for one blob upload."""
        rows = self._q("SELECT state FROM attachment_uploads WHERE message_rowid=? AND relay=?"
                       " AND box=?", (message_rowid, relay, box))
        return str(rows[0][0]) if rows else None

    def set_upload_state(self, message_rowid: int, relay: str, box: bytes, state: str,
                         error: str | None = None) -> None:
        """Record how the upload of a blob to one relay went."""
        self._q("INSERT INTO attachment_uploads(message_rowid, relay, box, state, error)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(message_rowid, relay, box) DO UPDATE SET"
                " state=excluded.state, error=excluded.error",
                (message_rowid, relay, box, state, error))

    # --- outbox -----------------------------------------------------------------------------------

    _OUTBOX_SELECT = (
        "SELECT o.seq, o.message_rowid, m.id, m.kind, m.body, m.sent_at, o.account, o.device,"
        " o.payload, o.session_base, o.state, o.attempts, o.created_at,"
        " (SELECT c.account FROM contacts c WHERE c.id = m.contact_id)"
        " FROM outbox o JOIN messages m ON m.rowid = o.message_rowid"
    )
    #: Whether outbox row `o` of message `m` goes to the conversation's account (not a sent
    #: transcript): only those move the message's own state (PROTOCOL.md section 25.5).
    #: A group's texts go to member devices: every row of one counts (PROTOCOL.md section 27.5).
    _RECIPIENT_ROW = ("(o.account = (SELECT c.account FROM contacts c WHERE c.id = m.contact_id)"
                      " OR (SELECT c.own FROM contacts c WHERE c.id = m.contact_id) = 2)")

    def outbox_for(self, device: bytes, *, limit: int, after_seq: int = 0) -> list[OutboxRow]:
        """Undelivered rows for `device` in send order."""
        return [OutboxRow(*r) for r in self._q(
            self._OUTBOX_SELECT + " WHERE o.device=? AND o.seq>? ORDER BY o.seq LIMIT ?",
            (device, after_seq, limit))]

    def has_queued(self, device: bytes, kind: ContentKind) -> bool:
        """Whether a message of `kind` waits in the outbox for `device`."""
        return bool(self._q("SELECT 1 FROM outbox o JOIN messages m ON m.rowid=o.message_rowid"
                            " WHERE o.device=? AND m.kind=? LIMIT 1", (device, kind)))

    def outbox_devices(self) -> list[bytes]:
        """The devices that have undelivered outbox rows."""
        return [r[0] for r in self._q("SELECT DISTINCT device FROM outbox")]

    def set_payloads(self, rows: Sequence[tuple[int, bytes, bytes]]) -> None:
        """Store `(seq, payload, session base key)` of freshly encrypted outbox rows."""
        self._many("UPDATE outbox SET payload=?, session_base=? WHERE seq=?",
                               [(payload, base, seq) for seq, payload, base in rows])

    def mark_sent(self, seqs: Sequence[int], *, now_ms: int) -> list[int]:
        """Rows written to a stream. Returns rowids of messages that became 'sent'."""
        if not seqs:
            return []
        marks = ",".join("?" * len(seqs))
        with self.transaction():
            # A row a relay already holds stays 'relayed' (no second deposit) when it is also
            # written to a direct stream.
            self._many(
                "UPDATE outbox SET state=iif(state='relayed', 'relayed', 'sent'),"
                " attempts=attempts+1 WHERE seq=?", [(s,) for s in seqs])
            # One statement for the batch (it was one UPDATE per message).
            rows = self._q(
                "UPDATE messages SET state='sent', updated_at=? WHERE state='pending' AND rowid IN"
                f" (SELECT o.message_rowid FROM outbox o JOIN messages m ON m.rowid="
                f"o.message_rowid WHERE o.seq IN ({marks}) AND {self._RECIPIENT_ROW})"
                " RETURNING rowid", (now_ms, *seqs))
        return [rowid for (rowid,) in rows]

    def outbox_to_deposit(self, device: bytes, *, limit: int, after_seq: int = 0
                          ) -> list[OutboxRow]:
        """Undelivered rows for `device` that no relay holds yet, in send order."""
        return [OutboxRow(*r) for r in self._q(
            self._OUTBOX_SELECT + " WHERE o.device=? AND o.seq>? AND o.state!='relayed'"
            " ORDER BY o.seq LIMIT ?", (device, after_seq, limit))]

    def mark_unrelayed(self, device: bytes) -> None:
        """The device's relays changed: no row counts as held by a relay any more, so each is
        deposited again at the new ones (PROTOCOL.md section 28.3). The messages keep their
        state ('relayed' until a receipt)."""
        with self.transaction():
            self._q("UPDATE outbox SET state='sent' WHERE device=? AND state='relayed'", (device,))

    def mark_relayed(self, seqs: Sequence[int], *, now_ms: int) -> list[int]:
        """Rows now held by at least one of the recipient's relays. Receipts are done then (they
        are not confirmed themselves) and leave the outbox; other rows wait for the recipient's
        receipt. Returns rowids of messages that became 'relayed'."""
        if not seqs:
            return []
        marks = ",".join("?" * len(seqs))
        with self.transaction():
            self._q("DELETE FROM outbox WHERE seq IN"
                    f" (SELECT o.seq FROM outbox o JOIN messages m ON m.rowid=o.message_rowid"
                    f" WHERE o.seq IN ({marks}) AND m.kind='receipt')", tuple(seqs))
            self._q(f"UPDATE outbox SET state='relayed' WHERE seq IN ({marks})", tuple(seqs))
            rows = self._q(
                "UPDATE messages SET state='relayed', updated_at=? WHERE state IN"
                " ('pending', 'sent') AND kind!='receipt' AND rowid IN"
                f" (SELECT o.message_rowid FROM outbox o JOIN messages m ON m.rowid="
                f"o.message_rowid WHERE o.seq IN ({marks}) AND {self._RECIPIENT_ROW})"
                " RETURNING rowid", (now_ms, *seqs))
        return [rowid for (rowid,) in rows]

    def mark_delivered(self, device: bytes, message_ids: Sequence[bytes], *, now_ms: int
                       ) -> tuple[list[MessageRow], set[bytes]]:
        """Remove the device's outbox rows for these ids and remember that it has them. Returns
        the messages that became delivered by this (a message is delivered once any device of
        its recipient account confirmed it; a sent transcript confirmed by one of our own
        devices does not count; PROTOCOL.md section 25.5), and the session base keys the
        confirmed rows were encrypted in (to acknowledge those sessions). Repeated or unknown
        ids are ignored."""
        if not message_ids:
            return [], set()
        marks = ",".join("?" * len(message_ids))
        with self.transaction():
            # CROSS JOIN makes SQLite start from the acked ids (messages_by_id) instead of
            # walking every outbox row of the device per call (quadratic in a backlog).
            rows = self._q(
                "SELECT o.seq, o.message_rowid, o.session_base, o.account,"
                f" {self._RECIPIENT_ROW} FROM messages m CROSS JOIN outbox o"
                f" ON o.message_rowid=m.rowid WHERE m.id IN ({marks}) AND m.direction='out'"
                " AND o.device=?", (*message_ids, device))
            if not rows:
                return [], set()
            self._many("DELETE FROM outbox WHERE seq=?", [(r[0],) for r in rows])
            self._many("INSERT OR IGNORE INTO delivered_to(message_rowid, device, account, at)"
                       " VALUES (?, ?, ?, ?)", [(r[1], device, r[3], now_ms) for r in rows])
            bases = {rowid: base for _, rowid, base, _, _ in rows}
            # A transcript confirmed by our own device delivers nothing, unless the message
            # had no recipient row left at all (it went to our own devices only).
            reached = [rowid for _, rowid, _, _, recipient in rows if recipient]
            done = self._q(
                "UPDATE messages SET state='delivered', error=NULL, updated_at=? WHERE"
                " state!='delivered' AND rowid IN"
                f" ({','.join('?' * len(bases))}) AND (rowid IN"
                f" ({','.join('?' * len(reached)) or 'NULL'}) OR NOT EXISTS (SELECT 1 FROM outbox"
                " WHERE outbox.message_rowid=messages.rowid)) RETURNING rowid, id, contact_id,"
                " direction, kind, body, sent_at, received_at, state, error",
                (now_ms, *bases, *reached))
        return ([MessageRow(*r) for r in sorted(done)],
                {base for base in bases.values() if base is not None})

    def device_states(self, rowids: Sequence[int]) -> dict[int, list[DeviceState]]:
        """Per message (by rowid), where it stands with each device it was queued for: the
        outbox rows still waiting, and the devices that confirmed it, in that order."""
        if not rowids:
            return {}
        marks = ",".join("?" * len(rowids))
        rows = self._q(
            # `own`: a device of our account (a sent transcript, or our other devices' copies of
            # a group text); for a contact's conversation, the rows not to the contact.
            "SELECT x.message_rowid, x.device, d.peer_id, x.account != c.account AND"
            " (c.own != 2 OR x.account = (SELECT account FROM contacts WHERE own = 1)),"
            " x.state FROM ("
            " SELECT message_rowid, device, account, state, seq AS n FROM outbox"
            f" WHERE message_rowid IN ({marks})"
            " UNION ALL SELECT message_rowid, device, account, 'delivered', 0 FROM delivered_to"
            f" WHERE message_rowid IN ({marks})) x"
            " JOIN messages m ON m.rowid = x.message_rowid JOIN contacts c ON c.id = m.contact_id"
            " LEFT JOIN devices d ON d.device = x.device ORDER BY x.message_rowid, x.n",
            (*rowids, *rowids))
        states: dict[int, list[DeviceState]] = {}
        for rowid, device, peer_id, own, state in rows:
            states.setdefault(rowid, []).append(DeviceState(
                device=device, peer_id=peer_id or "", own=bool(own), state=state))
        return states

    def drop_outbox_row(self, message_rowid: int, device: bytes) -> None:
        """Give up on one device's copy of a message that was delivered elsewhere."""
        self._q("DELETE FROM outbox WHERE message_rowid=? AND device=?", (message_rowid, device))

    def mark_failed(self, message_rowid: int, reason: str, *, now_ms: int) -> None:
        """Give up on a message: its outbox rows go, and it becomes 'failed' with `reason`."""
        with self.transaction():
            self._q("DELETE FROM outbox WHERE message_rowid=?", (message_rowid,))
            self._q("UPDATE messages SET state='failed', error=?, updated_at=? WHERE rowid=?",
                    (reason, now_ms, message_rowid))

    def set_outbox_error(self, device: bytes, error: str | None) -> None:
        """Record why delivery to `device` last failed (None clears it), for `pigeon status`."""
        self._q("UPDATE outbox SET error=? WHERE device=?", (error, device))

    def outbox_expired(self, *, before_ms: int) -> list[OutboxRow]:
        """Outbox rows created before `before_ms` (candidates for failing), in send order."""
        return [OutboxRow(*r) for r in self._q(
            self._OUTBOX_SELECT + " WHERE o.created_at<? ORDER BY o.seq", (before_ms,))]

    def outbox_summary(self) -> list[tuple[str, OutboxState, int, str | None]]:
        """(contact name, state, count, last error) for undelivered messages."""
        return [tuple(r) for r in self._q(
            "SELECT c.name, o.state, count(*), max(o.error) FROM outbox o"
            " JOIN messages m ON m.rowid=o.message_rowid JOIN contacts c ON c.id=m.contact_id"
            " WHERE o.account=c.account AND c.own=0"
            " GROUP BY c.name, o.state ORDER BY c.name, o.state")]

    def received_since(self, since_ms: int) -> int:
        """Texts received from contacts (by any path) at or after `since_ms`."""
        return int(self._q("SELECT count(*) FROM messages WHERE direction='in' AND kind='text'"
                           " AND received_at>=?", (since_ms,))[0][0])

    def waiting_receipts(self) -> int:
        """Receipts in the outbox: not yet held by a relay nor acknowledged by their device."""
        return int(self._q("SELECT count(*) FROM outbox o JOIN messages m"
                           " ON m.rowid=o.message_rowid WHERE m.kind='receipt'")[0][0])

    def outbox_by_device(self) -> list[tuple[bytes, OutboxState, int]]:
        """(device, state, count) of the rows waiting, for the per-device part of `status`."""
        return [tuple(r) for r in self._q(
            "SELECT device, state, count(*) FROM outbox GROUP BY device, state"
            " ORDER BY device, state")]

    # --- groups (PROTOCOL.md section 27) ------------------------------------------------------------

    def add_group(self, group_id: bytes, name: str, *, now_ms: int) -> Contact:
        """A group's hidden conversation row, under `name` or `name-2`, `name-3`... if a
        contact or group has it (names are this device's labels)."""
        candidate, n = name, 1
        while self._q("SELECT 1 FROM contacts WHERE name=?", (candidate,)):
            n += 1
            candidate = f"{name}-{n}"
        cur = self._conn.execute(
            "INSERT INTO contacts(name, account, added_at, own) VALUES (?, ?, ?, 2)",
            (candidate, group_id, now_ms))
        contact = Contact(int(cur.lastrowid or 0), candidate, group_id, now_ms)
        self._q("INSERT INTO groups(id, contact_id, joined_at) VALUES (?, ?, ?)",
                (group_id, contact.id, now_ms))
        return contact

    def groups(self) -> list[tuple[Contact, bool]]:
        """Every group's conversation row, by name, and whether we are a member."""
        return [(Contact(*r[:4]), bool(r[4])) for r in self._q(
            "SELECT c.id, c.name, c.account, c.added_at, g.member FROM groups g"
            " JOIN contacts c ON c.id = g.contact_id ORDER BY c.name")]

    def group_by_name(self, name: str) -> tuple[Contact, bool] | None:
        """The group called `name` here (exactly, else ignoring case if that names one)."""
        groups = self.groups()
        found = [g for g in groups if g[0].name == name] or \
            [g for g in groups if g[0].name.casefold() == name.casefold()]
        return found[0] if len(found) == 1 else None

    def group_by_id(self, group_id: bytes) -> tuple[Contact, bool] | None:
        """The group with this id, and whether we are a member."""
        return next((g for g in self.groups() if g[0].account == group_id), None)

    def set_group_member(self, group_id: bytes, member: bool) -> None:
        """Record whether we are (still) a member of the group."""
        self._q("UPDATE groups SET member=? WHERE id=?", (int(member), group_id))

    def rename_group(self, contact: Contact, name: str) -> Contact:
        """The group's row under a new name here (made unique as in `add_group`)."""
        candidate, n = name, 1
        while self._q("SELECT 1 FROM contacts WHERE name=? AND id!=?", (candidate, contact.id)):
            n += 1
            candidate = f"{name}-{n}"
        self._q("UPDATE contacts SET name=? WHERE id=?", (candidate, contact.id))
        return Contact(contact.id, candidate, contact.account, contact.added_at_ms)

    def group_ops(self, group_id: bytes) -> list[bytes]:
        """The group's signed operations as stored."""
        return [bytes(r[0]) for r in self._q("SELECT op FROM group_ops WHERE group_id=?",
                                             (group_id,))]

    def add_group_ops(self, group_id: bytes, ops: Iterable[tuple[bytes, bytes]]) -> None:
        """Store (hash, signed op) pairs; ones held already are left as they are."""
        self._many("INSERT INTO group_ops(group_id, hash, op) VALUES (?, ?, ?)"
                   " ON CONFLICT DO NOTHING", [(group_id, h, op) for h, op in ops])

    def own_chain(self, group_id: bytes) -> bytes | None:
        """This device's sender chain of the group, serialized."""
        rows = self._q("SELECT state FROM own_chains WHERE group_id=?", (group_id,))
        return bytes(rows[0][0]) if rows else None

    def save_own_chain(self, group_id: bytes, state: bytes) -> None:
        """Store this device's sender chain of the group."""
        self._q("INSERT INTO own_chains(group_id, state) VALUES (?, ?) ON CONFLICT(group_id)"
                " DO UPDATE SET state=excluded.state", (group_id, state))

    def drop_own_chain(self, group_id: bytes) -> None:
        """Forget this device's sender chain (a new one is made before the next message)."""
        self._q("DELETE FROM own_chains WHERE group_id=?", (group_id,))
        # The devices that had the log (key id 32 zero bytes) still have it.
        self._q("DELETE FROM chain_given WHERE group_id=? AND key_id!=?", (group_id, bytes(32)))

    def chain_given(self, group_id: bytes, key_id: bytes) -> set[bytes]:
        """The devices that were given our chain `key_id` of the group."""
        return {bytes(r[0]) for r in self._q(
            "SELECT device FROM chain_given WHERE group_id=? AND key_id=?", (group_id, key_id))}

    def mark_chain_given(self, group_id: bytes, key_id: bytes, devices: Iterable[bytes]) -> None:
        """Record that `devices` were given our chain `key_id` (queued in the same transaction)."""
        self._many("INSERT INTO chain_given(group_id, key_id, device) VALUES (?, ?, ?)"
                   " ON CONFLICT DO NOTHING", [(group_id, key_id, d) for d in devices])

    def peer_chain(self, group_id: bytes, device: bytes, key_id: bytes) -> bytes | None:
        """The chain `key_id` that `device` gave us for the group, serialized."""
        rows = self._q("SELECT state FROM peer_chains WHERE group_id=? AND device=? AND key_id=?",
                       (group_id, device, key_id))
        return bytes(rows[0][0]) if rows else None

    def save_peer_chain(self, group_id: bytes, device: bytes, key_id: bytes, state: bytes, *,
                        now_ms: int, keep: int) -> None:
        """Store a member device's chain, keeping its `keep` newest chains of the group."""
        self._q("INSERT INTO peer_chains(group_id, device, key_id, state, at) VALUES"
                " (?, ?, ?, ?, ?) ON CONFLICT(group_id, device, key_id) DO UPDATE SET"
                " state=excluded.state", (group_id, device, key_id, state, now_ms))
        self._q("DELETE FROM peer_chains WHERE group_id=? AND device=? AND key_id NOT IN"
                " (SELECT key_id FROM peer_chains WHERE group_id=? AND device=?"
                " ORDER BY at DESC, key_id LIMIT ?)", (group_id, device, group_id, device, keep))

    def drop_peer_chains(self, group_id: bytes, devices: Iterable[bytes] | None = None) -> None:
        """Forget the chains other devices gave us for the group (of `devices`, or all)."""
        if devices is None:
            self._q("DELETE FROM peer_chains WHERE group_id=?", (group_id,))
        else:
            self._many("DELETE FROM peer_chains WHERE group_id=? AND device=?",
                       [(group_id, d) for d in devices])

    def hold_group_message(self, group_id: bytes, account: bytes, device: bytes,
                           message_id: bytes, sent_at_ms: int, message: bytes, *,
                           limit: int) -> bool:
        """Keep a group message aside until its chain arrives; False when the group holds
        `limit` already (it is then dropped)."""
        if self._q("SELECT count(*) FROM group_held WHERE group_id=?", (group_id,))[0][0] >= limit:
            return False
        self._q("INSERT INTO group_held(group_id, account, device, id, sent_at, message)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (group_id, account, device, message_id, sent_at_ms, message))
        return True

    def held_group_messages(self, group_id: bytes, device: bytes
                            ) -> list[tuple[int, bytes, bytes, int, bytes]]:
        """(rowid, account, id, sent_at, message) held for the group from `device`, in order."""
        return [(int(r[0]), bytes(r[1]), bytes(r[2]), int(r[3]), bytes(r[4])) for r in self._q(
            "SELECT rowid, account, id, sent_at, message FROM group_held WHERE group_id=? AND"
            " device=? ORDER BY rowid", (group_id, device))]

    def drop_held_group_messages(self, rowids: Iterable[int]) -> None:
        """Forget held group messages (opened, or never to be opened)."""
        self._many("DELETE FROM group_held WHERE rowid=?", [(r,) for r in rowids])

    def set_group_payloads(self, rows: Iterable[tuple[int, bytes]]) -> None:
        """(message rowid, sender-key message) of group texts we queued."""
        self._many("INSERT INTO group_payloads(message_rowid, payload) VALUES (?, ?)", rows)

    def forget_sent_group_control(self) -> None:
        """Delete the `sender-key` and `group-ops` messages every device confirmed: a sender
        key's row holds a chain key, which must not outlive its delivery on disk (the messages
        it opened would stay readable from the file)."""
        self._q("DELETE FROM messages WHERE kind IN ('sender-key', 'group-ops') AND NOT EXISTS"
                " (SELECT 1 FROM outbox o WHERE o.message_rowid = messages.rowid)")

    def group_payload(self, message_rowid: int) -> bytes | None:
        """The sender-key message of a group text we queued, or None (not a group text)."""
        rows = self._q("SELECT payload FROM group_payloads WHERE message_rowid=?",
                       (message_rowid,))
        return bytes(rows[0][0]) if rows else None

    def insert_group_incoming(self, contact: Contact, sender: bytes, message_id: bytes,
                              body: str, sent_at_ms: int, *, received_at_ms: int) -> bool:
        """A group text from member `sender` into the group's conversation (inside the
        caller's transaction); False if the conversation has it already."""
        return bool(self._q(
            "INSERT INTO messages(id, contact_id, direction, kind, body, sent_at, received_at,"
            " state, updated_at, sender) VALUES (?, ?, 'in', 'text', ?, ?, ?, 'received', ?, ?)"
            " ON CONFLICT(contact_id, direction, id) DO NOTHING RETURNING 1",
            (message_id, contact.id, body, sent_at_ms, received_at_ms, received_at_ms, sender)))

    def insert_group_notice(self, contact: Contact, notice_id: bytes, body: str, *,
                            sent_at_ms: int, now_ms: int) -> None:
        """A membership notice in the group's conversation, once per operation, at the time
        its actor made it (inside the caller's transaction)."""
        self._q("INSERT INTO messages(id, contact_id, direction, kind, body, sent_at, received_at,"
                " state, updated_at) VALUES (?, ?, 'in', 'notice', ?, ?, ?, 'received', ?)"
                " ON CONFLICT(contact_id, direction, id) DO NOTHING",
                (notice_id, contact.id, body, sent_at_ms, now_ms, now_ms))

    def delete_group_notices(self, contact: Contact, notice_ids: Sequence[bytes]) -> None:
        """Remove the notices of operations the group's state no longer applies."""
        self._many("DELETE FROM messages WHERE contact_id=? AND direction='in' AND kind='notice'"
                   " AND id=?", [(contact.id, i) for i in notice_ids])

    def senders(self, rowids: Sequence[int]) -> dict[int, bytes]:
        """The member account that wrote each of these incoming group texts."""
        if not rowids:
            return {}
        marks = ",".join("?" * len(rowids))
        return {int(r[0]): bytes(r[1]) for r in self._q(
            f"SELECT rowid, sender FROM messages WHERE rowid IN ({marks}) AND sender IS NOT NULL",
            tuple(rowids))}


def _device(row: tuple[Any, ...]) -> Device:
    device, contact_id, peer_id, addrs, relays, cap, box, seen_at = row
    return Device(device, contact_id, peer_id, tuple(json.loads(addrs)), tuple(json.loads(relays)),
                  cap, box, seen_at)
