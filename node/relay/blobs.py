"""The relay's blob store (PROTOCOL.md section 26.6): attachments' encrypted blobs held for
devices that are offline, uploaded in pieces by their contacts and read by the mailbox's device.

A blob is stored once, as a file named by its hash (`blobs/<hash hex>` in the relay's data
directory), however many mailboxes it was uploaded for: the first upload sends the bytes, the
others only name the mailbox (one upload serves every device of the recipient at this relay).
What each mailbox holds, and until when, is in `blobs/blobs.db`. The file on disk is the truth
about how much of a blob is there: a relay killed mid-upload answers the next `blob-put` with
the length it has, and the uploader goes on from there. When the last byte is in, the relay
checks the SHA-256 of the whole file against the name; a blob that does not match is dropped
("bad-blob"), so a relay never serves bytes it was not asked to hold.

The relay cannot read a blob (it never sees the key) and learns only its size and hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from node.files import open_database
from node.protocol.mailbox import (
    BAD_BLOB,
    BAD_TTL,
    MAILBOX_FULL,
    STORAGE_FULL,
    TOO_LARGE,
    UNAUTHORIZED,
    UNKNOWN_BLOB,
    UNKNOWN_MAILBOX,
    BlobPut,
    cap_hash,
)

__all__ = ["BlobLimits", "RelayBlobs"]

SCHEMA_VERSION: Final = 2
MIGRATIONS: Final[dict[int, str]] = {
    1: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
    """,
    2: """
    CREATE TABLE blobs (
        hash BLOB PRIMARY KEY,
        size INTEGER NOT NULL,            -- bytes when complete
        complete INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE blob_refs (
        box BLOB NOT NULL,
        hash BLOB NOT NULL REFERENCES blobs(hash) ON DELETE CASCADE,
        expires INTEGER NOT NULL,         -- unix seconds
        PRIMARY KEY (box, hash)
    ) WITHOUT ROWID;
    CREATE INDEX blob_refs_by_hash ON blob_refs(hash);
    CREATE INDEX blob_refs_by_expiry ON blob_refs(expires);
    """,
}

#: Bytes hashed per read when a blob completes after a restart (its running hash was lost).
_HASH_READ_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class BlobLimits:
    """The relay's blob limits (node/relay/config.py says why each default)."""

    max_bytes: int
    mailbox_max_bytes: int
    storage_max_bytes: int
    default_ttl_s: int
    max_ttl_s: int


class RelayBlobs:
    """Blobs held for mailboxes. Open with `RelayBlobs.open(directory, limits)`."""

    def __init__(self, conn: sqlite3.Connection, directory: Path, limits: BlobLimits) -> None:
        self._conn = conn
        self.directory = directory
        self.limits = limits
        # hash -> (running SHA-256, bytes hashed): uploads are sequential, so the hash is kept
        # up to date as pieces come; after a restart it is rebuilt from the file once.
        self._hashing: dict[bytes, tuple[Any, int]] = {}

    @classmethod
    def open(cls, directory: Path, limits: BlobLimits) -> RelayBlobs:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return open_database(directory / "blobs.db", what="Pigeon relay blob database",
                             schema_version=SCHEMA_VERSION, migrations=MIGRATIONS,
                             synchronous="NORMAL",
                             load=lambda conn: cls(conn, directory, limits))

    def close(self) -> None:
        self._conn.close()

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, args).fetchall()

    def _file(self, blob_hash: bytes) -> Path:
        return self.directory / blob_hash.hex()

    def _have(self, blob_hash: bytes) -> int:
        try:
            return self._file(blob_hash).stat().st_size
        except FileNotFoundError:
            return 0

    def total_bytes(self) -> int:
        """Bytes of every blob held or being uploaded (as announced)."""
        return int(self._q("SELECT coalesce(sum(size), 0) FROM blobs")[0][0])

    # --- uploads ----------------------------------------------------------------------------------

    def put(self, request: BlobPut, *, registered: bool, caps: set[bytes], now: int
            ) -> int | str:
        """Store one piece of an upload; the bytes now held (from the start), or the refusal
        code. Checks, in order: the mailbox is registered, the uploader holds one of its
        capabilities, the TTL, the blob's size, the mailbox's and the relay's quotas."""
        if not registered:
            return UNKNOWN_MAILBOX
        if request.cap is None or cap_hash(request.cap) not in caps:
            return UNAUTHORIZED
        if request.ttl > self.limits.max_ttl_s:
            return BAD_TTL
        if request.size > self.limits.max_bytes:
            return TOO_LARGE
        known = self._q("SELECT size, complete FROM blobs WHERE hash=?", (request.hash,))
        if known and known[0][0] != request.size:
            return UNKNOWN_BLOB  # the same name announced with another size: not this blob
        ref = self._q("SELECT 1 FROM blob_refs WHERE box=? AND hash=?",
                      (request.box, request.hash))
        expires = now + (request.ttl or self.limits.default_ttl_s)
        with self._conn:
            if not ref:
                held = int(self._q(
                    "SELECT coalesce(sum(b.size), 0) FROM blob_refs r JOIN blobs b"
                    " ON b.hash = r.hash WHERE r.box=?", (request.box,))[0][0])
                if held + request.size > self.limits.mailbox_max_bytes:
                    return MAILBOX_FULL
                if not known and self.total_bytes() + request.size > \
                        self.limits.storage_max_bytes:
                    return STORAGE_FULL
                if not known:
                    self._q("INSERT INTO blobs(hash, size) VALUES (?, ?)",
                            (request.hash, request.size))
            self._q("INSERT INTO blob_refs(box, hash, expires) VALUES (?, ?, ?)"
                    " ON CONFLICT(box, hash) DO UPDATE SET expires=max(expires, excluded.expires)",
                    (request.box, request.hash, expires))
        if known and known[0][1]:
            return request.size
        have = self._have(request.hash)
        if request.data and request.off == have:
            return self._append(request, have)
        return have

    def _append(self, request: BlobPut, have: int) -> int | str:
        path = self._file(request.hash)
        with path.open("ab") as out:
            out.write(request.data)
        have += len(request.data)
        digest, hashed = self._hashing.get(request.hash, (None, -1))
        if digest is not None and hashed == have - len(request.data):
            digest.update(request.data)
            self._hashing[request.hash] = (digest, have)
        else:
            self._hashing.pop(request.hash, None)
        if have < request.size:
            if digest is None and have == len(request.data):  # the first piece
                self._hashing[request.hash] = (hashlib.sha256(request.data), have)
            return have
        return self._complete(request.hash, have)

    def _complete(self, blob_hash: bytes, have: int) -> int | str:
        digest, hashed = self._hashing.pop(blob_hash, (None, -1))
        if digest is None or hashed != have:
            digest = hashlib.sha256()
            with self._file(blob_hash).open("rb") as src:
                while block := src.read(_HASH_READ_BYTES):
                    digest.update(block)
        if digest.digest() != blob_hash:
            self._drop(blob_hash)
            return BAD_BLOB
        with self._conn:
            self._q("UPDATE blobs SET complete=1 WHERE hash=?", (blob_hash,))
        return have

    # --- reads ------------------------------------------------------------------------------------

    def read(self, box: bytes, blob_hash: bytes, off: int, length: int) -> bytes | str:
        """Bytes of a complete blob held for `box`, or UNKNOWN_BLOB."""
        rows = self._q("SELECT b.size FROM blob_refs r JOIN blobs b ON b.hash = r.hash"
                       " WHERE r.box=? AND r.hash=? AND b.complete=1", (box, blob_hash))
        if not rows or off > rows[0][0]:
            return UNKNOWN_BLOB
        with self._file(blob_hash).open("rb") as src:
            src.seek(off)
            return src.read(min(length, rows[0][0] - off))

    def delete(self, box: bytes, blob_hash: bytes) -> None:
        """The mailbox's device has the blob: forget it for that mailbox (and the file once no
        mailbox holds it)."""
        with self._conn:
            self._q("DELETE FROM blob_refs WHERE box=? AND hash=?", (box, blob_hash))
        self._drop_unreferenced()

    def purge(self, *, now: int) -> int:
        """Forget what expired; returns how many mailbox entries went."""
        with self._conn:
            gone = len(self._q("DELETE FROM blob_refs WHERE expires<=? RETURNING 1", (now,)))
        self._drop_unreferenced()
        return gone

    def _drop_unreferenced(self) -> None:
        for (blob_hash,) in self._q("SELECT hash FROM blobs WHERE hash NOT IN"
                                    " (SELECT hash FROM blob_refs)"):
            self._drop(blob_hash)

    def _drop(self, blob_hash: bytes) -> None:
        with self._conn:
            self._q("DELETE FROM blob_refs WHERE hash=?", (blob_hash,))
            self._q("DELETE FROM blobs WHERE hash=?", (blob_hash,))
        self._hashing.pop(blob_hash, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(blob_hash))
