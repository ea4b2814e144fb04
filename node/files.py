"""Files every Pigeon process keeps in its own directory, the device's and the relay's alike:
the lock that keeps a second process out, key files, and SQLite databases with their schema
migrations.

A key file is CBOR {"v": 1, "kind": "identity"|"device", "seed": bstr .size 32,
"public": bstr .size 32}: the public key doubles as a checksum, so a damaged file is reported as
damaged instead of silently becoming another identity.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Final, TypeVar

from node.errors import DataDirError, DataDirLocked, NodeError, StorageError
from node.protocol import codec
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair

__all__ = ["LockedDirectory", "StorageHealth", "create_key_file", "load_or_create_key_file", "open_database",
           "open_sqlite", "read_key_file", "sqlite_transaction", "storage_error", "storage_reason",
           "truncate_wal"]

KEY_FILE_VERSION: Final = 1

KeyPairT = TypeVar("KeyPairT", IdentityKeyPair, DeviceKeyPair)
T = TypeVar("T")


class LockedDirectory:
    """A directory that one process at a time works in (a device's data directory, a relay's):
    `lock()` before opening its files, `unlock()` when done. Subclasses name the lock file and
    say, for the message another process gets, who holds it and what to do."""

    LOCK_NAME: ClassVar[str]
    #: Who holds the lock, as in "in use by another {HOLDER} (pid N)".
    HOLDER: ClassVar[str]
    #: Appended to that message: what the user can do about it.
    HINT: ClassVar[str]

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser().absolute()
        self._lock_fd: int | None = None

    @property
    def lock_file(self) -> Path:
        """The file holding the lock (and the holder's pid)."""
        return self.path / self.LOCK_NAME

    def lock(self) -> None:
        """Create the directory (mode 0700) and take an exclusive flock on the lock file, writing
        our pid there. DataDirLocked ("in use by another HOLDER (pid N)HINT") if another process
        holds it: the lock dies with its process, so a crash never leaves the directory locked."""
        if self._lock_fd is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.read(fd, 32).decode(errors="replace").strip()
            finally:
                os.close(fd)
            pid = f" (pid {owner})" if owner.isdigit() else ""
            raise DataDirLocked(
                f"{self.path} is in use by another {self.HOLDER}{pid}{self.HINT}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock (if held)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def create_key_file(path: Path, kind: str, key_type: type[KeyPairT],
                    key: KeyPairT | None = None) -> KeyPairT:
    """Generate a key (or take `key`: an account key a linked device received) and write it to
    `path` as a `kind` key file; refuses to overwrite one. Returns the key as read back from the
    file, so what is used is what was stored."""
    key = key if key is not None else key_type.generate()
    _write_key_file(path, kind, key.to_bytes(), key.public.to_bytes())
    return read_key_file(path, kind, key_type)


def load_or_create_key_file(path: Path, kind: str, key_type: type[KeyPairT]) -> KeyPairT:
    """The key in `path`, created there first if there is no such file (a relay's host key,
    made on its first start)."""
    if not path.exists():
        return create_key_file(path, kind, key_type)
    return read_key_file(path, kind, key_type)


def _write_key_file(path: Path, kind: str, seed: bytes, public: bytes) -> None:
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


def read_key_file(path: Path, kind: str, key_type: type[KeyPairT]) -> KeyPairT:
    """The key in a `kind` key file, after checking its mode, format and checksum. DataDirError
    naming the file (and what to do) if it is missing, unreadable, exposed or damaged."""
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
    pair = key_type(seed)
    if pair.public.to_bytes() != public:
        raise DataDirError(f"{path} is damaged (its key does not match its checksum)")
    return pair


def open_sqlite(path: Path, *, synchronous: str, pragmas: Sequence[str] = ()) -> sqlite3.Connection:
    """Open an SQLite file the way every Pigeon database is opened (the node's, the relay's):
    created owner-only, WAL, secure_delete, the given synchronous mode and `pragmas`, and a
    quick integrity check. DataDirError if the file cannot be created or opened;
    sqlite3.DatabaseError if it is damaged (callers name their database in the message)."""
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
        # secure_delete: deleted rows (an acked envelope, a removed contact's history, pruned
        # ids) are overwritten with zeros in the database file instead of lingering on free
        # pages; `truncate_wal` then clears the copies in the WAL.
        conn.execute("PRAGMA secure_delete=ON")
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(check)
    except BaseException:
        conn.close()
        raise
    return conn


# SQLite's primary result codes (the low byte of an extended code), as sqlite3 exceptions carry
# them in `sqlite_errorcode`, and what each means to a person.
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26
_REASONS: Final = {
    _SQLITE_FULL: "disk-full",
    _SQLITE_READONLY: "read-only",
    _SQLITE_PERM: "read-only",
    _SQLITE_CANTOPEN: "read-only",
    _SQLITE_BUSY: "locked",
    _SQLITE_LOCKED: "locked",
    _SQLITE_CORRUPT: "damaged",
    _SQLITE_NOTADB: "damaged",
    _SQLITE_IOERR: "io-error",
}
_ADVICE: Final = {
    "disk-full": "the disk holding {path} is full: free some space (work resumes by itself)",
    "read-only": "{path} cannot be written (a read-only file, directory or file system):"
                 " check its permissions and mount",
    "locked": "{path} is locked by another program: close it",
    "damaged": "{path} is damaged: restore it from a backup, or move it away",
    "io-error": "the disk holding {path} failed to read or write",
    "failed": "{path}: database error",
}


def storage_reason(exc: sqlite3.Error) -> str:
    """The StorageError reason for an sqlite3 error: "disk-full", "read-only", "locked",
    "damaged", "io-error" or "failed"."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _REASONS:
        return _REASONS[code & 0xFF]
    if "disk is full" in str(exc):  # errors raised without a code keep SQLite's message
        return "disk-full"
    return "failed"


def storage_error(exc: sqlite3.Error, path: Path, doing: str) -> StorageError:
    """The StorageError to raise for `exc`, met while `doing` something with the database at
    `path`: a sentence a person understands, with `reason` for programs and the SQLite message
    at the end (for a bug report)."""
    reason = storage_reason(exc)
    advice = _ADVICE[reason].format(path=path)
    return StorageError(f"{advice} ({doing}: {exc})", reason=reason)


class StorageHealth:
    """The last storage failure of one database, until a transaction commits again: what
    `status` shows ("the disk holding ... is full"), so a person learns why work stopped."""

    def __init__(self) -> None:
        self.problem: StorageError | None = None

    def failed(self, error: StorageError) -> StorageError:
        """Remember `error` (and return it, to be raised)."""
        self.problem = error
        return error


@contextlib.contextmanager
def sqlite_transaction(conn: sqlite3.Connection, path: Path,
                       health: StorageHealth | None = None) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT around the body, which is all or nothing: on any exception the
    transaction is rolled back and an sqlite3 error comes out as a StorageError
    (`storage_error`). After a failed statement or COMMIT (disk full, I/O error) SQLite may have
    rolled back by itself already, so ROLLBACK is issued only while a transaction is open: a
    ROLLBACK without one would raise "cannot rollback - no transaction is active" and hide
    the real cause. `health`, if given, records the failure, and its end at the next commit."""
    health = health or StorageHealth()
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise health.failed(storage_error(exc, path, "starting a transaction")) from exc
    try:
        yield
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise health.failed(storage_error(exc, path, "writing")) from exc
        if isinstance(exc, StorageError):
            health.failed(exc)
        raise
    health.problem = None


def truncate_wal(conn: sqlite3.Connection) -> bool:
    """Fold the WAL into the database file and truncate it to zero bytes, so that what was
    deleted (and overwritten in the database file by secure_delete) leaves no copy in the WAL.
    Costs a write of every page changed since the last checkpoint: call it after a batch of
    deletions, not after each one. False if it could not complete (a reader held an old
    snapshot, or the disk failed); the next call tries again."""
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error:
        return False
    return not busy


def open_database(path: Path, *, what: str, schema_version: int, migrations: Mapping[int, str],
                  synchronous: str, pragmas: Sequence[str] = (),
                  load: Callable[[sqlite3.Connection], T]) -> T:
    """Open `path` with `open_sqlite`, bring its schema up to `schema_version`, and return
    `load(connection)`: the caller's object over the connection.

    The version is kept in the table `meta(key, value)` under 'schema_version'; `migrations[1]`
    creates that table, and `migrations[n]` is the script that takes a database from version
    n - 1 to n, run in one transaction with the version update. Raises DataDirError naming the
    file if it is damaged or not a `what` (any sqlite3.DatabaseError while opening, migrating or
    loading), or if a newer Pigeon wrote it: a newer schema is refused, not half-understood.
    The connection is closed on any failure.
    """
    conn: sqlite3.Connection | None = None
    try:
        conn = open_sqlite(path, synchronous=synchronous, pragmas=pragmas)
        _migrate(conn, path, schema_version, migrations)
        return load(conn)
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        if storage_reason(exc) not in ("damaged", "failed"):
            # A full disk or a read-only file is not damage: say what it is.
            raise DataDirError(storage_error(exc, path, f"opening the {what}").args[0]) from exc
        raise DataDirError(
            f"{path} is damaged or not a {what} ({exc}); restore it from a backup") from exc
    except BaseException:
        if conn is not None:
            conn.close()
        raise


def _migrate(conn: sqlite3.Connection, path: Path, schema_version: int,
             migrations: Mapping[int, str]) -> None:
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
    version = 0
    if has_meta:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row else 0
    elif conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise sqlite3.DatabaseError("database has tables but no Pigeon schema")
    if version > schema_version:
        raise DataDirError(
            f"{path} was written by a newer Pigeon (schema {version} > {schema_version});"
            " upgrade Pigeon")
    for target in range(version + 1, schema_version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(migrations[target]):
                conn.execute(statement)
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                         (target,))
        except BaseException:
            if conn.in_transaction:  # a failed statement may have rolled back already
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (no semicolons inside our statements)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
