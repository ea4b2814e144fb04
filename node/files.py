"""Files every Pigeon process keeps in its own directory, the device's and the relay's alike:
the lock that keeps a second process out, key files, and SQLite databases.

A key file is CBOR {"v": 1, "kind": "identity"|"device", "seed": bstr .size 32,
"public": bstr .size 32}: the public key doubles as a checksum, so a damaged file is reported as
damaged instead of silently becoming another identity.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from node.errors import DataDirError, DataDirLocked, NodeError
from node.protocol import codec
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair

__all__ = ["lock_directory", "open_sqlite", "read_key_file", "unlock_directory", "write_key_file"]

KEY_FILE_VERSION: Final = 1


def lock_directory(directory: Path, lock_file: Path, *, holder: str, hint: str) -> int:
    """Create `directory` (mode 0700) and take an exclusive flock on `lock_file` in it, writing
    our pid there; returns the descriptor to pass to `unlock_directory`. DataDirLocked ("in use
    by another `holder` (pid N)`hint`") if another process holds it: the lock dies with its
    process, so a crash never leaves the directory locked."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = os.read(fd, 32).decode(errors="replace").strip()
        finally:
            os.close(fd)
        pid = f" (pid {owner})" if owner.isdigit() else ""
        raise DataDirLocked(f"{directory} is in use by another {holder}{pid}{hint}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def unlock_directory(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_key_file(path: Path, kind: str, seed: bytes, public: bytes) -> None:
    """Atomically create `path` (mode 0600) holding the key; refuses to overwrite."""
    data = codec.encode({"v": KEY_FILE_VERSION, "kind": kind, "seed": seed, "public": public})
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if `path` exists: never rewrite a key
    finally:
        os.unlink(tmp)
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_key_file(path: Path, kind: str) -> bytes:
    """The seed in a key file, after checking its mode, format and checksum."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataDirError(f"{path} is missing") from None
    except OSError as exc:
        raise DataDirError(f"cannot read {path}: {exc.strerror}") from exc
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise DataDirError(
            f"{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`"
        )
    try:
        f = codec.decode_map(data, limit=1024, what=f"{kind} key file", version=KEY_FILE_VERSION)
        found = f.text("kind", max_size=16)
        seed = f.bytes("seed", 32)
        public = f.bytes("public", 32)
        f.done()
    except NodeError as exc:
        raise DataDirError(f"{path} is damaged ({exc}); restore it from a backup") from exc
    if found != kind:
        raise DataDirError(f"{path} holds the {found} key, not the {kind} key (files swapped?)")
    pair = (IdentityKeyPair if kind == "identity" else DeviceKeyPair).from_bytes(seed)
    if pair.public.to_bytes() != public:
        raise DataDirError(f"{path} is damaged (its key does not match its checksum)")
    return seed


def open_sqlite(path: Path, *, synchronous: str, pragmas: Sequence[str] = ()) -> sqlite3.Connection:
    """Open an SQLite file the way every Pigeon database is opened (the node's, the relay's):
    created owner-only, WAL, the given synchronous mode and `pragmas`, and a quick integrity
    check. DataDirError if the file cannot be created or opened; sqlite3.DatabaseError if it is
    damaged (callers name their database in the message)."""
    try:
        # A Pigeon database holds secrets (prekeys, ratchet state) or others' mail: create it
        # owner-only; SQLite gives its -wal/-shm files the same mode. Without this it would get
        # the umask default (0644 in a directory others may enter).
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise DataDirError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise DataDirError(f"cannot open {path}: {exc}") from exc
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(check)
    except BaseException:
        conn.close()
        raise
    return conn
