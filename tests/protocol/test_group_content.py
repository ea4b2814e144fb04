"""Group contents (PROTOCOL.md section 27.5): round trips and refusal of malformed ones."""

from __future__ import annotations

import pytest

from node.errors import DecodeError
from node.protocol import codec
from node.protocol.content import (
    GroupMessage,
    GroupOps,
    SenderKey,
    decode_content,
    encode_content,
)

ID = b"\x01" * 16
GID = b"\x02" * 32


@pytest.mark.parametrize("content", [
    GroupOps(id=ID, sent_at_ms=5, group_id=GID, ops=(b"op1", b"op2")),
    SenderKey(id=ID, sent_at_ms=5, group_id=GID, key_id=b"\x03" * 32, chain_key=b"\x04" * 32,
              iteration=7),
    GroupMessage(id=ID, sent_at_ms=5, group_id=GID, message=b"\x01" + bytes(200)),
])
def test_group_contents_round_trip(content: object) -> None:
    assert decode_content(encode_content(content)) == content  # type: ignore[arg-type]


def _padded(body: dict[str, object]) -> bytes:
    raw = codec.encode(body)
    return raw + b"\x80" + bytes(-(len(raw) + 1) % 128)


@pytest.mark.parametrize("extra", [
    {"t": "group-ops", "g": GID, "ops": []},
    {"t": "group-ops", "g": GID, "ops": ["text"]},
    {"t": "group-ops", "g": GID[:31], "ops": [b"x"]},
    {"t": "sender-key", "g": GID, "kid": b"\x03" * 31, "ck": b"\x04" * 32, "n": 0},
    {"t": "sender-key", "g": GID, "kid": b"\x03" * 32, "ck": b"\x04" * 32, "n": -1},
    {"t": "group", "g": GID, "m": b""},
    {"t": "group", "g": GID, "m": b"x", "extra": 1},
])
def test_malformed_group_contents_are_refused(extra: dict[str, object]) -> None:
    with pytest.raises(DecodeError):
        decode_content(_padded({"v": 1, "id": ID, "ts": 1, **extra}))


def test_the_smallest_group_message_is_the_sender_key_overhead() -> None:
    from node.protocol.content import MIN_GROUP_MESSAGE_BYTES
    from node.protocol.senderkey import MESSAGE_OVERHEAD
    assert MIN_GROUP_MESSAGE_BYTES == MESSAGE_OVERHEAD
