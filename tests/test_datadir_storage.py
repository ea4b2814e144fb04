"""The data directory and the SQLite storage: real files in tmp_path, real processes for locks.

A damaged data directory must be reported as a `DataDirError` naming the file (something the user
can act on), never as a traceback out of cbor2 or sqlite3, and never silently "repaired" into a
new identity.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from node import DataDirError, DataDirLocked, Node, init_data_dir
from node.device.datadir import DataDir
from node.device.storage import SCHEMA_VERSION, Contact, Database
from node.errors import ContactError
from tests.conftest import FAST

# --- init and locking --------------------------------------------------------------------------


def test_init_creates_private_key_files(tmp_path: Path) -> None:
    path = tmp_path / "pigeon"
    account_id, peer_id = init_data_dir(path, display_name="alice")
    assert account_id.startswith("pg") and peer_id.startswith("12D3KooW")
    dd = DataDir(path)
    for key_file in (dd.identity_file, dd.device_file):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0  # the directory is private too
    identity, device = dd.load_keys()
    assert identity.public.account_id() == account_id
    assert device.public.peer_id() == peer_id
    with pytest.raises(DataDirError, match="already holds an identity"):
        init_data_dir(path)  # never overwrites an identity
    assert dd.load_keys()[0].public.account_id() == account_id


def test_database_is_not_readable_by_other_users(tmp_path: Path) -> None:
    """The database holds private prekeys and ratchet state, as secret as the key files; it must
    not be readable by others even in a directory someone else can enter."""
    path = tmp_path / "shared"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    init_data_dir(path)
    mode = stat.S_IMODE(DataDir(path).database_file.stat().st_mode)
    assert mode & 0o077 == 0, oct(mode)


def _lock_in_child(path: Path) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        "from node.device.datadir import DataDir\n"
        "from node.errors import DataDirLocked\n"
        "try:\n"
        f"    DataDir({str(path)!r}).lock()\n"
        "except DataDirLocked as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
        "print('locked')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=False)


def test_second_lock_from_another_process_is_refused(tmp_path: Path) -> None:
    init_data_dir(tmp_path / "d")
    dd = DataDir(tmp_path / "d")
    dd.lock()
    try:
        child = _lock_in_child(dd.path)
        assert child.returncode == 3, child.stderr
        assert str(dd.path) in child.stdout and "in use by another Pigeon process" in child.stdout
        with pytest.raises(DataDirLocked):
            DataDir(tmp_path / "d").lock()  # a second user within this process too
    finally:
        dd.unlock()
    child = _lock_in_child(dd.path)  # released: now it can
    assert child.returncode == 0 and child.stdout.strip() == "locked", child.stderr


async def test_a_running_node_holds_its_data_dir(tmp_path: Path) -> None:
    async with Node.open(tmp_path / "d", FAST, create=True):
        with pytest.raises(DataDirLocked, match="in use"):
            async with Node.open(tmp_path / "d", FAST):
                pass
        child = await trio.to_thread.run_sync(_lock_in_child, tmp_path / "d")
        assert child.returncode == 3, child.stderr
    # closed: the lock is gone with it
    async with Node.open(tmp_path / "d", FAST) as node:
        assert node.peer_id


# --- damaged files -----------------------------------------------------------------------------


def _damage(dd: DataDir, how: str) -> Path:
    """Damage the data directory one way; returns the file the error must name."""
    if how == "truncated identity":
        data = dd.identity_file.read_bytes()
        dd.identity_file.write_bytes(data[: len(data) // 2])
        return dd.identity_file
    if how == "empty device":
        dd.device_file.write_bytes(b"")
        return dd.device_file
    if how == "random identity":
        dd.identity_file.write_bytes(os.urandom(90))
        return dd.identity_file
    if how == "identity not a map":
        dd.identity_file.write_bytes(b"\x83\x01\x02\x03")  # CBOR [1, 2, 3]
        return dd.identity_file
    if how == "seed bit flipped":
        data = bytearray(dd.device_file.read_bytes())
        seed_at = bytes(data).index(b"seed") + 6  # key, then the bstr header of the seed
        data[seed_at] ^= 0x01
        dd.device_file.write_bytes(bytes(data))
        return dd.device_file
    if how == "identity readable by others":
        dd.identity_file.chmod(0o644)
        return dd.identity_file
    if how == "swapped key files":
        identity, device = dd.identity_file.read_bytes(), dd.device_file.read_bytes()
        for path, data in ((dd.identity_file, device), (dd.device_file, identity)):
            path.chmod(0o600)
            path.write_bytes(data)
        return dd.identity_file
    if how == "device missing":
        dd.device_file.unlink()
        return dd.device_file
    if how == "database garbage":
        dd.database_file.write_bytes(os.urandom(8192))
        return dd.database_file
    if how == "database text":
        dd.database_file.write_text("this is not a database\n" * 100)
        return dd.database_file
    if how == "database of another program":
        dd.database_file.unlink()
        with sqlite3.connect(dd.database_file) as other:
            other.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, data BLOB)")
        return dd.database_file
    if how == "database truncated":
        data = dd.database_file.read_bytes()
        dd.database_file.write_bytes(data[: len(data) // 2])
        return dd.database_file
    if how == "database overwritten in the middle":
        with dd.database_file.open("r+b") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(size // 3)
            f.write(b"\xa5" * (size // 3))
        return dd.database_file
    raise AssertionError(how)


DAMAGE = [
    "truncated identity", "empty device", "random identity", "identity not a map",
    "seed bit flipped", "identity readable by others", "swapped key files", "device missing",
    "database garbage", "database text", "database of another program", "database truncated",
    "database overwritten in the middle",
]


@pytest.mark.parametrize("how", DAMAGE)
async def test_damaged_data_dir_gives_data_dir_error_naming_the_file(tmp_path: Path,
                                                                     how: str) -> None:
    path = tmp_path / "d"
    async with Node.open(path, FAST, create=True) as node:
        node.invite()  # some real content in the database
    dd = DataDir(path)
    named = _damage(dd, how)
    with pytest.raises(DataDirError) as caught:
        async with Node.open(path, FAST):
            pytest.fail("opened a damaged data directory")
    assert type(caught.value) is DataDirError  # ours: not cbor2's, sqlite3's or pynacl's
    assert str(named) in str(caught.value)  # the caller learns which file to restore
    # and the directory is not locked afterwards (the user can fix the file and retry)
    dd.lock()
    dd.unlock()


def test_wrong_permissions_message_says_how_to_fix(tmp_path: Path) -> None:
    init_data_dir(tmp_path / "d")
    dd = DataDir(tmp_path / "d")
    dd.device_file.chmod(0o640)
    with pytest.raises(DataDirError, match=r"readable by other users \(mode 640\).*chmod 600"):
        dd.load_keys()


def test_uninitialised_dir_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DataDirError, match="not initialised"):
        DataDir(tmp_path / "nothing").load_keys()


# --- storage -----------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(tmp_path / "test.db", durability="normal", create=True)
    yield database
    database.close()


def _outbox_seqs(db: Database, device: bytes) -> list[int]:
    return [r.seq for r in db.outbox_for(device, limit=1000)]


def _queue(db: Database, contact: Contact, device: bytes, n: int, start: int = 0) -> list[bytes]:
    ids = [os.urandom(16) for _ in range(n)]
    for i, message_id in enumerate(ids):
        db.insert_outgoing(contact=contact,
                           messages=[(message_id, "text", f"m{start + i}", 1000 + start + i)],
                           devices=[device], now_ms=1000 + start + i)
    return ids


def test_schema_version_is_recorded(tmp_path: Path, db: Database) -> None:
    assert db.get_meta("schema_version") == SCHEMA_VERSION
    with sqlite3.connect(tmp_path / "test.db") as raw:
        assert raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
            SCHEMA_VERSION,)
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_database_from_a_newer_pigeon_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "test.db"
    Database.open(path, create=True).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION + 1,))
    with pytest.raises(DataDirError, match=f"newer Pigeon .*schema {SCHEMA_VERSION + 1}"):
        Database.open(path)
    with sqlite3.connect(path) as raw:  # refused, not "migrated" or altered
        assert raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
            SCHEMA_VERSION + 1,)


def test_reopening_keeps_data_and_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "test.db"
    db = Database.open(path, create=True)
    contact = db.add_contact("bob", b"B" * 32, now_ms=1)
    db.close()
    db = Database.open(path)
    try:
        assert db.contacts() == [contact]
        assert db.get_meta("schema_version") == SCHEMA_VERSION
    finally:
        db.close()


def test_outbox_seq_never_reused_after_rows_are_deleted(tmp_path: Path) -> None:
    """Delivery lanes remember the last seq they wrote and ask for rows after it: a new row that
    got a reused (lower or equal) seq would be skipped until the lane restarts."""
    path = tmp_path / "test.db"
    db = Database.open(path, durability="normal", create=True)
    device = b"D" * 32
    contact = db.add_contact("bob", b"B" * 32, now_ms=1)
    first = _queue(db, contact, device, 3)
    seqs = _outbox_seqs(db, device)
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    written_upto = seqs[-1]  # what a lane remembers after writing them
    # the newest row goes first (delivered): plain rowid allocation would hand out its seq again
    assert [m.id for m in db.mark_delivered(device, [first[-1]], now_ms=5)[0]] == [first[-1]]
    _queue(db, contact, device, 1, start=3)
    assert [r.seq for r in db.outbox_for(device, limit=10, after_seq=written_upto)] == [
        written_upto + 1]
    # everything delivered (outbox empty), and across a reopen too
    db.mark_delivered(device, first, now_ms=6)
    db.mark_delivered(device, [r.message_id for r in db.outbox_for(device, limit=10)], now_ms=6)
    assert db.outbox_for(device, limit=10) == []
    db.close()
    db = Database.open(path, durability="normal")
    try:
        _queue(db, contact, device, 1, start=4)
        (row,) = db.outbox_for(device, limit=10, after_seq=written_upto)
        assert row.seq > written_upto + 1 and row.body == "m4"
    finally:
        db.close()


def test_mark_delivered_is_idempotent(db: Database) -> None:
    device = b"D" * 32
    contact = db.add_contact("bob", b"B" * 32, now_ms=1)
    (message_id,) = _queue(db, contact, device, 1)
    first, _ = db.mark_delivered(device, [message_id], now_ms=10)
    assert [(m.id, m.state) for m in first] == [(message_id, "delivered")]
    assert db.mark_delivered(device, [message_id], now_ms=20) == ([], set())  # a repeated ack
    assert db.mark_delivered(device, [os.urandom(16)], now_ms=20) == ([], set())  # unknown id
    row = db.message(message_id)
    assert row is not None and row.state == "delivered"
    assert db.outbox_for(device, limit=10) == []


def test_message_is_delivered_when_any_recipient_device_acked(db: Database) -> None:
    """PROTOCOL.md section 25.5: delivered once any device of the recipient's account committed
    it; our own devices' copies (sent transcripts) do not count, and every device's own state
    stays visible."""
    phone, laptop, own = b"P" * 32, b"L" * 32, b"O" * 32
    contact = db.add_contact("bob", b"B" * 32, now_ms=1)
    mine = db.own_contact(b"A" * 32, now_ms=1)
    db.put_device(mine.id, own, "own-peer", [], seen_at_ms=0, now_ms=1)
    message_id = os.urandom(16)
    (rowid,) = db.insert_outgoing(contact=contact, messages=[(message_id, "text", "hi", 1)],
                                  devices=[phone, laptop], now_ms=1, copies=[(b"A" * 32, own)])
    assert db.mark_delivered(own, [message_id], now_ms=2)[0] == []
    assert db.message(message_id).state == "pending"  # type: ignore[union-attr]
    delivered, _ = db.mark_delivered(phone, [message_id], now_ms=3)
    assert [m.id for m in delivered] == [message_id]
    assert db.message(message_id).state == "delivered"  # type: ignore[union-attr]
    assert db.mark_delivered(laptop, [message_id], now_ms=4)[0] == []  # delivered already
    states = {(s.device, s.own, s.state) for s in db.device_states([rowid])[rowid]}
    assert states == {(own, True, "delivered"), (phone, False, "delivered"),
                      (laptop, False, "delivered")}


def test_failed_transaction_leaves_nothing_behind(db: Database) -> None:
    contact = db.add_contact("bob", b"B" * 32, now_ms=1)
    with pytest.raises(RuntimeError), db.transaction():
        db.insert_outgoing(contact=contact, messages=[(b"x" * 16, "text", "hi", 1)],
                           devices=[b"D" * 32], now_ms=1)
        raise RuntimeError("crash between the writes")
    assert db.message(b"x" * 16) is None
    assert db.outbox_devices() == []


def test_contacts_are_unique_by_name_and_account(db: Database) -> None:
    db.add_contact("bob", b"B" * 32, now_ms=1)
    with pytest.raises(ContactError, match="already a contact"):
        db.add_contact("robert", b"B" * 32, now_ms=2)
    with pytest.raises(ContactError, match="exists already"):
        db.add_contact("bob", b"C" * 32, now_ms=2)
    assert [c.name for c in db.contacts()] == ["bob"]


def test_a_device_keeps_its_binding_and_is_released_with_its_queue(db: Database) -> None:
    """The binding stored with a device (PROTOCOL.md section 4 "Binding") survives refreshes
    that carry none; releasing the device takes its row and session, and fails the messages
    queued only for it, while a message also queued for another device stays pending."""
    device, other = b"D" * 32, b"O" * 32
    claimer = db.add_contact("claimer", b"C" * 32, now_ms=1)
    db.put_device(claimer.id, device, "peer-d", [], seen_at_ms=1, now_ms=1)
    assert db.device_binding(device) is None
    db.put_device(claimer.id, device, "peer-d", ["/ip4/1.2.3.4/tcp/1"], binding=b"b" * 64,
                  seen_at_ms=2, now_ms=2)
    db.put_device(claimer.id, device, "peer-d", ["/ip4/1.2.3.4/tcp/2"], seen_at_ms=3, now_ms=3)
    assert db.device_binding(device) == b"b" * 64
    db.save_session(b"C" * 32, device, b"session")
    (only,) = _queue(db, claimer, device, 1)
    both = os.urandom(16)
    db.insert_outgoing(contact=claimer, messages=[(both, "text", "both", 5)],
                       devices=[device, other], now_ms=5)
    db.release_device(device, "not theirs", now_ms=9)
    assert db.device(device) is None and db.device_binding(device) is None
    assert db.load_session(b"C" * 32, device) is None
    assert db.outbox_for(device, limit=10) == []
    failed = db.message(only)
    assert failed is not None and (failed.state, failed.error) == ("failed", "not theirs")
    assert db.message(both).state == "pending"  # type: ignore[union-attr]
    assert [r.seq for r in db.outbox_for(other, limit=10)]
    db.release_device(device, "again", now_ms=10)  # a device nobody holds: nothing happens


def test_seen_ids_are_per_sender(db: Database) -> None:
    message_id = os.urandom(16)
    db.mark_seen(b"B" * 32, [message_id], now_ms=1)
    db.mark_seen(b"B" * 32, [message_id], now_ms=2)  # again: no error
    assert db.seen_among(b"B" * 32, [message_id, b"y" * 16]) == {message_id}
    assert not db.seen_among(b"C" * 32, [message_id])  # another sender may pick the same id
    assert db.prune_seen(before_ms=2) == 1
    assert not db.seen_among(b"B" * 32, [message_id])


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_an_initialised_data_dir_without_its_database_is_refused(tmp_path: Path,
                                                                 state: str) -> None:
    """Keys without a database mean contacts and sessions were lost: say so, do not start
    afresh silently (a fresh database would also make every invite handed out useless)."""
    path = tmp_path / "test.db"
    Database.open(path, create=True).close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if state == "empty":
        path.write_bytes(b"")
    with pytest.raises(DataDirError, match="missing or empty although the keys exist"):
        Database.open(path)
    assert state == "empty" or not path.exists()  # nothing created in its place
