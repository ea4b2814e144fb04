"""node/files.py, the files the device and the relay share: schema migrations, key files and the
directory lock, on real SQLite files and real keys in tmp_path, through both users of each."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from node.device.datadir import DataDir
from node.device.storage import Database
from node.errors import DataDirError, DataDirLocked
from node.files import load_or_create_key_file, open_database
from node.protocol.keys import DeviceKeyPair
from node.relay.datadir import RelayDir
from node.relay.store import SCHEMA_VERSION as RELAY_SCHEMA_VERSION
from node.relay.store import RelayStore, StoreLimits

V1 = {1: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
    CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL);  -- a comment; with a semicolon
"""}
LIMITS = StoreLimits(mailbox_max_messages=10, mailbox_max_bytes=10_000, storage_max_bytes=100_000)


def _open(path: Path, migrations: dict[int, str]) -> sqlite3.Connection:
    return open_database(path, what="test database", schema_version=max(migrations),
                         migrations=migrations, synchronous="NORMAL", load=lambda conn: conn)


def _version(path: Path) -> int:
    with sqlite3.connect(path) as raw:
        return int(raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])


# --- schema migrations ---------------------------------------------------------------------------


def test_an_older_database_is_migrated_once_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    conn = _open(path, V1)
    conn.execute("INSERT INTO notes(text) VALUES ('kept')")
    conn.close()
    v2 = {**V1, 2: "ALTER TABLE notes ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0"}
    conn = _open(path, v2)
    assert conn.execute("SELECT text, pinned FROM notes").fetchall() == [("kept", 0)]
    conn.close()
    assert _version(path) == 2
    _open(path, v2).close()  # migration 2 is not run again (ADD COLUMN twice would fail)


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    _open(path, V1).close()
    broken = {**V1, 2: "CREATE TABLE tags (id INTEGER); CREATE TABLE notes (id INTEGER)"}
    with pytest.raises(DataDirError, match=f"{path} is damaged or not a test database"):
        _open(path, broken)
    assert _version(path) == 1
    with sqlite3.connect(path) as raw:  # rolled back: the first statement of 2 left nothing
        assert raw.execute("SELECT name FROM sqlite_master WHERE name='tags'").fetchone() is None


def test_the_relay_refuses_a_database_from_a_newer_pigeon(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    RelayStore.open(path, LIMITS).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE meta SET value=? WHERE key='schema_version'", (RELAY_SCHEMA_VERSION + 1,))
    with pytest.raises(DataDirError, match=f"newer Pigeon .*schema {RELAY_SCHEMA_VERSION + 1}"):
        RelayStore.open(path, LIMITS)
    assert _version(path) == RELAY_SCHEMA_VERSION + 1  # refused, not altered


def test_a_device_database_is_not_a_relay_database(tmp_path: Path) -> None:
    """Same `meta` table and version, other tables: what the relay reads on opening fails, and
    that is reported as the file being the wrong one, not as an sqlite3 error."""
    path = tmp_path / "pigeon.db"
    Database.open(path, durability="normal", create=True).close()
    # The two schemas move on separately: give the device file the relay's version, so that
    # the version check passes and the tables are what tells them apart.
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (RELAY_SCHEMA_VERSION,))
    conn.close()
    with pytest.raises(DataDirError, match=f"{path} is damaged or not a Pigeon relay database"):
        RelayStore.open(path, LIMITS)


def test_tables_of_another_program_are_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    with pytest.raises(DataDirError, match="not a Pigeon relay database"):
        RelayStore.open(path, LIMITS)
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT name FROM sqlite_master").fetchall() == [("photos",)]


# --- key files -----------------------------------------------------------------------------------


def test_a_relay_key_is_created_once_then_loaded(tmp_path: Path) -> None:
    directory = RelayDir(tmp_path / "relay")
    directory.path.mkdir()
    first = directory.load_or_create_key()
    assert stat.S_IMODE(directory.key_file.stat().st_mode) == 0o600
    assert directory.load_or_create_key().public == first.public


def test_a_key_file_of_another_kind_is_refused(tmp_path: Path) -> None:
    DataDir(tmp_path / "d").create_keys()
    device_file = DataDir(tmp_path / "d").device_file
    with pytest.raises(DataDirError, match="holds the device key, not the relay key"):
        load_or_create_key_file(device_file, "relay", DeviceKeyPair)


# --- the directory lock ----------------------------------------------------------------------------


def test_a_relay_directory_is_held_by_one_relay(tmp_path: Path) -> None:
    first, second = RelayDir(tmp_path / "r"), RelayDir(tmp_path / "r")
    first.lock()
    try:
        with pytest.raises(DataDirLocked, match=r"in use by another pigeon relay \(pid \d+\); stop"):
            second.lock()
    finally:
        first.unlock()
    second.lock()  # released: now it can
    second.unlock()
