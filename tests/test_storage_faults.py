"""Storage faults (a full disk) and reused message ids: every SQLite failure is a StorageError
that says what is wrong, nothing is half-written, nothing ends the node, and work resumes by
itself once the disk has room again. Plus what deletion leaves behind: secure_delete and the
WAL truncation (node/files.py `truncate_wal`).

A full disk is real: a small tmpfs mounted in the test's own directory and filled with a file
(so these tests need root; they are skipped otherwise), unmounted at the end."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import node.device.node as node_module
from node import MessageReceived, Node
from node.device.storage import Database
from node.errors import DataDirError, RelayRefused, StorageError
from node.files import storage_reason
from node.protocol.keys import DeviceKeyPair
from node.protocol.mailbox import STORAGE_FULL
from node.relay.store import DUPLICATE, STORED, PendingDeposit, RelayStore, StoreLimits
from tests.conftest import WAIT, befriend, next_event, open_node
from tests.relaytools import box_of, client, peer, running_relay
from tests.test_relay_delivery import _close_direct_path, address, relay

LIMITS = StoreLimits(mailbox_max_messages=1000, mailbox_max_bytes=10_000_000,
                     storage_max_bytes=100_000_000)


class FullDisk:
    """A tmpfs of `size` mounted at `path`; `fill()` takes every free byte, `free()` gives it
    back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        chunk = b"\0" * 65536
        with open(self.filler, "ab", buffering=0) as f:
            for size in (65536, 4096, 512, 1):  # bounded: the disk is a few MiB
                while True:
                    try:
                        f.write(chunk[:size])
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[FullDisk]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill up needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield FullDisk(mount)
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def _files_holding(directory: Path, marker: bytes) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and marker in p.read_bytes())


# --- the classification ---------------------------------------------------------------------------


def test_sqlite_errors_get_reasons_a_person_understands(tmp_path: Path) -> None:
    def error(code: int, text: str = "x") -> sqlite3.Error:
        exc = sqlite3.OperationalError(text)
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
        return exc

    # primary codes, and extended ones (SQLITE_IOERR_WRITE = 778, SQLITE_READONLY_DBMOVED = 1032)
    assert [storage_reason(error(c)) for c in (13, 8, 1032, 5, 6, 11, 26, 10, 778, 1)] == [
        "disk-full", "read-only", "read-only", "locked", "locked", "damaged", "damaged",
        "io-error", "io-error", "failed"]
    assert storage_reason(sqlite3.OperationalError("database or disk is full")) == "disk-full"

    # a real one: a database file that became read-only
    path = tmp_path / "ro.db"
    db = Database.open(path, create=True)
    db.close()
    path.chmod(0o400)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        with pytest.raises(sqlite3.Error) as caught:
            conn.execute("INSERT INTO meta(key, value) VALUES ('a', 1)")
        assert storage_reason(caught.value) == "read-only"
    finally:
        conn.close()


# --- the node's database on a full disk -----------------------------------------------------------


def test_a_full_disk_is_a_storage_error_and_nothing_is_half_written(full_disk: FullDisk) -> None:
    db = Database.open(full_disk.path / "pigeon.db", create=True)
    try:
        with db.transaction():
            bob = db.add_contact("bob", b"b" * 32, now_ms=1)
        first = db.insert_outgoing(contact=bob, messages=[(b"1" * 16, "text", "before", 1)],
                                   devices=[b"d" * 32], now_ms=1)
        full_disk.fill()
        big = "x" * 300_000  # more than the WAL's free pages: it must grow
        with pytest.raises(StorageError) as caught:
            db.insert_outgoing(contact=bob, messages=[(b"2" * 16, "text", big, 2)],
                               devices=[b"d" * 32], now_ms=2)
        assert caught.value.reason == "disk-full"
        assert "is full: free some space" in str(caught.value)
        assert not isinstance(caught.value.__cause__, StorageError)
        # nothing of the failed transaction is there; the database still reads and works
        assert [m.id for m in db.history(bob)] == [b"1" * 16]
        assert len(db.outbox_for(b"d" * 32, limit=10)) == 1
        full_disk.free()
        second = db.insert_outgoing(contact=bob, messages=[(b"2" * 16, "text", big, 2)],
                                    devices=[b"d" * 32], now_ms=2)
        assert second[0] > first[0]
        assert [m.id for m in db.history(bob)] == [b"1" * 16, b"2" * 16]
    finally:
        db.close()


def test_the_relay_store_on_a_full_disk_refuses_and_recovers(full_disk: FullDisk) -> None:
    store = RelayStore.open(full_disk.path / "relay.db", LIMITS)
    try:
        box = b"\x01" * 32
        assert store.register(box, now=1, max_mailboxes=10)
        assert store.deposit([PendingDeposit(box, b"a" * 16, b"e" * 1000, 10**10)],
                             now=1).results == [STORED]
        full_disk.fill()
        with pytest.raises(StorageError) as caught:
            store.deposit([PendingDeposit(box, bytes([i]) * 16, b"e" * 200_000, 10**10)
                           for i in range(3)], now=1)
        assert caught.value.reason == "disk-full"
        assert (store.totals.messages, store.totals.bytes) == (1, 1000)  # unchanged
        items, _ = store.fetch(box, after=0, limit=10, budget=10**7, now=1)  # reads still work
        assert [i.id for i in items] == [b"a" * 16]
        full_disk.free()
        outcome = store.deposit([PendingDeposit(box, bytes([i]) * 16, b"e" * 200_000, 10**10)
                                 for i in range(3)], now=1)
        assert outcome.results == [STORED] * 3
        assert store.ack(box, [b"a" * 16]) == 1
        assert store.totals.messages == 3
    finally:
        store.close()


# --- what deletion leaves behind -----------------------------------------------------------------


def test_an_acked_envelope_leaves_no_trace_in_the_relays_files(tmp_path: Path) -> None:
    marker = os.urandom(12).hex().encode()
    store = RelayStore.open(tmp_path / "relay.db", LIMITS)
    try:
        box = b"\x02" * 32
        assert store.register(box, now=1, max_mailboxes=10)
        assert store.deposit([PendingDeposit(box, b"m" * 16, b"<" + marker + b">" * 500, 10**10),
                              PendingDeposit(box, b"k" * 16, b"kept" * 100, 10**10)],
                             now=1).results == [STORED, STORED]
        assert store.checkpoint_if_deleted() is False  # nothing deleted yet: no work
        assert store.ack(box, [b"m" * 16]) == 1
        # secure_delete overwrote it in the database file, but the WAL still has the old page
        assert _files_holding(tmp_path, marker) == ["relay.db-wal"]
        assert store.checkpoint_if_deleted() is True
        assert _files_holding(tmp_path, marker) == []
        assert (tmp_path / "relay.db-wal").stat().st_size == 0
        items, _ = store.fetch(box, after=0, limit=10, budget=10**7, now=1)
        assert [i.id for i in items] == [b"k" * 16]
        assert store.deposit([PendingDeposit(box, b"k" * 16, b"x", 10**10)],
                             now=1).results == [DUPLICATE]
    finally:
        store.close()


def test_a_removed_contacts_history_leaves_no_trace_in_the_data_dir(tmp_path: Path) -> None:
    marker = os.urandom(12).hex()
    db = Database.open(tmp_path / "pigeon.db", create=True)
    try:
        with db.transaction():
            bob = db.add_contact("bob", b"b" * 32, now_ms=1)
            carol = db.add_contact("carol", b"c" * 32, now_ms=1)
            db.insert_incoming(contact=bob, messages=[(b"1" * 16, "text", f"<{marker}>", 1)],
                               received_at_ms=1)
            db.insert_incoming(contact=carol, messages=[(b"2" * 16, "text", "stays", 1)],
                               received_at_ms=1)
        assert _files_holding(tmp_path, marker.encode()) != []
        db.remove_contact(bob)
        assert _files_holding(tmp_path, marker.encode()) == []
        assert [m.body for m in db.history(carol)] == ["stays"]
        assert db._conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    finally:
        db.close()


# --- reused message ids ---------------------------------------------------------------------------


class _FixedIds:
    """node.device.node's `new_message_id`: the next text ids are the ones queued here (every
    other random id the node draws, for intros, device lists and keys, stays random)."""

    def __init__(self) -> None:
        self.ids: list[bytes] = []

    def __call__(self) -> bytes:
        return self.ids.pop(0) if self.ids else os.urandom(16)


async def test_an_id_reused_after_the_seen_record_was_pruned_is_a_duplicate(
        node_pair: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    alice, bob = node_pair
    fixed = _FixedIds()
    monkeypatch.setattr(node_module, "new_message_id", fixed)
    reused = os.urandom(16)
    fixed.ids.append(reused)
    with trio.fail_after(WAIT):
        first = await bob.send("alice", "first")
        assert first == reused.hex()
        assert await bob.wait_delivered(first, timeout=WAIT) == "delivered"
    # 60 days later: Alice's record of accepted ids forgot it (her history did not)
    with alice._db.transaction():
        assert alice._db.prune_seen(before_ms=2**62) >= 1
    # Bob's side (another implementation, say) forgets it sent that id, and uses it again
    bob._db._q("DELETE FROM messages WHERE id=? AND direction='out'", (reused,))
    fixed.ids.append(reused)
    with alice.events() as events, trio.fail_after(WAIT):
        again = await bob.send("alice", "the same id again")
        assert again == first
        # acknowledged as a duplicate: delivered for Bob, not shown to Alice, nothing crashed
        assert await bob.wait_delivered(again, timeout=WAIT) == "delivered"
        later = await bob.send("alice", "later")
        received = await next_event(events, MessageReceived)
    assert received.message_id == later
    assert [(h.message_id, h.text) for h in alice.history("bob")] == [
        (first, "first"), (later, "later")]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no traceback


# --- a receiver whose disk is full --------------------------------------------------------------


@pytest.mark.slow(seconds=2)
async def test_a_receiver_with_a_full_disk_asks_for_a_retry_and_gets_everything_later(
        tmp_path: Path, full_disk: FullDisk) -> None:
    async with open_node(tmp_path / "alice", "alice") as alice, \
            open_node(full_disk.path / "bob", "bob") as bob:
        await befriend(alice, bob, "alice")
        with bob.events() as events:
            full_disk.fill()
            ids = [await alice.send("bob", f"while full {i} " + "x" * 60_000) for i in range(3)]
            with trio.fail_after(WAIT):
                # Bob's node answers retry-later; Alice keeps the messages queued (not failed)
                while not any("cannot store" in (c.last_error or "")
                              for c in alice.status().contacts):
                    await trio.sleep(0.05)
            assert [alice.message_state(i) for i in ids] == ["sent"] * 3
            full_disk.free()
            with trio.fail_after(WAIT):
                got = [(await next_event(events, MessageReceived)).message_id for _ in ids]
                for i in ids:
                    assert await alice.wait_delivered(i, timeout=WAIT) == "delivered"
        assert got == ids
        assert [h.message_id for h in bob.history("alice")] == ids



# --- a sender whose disk is full ------------------------------------------------------------------


async def test_a_sender_with_a_full_disk_is_told_so_and_keeps_running(
        tmp_path: Path, full_disk: FullDisk) -> None:
    async with open_node(full_disk.path / "alice", "alice") as alice, \
            open_node(tmp_path / "bob", "bob") as bob:
        await befriend(alice, bob, "alice")
        full_disk.fill()
        with pytest.raises(StorageError) as caught:
            await alice.send_many("bob", ["x" * 60_000] * 6)
        assert caught.value.reason == "disk-full"
        assert "is full" in (alice.status().storage_error or "")
        assert alice.history("bob") == []  # nothing half-written
        full_disk.free()
        with bob.events() as events, trio.fail_after(WAIT):
            sent = await alice.send("bob", "after")  # the same node, still running
            assert await alice.wait_delivered(sent, timeout=WAIT) == "delivered"
            assert (await next_event(events, MessageReceived)).message_id == sent
        assert alice.status().storage_error is None


# --- a relay whose disk is full -------------------------------------------------------------------


async def test_a_relay_with_a_full_disk_answers_storage_full_and_recovers(
        full_disk: FullDisk) -> None:
    bob = DeviceKeyPair.generate()
    box = box_of(bob.public)
    async with running_relay(full_disk.path / "relay") as relay, peer() as alice_t, \
            peer(bob.to_bytes()) as bob_t, \
            client(bob_t, relay.peer_id, relay.addresses()) as inbox, \
            client(alice_t, relay.peer_id, relay.addresses()) as alice:
        assert await inbox.authenticate(bob) == box
        first = os.urandom(16)
        await alice.deposit(box, first, b"e" * 1000, ttl=3600)
        full_disk.fill()
        # a refusal with a code on the same stream, not a reset
        with pytest.raises(RelayRefused) as refused:
            await alice.deposit(box, os.urandom(16), b"e" * 200_000, ttl=3600)
        assert refused.value.code == STORAGE_FULL
        with pytest.raises(RelayRefused) as refused:
            await inbox.ack([first])  # deleting needs room in the WAL too
        assert refused.value.code == STORAGE_FULL
        status = relay.relay.status()
        assert status["storage_error"]["reason"] == "disk-full"
        assert status["messages"] == 1
        items, _ = await inbox.fetch()
        assert [i.id for i in items] == [first]  # still held
        full_disk.free()
        second = os.urandom(16)
        await alice.deposit(box, second, b"e" * 200_000, ttl=3600)
        await inbox.ack([first])
        items, _ = await inbox.fetch()
        assert [i.id for i in items] == [second]
        assert relay.relay.status()["storage_error"] is None


@pytest.mark.slow(seconds=2)
async def test_an_id_reused_after_pruning_through_a_relay_is_a_duplicate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The same through a relay (where the crash came back on every restart while the relay held
    the envelope): the relay's copy is acknowledged and forgotten, nothing is shown twice."""
    fixed = _FixedIds()
    monkeypatch.setattr(node_module, "new_message_id", fixed)
    reused = os.urandom(16)
    async with relay(tmp_path / "r1") as r1:
        relays = (address(r1),)
        async with open_node(tmp_path / "alice", "alice", relays=relays) as alice, \
                open_node(tmp_path / "bob", "bob", relays=relays) as bob:
            await befriend(bob, alice, "bob")
            _close_direct_path(alice, "bob")
            _close_direct_path(bob, "alice")
            await alice._disconnect_quietly(bob.peer_id)
            with bob.events() as events, trio.fail_after(WAIT * 2):
                fixed.ids.append(reused)
                first = await alice.send("bob", "first")
                assert (await next_event(events, MessageReceived)).message_id == first
                assert await alice.wait_delivered(first, timeout=WAIT) == "delivered"  # receipt
                with bob._db.transaction():
                    assert bob._db.prune_seen(before_ms=2**62) >= 1
                alice._db._q("DELETE FROM messages WHERE id=? AND direction='out'", (reused,))
                fixed.ids.append(reused)
                assert await alice.send("bob", "the same id again") == first
                while alice.message_state(first) != "relayed":
                    await trio.sleep(0.05)
                while r1.relay.status()["messages"]:  # Bob took it off the relay...
                    await trio.sleep(0.05)
                later = await alice.send("bob", "later")
                assert (await next_event(events, MessageReceived)).message_id == later
            # ... and showed it never
            assert [h.text for h in bob.history("alice")] == ["first", "later"]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no traceback


def test_a_read_only_file_system_is_reported_as_read_only_not_damaged(
        full_disk: FullDisk, tmp_path: Path) -> None:
    path = full_disk.path / "pigeon.db"
    db = Database.open(path, create=True)
    with db.transaction():
        db.add_contact("bob", b"b" * 32, now_ms=1)
    db.close()
    view = tmp_path / "read-only"  # the same files, through a read-only bind mount
    view.mkdir()
    subprocess.run(["mount", "--bind", str(full_disk.path), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        with pytest.raises(DataDirError) as refused:
            Database.open(view / "pigeon.db")
        assert "cannot be written" in str(refused.value), refused.value
        assert "damaged" not in str(refused.value)
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)
    db = Database.open(path)  # nothing was damaged
    try:
        assert [c.name for c in db.contacts()] == ["bob"]
    finally:
        db.close()
