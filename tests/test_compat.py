"""Data directories made before the packages-by-role move (commit 0db4def) open and keep working.

tests/fixtures/layout_0db4def/ holds what that commit's code wrote (its README says how it was
made): the database schemas as SQL text, every row of two devices' databases and of a relay's,
and the key files. The directories are rebuilt here with plain sqlite3 and the key-file format of
that commit (not with today's code, which is what is under test), then opened with today's
`Node.open` and `open_relay` on 127.0.0.1.

Today's code must also still create exactly the frozen schema, with the migrations added since
(node/device/storage.py MIGRATIONS from version 2) applied: a change to it needs a migration
(node/device/storage.py MIGRATIONS, node/relay/store.py), and this test says so.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import cbor2
import nacl.signing
import pytest
import trio

from node import MessageReceived, init_data_dir
from node.clock import ManualClock
from node.device.storage import SCHEMA_VERSION as DEVICE_SCHEMA_VERSION
from node.device.storage import Database
from node.protocol.binding import verify_binding
from node.protocol.keys import DeviceKey, IdentityKey
from node.protocol.sealed import unseal
from node.relay.store import SCHEMA_VERSION as RELAY_SCHEMA_VERSION
from node.relay.store import RelayStore, StoreLimits
from node.testing import Party
from tests.conftest import WAIT, befriend, next_event, open_node
from tests.relaytools import box_of, client, peer, running_relay

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "layout_0db4def"
KEYS: dict[str, dict[str, str]] = json.loads((FIXTURES / "key_files.json").read_text())

#: The relay message of relay.sql (see the fixture's README).
RELAY_MESSAGE_ID = bytes(range(16))
RELAY_MESSAGE_TEXT = b"kept by the relay across the move"


def old_key_file(kind: str, seed: bytes) -> bytes:
    """A key file as commit 0db4def wrote it (node/datadir.py there): CBOR {"v": 1, "kind",
    "seed", "public"}, the Ed25519 public key of the seed doubling as a checksum."""
    public = nacl.signing.SigningKey(seed).verify_key.encode()
    return cbor2.dumps({"v": 1, "kind": kind, "seed": seed, "public": public})


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _build_database(path: Path, schema: str, rows: str) -> None:
    """The database file as that commit left it: owner-only, WAL, the schema and its rows."""
    _write_private(path, b"")
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(f"BEGIN;\n{schema}\n{rows}\nCOMMIT;")
    finally:
        conn.close()


def build_device_dir(path: Path, name: str) -> Path:
    """`name`'s data directory (alice or bob) as commit 0db4def made it."""
    path.mkdir(mode=0o700)
    keys = KEYS[name]
    for kind in ("identity", "device"):
        _write_private(path / f"{kind}.key", old_key_file(kind, bytes.fromhex(keys[f"{kind}_seed"])))
    _build_database(path / "pigeon.db", (FIXTURES / "device_schema.sql").read_text(),
                    (FIXTURES / f"{name}.sql").read_text())
    # The ports the fixture's processes had are not part of the layout: forget them. Every run of
    # this test has the same identities, so two runs side by side would otherwise listen on, and
    # dial, the same remembered ports, and reach each other's nodes (which the Noise handshake
    # accepts: they have the right keys).
    conn = sqlite3.connect(path / "pigeon.db")
    try:
        with conn:
            conn.execute("UPDATE devices SET addrs = '[]'")
            conn.execute("DELETE FROM meta WHERE key = 'listen_bound'")
    finally:
        conn.close()
    return path


def build_relay_dir(path: Path) -> Path:
    """A relay's data directory as commit 0db4def made it, holding one envelope for dave."""
    path.mkdir(mode=0o700)
    _write_private(path / "relay.key", old_key_file("relay", bytes.fromhex(KEYS["relay"]["relay_seed"])))
    _build_database(path / "relay.db", (FIXTURES / "relay_schema.sql").read_text(),
                    (FIXTURES / "relay.sql").read_text())
    return path


def schema_of(path: Path) -> dict[tuple[str, str], str | None]:
    """{(type, name): its CREATE statement without comments and with spaces folded}: what a
    schema is, regardless of how its text was laid out."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
    finally:
        conn.close()
    return {(kind, name): None if sql is None else " ".join(re.sub(r"--[^\n]*", "", sql).split())
            for kind, name, sql in rows}


def _meta(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()


# --- the fixture is what that commit wrote ---------------------------------------------------------


@pytest.mark.parametrize(("name", "file", "kind"), [
    ("alice", "identity.key", "identity"), ("alice", "device.key", "device"),
    ("bob", "identity.key", "identity"), ("bob", "device.key", "device"),
    ("relay", "relay.key", "relay")])
def test_key_files_are_rebuilt_byte_for_byte(name: str, file: str, kind: str) -> None:
    seed = bytes.fromhex(KEYS[name][f"{kind}_seed"])
    assert old_key_file(kind, seed) == bytes.fromhex(KEYS[name][f"{file}_hex"])


# --- today's code writes the same schema ----------------------------------------------------------


#: The version the frozen schemas are (as their databases record it).
FROZEN_VERSION = "INSERT INTO meta VALUES('schema_version', 1);"


def test_init_data_dir_writes_the_frozen_device_schema(tmp_path: Path) -> None:
    # The frozen first schema plus today's later migrations is today's schema: the first
    # migration was never edited, and later ones only add to it.
    frozen = tmp_path / "frozen.db"
    _build_database(frozen, (FIXTURES / "device_schema.sql").read_text(), FROZEN_VERSION)
    Database.open(frozen).close()  # today's migrations take it to today's version
    init_data_dir(tmp_path / "today")
    today = tmp_path / "today" / "pigeon.db"
    assert schema_of(today) == schema_of(frozen), (
        "the device database schema changed other than by a new migration "
        "(node/device/storage.py): never edit a migration that shipped")
    assert _meta(today)["schema_version"] == _meta(frozen)["schema_version"] == \
        DEVICE_SCHEMA_VERSION


def test_relay_store_writes_the_frozen_relay_schema(tmp_path: Path) -> None:
    frozen = tmp_path / "frozen.db"
    _build_database(frozen, (FIXTURES / "relay_schema.sql").read_text(), FROZEN_VERSION)
    today = tmp_path / "today.db"
    limits = StoreLimits(mailbox_max_messages=10, mailbox_max_bytes=10_000,
                         storage_max_bytes=100_000)
    RelayStore.open(frozen, limits).close()  # today's migrations take it to today's version
    RelayStore.open(today, limits).close()
    assert schema_of(today) == schema_of(frozen), (
        "the relay database schema changed other than by a new migration "
        "(node/relay/store.py): never edit a migration that shipped")
    assert _meta(today)["schema_version"] == _meta(frozen)["schema_version"] == \
        RELAY_SCHEMA_VERSION


# --- old directories open and keep working -------------------------------------------------------


async def test_device_dirs_from_before_the_move_keep_working(tmp_path: Path) -> None:
    alice_dir = build_device_dir(tmp_path / "alice", "alice")
    bob_dir = build_device_dir(tmp_path / "bob", "bob")
    async with open_node(alice_dir, "alice") as alice, open_node(bob_dir, "bob") as bob:
        # the same identities
        assert (alice.account_id, alice.peer_id) == (KEYS["alice"]["account_id"],
                                                     KEYS["alice"]["peer_id"])
        assert (bob.account_id, bob.peer_id) == (KEYS["bob"]["account_id"], KEYS["bob"]["peer_id"])
        # the same contacts and history
        assert [(c.name, c.account_id) for c in alice.contacts()] == [("bob", bob.account_id)]
        assert [(c.name, c.account_id) for c in bob.contacts()] == [("alice", alice.account_id)]
        before = [("out", "hello bob, from before the move", "delivered"),
                  ("in", "hello alice, this was stored by the old layout", "received")]
        assert [(h.direction, h.text, h.state) for h in alice.history("bob")] == before
        assert alice.safety_number("bob") == bob.safety_number("alice")

        # The conversation goes on in the sessions stored before the move. Both listen on fresh
        # ports if their old ones are taken: re-adding from an invite refreshes the addresses
        # and, as the session exists, starts no new one.
        alice.add_contact("bob", bob.invite())
        bob.add_contact("alice", alice.invite())
        with bob.events() as events, trio.fail_after(WAIT):
            message_id = await alice.send("bob", "hello bob, after the move")
            assert await alice.wait_delivered(message_id, timeout=WAIT) == "delivered"
            received = await next_event(events, MessageReceived)
        assert (received.contact, received.text) == ("alice", "hello bob, after the move")
        with trio.fail_after(WAIT):
            message_id = await bob.send("alice", "still here")
            assert await bob.wait_delivered(message_id, timeout=WAIT) == "delivered"
        assert [h.text for h in alice.history("bob")][-2:] == ["hello bob, after the move",
                                                               "still here"]

        # and a device that never saw the old layout becomes a contact and talks to it
        async with open_node(tmp_path / "carol", "carol") as carol:
            added = await befriend(alice, carol, "alice")
            assert added.contact == "carol"
            with trio.fail_after(WAIT):
                message_id = await carol.send("alice", "hi from a new device")
                assert await carol.wait_delivered(message_id, timeout=WAIT) == "delivered"
                message_id = await alice.send("carol", "welcome")
                assert await alice.wait_delivered(message_id, timeout=WAIT) == "delivered"
            assert [h.text for h in alice.history("carol")] == ["hi from a new device", "welcome"]
            assert [h.text for h in carol.history("alice")] == ["hi from a new device", "welcome"]

    # The old sessions were used, not replaced: a new session with Bob would have queued an
    # introduction in Alice's database (node/device/node.py `_adopt`). The one intro there is
    # the one that gives Bob Alice's deposit capability, queued once after the upgrade
    # (`_offer_caps`, PROTOCOL.md section 21).
    conn = sqlite3.connect(alice_dir / "pigeon.db")
    try:
        intros = conn.execute(
            "SELECT count(*) FROM messages m JOIN contacts c ON c.id = m.contact_id "
            "WHERE c.name = 'bob' AND m.kind = 'intro'").fetchone()[0]
        # Bob's device, stored before bindings existed, is now proven: his invite carried its
        # binding, made by his upgraded device (PROTOCOL.md section 4 "Binding").
        (binding,) = conn.execute("SELECT binding FROM devices").fetchone()
    finally:
        conn.close()
    assert intros == 1
    verify_binding(DeviceKey.from_peer_id(KEYS["bob"]["peer_id"]),
                   IdentityKey.from_account_id(KEYS["bob"]["account_id"]), binding)


async def test_relay_dir_from_before_the_move_keeps_working(tmp_path: Path) -> None:
    directory = build_relay_dir(tmp_path / "relay")
    carol, dave = Party.create("carol"), Party.create("dave")  # as when the envelope was made
    async with running_relay(directory, clock=ManualClock(start_ms=1_800_000_000_000)) as relay, peer() as t:
        assert relay.peer_id == KEYS["relay"]["peer_id"]
        assert relay.relay.status()["messages"] == 1
        async with client(t, relay.peer_id, relay.addresses()) as inbox:
            await inbox.authenticate(dave.device)
            items, more = await inbox.fetch()
            assert not more
            assert [item.id for item in items] == [RELAY_MESSAGE_ID]
            content = unseal(dave.device, items[0].env)
            assert content.sender == carol.identity.public
            assert dave.decrypt(carol, content.message) == RELAY_MESSAGE_TEXT
            await inbox.ack([RELAY_MESSAGE_ID])
            # and it takes new deposits after the old one
            await inbox.deposit(box_of(dave.device.public), bytes(16), b"a new envelope")
            items, _ = await inbox.fetch(after=items[0].seq)
            assert [(item.id, item.env) for item in items] == [(bytes(16), b"a new envelope")]
        assert relay.relay.status()["messages"] == 1
