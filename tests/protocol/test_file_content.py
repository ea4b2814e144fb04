"""File messages and blob transfer frames (PROTOCOL.md sections 26.4, 26.5): the vector, round
trips, and bad input refused with DecodeError only."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import DecodeError
from node.protocol import codec
from node.protocol.attachment import MAX_DESCRIPTOR_BYTES, Descriptor
from node.protocol.blob import (
    MAX_BLOB_REQUEST_BYTES,
    BlobError,
    BlobGet,
    BlobRange,
    blob_proof,
    check_proof,
    decode_reply,
    decode_request,
    encode_error,
    encode_range,
    encode_request,
)
from node.protocol.content import PAD_BLOCK, File, Transcript, decode_content, encode_content
from node.protocol.kdf import hmac_sha256
from tests.vectors.generate import PATH

VECTORS = json.loads(PATH.read_text())
INPUTS, OUTPUTS = VECTORS["inputs"], VECTORS["outputs"]
DESCRIPTOR = Descriptor.from_bytes(bytes.fromhex(OUTPUTS["attachment_descriptor"]))


def _pad(body: bytes) -> bytes:
    length = (len(body) // PAD_BLOCK + 1) * PAD_BLOCK
    return body + b"\x80" + bytes(length - len(body) - 1)


def test_the_file_vector_decodes_to_its_inputs_and_encodes_back() -> None:
    plaintext = bytes.fromhex(OUTPUTS["file_plaintext"])
    content = decode_content(plaintext)
    assert isinstance(content, File)
    assert content.id.hex() == INPUTS["file_id"] and content.sent_at_ms == INPUTS["file_ts"]
    assert content.caption == INPUTS["file_caption"]
    assert content.attachment == DESCRIPTOR
    assert encode_content(content) == plaintext


def test_a_file_without_caption_leaves_the_body_out() -> None:
    encoded = encode_content(File(id=b"\x01" * 16, sent_at_ms=5, attachment=DESCRIPTOR))
    decoded = decode_content(encoded)
    assert isinstance(decoded, File) and decoded.caption == ""
    body = codec.decode(encoded.rstrip(b"\x00")[:-1], limit=1 << 20, what="test")
    assert "body" not in body


@pytest.mark.parametrize("att", [
    b"\x00" * 10,                                   # not a descriptor
    bytes(MAX_DESCRIPTOR_BYTES + 1),                # over the limit, refused before parsing
    DESCRIPTOR.to_bytes()[:-1],                     # cut short
])
def test_a_file_with_a_bad_descriptor_is_malformed(att: bytes) -> None:
    body = codec.encode({"v": 1, "t": "file", "id": b"\x02" * 16, "ts": 1, "att": att})
    with pytest.raises(DecodeError):
        decode_content(_pad(body))


def test_a_transcript_of_a_file_carries_the_same_descriptor_bytes() -> None:
    """PROTOCOL.md sections 25.5, 26.4: `att` is the file's descriptor as encoded, `body` the
    caption; a transcript of a text leaves `att` out."""
    transcript = Transcript(id=b"\x05" * 16, sent_at_ms=9, to=b"\x06" * 32, body="",
                            attachment=DESCRIPTOR)
    encoded = encode_content(transcript)
    assert decode_content(encoded) == transcript
    body = codec.decode(encoded.rstrip(b"\x00")[:-1], limit=1 << 20, what="test")
    assert body["att"] == DESCRIPTOR.to_bytes() and body["body"] == ""
    text = encode_content(Transcript(id=b"\x05" * 16, sent_at_ms=9, to=b"\x06" * 32, body="hi"))
    assert "att" not in codec.decode(text.rstrip(b"\x00")[:-1], limit=1 << 20, what="test")


@pytest.mark.parametrize("att", [b"\x00" * 10, bytes(MAX_DESCRIPTOR_BYTES + 1)])
def test_a_transcript_with_a_bad_descriptor_is_malformed(att: bytes) -> None:
    body = codec.encode({"v": 1, "t": "transcript", "id": b"\x02" * 16, "ts": 1,
                         "to": b"\x06" * 32, "body": "", "att": att})
    with pytest.raises(DecodeError):
        decode_content(_pad(body))


def test_the_proof_is_the_hmac_written_in_protocol_md() -> None:
    proof = blob_proof(DESCRIPTOR)
    assert proof == hmac_sha256(DESCRIPTOR.key, b"pigeon-blob-proof-v1" + DESCRIPTOR.sha256)
    assert check_proof(DESCRIPTOR, proof)
    assert not check_proof(DESCRIPTOR, bytes(32))


def test_blob_frames_round_trip() -> None:
    request = BlobGet(hash=b"\x03" * 32, proof=b"\x04" * 32, first=7, count=9)
    assert decode_request(encode_request(request)) == request
    assert decode_reply(encode_range(7, 9)) == BlobRange(first=7, count=9)
    assert decode_reply(encode_error("unknown-blob")) == BlobError(code="unknown-blob")
    assert len(encode_request(BlobGet(hash=b"\xff" * 32, proof=b"\xff" * 32, first=2**25,
                                      count=2**25))) <= MAX_BLOB_REQUEST_BYTES


@pytest.mark.parametrize("fields", [
    {"v": 1, "t": "get", "hash": b"\x00" * 32, "proof": b"\x00" * 32, "from": 0, "count": 0},
    {"v": 1, "t": "get", "hash": b"\x00" * 31, "proof": b"\x00" * 32, "from": 0, "count": 1},
    {"v": 1, "t": "get", "hash": b"\x00" * 32, "proof": b"\x00" * 32, "from": 0, "count": 1,
     "x": 1},
    {"v": 2, "t": "get", "hash": b"\x00" * 32, "proof": b"\x00" * 32, "from": 0, "count": 1},
    {"v": 1, "t": "range", "from": 0, "count": 1},
])
def test_bad_requests_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(DecodeError):
        decode_request(codec.encode(fields))


def test_an_oversized_header_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="bytes >"):
        decode_request(bytes(MAX_BLOB_REQUEST_BYTES + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(DecodeError):
            decode(data)
