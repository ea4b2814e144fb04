"""Attachments: the descriptor a message carries and the chunked encryption of the file
(PROTOCOL.md section 26 "Attachments").

An attachment travels as two things. The *descriptor* (a small CBOR map) goes inside an
end-to-end encrypted message; it names the file and carries the 32-byte key, the 16-byte nonce
prefix and the SHA-256 of the ciphertext. The *ciphertext* (the blob) travels on its own, directly
or through a relay, and is useless without the descriptor.

The blob is the file cut into fixed-size chunks (`DEFAULT_CHUNK_BYTES`, 256 KiB, the last one
shorter), each sealed on its own with XChaCha20-Poly1305 (PROTOCOL.md section 2 "AEAD"):

    nonce(i) = nonce_prefix (16 bytes) || u64be(i)
    ad(i)    = "pigeon-attachment-v1" || 0x00 || u8(1 if i is the last chunk else 0)
    blob     = AEAD(key, nonce(0), chunk 0, ad(0)) || AEAD(key, nonce(1), chunk 1, ad(1)) || ...

The index in the nonce refuses reordered chunks, the final flag refuses a blob cut at a chunk
boundary (the new last chunk was sealed as "not last") or extended after its end, and the random
nonce prefix refuses a chunk taken from another attachment even if a key were reused. Every chunk
sits at a fixed offset (`Descriptor.chunk_span`), so a resumed or ranged download fetches and
checks chunk i alone: no state is carried from one chunk to the next (unlike libsodium's
secretstream, which is sequential).

Pure: the streaming functions read and write the binary files handed in, in constant memory
(two chunks at most); randomness comes from the `rng` handed in.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final, Literal

import nacl.exceptions
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)

from node.errors import AttachmentCorrupt, DecodeError, LimitExceeded
from node.protocol import codec
from node.protocol.keys import Random

__all__ = [
    "CHUNK_CONTEXT",
    "DEFAULT_CHUNK_BYTES",
    "KEY_BYTES",
    "MAX_ATTACHMENT_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_DESCRIPTOR_BYTES",
    "MAX_THUMBNAIL_BYTES",
    "MIN_CHUNK_BYTES",
    "NONCE_PREFIX_BYTES",
    "TAG_BYTES",
    "ChunkCipher",
    "Compression",
    "DecodeError",
    "Descriptor",
    "Encrypted",
    "check_media_type",
    "check_name",
    "chunk_count",
    "ciphertext_size",
    "decrypt_chunks",
    "decrypt_stream",
    "encrypt_stream",
]

#: Size of the per-attachment key (XChaCha20-Poly1305).
KEY_BYTES: Final = 32
#: Random prefix of every chunk nonce; the other 8 bytes are the chunk index.
NONCE_PREFIX_BYTES: Final = 16
#: Poly1305 tag appended to every chunk.
TAG_BYTES: Final = 16
#: Chunk size senders use: big enough that the 16-byte tag and the per-chunk costs (an AEAD call,
#: a frame, a GIL hand-over in the receiver's worker thread) are lost in the noise, small enough
#: that a resumed download loses little and a chunk fits any buffer. 64 KiB chunks made a
#: download 0.57-0.60x raw libp2p, 256 KiB ones 0.71-0.74x (benchmarks/media.py, same machine).
DEFAULT_CHUNK_BYTES: Final = 256 * 1024
#: Smallest chunk size a receiver accepts; tiny chunks only cost their sender, and the test
#: vectors use 64-byte chunks so that they stay readable.
MIN_CHUNK_BYTES: Final = 64
#: Largest chunk size a receiver accepts: it holds one chunk (plus the next, to know which is
#: last) in memory, so this bounds the memory a sender can make it allocate.
MAX_CHUNK_BYTES: Final = 1024 * 1024
#: Largest attachment (plaintext, and original size of a compressed one) the protocol allows;
#: a device may set a lower limit for what it sends and accepts.
MAX_ATTACHMENT_BYTES: Final = 2 * 1024**3
#: Largest inline thumbnail: a 96-pixel JPEG is 1 to 4 KB; twice the sender's target is margin.
MAX_THUMBNAIL_BYTES: Final = 8 * 1024
#: Longest file name, in UTF-8 bytes: the limit of common file systems (ext4, APFS, NTFS).
MAX_NAME_BYTES: Final = 255
#: Longest media type (RFC 6838 section 4.2 allows 127 characters on each side of the slash).
MAX_MEDIA_TYPE_BYTES: Final = 255
#: Largest image side a descriptor may state (JPEG's and WebP's own limit is 65,535).
MAX_IMAGE_SIDE: Final = 65_535
#: Largest encoded descriptor: the thumbnail plus the name, type, key, hash and sizes.
MAX_DESCRIPTOR_BYTES: Final = MAX_THUMBNAIL_BYTES + 1024
#: Associated-data context of every chunk (PROTOCOL.md section 26.2), followed by 0x00 and the
#: final flag.
CHUNK_CONTEXT: Final = b"pigeon-attachment-v1"
DESCRIPTOR_VERSION: Final = 1

Compression = Literal["zstd"]
"""How the encrypted plaintext was compressed: "zstd" is one Zstandard frame (RFC 8878)."""

#: RFC 6838 section 4.2 restricted names, lower case (types are case-insensitive; senders
#: normalise), with no parameters.
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")


def chunk_count(size: int, chunk_bytes: int) -> int:
    """Chunks of a `size`-byte plaintext: at least one (an empty file is one empty last chunk)."""
    return max(1, -(-size // chunk_bytes))


def ciphertext_size(size: int, chunk_bytes: int) -> int:
    """Bytes of the blob of a `size`-byte plaintext: the plaintext plus one tag per chunk."""
    return size + TAG_BYTES * chunk_count(size, chunk_bytes)


def _check_chunk_bytes(chunk_bytes: int) -> None:
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size {chunk_bytes} outside [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")


def check_name(name: str) -> str | None:
    """Why `name` is not an acceptable file name, or None. A name is one path component: the
    receiver must be able to use it as it is without it naming another directory."""
    encoded = name.encode("utf-8", "surrogatepass")
    if not 1 <= len(encoded) <= MAX_NAME_BYTES:
        return f"must be 1 to {MAX_NAME_BYTES} bytes"
    if name in (".", "..") or any(c in name for c in "/\\\x00"):
        return "must be a single path component"
    if any(ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        return "must not hold control characters or lone surrogates"
    return None


def check_media_type(media_type: str) -> str | None:
    """Why `media_type` is not an acceptable media type (`type/subtype`, lower case), or None."""
    if len(media_type) > MAX_MEDIA_TYPE_BYTES or not _MEDIA_TYPE.fullmatch(media_type):
        return "must be a lower-case type/subtype (RFC 6838)"
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Descriptor:
    """What a message says about one attachment (PROTOCOL.md section 26.1).

    `size` is the plaintext that was encrypted; when `compression` is set that plaintext is
    compressed and `original_size` is the size of the file it restores. `sha256` covers the whole
    blob (the ciphertext of every chunk, in order). `width` and `height` are given together, for
    images only; `thumbnail` is a small JPEG.
    """

    name: str
    media_type: str
    size: int
    chunk_bytes: int
    sha256: bytes
    key: bytes
    nonce_prefix: bytes
    compression: Compression | None = None
    original_size: int | None = None
    thumbnail: bytes | None = None
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        problem = check_name(self.name)
        if problem:
            raise ValueError(f"attachment name {problem}")
        problem = check_media_type(self.media_type)
        if problem:
            raise ValueError(f"attachment media type {problem}")
        if not 0 <= self.size <= MAX_ATTACHMENT_BYTES:
            raise ValueError(f"attachment size outside [0, {MAX_ATTACHMENT_BYTES}]")
        _check_chunk_bytes(self.chunk_bytes)
        if len(self.sha256) != 32 or len(self.key) != KEY_BYTES:
            raise ValueError("hash and key are 32 bytes")
        if len(self.nonce_prefix) != NONCE_PREFIX_BYTES:
            raise ValueError(f"nonce prefix is {NONCE_PREFIX_BYTES} bytes")
        if (self.compression is None) != (self.original_size is None):
            raise ValueError("compression and original_size go together")
        if self.compression not in (None, "zstd"):
            raise ValueError("compression must be 'zstd' or None")
        if self.original_size is not None and not 0 <= self.original_size <= MAX_ATTACHMENT_BYTES:
            raise ValueError(f"original size outside [0, {MAX_ATTACHMENT_BYTES}]")
        if self.thumbnail is not None and not 0 < len(self.thumbnail) <= MAX_THUMBNAIL_BYTES:
            raise ValueError(f"thumbnail must be 1 to {MAX_THUMBNAIL_BYTES} bytes")
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height go together")
        for side in (self.width, self.height):
            if side is not None and not 1 <= side <= MAX_IMAGE_SIDE:
                raise ValueError(f"image sides are 1 to {MAX_IMAGE_SIDE} pixels")

    @property
    def ciphertext_size(self) -> int:
        """Bytes of the blob."""
        return ciphertext_size(self.size, self.chunk_bytes)

    @property
    def chunks(self) -> int:
        """Number of chunks in the blob."""
        return chunk_count(self.size, self.chunk_bytes)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index` in the blob, for a ranged fetch."""
        if not 0 <= index < self.chunks:
            raise IndexError(f"chunk {index} outside [0, {self.chunks})")
        plain = min(self.chunk_bytes, self.size - index * self.chunk_bytes)
        return index * (self.chunk_bytes + TAG_BYTES), plain + TAG_BYTES

    def cipher(self) -> ChunkCipher:
        """The cipher of this attachment's chunks."""
        return ChunkCipher(self.key, self.nonce_prefix)

    def to_bytes(self) -> bytes:
        """Deterministic CBOR (PROTOCOL.md section 19, `attachment`)."""
        body: dict[str, object] = {
            "v": DESCRIPTOR_VERSION, "name": self.name, "type": self.media_type,
            "size": self.size, "csize": self.ciphertext_size, "chunk": self.chunk_bytes,
            "hash": self.sha256, "key": self.key, "np": self.nonce_prefix,
        }
        if self.compression is not None:
            body["comp"] = self.compression
            body["osize"] = self.original_size
        if self.thumbnail is not None:
            body["thumb"] = self.thumbnail
        if self.width is not None:
            body["w"] = self.width
            body["h"] = self.height
        return codec.encode(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> Descriptor:
        """Decode and check a descriptor. Raises `DecodeError` (and nothing else) on bad input,
        including input over `MAX_DESCRIPTOR_BYTES`, which is refused before it is parsed."""
        what = "attachment descriptor"
        if isinstance(data, bytes | bytearray | memoryview) and len(data) > MAX_DESCRIPTOR_BYTES:
            raise DecodeError(f"{what}: {len(data)} bytes > {MAX_DESCRIPTOR_BYTES}")
        try:
            fields = codec.decode_map(data, limit=MAX_DESCRIPTOR_BYTES, what=what,
                                      version=DESCRIPTOR_VERSION)
        except LimitExceeded as exc:  # pragma: no cover - the length was checked above
            raise DecodeError(str(exc)) from exc
        compression = fields.text("comp", max_size=16, optional=True)
        if compression not in (None, "zstd"):
            raise DecodeError(f"{what}: unknown compression {compression!r}")
        name = fields.text("name", max_size=MAX_NAME_BYTES)
        media_type = fields.text("type", max_size=MAX_MEDIA_TYPE_BYTES)
        size = fields.int("size", 0, MAX_ATTACHMENT_BYTES)
        chunk_bytes = fields.int("chunk", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
        csize = fields.int("csize", 0, 2 * MAX_ATTACHMENT_BYTES)
        if csize != ciphertext_size(size, chunk_bytes):
            raise DecodeError(f"{what}: csize {csize} does not match size and chunk")
        sha256 = fields.bytes("hash", 32)
        key = fields.bytes("key", KEY_BYTES)
        nonce_prefix = fields.bytes("np", NONCE_PREFIX_BYTES)
        original_size = fields.int("osize", 0, MAX_ATTACHMENT_BYTES, optional=True)
        thumbnail = fields.bytes("thumb", max_size=MAX_THUMBNAIL_BYTES, optional=True)
        width = fields.int("w", 1, MAX_IMAGE_SIDE, optional=True)
        height = fields.int("h", 1, MAX_IMAGE_SIDE, optional=True)
        fields.done()
        try:
            return cls(name=name, media_type=media_type, size=size, chunk_bytes=chunk_bytes,
                       sha256=sha256, key=key, nonce_prefix=nonce_prefix,
                       compression="zstd" if compression is not None else None,
                       original_size=original_size, thumbnail=thumbnail, width=width,
                       height=height)
        except ValueError as exc:
            raise DecodeError(f"{what}: {exc}") from exc


class ChunkCipher:
    """Seals and opens single chunks of one attachment, in any order (random access)."""

    __slots__ = ("_key", "_prefix")

    def __init__(self, key: bytes, nonce_prefix: bytes) -> None:
        if len(key) != KEY_BYTES or len(nonce_prefix) != NONCE_PREFIX_BYTES:
            raise ValueError(f"key is {KEY_BYTES} bytes, nonce prefix {NONCE_PREFIX_BYTES}")
        self._key = bytes(key)
        self._prefix = bytes(nonce_prefix)

    @classmethod
    def generate(cls, rng: Random = os.urandom) -> ChunkCipher:
        """A fresh key and nonce prefix (one per attachment, never reused)."""
        return cls(rng(KEY_BYTES), rng(NONCE_PREFIX_BYTES))

    @property
    def key(self) -> bytes:
        """The 32-byte key (goes into the descriptor)."""
        return self._key

    @property
    def nonce_prefix(self) -> bytes:
        """The 16-byte nonce prefix (goes into the descriptor)."""
        return self._prefix

    def _nonce(self, index: int) -> bytes:
        if not 0 <= index < 2**64:
            raise ValueError("chunk index outside [0, 2**64)")
        return self._prefix + index.to_bytes(8, "big")

    @staticmethod
    def _ad(final: bool) -> bytes:
        return CHUNK_CONTEXT + b"\x00" + (b"\x01" if final else b"\x00")

    def seal(self, index: int, plaintext: bytes, *, final: bool) -> bytes:
        """Ciphertext of chunk `index` (`final`: it is the last chunk)."""
        return crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext, self._ad(final), self._nonce(index), self._key)

    def open(self, index: int, ciphertext: bytes, *, final: bool) -> bytes:
        """Plaintext of chunk `index`; `AttachmentCorrupt` naming the index if it does not open
        as that chunk (tampered, another chunk, another attachment, wrong final flag)."""
        try:
            return crypto_aead_xchacha20poly1305_ietf_decrypt(
                bytes(ciphertext), self._ad(final), self._nonce(index), self._key)
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise AttachmentCorrupt("does not decrypt", chunk=index) from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class Encrypted:
    """What `encrypt_stream` wrote: the plaintext size and the blob's size and SHA-256."""

    size: int
    ciphertext_size: int
    sha256: bytes


def _read_exactly(src: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes, fewer only at the end of `src` (a raw file may return short reads)."""
    data = src.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = src.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def encrypt_stream(src: BinaryIO, dst: BinaryIO, cipher: ChunkCipher, *,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   max_bytes: int = MAX_ATTACHMENT_BYTES) -> Encrypted:
    """Encrypt everything `src` holds into `dst`, chunk by chunk, holding two chunks at most.

    Raises `LimitExceeded("MAX_ATTACHMENT_BYTES")` as soon as `src` yields more than `max_bytes`
    (what was written to `dst` by then must be discarded).
    """
    _check_chunk_bytes(chunk_bytes)
    digest = hashlib.sha256()
    size = written = 0
    index = 0
    current = _read_exactly(src, chunk_bytes)
    while True:
        size += len(current)
        if size > max_bytes:
            raise LimitExceeded("MAX_ATTACHMENT_BYTES", f"more than {max_bytes} bytes")
        # The last chunk is the one not followed by another: read ahead to know.
        following = _read_exactly(src, chunk_bytes) if len(current) == chunk_bytes else b""
        sealed = cipher.seal(index, current, final=not following)
        dst.write(sealed)
        digest.update(sealed)
        written += len(sealed)
        if not following:
            return Encrypted(size=size, ciphertext_size=written, sha256=digest.digest())
        current = following
        index += 1


def decrypt_chunks(src: BinaryIO, descriptor: Descriptor) -> Iterator[bytes]:
    """Plaintext chunks of the blob read from `src`, in order, each checked before it is yielded;
    at the end the blob's size and SHA-256 are checked against `descriptor`.

    Raises `AttachmentCorrupt` naming the first bad chunk (missing, cut short, tampered, out of
    place) or, with no chunk, a blob that is too long or whose hash does not match. Plaintext
    already yielded is unconfirmed until the iterator finishes: keep it apart (a temporary file)
    until then.
    """
    cipher = descriptor.cipher()
    digest = hashlib.sha256()
    last = descriptor.chunks - 1
    for index in range(descriptor.chunks):
        _, length = descriptor.chunk_span(index)
        sealed = _read_exactly(src, length)
        if len(sealed) != length:
            raise AttachmentCorrupt(
                f"truncated: {len(sealed)} of {length} bytes", chunk=index)
        digest.update(sealed)
        yield cipher.open(index, sealed, final=index == last)
    if src.read(1):
        raise AttachmentCorrupt(f"longer than the {descriptor.ciphertext_size} bytes announced")
    if digest.digest() != descriptor.sha256:
        raise AttachmentCorrupt("ciphertext hash does not match the descriptor")


def decrypt_stream(src: BinaryIO, dst: BinaryIO, descriptor: Descriptor) -> int:
    """Decrypt the blob in `src` into `dst` (see `decrypt_chunks`); returns the bytes written."""
    written = 0
    for plain in decrypt_chunks(src, descriptor):
        dst.write(plain)
        written += len(plain)
    return written
