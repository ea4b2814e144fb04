"""Strict CBOR decoding: every malformed input becomes a DecodeError, never a cbor2 exception."""

from __future__ import annotations

import cbor2
import pytest

from node.errors import DecodeError, LimitExceeded, UnknownVersion
from node.protocol import codec


def test_round_trip_is_canonical() -> None:
    data = codec.encode({"b": 1, "a": b"x"})
    assert data == cbor2.dumps({"a": b"x", "b": 1}, canonical=True)
    assert codec.decode(data, limit=100, what="t") == {"a": b"x", "b": 1}


@pytest.mark.parametrize(
    "data",
    [
        b"",  # empty
        b"\xa1\x61a",  # truncated map
        b"\xa1\x61a\x01\x00",  # trailing byte
        b"\xa2\x61a\x01\x61a\x02",  # duplicate key
        b"\x5f\x41a\xff",  # indefinite-length byte string
        b"\x81" * 40 + b"\x00",  # nested too deeply
        b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff",  # length far beyond the input
        b"\xff",  # break outside an indefinite item
        b"\x7f\x61\xff\xff",  # indefinite text with invalid UTF-8
    ],
)
def test_malformed_cbor_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.decode(data, limit=1000, what="t")


def test_size_is_checked_before_parsing() -> None:
    with pytest.raises(LimitExceeded):
        codec.decode(b"\x00" * 11, limit=10, what="t")


def test_fields_check_types_sizes_and_unknown_keys() -> None:
    data = codec.encode({"v": 1, "k": b"\x00" * 32, "n": 5, "t": "hi", "x": 1})
    f = codec.decode_map(data, limit=1000, what="t", version=1)
    assert f.bytes("k", 32) == b"\x00" * 32
    assert f.int("n", 0, 10) == 5
    assert f.text("t", max_size=2) == "hi"
    with pytest.raises(DecodeError, match="unknown fields"):
        f.done()
    f = codec.decode_map(data, limit=1000, what="t")
    with pytest.raises(DecodeError):
        f.bytes("k", 16)
    with pytest.raises(DecodeError):
        f.int("n", 6, 10)
    with pytest.raises(DecodeError):
        f.bytes("n")
    with pytest.raises(DecodeError):
        f.int("t", 0, 1)
    with pytest.raises(DecodeError, match="missing"):
        f.bytes("absent")


def test_booleans_are_not_integers_and_tags_are_not_bytes() -> None:
    f = codec.decode_map(codec.encode({"b": True, "d": 1}), limit=100, what="t")
    with pytest.raises(DecodeError):
        f.int("b", 0, 1)
    tagged = cbor2.dumps({"d": cbor2.CBORTag(2, b"\x01\x00")})  # a bignum tag
    f = codec.decode_map(tagged, limit=100, what="t")
    with pytest.raises(DecodeError):
        f.int("d", 0, 100)


def test_unknown_version_is_its_own_error() -> None:
    with pytest.raises(UnknownVersion):
        codec.decode_map(codec.encode({"v": 9}), limit=100, what="t", version=1)


def test_non_map_and_non_text_keys_are_refused() -> None:
    with pytest.raises(DecodeError):
        codec.decode_map(codec.encode([1, 2]), limit=100, what="t")
    with pytest.raises(DecodeError):
        codec.decode_map(codec.encode({1: 2}), limit=100, what="t")
