"""What one contact can make us store: every session it opens and every
message it claims to have skipped grows our record with it, and the record is rewritten with every
message. The whole record holds at most MAX_SKIPPED_KEYS skipped keys, evicted from the oldest
archived session first, so it stays small whatever the contact does."""

from __future__ import annotations

import pytest

from node.errors import DecryptionFailed
from node.protocol.kdf import kdf_ck
from node.protocol.limits import MAX_ARCHIVED_SESSIONS, MAX_SKIPPED_KEYS
from node.protocol.session import SessionRecord
from node.testing import Party

#: A generous bound on the record's size: MAX_SKIPPED_KEYS keys of ~80 bytes each, plus the
#: sessions themselves (a few hundred bytes each, ~1.7 KB while the PQXDH header is pending).
RECORD_BOUND_BYTES = MAX_SKIPPED_KEYS * 100 + (MAX_ARCHIVED_SESSIONS + 1) * 2048


def _skip_ahead(sender: Party, receiver: Party, count: int) -> None:
    """Advance `sender`'s sending chain by `count` messages that are never sent (as a hostile
    contact would, to make `receiver` store skipped keys): the chain keys a real send derives."""
    current = sender.sessions[receiver.name].current
    assert current is not None and current.ratchet.cks is not None
    ratchet = current.ratchet
    ck = ratchet.cks
    for _ in range(count):
        ck, _ = kdf_ck(ck)
    ratchet.cks, ratchet.ns = ck, ratchet.ns + count


def _total_skipped(record: SessionRecord) -> int:
    sessions = [s for s in [record.current, *record.archived] if s is not None]
    return sum(len(s.ratchet.skipped) for s in sessions)


def _amplify(sessions: int) -> tuple[Party, Party]:
    """Mallory opens `sessions` sessions with Bob, and in each makes him skip MAX_SKIPPED_KEYS."""
    mallory, bob = Party.create("mallory"), Party.create("bob")
    for i in range(sessions):
        mallory.start_session(bob, one_time=False)
        assert bob.decrypt(mallory, mallory.encrypt(bob, b"open %d" % i)) == b"open %d" % i
        _skip_ahead(mallory, bob, MAX_SKIPPED_KEYS)
        assert bob.decrypt(mallory, mallory.encrypt(bob, b"far %d" % i)) == b"far %d" % i
    return mallory, bob


def test_a_contact_cannot_grow_our_session_record_beyond_one_sessions_skipped_keys() -> None:
    mallory, bob = _amplify(MAX_ARCHIVED_SESSIONS + 1)
    record = bob.sessions[mallory.name]
    assert len(record.archived) == MAX_ARCHIVED_SESSIONS
    assert _total_skipped(record) <= MAX_SKIPPED_KEYS
    assert len(record.to_bytes()) <= RECORD_BOUND_BYTES
    # Reading the record back keeps it bounded too (and the same).
    again = SessionRecord.from_bytes(record.to_bytes())
    assert again.to_bytes() == record.to_bytes()


def test_the_current_sessions_skipped_keys_are_kept_first() -> None:
    mallory, bob = Party.create("mallory"), Party.create("bob")
    mallory.start_session(bob, one_time=False)
    assert bob.decrypt(mallory, mallory.encrypt(bob, b"old")) == b"old"
    late_in_old = mallory.encrypt(bob, b"late, old session")  # held back: a skipped key
    assert bob.decrypt(mallory, mallory.encrypt(bob, b"after")) == b"after"
    # A new session in which Bob skips a whole store's worth of keys.
    mallory.start_session(bob, one_time=False)
    assert bob.decrypt(mallory, mallory.encrypt(bob, b"new")) == b"new"
    late_in_new = mallory.encrypt(bob, b"late, new session")
    _skip_ahead(mallory, bob, MAX_SKIPPED_KEYS - 1)
    assert bob.decrypt(mallory, mallory.encrypt(bob, b"far")) == b"far"
    record = bob.sessions[mallory.name]
    assert _total_skipped(record) == MAX_SKIPPED_KEYS
    # The new session's keys stayed; the archived session's key was the one evicted.
    assert bob.decrypt(mallory, late_in_new) == b"late, new session"
    with pytest.raises(DecryptionFailed):
        bob.decrypt(mallory, late_in_old)


def test_a_copy_is_the_same_record_and_independent_of_the_original() -> None:
    # The inbound machine decrypts on a copy of each record (commit on success); with a record of
    # a whole skipped-key store the copy must not cost a serialization round trip.
    mallory, bob = _amplify(2)
    record = bob.sessions[mallory.name]
    before = record.to_bytes()
    copy = record.copy()
    assert copy.to_bytes() == before
    message = mallory.encrypt(bob, b"on the copy")
    assert copy.decrypt(message, identity=bob.identity, remote_identity=mallory.identity.public,
                        prekeys=bob.prekeys) == b"on the copy"
    assert record.to_bytes() == before and copy.to_bytes() != before
    assert bob.decrypt(mallory, message) == b"on the copy"  # the original can still do it


def test_a_copy_and_its_original_change_independently_in_every_session() -> None:
    # A copy shares archived sessions and skipped keys with its original until one side changes
    # them; each change (a late message in an archived session, the cap evicting archived keys,
    # an acknowledgement) must stay on its side.
    mallory, bob = Party.create("mallory"), Party.create("bob")
    mallory.start_session(bob, one_time=False)
    assert bob.decrypt(mallory, mallory.encrypt(bob, b"old")) == b"old"
    late_old = mallory.encrypt(bob, b"late, old session")  # held back: a skipped key
    assert bob.decrypt(mallory, mallory.encrypt(bob, b"after")) == b"after"
    mallory.start_session(bob, one_time=False)
    assert bob.decrypt(mallory, mallory.encrypt(bob, b"new")) == b"new"
    record = bob.sessions[mallory.name]
    assert len(record.archived) == 1 and _total_skipped(record) == 1
    before = record.to_bytes()

    def decrypt(target: SessionRecord, message: bytes) -> bytes:
        return target.decrypt(message, identity=bob.identity,
                              remote_identity=mallory.identity.public, prekeys=bob.prekeys)

    copy = record.copy()
    assert decrypt(copy, late_old) == b"late, old session"  # in the copy's archived session
    assert record.to_bytes() == before
    assert decrypt(record, late_old) == b"late, old session"  # the original still has the key
    with pytest.raises(DecryptionFailed):
        decrypt(record, late_old)  # and used it now
    # The original changes after a copy was made: the copy keeps what it had.
    late_new = mallory.encrypt(bob, b"late, new session")
    _skip_ahead(mallory, bob, MAX_SKIPPED_KEYS)
    far = mallory.encrypt(bob, b"far")
    copy = record.copy()
    snapshot = copy.to_bytes()
    assert decrypt(record, far) == b"far"  # the cap evicts the original's older keys
    assert copy.to_bytes() == snapshot
    assert decrypt(copy, late_new) == b"late, new session"
    with pytest.raises(DecryptionFailed):
        decrypt(record, late_new)  # evicted from the original by the cap
