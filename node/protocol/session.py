"""Sessions with one remote device: PQXDH setup plus Double Ratchet, and the bytes they exchange.

A `SessionRecord` belongs to one (remote account, remote device) pair. It holds the current
session and up to MAX_ARCHIVED_SESSIONS older ones, so that when both sides start a session at
the same time (crossing first messages) or a session is replaced, messages of either still
decrypt; the session that last decrypted a message becomes current, and the two sides converge
on one session (libsignal's SessionRecord does the same). The whole record holds at most
MAX_SKIPPED_KEYS skipped keys, evicted from the oldest archived session first, so what one contact
can make us store is bounded by one session's worth, not MAX_ARCHIVED_SESSIONS + 1 of them
(PROTOCOL.md section 8). A store need not rewrite all of it with every message: `head_bytes`,
`archive_bytes` and each session's skipped keys are the parts, and the record says which changed
(`archive_changed`, each ratchet's `skipped_stamp`).

Session messages (PROTOCOL.md "Session messages") start with a type byte:

    0x01  ratchet message   (see ratchet.py for the layout)
    0x02  prekey message    0x02 || CBOR {"v": 1, "ik", "ek", "spk", ["opk"], "pqpk", "ct", "m"}
                            where "m" is the ratchet message (type 0x01) of the new session

An initiator sends prekey messages until it knows the responder has the session: when a message
from the responder decrypts in it, or when the node learns that a message of that session was
delivered (`acknowledge`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final, Self

from node.errors import DecodeError, DecryptionFailed, LimitExceeded, LocalError, NodeError
from node.protocol import codec
from node.protocol.keys import KEY_BYTES, IdentityKey, IdentityKeyPair, Random
from node.protocol.limits import MAX_ARCHIVED_SESSIONS, MAX_SEALED_BYTES, MAX_SKIPPED_KEYS
from node.protocol.pqxdh import PreKeyHeader, initiate, respond
from node.protocol.prekeys import PreKeyStore
from node.protocol.ratchet import MAX_STATE_BYTES, RATCHET_MESSAGE_TYPE, RatchetState
from node.protocol.records import PreKeyBundle

__all__ = ["PREKEY_MESSAGE_TYPE", "Session", "SessionRecord", "prekey_message_sender"]

#: First byte of a prekey message (PROTOCOL.md section 8).
PREKEY_MESSAGE_TYPE: Final = 0x02
PREKEY_MESSAGE_VERSION: Final = 1
RECORD_VERSION: Final = 1
MAX_RECORD_BYTES: Final = (MAX_ARCHIVED_SESSIONS + 1) * (MAX_STATE_BYTES + 4096)


class Session:
    """One ratchet plus what identifies it: the initiator's base key (EK_A), which both sides
    know, and, on the initiating side until acknowledged, the PQXDH header to repeat."""

    __slots__ = ("base_key", "pending", "ratchet")

    def __init__(
        self, ratchet: RatchetState, base_key: bytes, pending: PreKeyHeader | None = None
    ) -> None:
        self.ratchet = ratchet
        self.base_key = base_key
        self.pending = pending

    def copy(self) -> Session:
        """An independent copy (the PQXDH header is immutable and shared)."""
        return Session(self.ratchet.copy(), self.base_key, self.pending)

    def to_dict(self, *, skipped: bool = True) -> dict[str, object]:
        """The session as a CBOR map (PROTOCOL.md section 17), without its skipped keys unless
        `skipped`."""
        out: dict[str, object] = {"base": self.base_key,
                                  "r": self.ratchet.to_dict(skipped=skipped)}
        if self.pending is not None:
            out["pending"] = self.pending.to_dict()
        return out

    @classmethod
    def from_fields(cls, f: codec.Fields) -> Self:
        """The session in a decoded map; DecodeError if malformed."""
        base = f.bytes("base", KEY_BYTES)
        ratchet = RatchetState.from_fields(f.map("r"))
        pending_fields = f.optional_map("pending")
        pending = None
        if pending_fields is not None:
            pending = PreKeyHeader.from_fields(pending_fields)
            pending_fields.done()
        f.done()
        return cls(ratchet, base, pending)


@dataclass(frozen=True, slots=True)
class Encrypted:
    """An encrypted session message and the base key of the session it belongs to (the node
    stores it with the outbox row, to `acknowledge` that session once the message is delivered)."""

    message: bytes
    session_base_key: bytes


class SessionRecord:
    """All sessions with one remote device. Mutated only by successful operations."""

    __slots__ = ("_borrowed", "archive_changed", "archived", "current")

    def __init__(self, current: Session | None = None, archived: list[Session] | None = None):
        self.current = current
        self.archived: list[Session] = archived or []
        # Whether `archived` (which sessions, in which order, their states) differs from what
        # the store last wrote; the store clears it after writing (`archive_bytes`).
        self.archive_changed = bool(self.archived)
        # Base keys of archived sessions shared with a copy of this record (or the record this
        # is a copy of): `_own` copies one before it changes. Most messages touch only the
        # current session, so a copy need not copy MAX_ARCHIVED_SESSIONS sessions every time.
        self._borrowed: set[bytes] = set()

    def _own(self, session: Session) -> Session:
        """`session` (of this record), copied first if it is shared with another record."""
        if session.base_key not in self._borrowed or session is self.current:
            return session
        self._borrowed.discard(session.base_key)
        mine = session.copy()
        self.archived[self.archived.index(session)] = mine
        return mine

    @property
    def can_encrypt(self) -> bool:
        """Whether a message can be encrypted now (a responder waits for the first message)."""
        return self.current is not None and self.current.ratchet.can_send

    # --- starting a session -----------------------------------------------------------------------

    def initiate(
        self,
        identity: IdentityKeyPair,
        bundle: PreKeyBundle,
        *,
        rng: Random = os.urandom,
        kem_encapsulation: tuple[bytes, bytes] | None = None,
    ) -> None:
        """Start a new session from a verified bundle; it becomes current, the old one archived."""
        ratchet, header = initiate(
            identity, bundle, rng=rng, kem_encapsulation=kem_encapsulation
        )
        self._promote(Session(ratchet, header.base_key.to_bytes(), header))

    def _promote(self, session: Session) -> None:
        if session is self.current:
            return
        if session in self.archived:
            self.archived.remove(session)
        if self.current is not None:
            self.archived.insert(0, self.current)
            del self.archived[MAX_ARCHIVED_SESSIONS:]
        self.current = session
        self.archive_changed = True

    def _cap_skipped(self) -> None:
        """Keep at most MAX_SKIPPED_KEYS skipped keys in the whole record, evicting the oldest
        archived session's oldest keys first and the current session's last."""
        sessions = [s for s in [self.current, *self.archived] if s is not None]
        excess = sum(len(s.ratchet.skipped) for s in sessions) - MAX_SKIPPED_KEYS
        for session in reversed(sessions):
            if excess <= 0:
                return
            held = len(session.ratchet.skipped)
            if not held:
                continue
            session = self._own(session)
            session.ratchet.evict_skipped(excess)
            excess -= held - len(session.ratchet.skipped)

    # --- encrypt / decrypt ------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, *, rng: Random = os.urandom) -> Encrypted:
        """Encrypt with the current session: a prekey message while it is unacknowledged."""
        session = self.current
        if session is None or not session.ratchet.can_send:
            raise LocalError("no session to encrypt with: initiate one from a prekey bundle")
        inner = session.ratchet.encrypt(plaintext, rng)
        if session.pending is None:
            return Encrypted(inner, session.base_key)
        body = dict(session.pending.to_dict(), v=PREKEY_MESSAGE_VERSION, m=inner)
        return Encrypted(bytes([PREKEY_MESSAGE_TYPE]) + codec.encode(body), session.base_key)

    def acknowledge(self, base_key: bytes) -> None:
        """The remote device has the session with `base_key` (a message of it was delivered):
        stop repeating the PQXDH header in it."""
        for session in [self.current, *self.archived]:
            if session is not None and session.base_key == base_key and session.pending:
                if session is not self.current:
                    self.archive_changed = True
                self._own(session).pending = None

    def decrypt(
        self,
        message: bytes,
        *,
        identity: IdentityKeyPair,
        remote_identity: IdentityKey,
        prekeys: PreKeyStore,
        rng: Random = os.urandom,
    ) -> bytes:
        """Decrypt a session message from the device this record belongs to, whose account is
        `remote_identity`. On success the record (and, for a new session, `prekeys`) is updated;
        on failure DecryptionFailed (or LimitExceeded) and nothing changed."""
        if not message:
            raise DecryptionFailed("empty message")
        if message[0] == RATCHET_MESSAGE_TYPE:
            return self._decrypt_existing(message, rng)
        if message[0] != PREKEY_MESSAGE_TYPE:
            raise DecryptionFailed("unknown session message type")
        try:
            fields = codec.decode_map(
                message[1:], limit=MAX_SEALED_BYTES, what="prekey message",
                version=PREKEY_MESSAGE_VERSION,
            )
            header = PreKeyHeader.from_fields(fields)
            inner = fields.bytes("m", max_size=MAX_SEALED_BYTES)
            fields.done()
        except (DecodeError, LimitExceeded, ValueError) as exc:
            raise DecryptionFailed("malformed prekey message") from exc
        if header.identity != remote_identity:
            raise DecryptionFailed("prekey message from another account")
        base_key = header.base_key.to_bytes()
        for session in [self.current, *self.archived]:
            if session is not None and session.base_key == base_key:
                # A repeat of the header in a session we already have.
                session = self._own(session)
                plaintext = session.ratchet.decrypt(inner, rng)
                self._received_in(session)
                return plaintext
        ratchet, use = respond(identity, prekeys, header)
        plaintext = ratchet.decrypt(inner, rng)
        prekeys.commit_use(use)
        self._promote(Session(ratchet, base_key))
        self._cap_skipped()
        return plaintext

    def _decrypt_existing(self, message: bytes, rng: Random) -> bytes:
        for session in [self.current, *self.archived]:
            if session is None:
                continue
            session = self._own(session)
            try:
                plaintext = session.ratchet.decrypt(message, rng)
            except DecryptionFailed:
                continue
            self._received_in(session)
            return plaintext
        raise DecryptionFailed("no session decrypts this message")

    def _received_in(self, session: Session) -> None:
        session.pending = None  # the other side has this session: it used it to write to us
        self._promote(session)
        self._cap_skipped()

    def copy(self) -> SessionRecord:
        """An independent copy, equal to `from_bytes(to_bytes())` but without the round trip."""
        record = SessionRecord(self.current.copy() if self.current else None, list(self.archived))
        record.archive_changed = self.archive_changed
        shared = {s.base_key for s in self.archived}
        record._borrowed = set(shared)
        self._borrowed |= shared
        return record

    # --- serialization ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The record's serialized form, for storage; `from_bytes` reads it back."""
        return codec.encode(
            {
                "v": RECORD_VERSION,
                "cur": self.current.to_dict() if self.current else None,
                "old": [s.to_dict() for s in self.archived],
            }
        )

    def head_bytes(self) -> bytes:
        """The current session alone, without skipped keys, in the form of `to_bytes`: what a
        store rewrites with every message. `archive_bytes` and each session's skipped keys
        (`sessions()`) are the other parts, written only when they change (`from_parts`)."""
        return codec.encode({"v": RECORD_VERSION,
                             "cur": self.current.to_dict(skipped=False) if self.current else None,
                             "old": []})

    def archive_bytes(self) -> bytes:
        """The archived sessions, without skipped keys, in the form of `to_bytes`; a store
        writes them only while `archive_changed`."""
        return codec.encode({"v": RECORD_VERSION, "cur": None,
                             "old": [s.to_dict(skipped=False) for s in self.archived]})

    def sessions(self) -> list[Session]:
        """The current session (if any), then the archived ones, newest first."""
        return [s for s in [self.current, *self.archived] if s is not None]

    @classmethod
    def from_parts(
        cls,
        head: bytes,
        archive: bytes | None,
        skipped: list[tuple[bytes, tuple[bytes, int], bytes]],
    ) -> Self:
        """Read back `head_bytes`, `archive_bytes` and the skipped keys `(session base key, (header key, N),
        message key)`, oldest first; keys of sessions no longer in the record are ignored.
        `head` may also be a whole record (`to_bytes`, as stored before the split): its archived
        sessions come first and `archive_changed` is set, so the store writes them apart.
        DecodeError for anything malformed."""
        record = cls._decode(head)
        legacy = bool(record.archived)
        if archive is not None:
            record.archived = (record.archived + cls._decode(archive).archived)[
                :MAX_ARCHIVED_SESSIONS]
        by_base: dict[bytes, list[tuple[tuple[bytes, int], bytes]]] = {}
        for base, slot, mk in skipped:
            by_base.setdefault(base, []).append((slot, mk))
        for session in record.sessions():
            keys = by_base.pop(session.base_key, None)
            if keys:
                session.ratchet.add_skipped(keys)
        record._cap_skipped()
        record.archive_changed = legacy
        return record

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Raises DecodeError (never a bare exception) for anything malformed."""
        record = cls._decode(data)
        record._cap_skipped()  # records stored before the cap shrink on their first load
        return record

    @classmethod
    def _decode(cls, data: bytes) -> Self:
        try:
            f = codec.decode_map(data, limit=MAX_RECORD_BYTES, what="session record",
                                 version=RECORD_VERSION)
            cur_fields = f.optional_map("cur")
            current = Session.from_fields(cur_fields) if cur_fields is not None else None
            archived = [
                Session.from_fields(codec.Fields(item, "session record.old"))
                for item in f.list("old", max_items=MAX_ARCHIVED_SESSIONS)
            ]
            f.done()
        except DecodeError:
            raise
        except (NodeError, ValueError, TypeError) as exc:
            raise DecodeError(f"session record: {exc}") from exc
        return cls(current, archived)


def prekey_message_sender(message: bytes) -> IdentityKey:
    """The identity key a prekey message claims to come from (not yet authenticated: decrypting
    the message proves it). DecodeError if `message` is not a well-formed prekey message."""
    if not message or message[0] != PREKEY_MESSAGE_TYPE:
        raise DecodeError("not a prekey message")
    fields = codec.decode_map(message[1:], limit=MAX_SEALED_BYTES, what="prekey message",
                              version=PREKEY_MESSAGE_VERSION)
    return IdentityKey.from_bytes(fields.bytes("ik", KEY_BYTES))
