"""Attachment descriptor and chunk encryption (PROTOCOL.md section 26): round trips, random
access, every kind of tampering refused naming the chunk, constant memory, and a descriptor
decoder that raises nothing but DecodeError on any input."""

from __future__ import annotations

import contextlib
import io
import os
import tracemalloc
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import AttachmentCorrupt, DecodeError, DecryptionFailed, LimitExceeded
from node.protocol import codec
from node.protocol.attachment import (
    DEFAULT_CHUNK_BYTES,
    MAX_DESCRIPTOR_BYTES,
    MAX_THUMBNAIL_BYTES,
    TAG_BYTES,
    ChunkCipher,
    Descriptor,
    ciphertext_size,
    decrypt_chunks,
    decrypt_stream,
    encrypt_stream,
)
from node.testing import DeterministicRandom

CHUNK = 64


def _encrypt(data: bytes, cipher: ChunkCipher | None = None,
             chunk: int = CHUNK) -> tuple[Descriptor, bytes]:
    cipher = cipher or ChunkCipher.generate()
    out = io.BytesIO()
    result = encrypt_stream(io.BytesIO(data), out, cipher, chunk_bytes=chunk)
    descriptor = Descriptor(name="notes.txt", media_type="text/plain", size=result.size,
                            chunk_bytes=chunk, sha256=result.sha256, key=cipher.key,
                            nonce_prefix=cipher.nonce_prefix)
    assert result.ciphertext_size == descriptor.ciphertext_size == len(out.getvalue())
    return descriptor, out.getvalue()


def _decrypt(descriptor: Descriptor, blob: bytes) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(blob), out, descriptor)
    return out.getvalue()


def _chunks(descriptor: Descriptor, blob: bytes) -> list[bytes]:
    return [blob[o:o + n] for o, n in map(descriptor.chunk_span, range(descriptor.chunks))]


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 7])
def test_round_trip_at_every_boundary(size: int) -> None:
    data = os.urandom(size)
    descriptor, blob = _encrypt(data)
    assert len(blob) == size + TAG_BYTES * max(1, -(-size // CHUNK))
    assert _decrypt(descriptor, blob) == data


def test_each_chunk_decrypts_alone_for_a_ranged_fetch() -> None:
    data = os.urandom(4 * CHUNK + 10)
    descriptor, blob = _encrypt(data)
    cipher = descriptor.cipher()
    for index in reversed(range(descriptor.chunks)):  # any order: no state between chunks
        offset, length = descriptor.chunk_span(index)
        plain = cipher.open(index, blob[offset:offset + length],
                            final=index == descriptor.chunks - 1)
        assert plain == data[index * CHUNK:(index + 1) * CHUNK]


def _refused(descriptor: Descriptor, blob: bytes) -> AttachmentCorrupt:
    with pytest.raises(AttachmentCorrupt) as caught:
        _decrypt(descriptor, blob)
    assert isinstance(caught.value, DecryptionFailed)
    return caught.value


def test_a_flipped_byte_is_refused_naming_its_chunk() -> None:
    descriptor, blob = _encrypt(os.urandom(3 * CHUNK + 5))
    for index in range(descriptor.chunks):
        offset, length = descriptor.chunk_span(index)
        tampered = bytearray(blob)
        tampered[offset + length // 2] ^= 0x01
        error = _refused(descriptor, bytes(tampered))
        assert error.chunk == index
        assert f"chunk {index}" in str(error)


def test_truncation_is_refused_naming_the_missing_chunk() -> None:
    descriptor, blob = _encrypt(os.urandom(3 * CHUNK + 5))
    # Cut at a chunk boundary: chunk 2 is the new end but was sealed as "not last"; even a
    # receiver that did not know the size would refuse it (the final flag).
    cut = descriptor.chunk_span(3)[0]
    assert _refused(descriptor, blob[:cut]).chunk == 3
    short = replace(descriptor, size=3 * CHUNK)
    assert _refused(short, blob[:cut]).chunk == 2
    # Cut inside a chunk.
    assert _refused(descriptor, blob[:cut - 3]).chunk == 2


def test_reordered_chunks_are_refused() -> None:
    descriptor, blob = _encrypt(os.urandom(4 * CHUNK))
    parts = _chunks(descriptor, blob)
    parts[1], parts[2] = parts[2], parts[1]
    assert _refused(descriptor, b"".join(parts)).chunk == 1


def test_a_chunk_from_another_attachment_with_the_same_key_is_refused() -> None:
    key = os.urandom(32)
    first = ChunkCipher(key, os.urandom(16))
    other = ChunkCipher(key, os.urandom(16))
    descriptor, blob = _encrypt(os.urandom(3 * CHUNK), first)
    other_descriptor, other_blob = _encrypt(os.urandom(3 * CHUNK), other)
    parts = _chunks(descriptor, blob)
    parts[1] = _chunks(other_descriptor, other_blob)[1]
    assert _refused(descriptor, b"".join(parts)).chunk == 1


def test_a_last_chunk_moved_earlier_or_data_appended_is_refused() -> None:
    descriptor, blob = _encrypt(os.urandom(2 * CHUNK))
    parts = _chunks(descriptor, blob)
    assert _refused(descriptor, parts[1] + parts[0]).chunk == 0
    error = _refused(descriptor, blob + parts[1])
    assert error.chunk is None and "longer" in str(error)


def test_a_wrong_hash_is_refused_after_the_chunks() -> None:
    descriptor, blob = _encrypt(os.urandom(2 * CHUNK))
    error = _refused(replace(descriptor, sha256=bytes(32)), blob)
    assert error.chunk is None and "hash" in str(error)


def test_chunks_are_yielded_only_after_they_verify() -> None:
    descriptor, blob = _encrypt(os.urandom(3 * CHUNK))
    tampered = bytearray(blob)
    tampered[descriptor.chunk_span(1)[0]] ^= 0xFF
    got = []
    with pytest.raises(AttachmentCorrupt):
        got.extend(decrypt_chunks(io.BytesIO(bytes(tampered)), descriptor))
    assert len(got) == 1  # chunk 0 only


def test_encryption_refuses_more_than_the_limit() -> None:
    with pytest.raises(LimitExceeded):
        encrypt_stream(io.BytesIO(bytes(1000)), io.BytesIO(), ChunkCipher.generate(),
                       chunk_bytes=CHUNK, max_bytes=999)


class _Zeros(io.RawIOBase):
    """`total` zero bytes, made as they are read (no file behind them)."""

    def __init__(self, total: int) -> None:
        self.left = total

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.count += len(data)
        return len(data)


def test_encryption_runs_in_constant_memory() -> None:
    total = 16 * 1024 * 1024
    sink = _Sink()
    tracemalloc.start()
    try:
        result = encrypt_stream(_Zeros(total), sink, ChunkCipher.generate())  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.size == total and sink.count == ciphertext_size(total, DEFAULT_CHUNK_BYTES)
    # a few chunks (the current one, the next read ahead, the sealed or opened one, the
    # binding's output buffer), not the 16 MiB stream
    assert peak < 6 * DEFAULT_CHUNK_BYTES, f"peak {peak} bytes for a {total}-byte stream"


def test_decryption_runs_in_constant_memory() -> None:
    total = 16 * 1024 * 1024
    cipher = ChunkCipher.generate()
    blob = io.BytesIO()
    result = encrypt_stream(_Zeros(total), blob, cipher)  # type: ignore[arg-type]
    descriptor = Descriptor(name="zeros", media_type="application/octet-stream", size=total,
                            chunk_bytes=DEFAULT_CHUNK_BYTES, sha256=result.sha256, key=cipher.key,
                            nonce_prefix=cipher.nonce_prefix)
    blob.seek(0)
    sink = _Sink()
    tracemalloc.start()
    try:
        decrypt_stream(blob, sink, descriptor)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.count == total
    # a few chunks (the current one, the next read ahead, the sealed or opened one, the
    # binding's output buffer), not the 16 MiB stream
    assert peak < 6 * DEFAULT_CHUNK_BYTES, f"peak {peak} bytes for a {total}-byte stream"


# --- descriptor ------------------------------------------------------------------------------

SAMPLE = Descriptor(
    name="photo.jpg", media_type="image/jpeg", size=123_456, chunk_bytes=65_536,
    sha256=bytes(range(32)), key=bytes(range(32, 64)), nonce_prefix=bytes(16),
    thumbnail=b"\xff\xd8" + bytes(500), width=1600, height=1200)
SAMPLE_COMPRESSED = Descriptor(
    name="log.txt", media_type="text/plain", size=1000, chunk_bytes=65_536, sha256=bytes(32),
    key=bytes(32), nonce_prefix=bytes(16), compression="zstd", original_size=50_000)


@pytest.mark.parametrize("descriptor", [SAMPLE, SAMPLE_COMPRESSED])
def test_descriptor_round_trip(descriptor: Descriptor) -> None:
    encoded = descriptor.to_bytes()
    assert Descriptor.from_bytes(encoded) == descriptor
    assert codec.decode(encoded, limit=MAX_DESCRIPTOR_BYTES, what="x")["csize"] == (
        descriptor.ciphertext_size)


def _with(**changes: object) -> bytes:
    body = codec.decode(SAMPLE.to_bytes(), limit=MAX_DESCRIPTOR_BYTES, what="x")
    for key, value in changes.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    return codec.encode(body)


@pytest.mark.parametrize("bad", [
    _with(name="../etc/passwd"), _with(name=""), _with(name="a" * 256), _with(name="a\x00b"),
    _with(type="Image/JPEG"), _with(type="jpeg"), _with(csize=5), _with(chunk=32),
    _with(chunk=2 * 1024 * 1024), _with(size=2**31 + 1), _with(key=bytes(31)),
    _with(np=bytes(15)), _with(hash=bytes(33)), _with(thumb=bytes(MAX_THUMBNAIL_BYTES + 1)),
    _with(thumb=b""), _with(h=None), _with(w=0), _with(comp="gzip", osize=5),
    _with(comp="zstd"), _with(osize=5), _with(extra=1), _with(v=2), _with(key=None),
])
def test_descriptor_refuses_bad_fields(bad: bytes) -> None:
    with pytest.raises(DecodeError):
        Descriptor.from_bytes(bad)


def test_descriptor_refuses_oversized_input_before_parsing() -> None:
    with pytest.raises(DecodeError, match="bytes >"):
        Descriptor.from_bytes(b"\xa1" + bytes(MAX_DESCRIPTOR_BYTES))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_descriptor_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        Descriptor.from_bytes(data)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_descriptor_fuzz_mutations(data: st.DataObject) -> None:
    encoded = bytearray(data.draw(st.sampled_from([SAMPLE.to_bytes(),
                                                    SAMPLE_COMPRESSED.to_bytes()])))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(encoded)))
        if op == "flip" and at < len(encoded):
            encoded[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del encoded[at:at + data.draw(st.integers(1, 8))]
        else:
            encoded[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    with contextlib.suppress(DecodeError):
        Descriptor.from_bytes(bytes(encoded))


def test_deterministic_key_material_gives_identical_blobs() -> None:
    """Same key, prefix and plaintext give the same bytes (what the vectors rely on)."""
    data = os.urandom(200)
    a = _encrypt(data, ChunkCipher.generate(DeterministicRandom(b"x")))
    b = _encrypt(data, ChunkCipher.generate(DeterministicRandom(b"x")))
    assert a == b


def test_vectors_follow_the_construction_written_in_protocol_md() -> None:
    """Section 26.2 reimplemented with raw libsodium calls, against tests/vectors: an independent
    client written from the text gets the same bytes."""
    import hashlib
    import json

    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt

    from tests.vectors.generate import PATH

    document = json.loads(PATH.read_text())
    inputs, out = document["inputs"], document["outputs"]
    stream = DeterministicRandom(bytes.fromhex(inputs["attachment_random_seed"]))
    key, prefix = stream(32), stream(16)
    assert (key.hex(), prefix.hex()) == (out["attachment_key"], out["attachment_nonce_prefix"])
    chunks = [bytes.fromhex(c) for c in out["attachment_chunks"]]
    plain = b"".join(
        crypto_aead_xchacha20poly1305_ietf_decrypt(
            chunk, b"pigeon-attachment-v1\x00" + bytes([i == len(chunks) - 1]),
            prefix + i.to_bytes(8, "big"), key)
        for i, chunk in enumerate(chunks))
    assert plain.hex() == inputs["attachment_plaintext"]
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == out["attachment_ciphertext_sha256"]
    descriptor = Descriptor.from_bytes(bytes.fromhex(out["attachment_descriptor"]))
    assert (descriptor.key, descriptor.nonce_prefix, descriptor.size) == (key, prefix, len(plain))
    assert descriptor.sha256.hex() == out["attachment_ciphertext_sha256"]
