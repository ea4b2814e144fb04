"""The data directory: key files, the database, the lock and the control socket.

Layout (PROTOCOL.md does not cover it; it is local):

    identity.key   the account's identity key      (mode 0600, written once, never rewritten)
    device.key     this device's key               (mode 0600, written once, never rewritten)
    pigeon.db      SQLite database (WAL)           contacts, sessions, prekeys, messages, outbox
    pigeon.lock    held (flock) by the process that has the node open
    pigeon.sock    the daemon's control socket (JSON-RPC 2.0), present while `pigeon run` runs

A key file is CBOR {"v": 1, "kind": "identity"|"device", "seed": bstr .size 32,
"public": bstr .size 32}: the public key doubles as a checksum, so a damaged file is reported as
damaged instead of silently becoming another identity.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Final

import platformdirs

from node.errors import DataDirError, DataDirLocked, NodeError
from node.protocol import codec
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair

__all__ = [
    "DataDir",
    "default_data_dir",
    "lock_directory",
    "read_key_file",
    "unlock_directory",
    "write_key_file",
]

ENV_HOME: Final = "PIGEON_HOME"
KEY_FILE_VERSION: Final = 1


def default_data_dir() -> Path:
    """`$PIGEON_HOME`, else the platform's user data directory (e.g. ~/.local/share/pigeon)."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("pigeon", appauthor=False))


class DataDir:
    """Paths and files of one data directory. `lock()` before opening the database."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser().absolute()
        self._lock_fd: int | None = None

    @property
    def identity_file(self) -> Path:
        return self.path / "identity.key"

    @property
    def device_file(self) -> Path:
        return self.path / "device.key"

    @property
    def database_file(self) -> Path:
        return self.path / "pigeon.db"

    @property
    def lock_file(self) -> Path:
        return self.path / "pigeon.lock"

    @property
    def socket_file(self) -> Path:
        return self.path / "pigeon.sock"

    def is_initialized(self) -> bool:
        return self.identity_file.exists()

    # --- locking ----------------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the data directory for this process; DataDirLocked if another process has it."""
        if self._lock_fd is None:
            self._lock_fd = lock_directory(
                self.path, self.lock_file, holder="Pigeon process",
                hint=": a running `pigeon run`? (commands use it automatically when it runs)")

    def unlock(self) -> None:
        unlock_directory(self._lock_fd)
        self._lock_fd = None

    # --- keys -------------------------------------------------------------------------------------

    def create_keys(self) -> tuple[IdentityKeyPair, DeviceKeyPair]:
        """Generate and write both key files. DataDirError if they exist already."""
        if self.identity_file.exists() or self.device_file.exists():
            raise DataDirError(f"{self.path} already holds an identity; not overwriting it")
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity, device = IdentityKeyPair.generate(), DeviceKeyPair.generate()
        write_key_file(self.device_file, "device", device.to_bytes(), device.public.to_bytes())
        write_key_file(
            self.identity_file, "identity", identity.to_bytes(), identity.public.to_bytes()
        )
        return identity, device

    def load_keys(self) -> tuple[IdentityKeyPair, DeviceKeyPair]:
        """Read both key files; DataDirError naming the file if one is missing or damaged."""
        if not self.identity_file.exists():
            raise DataDirError(f"{self.path} is not initialised: run `pigeon init` first")
        identity = IdentityKeyPair.from_bytes(read_key_file(self.identity_file, "identity"))
        device = DeviceKeyPair.from_bytes(read_key_file(self.device_file, "device"))
        return identity, device  # type: ignore[return-value]


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
