"""What one contact can make us store and rewrite (the amplification of PROTOCOL.md section 20,
"Skipped keys"), through the node's real session store over a real SQLite file.

A contact that opens MAX_ARCHIVED_SESSIONS + 1 sessions and makes us skip MAX_SKIPPED_KEYS in
each must not make every later message cost much more to store than a normal contact's message:
skipped keys and archived sessions are written when they change, not with every message.
"Bytes written" is measured where they land: the growth of the database's write-ahead log (with
automatic checkpoints off, every committed page is appended to it)."""

from __future__ import annotations

from pathlib import Path

from node.device.session_store import SessionStore
from node.device.storage import Database
from node.protocol.kdf import kdf_ck
from node.protocol.limits import MAX_ARCHIVED_SESSIONS, MAX_SKIPPED_KEYS
from node.protocol.session import SessionRecord
from node.testing import FIXED_NOW, Party

#: A normal message rewrites the current session (~1 KB) and its page: a few pages of 4 KiB in
#: the WAL. An amplified contact's message may cost at most this much more than a normal one.
MAX_RATIO = 2.0


class Victim:
    """Bob's device: a SessionStore over a real database file, fed as the inbound shell does
    (decrypt on the cached record, then save it and the prekeys in one transaction)."""

    def __init__(self, path: Path, party: Party) -> None:
        self.party = party
        self.db = Database.open(path, durability="normal", create=True)
        self.db._conn.execute("PRAGMA wal_autocheckpoint=0")  # the WAL keeps every commit
        self.store = SessionStore(self.db, party.identity, party.device, now=FIXED_NOW)
        self.store.prekeys = party.prekeys
        with self.db.transaction():
            self.store.save_prekeys()
        self.wal = path.with_name(path.name + "-wal")

    def receive(self, sender: Party, message: bytes) -> tuple[bytes, int]:
        """Decrypt and store; returns the plaintext and the bytes the commit added to the WAL."""
        account, device = sender.identity.public.to_bytes(), sender.device.public.to_bytes()
        before = self.wal.stat().st_size
        record = self.store.record(account, device)
        plaintext = record.decrypt(message, identity=self.party.identity,
                                   remote_identity=sender.identity.public,
                                   prekeys=self.store.prekeys)
        with self.db.transaction():
            self.store.save(account, device)
            if message[0] == 0x02:
                self.store.save_prekeys()
        return plaintext, self.wal.stat().st_size - before

    def stored_bytes(self, sender: Party) -> int:
        """Everything stored about the sessions with `sender`'s device, in rows' bytes."""
        account, device = sender.identity.public.to_bytes(), sender.device.public.to_bytes()
        total = 0
        for table in self.session_tables():
            columns = [row[1] for row in self.db._conn.execute(f"PRAGMA table_info({table})")]
            expr = " + ".join(f"coalesce(length({c}), 8)" for c in columns)
            row = self.db._conn.execute(
                f"SELECT sum({expr}) FROM {table} WHERE account=? AND device=?",
                (account, device)).fetchone()
            total += row[0] or 0
        return total

    def session_tables(self) -> list[str]:
        names = [row[0] for row in self.db._conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")]
        return [n for n in names if "account" in [
            row[1] for row in self.db._conn.execute(f"PRAGMA table_info({n})")]
            and "device" in [row[1] for row in self.db._conn.execute(f"PRAGMA table_info({n})")]
            and n != "outbox"]


def _skip_ahead(sender: Party, receiver: Party, count: int) -> None:
    """Advance `sender`'s sending chain by `count` messages never sent (chain keys as a real
    send derives them): the receiver will store them as skipped keys."""
    current = sender.sessions[receiver.name].current
    assert current is not None and current.ratchet.cks is not None
    ck = current.ratchet.cks
    for _ in range(count):
        ck, _ = kdf_ck(ck)
    current.ratchet.cks, current.ratchet.ns = ck, current.ratchet.ns + count


def _normal_cost(victim: Victim, carol: Party, bob: Party) -> int:
    carol.start_session(bob)
    victim.receive(carol, carol.encrypt(bob, b"hello"))
    costs = [victim.receive(carol, carol.encrypt(bob, b"msg %d" % i))[1] for i in range(5)]
    return max(costs)


#: Keys skipped per session: together just over MAX_SKIPPED_KEYS, so the record ends up holding
#: the most it may, spread over every session (the worst case for a store that rewrites whole
#: sessions). benchmarks/abuse.py measures the full attack (MAX_SKIPPED_KEYS in each session).
PER_SESSION = MAX_SKIPPED_KEYS // MAX_ARCHIVED_SESSIONS + 1


def test_an_amplifying_contact_cannot_make_later_messages_cost_much_more(tmp_path: Path) -> None:
    bob = Party.create("bob")
    mallory, carol = Party.create("mallory"), Party.create("carol")
    victim = Victim(tmp_path / "pigeon.db", bob)
    normal = _normal_cost(victim, carol, bob)
    for i in range(MAX_ARCHIVED_SESSIONS + 1):
        mallory.start_session(bob, one_time=False)
        assert victim.receive(mallory, mallory.encrypt(bob, b"open %d" % i))[0] == b"open %d" % i
        _skip_ahead(mallory, bob, PER_SESSION)
        assert victim.receive(mallory, mallory.encrypt(bob, b"far %d" % i))[0] == b"far %d" % i
    record = victim.store.record(mallory.identity.public.to_bytes(),
                                 mallory.device.public.to_bytes())
    assert len(record.archived) == MAX_ARCHIVED_SESSIONS
    assert sum(len(s.ratchet.skipped) for s in record.sessions()) == MAX_SKIPPED_KEYS
    assert all(s.ratchet.skipped for s in record.archived[:-2])
    # What the contact made us store is bounded: one session's worth of skipped keys (with row
    # overhead) plus the archived sessions themselves.
    assert victim.stored_bytes(mallory) <= MAX_SKIPPED_KEYS * 400 + (
        MAX_ARCHIVED_SESSIONS + 1) * 2048
    # Every later message costs about what a normal contact's does.
    costs = [victim.receive(mallory, mallory.encrypt(bob, b"later %d" % i))[1] for i in range(5)]
    assert max(costs) <= MAX_RATIO * normal, (costs, normal)
    # And nothing was lost: a reload from the database has the same sessions and skipped keys.
    account, device = mallory.identity.public.to_bytes(), mallory.device.public.to_bytes()
    cached = victim.store.record(account, device)
    victim.store.forget([(account, device)])
    assert victim.store.record(account, device).to_bytes() == cached.to_bytes()
    victim.db.close()


def test_skipped_keys_survive_a_reload_and_are_deleted_when_used(tmp_path: Path) -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    path = tmp_path / "pigeon.db"
    victim = Victim(path, bob)
    alice.start_session(bob)
    victim.receive(alice, alice.encrypt(bob, b"one"))
    late = [alice.encrypt(bob, b"late %d" % i) for i in range(3)]  # held back: skipped keys
    victim.receive(alice, alice.encrypt(bob, b"two"))
    victim.db.close()
    # A restart: everything comes back from the file.
    again = Victim(path, bob)
    assert again.receive(alice, late[1])[0] == b"late 1"
    again.db.close()
    third = Victim(path, bob)
    assert third.receive(alice, late[0])[0] == b"late 0"
    assert third.receive(alice, late[2])[0] == b"late 2"
    account, device = alice.identity.public.to_bytes(), alice.device.public.to_bytes()
    record = third.store.record(account, device)
    assert record.current is not None and not record.current.ratchet.skipped
    third.store.forget([(account, device)])
    reloaded = third.store.record(account, device)
    assert reloaded.current is not None and not reloaded.current.ratchet.skipped
    third.db.close()


def test_a_record_stored_whole_by_an_older_version_still_loads_and_is_split(tmp_path: Path) -> None:
    mallory, bob = Party.create("mallory"), Party.create("bob")
    for i in range(3):
        mallory.start_session(bob, one_time=False)
        assert bob.decrypt(mallory, mallory.encrypt(bob, b"open %d" % i)) == b"open %d" % i
        _skip_ahead(mallory, bob, 10)
        assert bob.decrypt(mallory, mallory.encrypt(bob, b"far %d" % i)) == b"far %d" % i
    whole = bob.sessions[mallory.name].to_bytes()
    path = tmp_path / "pigeon.db"
    db = Database.open(path, create=True)
    account, device = mallory.identity.public.to_bytes(), mallory.device.public.to_bytes()
    with db.transaction():
        db.save_session(account, device, whole)  # the one-blob form older versions wrote
    store = SessionStore(db, bob.identity, bob.device, now=FIXED_NOW)
    store.prekeys = bob.prekeys
    assert store.record(account, device).to_bytes() == SessionRecord.from_bytes(whole).to_bytes()
    message = mallory.encrypt(bob, b"after the upgrade")
    assert store.record(account, device).decrypt(
        message, identity=bob.identity, remote_identity=mallory.identity.public,
        prekeys=store.prekeys) == b"after the upgrade"
    with db.transaction():
        store.save(account, device)
    expected = store.record(account, device).to_bytes()
    store.forget([(account, device)])
    assert store.record(account, device).to_bytes() == expected
    assert len(db.load_session(account, device) or b"") < len(whole)
    db.close()

