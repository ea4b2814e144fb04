"""One exception tree for everything Pigeon raises on purpose.

Every class says when it is raised and what the user (or the embedding program) can do about it.
Errors caused by the remote side (a peer, a relay, a record from the network) derive from
`RemoteError`; errors caused by local misuse or local state derive from `LocalError`. That split is
borrowed from h11 (`RemoteProtocolError` / `LocalProtocolError`): a node never crashes because of
a `RemoteError`, it logs it and drops the offending input or peer.
"""

from __future__ import annotations

__all__ = [
    "AttachmentCorrupt",
    "ConfigError",
    "ContactError",
    "DataDirError",
    "DataDirLocked",
    "DecodeError",
    "DecryptionFailed",
    "DeviceError",
    "FrameTooLarge",
    "GroupError",
    "InvalidMessage",
    "InvalidRecord",
    "InviteError",
    "LimitExceeded",
    "LocalError",
    "MediaError",
    "NodeError",
    "NotRunning",
    "PeerMismatch",
    "RelayRefused",
    "RemoteError",
    "StorageError",
    "TransportError",
    "UnknownVersion",
]


class NodeError(Exception):
    """Root of every error Pigeon raises on purpose. Catch this to catch them all."""


class RemoteError(NodeError):
    """Something that came from outside (peer, relay, network record) was unacceptable.

    The input is dropped; the node keeps running. Nothing for the local user to fix.
    """


class LocalError(NodeError):
    """The local caller or local state is at fault: bad arguments, bad files, wrong order of calls."""


# --- decoding and limits (remote) -------------------------------------------------------------


class DecodeError(RemoteError):
    """Bytes could not be decoded into the expected object: truncated, wrong CBOR type, missing or
    extra fields, bad lengths. Raised instead of any exception from cbor2 or pynacl. The object is
    rejected; if it came from a peer, the peer may be disconnected."""


class UnknownVersion(DecodeError):
    """An object carries a version number this implementation does not know. Upgrade Pigeon if the
    peer is newer; otherwise the object is rejected."""


class LimitExceeded(RemoteError):
    """A named limit from `node.limits` was crossed (size, count, skip). `limit` names it."""

    def __init__(self, limit: str, detail: str = "") -> None:
        self.limit = limit
        super().__init__(f"{limit} exceeded" + (f": {detail}" if detail else ""))


class FrameTooLarge(LimitExceeded):
    """A length prefix on the wire announced a frame bigger than allowed. The stream is reset
    before anything is read or parsed."""


class DecryptionFailed(RemoteError):
    """A message, header or envelope did not decrypt. Deliberately opaque: it never says which
    check failed (wrong key, tampered bytes, replay, duplicate, unknown prekey). The session is
    unchanged and the next genuine message still decrypts."""


class AttachmentCorrupt(DecryptionFailed):
    """An attachment's ciphertext does not match its descriptor (PROTOCOL.md section 26): chunk
    `chunk` is missing, cut short, tampered with, out of place or from another attachment, or
    (`chunk` None) the whole is too long or its hash differs. Plaintext written so far must be
    discarded; fetching the attachment again (from chunk `chunk`) may succeed."""

    def __init__(self, detail: str, *, chunk: int | None = None) -> None:
        self.chunk = chunk
        where = f"chunk {chunk}" if chunk is not None else "ciphertext"
        super().__init__(f"attachment {where} rejected: {detail}")


class InvalidRecord(RemoteError):
    """A signed record (prekey bundle, device list, device record, invite) was rejected: bad
    signature, expired, oversized, wrong namespace or kind, or older than the one already held."""


class PeerMismatch(RemoteError):
    """The device authenticated by the transport is not the device the peer claims to be (or not a
    device of the contact it claims to belong to). The stream is closed."""


class RelayRefused(RemoteError):
    """A relay refused a request with an error code (`code`), e.g. over quota or too large. The
    message stays pending with this reason visible to the user."""

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        super().__init__(f"relay refused: {code}" + (f" ({detail})" if detail else ""))


class TransportError(RemoteError):
    """A connection or stream could not be opened or broke. The delivery engine retries later."""


# --- local -------------------------------------------------------------------------------------


class ConfigError(LocalError):
    """A setting, command-line flag or config file value is invalid. The message says which."""


class DataDirError(LocalError):
    """The data directory is unusable: a key file is corrupted or has the wrong permissions, the
    database is damaged or from a newer version. The message names the file; restore it from a
    backup or point `--data-dir` somewhere else."""


class DataDirLocked(DataDirError):
    """Another Pigeon process already uses this data directory. Use the running daemon (the CLI
    does this automatically) or stop it first."""


class StorageError(LocalError):
    """SQLite failed in a way that is not the caller's fault. `reason` says why, in one word a
    program can test: "disk-full" (free some space), "read-only" (the file or its directory lost
    write permission, or the file system is mounted read-only), "locked" (another program holds
    the database), "damaged" (restore it from a backup), "io-error" (the disk failed) or
    "failed" (anything else). Nothing was written: the operation is retried once the cause is
    gone, and the process keeps running."""

    def __init__(self, message: str, *, reason: str = "failed") -> None:
        self.reason = reason
        super().__init__(message)


class MediaError(LocalError):
    """A file cannot be prepared as an attachment. `reason` says why, in one word a program can
    test: "missing" (no such file), "directory" (a directory, not a file), "unreadable" (no
    permission, or reading failed), "too-large" (over the configured largest attachment) or
    "invalid" (an attachment received does not restore). The message names the file."""

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


class ContactError(LocalError):
    """The named contact does not exist, already exists, or cannot receive messages yet."""


class GroupError(LocalError):
    """A group change or message cannot be made: the group or a member is unknown, this account
    is not an admin (or no longer a member), the group is full (1,000 members), or the change
    does not apply (adding a member twice, removing oneself instead of leaving). Nothing was
    changed or sent."""


class DeviceError(LocalError):
    """A device of the account cannot be linked or removed: the list is full, the device is
    unknown, or it is this device itself."""


class InviteError(LocalError):
    """An invite text is malformed, tampered with or expired. Ask the contact for a fresh invite."""


class InvalidMessage(LocalError):
    """A message to send is empty or too long, or a message id is unknown."""


class NotRunning(LocalError):
    """The node was used outside its `async with` block, or after it was closed."""
