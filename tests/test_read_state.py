"""Read state of incoming messages, kept alike on an account's devices (PROTOCOL.md section 25.6,
`read`): real nodes on loopback, a second device of the account made by tests/devicetools.py,
and the storage rules on a real SQLite file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from node import MessagesRead, Node
from node.device import outbound as outbound_module
from node.device.control import LocalClient
from node.device.storage import MIGRATIONS, Contact, Database, NewMessage
from node.errors import ContactError, InvalidMessage
from node.files import open_database
from node.protocol import codec
from node.protocol.content import PAD_BLOCK
from node.rpc import INVALID_PARAMS, RpcError
from tests.conftest import WAIT, befriend, next_event, open_node
from tests.devicetools import open_linked
from tests.mediatools import random_file


async def wait_until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll `check()` (a cheap read of a node's store) until it is true, within WAIT."""
    with trio.fail_after(WAIT):
        while not check():
            await trio.sleep(0.02)


def read_flags(node: Node, contact: str) -> list[tuple[str, bool | None]]:
    """(text, read) of the incoming texts and files (their caption) with `contact`, in
    history order."""
    return [(e.text, e.read) for e in node.history(contact, limit=1000)
            if e.direction == "in" and e.kind in ("text", "file")]


def unread(node: Node, contact: str) -> tuple[int, int]:
    """The unread count as `contact()` and as `status()` show it."""
    (status,) = [c for c in node.status().contacts if c.name == contact]
    return node.contact(contact).unread, status.unread


async def settled(node: Node, peer: Node) -> None:
    """Everything `node` queued for the device `peer` was acknowledged (or refused)."""
    key = peer._device.public.to_bytes()
    await wait_until(lambda: not node._db.outbox_for(key, limit=1), "the outbox drained")


async def three_from_bob(a1: Node, a2: Node, b1: Node) -> list[str]:
    ids = [await b1.send("alice", f"m{i}") for i in range(3)]
    for device in (a1, a2):
        await wait_until(lambda d=device: len(read_flags(d, "bob")) == 3, "both got them")
    return ids


async def test_reading_on_one_device_shows_read_on_the_other(tmp_path: Path) -> None:
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        async with open_linked(a1, tmp_path / "a2", "alice") as a2:
            ids = await three_from_bob(a1, a2, b1)
            assert read_flags(a2, "bob") == [("m0", False), ("m1", False), ("m2", False)]
            assert unread(a1, "bob") == unread(a2, "bob") == (3, 3)
            # Our own messages carry no read state.
            await a1.send("bob", "mine")
            assert [e.read for e in a1.history("bob") if e.direction == "out"] == [None]

            with a1.events() as on_a1, a2.events() as on_a2:
                assert a1.mark_read("bob", up_to=ids[1]) == 2
                with trio.fail_after(WAIT):
                    here = await next_event(on_a1, MessagesRead)
                    there = await next_event(on_a2, MessagesRead)
            assert (here.contact, here.count) == (there.contact, there.count) == ("bob", 2)
            for device in (a1, a2):
                assert read_flags(device, "bob") == [("m0", True), ("m1", True), ("m2", False)]
                assert unread(device, "bob") == (1, 1)

            # And the other way, all so far: the first device follows.
            with a1.events() as on_a1:
                assert a2.mark_read("bob") == 1
                with trio.fail_after(WAIT):
                    assert (await next_event(on_a1, MessagesRead)).count == 1
            assert unread(a1, "bob") == unread(a2, "bob") == (0, 0)
            # Nothing new to read: nothing becomes read, and no sync is queued.
            own = a2._account_devices.own
            before = a2._db._q("SELECT count(*) FROM messages WHERE contact_id=?", (own.id,))
            assert a2.mark_read("bob") == 0 and a2.mark_read("bob", up_to=ids[0]) == 0
            assert a2._db._q("SELECT count(*) FROM messages WHERE contact_id=?",
                             (own.id,)) == before


async def test_a_received_file_counts_as_unread_until_read(tmp_path: Path) -> None:
    """A file message is news like a text: it counts in the unread counts of every device of
    the account, shows unread in the history, and reading up to it (here, on the other
    device) marks it read everywhere."""
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        async with open_linked(a1, tmp_path / "a2", "alice") as a2:
            source = tmp_path / "photo.bin"
            random_file(source, 1000)
            first = await b1.send("alice", "look")
            sent = await b1.send_file("alice", source, caption="the file")
            for device in (a1, a2):
                await wait_until(lambda d=device: len(read_flags(d, "bob")) == 2, "both got them")
                assert read_flags(device, "bob") == [("look", False), ("the file", False)]
                assert unread(device, "bob") == (2, 2)
            # Reading up to the text leaves the file unread; reading up to the file reads it.
            assert a2.mark_read("bob", up_to=first) == 1
            assert a2.mark_read("bob", up_to=sent) == 1
            for device in (a1, a2):
                await wait_until(lambda d=device: unread(d, "bob") == (0, 0), "read everywhere")
                assert read_flags(device, "bob") == [("look", True), ("the file", True)]
            assert a1.mark_read("bob") == 0


async def test_a_late_older_read_sync_makes_nothing_unread(tmp_path: Path) -> None:
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        async with open_linked(a1, tmp_path / "a2", "alice") as a2:
            ids = await three_from_bob(a1, a2, b1)
            newest = a1.history("bob")[-1]
            assert a1.mark_read("bob") == 3
            await wait_until(lambda: unread(a2, "bob") == (0, 0), "A2 follows")
            # An older read (up to the first message) comes after the newer one.
            first = a1._db.newest_incoming(a1._db.contact_by_name("bob"),  # type: ignore[arg-type]
                                           bytes.fromhex(ids[0]))
            assert first is not None and first.sent_at_ms < newest.sent_at_ms
            with a2.events() as on_a2:
                contact = a1._db.contact_by_name("bob")
                assert contact is not None
                a1._sync_own("read", contact, read=(first.id, first.sent_at_ms))
                await settled(a1, a2)
                # A later message from Bob is still news on both devices.
                later = await b1.send("alice", "m3")
                await wait_until(lambda: len(read_flags(a2, "bob")) == 4, "m3 arrives")
                await wait_until(lambda: len(read_flags(a1, "bob")) == 4, "m3 arrives")
                assert read_flags(a2, "bob") == [("m0", True), ("m1", True), ("m2", True),
                                                 ("m3", False)]
                assert unread(a1, "bob") == unread(a2, "bob") == (1, 1)
                # Nothing was announced as read on A2 (m3 came as a MessageReceived only).
                drained = []
                while (event := on_a2.get_nowait()) is not None:
                    drained.append(event)
                assert drained and not any(isinstance(e, MessagesRead) for e in drained)
            assert a2.mark_read("bob", up_to=later) == 1


async def test_bad_and_unknown_read_syncs_are_refused_and_the_node_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read syncs with bad fields reach the other device as real encrypted messages (the lane's
    encoding is replaced for them only): each is refused as malformed, a sync for an account
    the device does not know is dropped, and a good one afterwards still works."""
    crafted: dict[bytes, dict[str, Any]] = {}
    encoded = outbound_module.Lane._encoded

    def encode(lane: Any, row: Any) -> bytes:
        if row.message_id not in crafted:
            return encoded(lane, row)
        body = codec.encode({"v": 1, "t": "sync", "id": row.message_id, "ts": row.sent_at_ms,
                             **crafted[row.message_id]})
        return body + b"\x80" + bytes(-(len(body) + 1) % PAD_BLOCK)

    monkeypatch.setattr(outbound_module.Lane, "_encoded", encode)
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        async with open_linked(a1, tmp_path / "a2", "alice") as a2:
            await three_from_bob(a1, a2, b1)
            bob = b1._identity.public.to_bytes()
            good = {"op": "read", "ik": bob, "name": "", "devices": [],
                    "mid": os.urandom(16), "mts": 2**40}
            bad: list[dict[str, Any]] = [
                {**good, "mid": os.urandom(4000)},          # a huge id
                {**good, "mid": "7a" * 16},                 # an id of the wrong type
                {**good, "mts": True}, {**good, "mts": -1}, {**good, "mts": 2**64},
                {**good, "mts": [1, 2]}, {**good, "ik": bob[:31]},
                {k: v for k, v in good.items() if k != "mid"},
                {**good, "name": "bob"}, {**good, "op": "contact-rename", "name": "x"},
                {**good, "op": "read" * 100},
            ]
            own = a1._account_devices.own
            a2_key = a2._device.public.to_bytes()
            for fields in bad:
                message_id = os.urandom(16)
                crafted[message_id] = fields
                a1._db.insert_outgoing(
                    contact=own, messages=[(message_id, "sync", json.dumps({}),
                                            a1._next_timestamp())],
                    devices=[a2_key], now_ms=a1._clock.now_ms())
            a1._outbound.kick(a2_key)
            await settled(a1, a2)
            failed = a1._db._q("SELECT count(*) FROM messages WHERE contact_id=? AND"
                               " state='failed' AND error LIKE '%malformed%'", (own.id,))
            assert failed == [(len(bad),)]
            # A read of an account this device has no conversation with: acked and dropped.
            stranger = Contact(0, "", os.urandom(32), 0)
            a1._sync_own("read", stranger, read=(os.urandom(16), 2**40))
            await settled(a1, a2)
            assert unread(a2, "bob") == (3, 3)
            # The device goes on: a good read still arrives and applies.
            assert a1.mark_read("bob") == 3
            await wait_until(lambda: unread(a2, "bob") == (0, 0), "a good read applies")


async def test_mark_read_refuses_what_is_not_an_incoming_message(tmp_path: Path) -> None:
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        mine = await a1.send("bob", "hello")
        for up_to in ("zz", "00" * 15, "00" * 16, mine):
            with pytest.raises(InvalidMessage):
                a1.mark_read("bob", up_to=up_to)
        with pytest.raises(ContactError):
            a1.mark_read("nobody")
        assert a1.mark_read("bob") == 0  # nothing received yet
        # The control API: a wrong type is refused as invalid params, null means all.
        client = LocalClient(a1)
        for bad in (5, ["x"], {"id": mine}):
            with pytest.raises(RpcError) as refused:
                await client.call("read", {"contact": "bob", "up_to": bad})
            assert refused.value.code == INVALID_PARAMS
        assert await client.call("read", {"contact": "bob", "up_to": None}) == {
            "contact": "bob", "read": 0, "unread": 0}


# --- storage: the read mark, on a real database ---------------------------------------------------


def _arrive_and_mark(db: Database, bob: Contact, *, message_first: bool) -> None:
    """An older message arrives and the read mark rises past it, in the order given."""
    late: NewMessage = (os.urandom(16), "text", "late", 100)
    for arrive in ((True, False) if message_first else (False, True)):
        with db.transaction():
            if arrive:
                db.insert_incoming(contact=bob, messages=[late], received_at_ms=6)
            else:
                db.mark_read(bob, up_to_ms=200, now_ms=7)


def test_the_read_mark_gives_the_same_state_whichever_comes_first(tmp_path: Path) -> None:
    """A message older than the read mark is filed as read when it arrives after the mark rose,
    and is marked read when the mark rises after it arrived: the same end state."""
    results = []
    for message_first in (True, False):
        db = Database.open(tmp_path / f"{message_first}.db", durability="normal", create=True)
        try:
            bob = db.add_contact("bob", b"\x0b" * 32, now_ms=1)
            newer: NewMessage = (os.urandom(16), "text", "newer", 300)
            with db.transaction():
                db.insert_incoming(contact=bob, messages=[newer], received_at_ms=5)
            _arrive_and_mark(db, bob, message_first=message_first)
            rows = db.history(bob)
            results.append([(r.body, r.read_at_ms is not None) for r in rows])
            assert db.unread_counts() == {bob.id: 1}
            # A lower mark changes nothing and does not rise.
            assert db.mark_read(bob, up_to_ms=150, now_ms=8) == (0, False)
            assert db.mark_read(bob, up_to_ms=300, now_ms=9) == (1, True)
            assert db.unread_counts() == {}
        finally:
            db.close()
    assert results[0] == results[1] == [("late", True), ("newer", False)]


def test_a_file_older_than_the_read_mark_arrives_read(tmp_path: Path) -> None:
    """The read mark covers files as it covers texts, whichever came first."""
    db = Database.open(tmp_path / "files.db", durability="normal", create=True)
    try:
        bob = db.add_contact("bob", b"\x0b" * 32, now_ms=1)
        with db.transaction():
            db.insert_incoming(contact=bob, messages=[(os.urandom(16), "file", "new", 300)],
                               received_at_ms=5)
        assert db.unread_counts() == {bob.id: 1}
        with db.transaction():
            assert db.mark_read(bob, up_to_ms=200, now_ms=6) == (0, True)
            db.insert_incoming(contact=bob, messages=[(os.urandom(16), "file", "late", 100)],
                               received_at_ms=7)
        assert [(r.body, r.read_at_ms is not None)
                for r in db.history(bob, kinds=("text", "file"))] == [("late", True),
                                                                      ("new", False)]
        assert db.mark_read(bob, up_to_ms=300, now_ms=8) == (1, True)
        assert db.unread_counts() == {}
    finally:
        db.close()


def test_files_received_before_they_counted_are_read(tmp_path: Path) -> None:
    """A database from before files counted as unread: the files it holds count as read after
    the migration (they were shown long ago), and only files that arrive later are news."""
    path = tmp_path / "old.db"
    before = max(n for n, script in MIGRATIONS.items() if "messages_unread" in script) - 1
    old = open_database(path, what="test database", schema_version=before,
                        migrations={n: s for n, s in MIGRATIONS.items() if n <= before},
                        synchronous="NORMAL", load=lambda conn: conn)
    with old:
        old.execute("INSERT INTO contacts(name, account, added_at) VALUES ('bob', ?, 1)",
                    (b"\x0b" * 32,))
        old.execute("INSERT INTO messages(id, contact_id, direction, kind, body, sent_at,"
                    " received_at, state, updated_at) VALUES (?, 1, 'in', 'file', 'old', 5, 6,"
                    " 'received', 6)", (os.urandom(16),))
    old.close()
    db = Database.open(path)
    try:
        bob = db.contact_by_name("bob")
        assert bob is not None and db.unread_counts() == {}
        with db.transaction():
            db.insert_incoming(contact=bob, messages=[(os.urandom(16), "file", "new", 7)],
                               received_at_ms=8)
        assert [(r.body, r.read_at_ms) for r in db.history(bob, kinds=("text", "file"))] == [
            ("old", 6), ("new", None)]
        assert db.unread_counts() == {bob.id: 1}
    finally:
        db.close()


def test_messages_from_before_read_state_count_as_read(tmp_path: Path) -> None:
    """A database from before the read state: its incoming messages are read after the
    migration, and only what arrives later is news."""
    path = tmp_path / "old.db"
    before = max(n for n, script in MIGRATIONS.items() if "ADD COLUMN read_at" in script) - 1
    old = open_database(path, what="test database", schema_version=before,
                        migrations={n: s for n, s in MIGRATIONS.items() if n <= before},
                        synchronous="NORMAL", load=lambda conn: conn)
    with old:
        old.execute("INSERT INTO contacts(name, account, added_at) VALUES ('bob', ?, 1)",
                    (b"\x0b" * 32,))
        old.execute("INSERT INTO messages(id, contact_id, direction, kind, body, sent_at,"
                    " received_at, state, updated_at) VALUES (?, 1, 'in', 'text', 'old', 5, 6,"
                    " 'received', 6)", (os.urandom(16),))
    old.close()
    db = Database.open(path)
    try:
        bob = db.contact_by_name("bob")
        assert bob is not None and db.unread_counts() == {}
        with db.transaction():
            db.insert_incoming(contact=bob, messages=[(os.urandom(16), "text", "new", 7)],
                               received_at_ms=8)
        assert [(r.body, r.read_at_ms) for r in db.history(bob)] == [("old", 6), ("new", None)]
        # Messages copied from another device by the history transfer come as read too.
        with db.transaction():
            db.insert_history([(bob.id, os.urandom(16), "in", "copied", 1, 2, "received")],
                              now_ms=9)
        assert db.unread_counts() == {bob.id: 1}
    finally:
        db.close()
