"""Frames of the direct message protocol `/pigeon/msg/1.0.0` (PROTOCOL.md "Direct messaging").

Each frame is one CBOR map (the transport length-prefixes it):

    msg   {"v": 1, "t": "msg", "id": bstr .size 16, "m": session message}
    ack   {"v": 1, "t": "ack", "ids": [+ bstr .size 16]}
    nack  {"v": 1, "t": "nack", "id": bstr .size 16, "code": tstr}

The sender of a `msg` is the device the connection authenticated; the frame itself names no one.
`ack` is sent only after the receiver committed the messages (or had committed them before: a
duplicate is acknowledged again so the sender stops resending). `nack` says a message will never
be accepted (`code` in NACK_CODES); the sender marks it failed with that reason. The one
exception is `retry-later`: the receiver could not store the message now (its disk is full, its
database is locked or read-only) and the sender writes it again after a short wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, TypeGuard, get_args

from node.errors import DecodeError
from node.protocol import codec
from node.protocol.content import MESSAGE_ID_BYTES
from node.protocol.limits import MAX_SEALED_BYTES

__all__ = ["Ack", "Frame", "Msg", "Nack", "NackCode", "decode_frame", "encode_frame"]

WIRE_VERSION: Final = 1
MAX_ACK_IDS: Final = 1024

NackCode = Literal["undecryptable", "malformed", "unknown-sender", "retry-later"]
"""Reasons a receiver may give for refusing a message: for good, or (`retry-later`) for now."""
NACK_CODES: Final = frozenset(get_args(NackCode))


@dataclass(frozen=True, slots=True)
class Msg:
    """A session message (`message`) with its message id."""

    id: bytes
    message: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """The receiver committed these messages (or had before): stop resending them."""

    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Nack:
    """The receiver will never accept this message, for the reason `code`."""

    id: bytes
    code: NackCode


Frame = Msg | Ack | Nack
"""Any frame of the direct message protocol."""


def encode_frame(frame: Frame) -> bytes:
    """The canonical CBOR body of one frame (the transport length-prefixes it)."""
    if isinstance(frame, Msg):
        return codec.encode({"v": WIRE_VERSION, "t": "msg", "id": frame.id, "m": frame.message})
    if isinstance(frame, Ack):
        return codec.encode({"v": WIRE_VERSION, "t": "ack", "ids": list(frame.ids)})
    return codec.encode({"v": WIRE_VERSION, "t": "nack", "id": frame.id, "code": frame.code})


def decode_frame(data: bytes) -> Frame:
    """Decode one frame strictly; DecodeError (or UnknownVersion) for anything else."""
    f = codec.decode_map(data, limit=MAX_SEALED_BYTES + 1024, what="frame", version=WIRE_VERSION)
    kind = f.text("t", max_size=8)
    frame: Frame
    if kind == "msg":
        frame = Msg(f.bytes("id", MESSAGE_ID_BYTES), f.bytes("m", max_size=MAX_SEALED_BYTES))
    elif kind == "ack":
        ids = f.list("ids", max_items=MAX_ACK_IDS)
        if not ids or not all(isinstance(i, bytes) and len(i) == MESSAGE_ID_BYTES for i in ids):
            raise DecodeError("frame: ack ids must be 16-byte strings")
        frame = Ack(tuple(ids))
    elif kind == "nack":
        message_id, code = f.bytes("id", MESSAGE_ID_BYTES), f.text("code", max_size=32)
        if not _is_nack_code(code):
            raise DecodeError(f"frame: unknown nack code {code!r}")
        frame = Nack(message_id, code)
    else:
        raise DecodeError(f"frame: unknown type {kind!r}")
    f.done()
    return frame


def _is_nack_code(code: str) -> TypeGuard[NackCode]:
    return code in NACK_CODES
