"""Frames of the direct blob transfer `/pigeon/blob/1.0.0` (PROTOCOL.md section 26.5).

The device that received a file message opens a stream to the device that sent it and asks for
the blob's sealed chunks by index, proving that it holds the attachment's key:

    get   = {"v": 1, "t": "get", "hash": bstr .size 32, "proof": bstr .size 32,
             "from": uint, "count": uint}
    range = {"v": 1, "t": "range", "from": uint, "count": uint}   then `count` chunk frames
    error = {"v": 1, "t": "error", "code": tstr}
    chunk frame = the sealed chunk itself (section 26.2), not CBOR

    proof = HMAC-SHA256(key, "pigeon-blob-proof-v1" || hash)

A chunk frame's length is known from the descriptor (`Descriptor.chunk_span`), so a chunk
frame needs no header; the receiver checks the length and opens the chunk before writing it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final

from node.errors import DecodeError, LimitExceeded
from node.protocol import codec
from node.protocol.attachment import MAX_CHUNK_BYTES, TAG_BYTES, Descriptor
from node.protocol.kdf import hmac_sha256

__all__ = [
    "BAD_RANGE",
    "BLOB_PROTOCOL",
    "MAX_BLOB_FRAME_BYTES",
    "MAX_BLOB_REQUEST_BYTES",
    "UNAUTHORIZED",
    "UNKNOWN_BLOB",
    "BlobError",
    "BlobGet",
    "BlobRange",
    "blob_proof",
    "check_proof",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_range",
    "encode_request",
]

BLOB_PROTOCOL: Final = "/pigeon/blob/1.0.0"
BLOB_VERSION: Final = 1
#: Largest frame on the stream: one sealed chunk of the largest chunk size a receiver accepts.
MAX_BLOB_FRAME_BYTES: Final = MAX_CHUNK_BYTES + TAG_BYTES
#: Largest request or reply header: two 32-byte strings and a few integers.
MAX_BLOB_REQUEST_BYTES: Final = 160
#: Context of the proof of the key (PROTOCOL.md section 26.5).
PROOF_CONTEXT: Final = b"pigeon-blob-proof-v1"
#: Most chunks a blob has: 2 GiB in 64-byte chunks.
_MAX_CHUNKS: Final = 2**31 // 64 + 1
_MAX_CODE_BYTES: Final = 32

#: Error codes: no such blob here; the proof does not match it; a range outside the blob.
UNKNOWN_BLOB: Final = "unknown-blob"
UNAUTHORIZED: Final = "unauthorized"
BAD_RANGE: Final = "bad-range"


def blob_proof(descriptor: Descriptor) -> bytes:
    """The proof that whoever asks for the blob holds the descriptor's key."""
    return hmac_sha256(descriptor.key, PROOF_CONTEXT + descriptor.sha256)


def check_proof(descriptor: Descriptor, proof: bytes) -> bool:
    """Whether `proof` is this descriptor's (compared in constant time)."""
    return hmac.compare_digest(blob_proof(descriptor), proof)


@dataclass(frozen=True, kw_only=True, slots=True)
class BlobGet:
    """A request for `count` sealed chunks of the blob `hash`, from chunk index `first`."""

    hash: bytes
    proof: bytes
    first: int
    count: int

    def __post_init__(self) -> None:
        if len(self.hash) != 32 or len(self.proof) != 32:
            raise ValueError("hash and proof are 32 bytes")
        if not 0 <= self.first < _MAX_CHUNKS or not 1 <= self.count <= _MAX_CHUNKS:
            raise ValueError("chunk range out of bounds")


@dataclass(frozen=True, kw_only=True, slots=True)
class BlobRange:
    """The server's answer: `count` chunk frames follow, from index `first`."""

    first: int
    count: int


@dataclass(frozen=True, kw_only=True, slots=True)
class BlobError:
    """The server refused the request (`code`: one of the codes above, or another)."""

    code: str


def encode_request(request: BlobGet) -> bytes:
    """The `get` frame body."""
    return codec.encode({"v": BLOB_VERSION, "t": "get", "hash": request.hash,
                         "proof": request.proof, "from": request.first, "count": request.count})


def encode_range(first: int, count: int) -> bytes:
    """The `range` frame body."""
    return codec.encode({"v": BLOB_VERSION, "t": "range", "from": first, "count": count})


def encode_error(code: str) -> bytes:
    """The `error` frame body."""
    return codec.encode({"v": BLOB_VERSION, "t": "error", "code": code[:_MAX_CODE_BYTES]})


def _fields(data: bytes, what: str) -> codec.Fields:
    if len(data) > MAX_BLOB_REQUEST_BYTES:
        raise DecodeError(f"{what}: {len(data)} bytes > {MAX_BLOB_REQUEST_BYTES}")
    try:
        return codec.decode_map(data, limit=MAX_BLOB_REQUEST_BYTES, what=what,
                                version=BLOB_VERSION)
    except LimitExceeded as exc:  # pragma: no cover - the length was checked above
        raise DecodeError(str(exc)) from exc


def decode_request(data: bytes) -> BlobGet:
    """A `get` frame; DecodeError for anything else or malformed."""
    f = _fields(data, "blob request")
    if f.text("t", max_size=8) != "get":
        raise DecodeError("blob request: not a get")
    request_hash = f.bytes("hash", 32)
    proof = f.bytes("proof", 32)
    first = f.int("from", 0, _MAX_CHUNKS - 1)
    count = f.int("count", 1, _MAX_CHUNKS)
    f.done()
    return BlobGet(hash=request_hash, proof=proof, first=first, count=count)


def decode_reply(data: bytes) -> BlobRange | BlobError:
    """A `range` or `error` frame; DecodeError for anything else or malformed."""
    f = _fields(data, "blob reply")
    kind = f.text("t", max_size=8)
    reply: BlobRange | BlobError
    if kind == "range":
        reply = BlobRange(first=f.int("from", 0, _MAX_CHUNKS - 1),
                          count=f.int("count", 1, _MAX_CHUNKS))
    elif kind == "error":
        reply = BlobError(code=f.text("code", max_size=_MAX_CODE_BYTES))
    else:
        raise DecodeError(f"blob reply: unknown kind {kind!r}")
    f.done()
    return reply
