"""Frames of the key-fetch protocol `/pigeon/bundle/1.0.0` (PROTOCOL.md section 14.2).

Whoever uses a short invite opens one stream to the inviting device and asks, with the invite's
token, for the device's signed device record (the record of PROTOCOL.md section 23.3: addresses,
relays and a prekey bundle, signed by the account key). One request, one reply, then the stream
ends:

    request = {"v": 1, "t": "get", ? "token": bstr .size 16}
    reply   = {"v": 1, "t": "record", "record": bstr}             a signed device record
            / {"v": 1, "t": "error", "code": "unknown-token" / "rate-limited" / tstr}

The record proves itself (signature by the invite's identity key, the invite's device key), so
the same check applies whether it came from the device or from the DHT.

A request without a token asks as a device the answering device already knows (of one of its
contacts, or of its own account): it is answered only if the connection's peer is such a device,
and is how a device gets the keys of a device that joined an account since (PROTOCOL.md section
25.4). Otherwise the reply is the error "unknown-device".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from node.errors import DecodeError
from node.protocol import codec
from node.protocol.content import INVITE_TOKEN_BYTES
from node.protocol.limits import MAX_RECORD_BYTES

__all__ = [
    "BUNDLE_PROTOCOL",
    "MAX_BUNDLE_REPLY_BYTES",
    "MAX_BUNDLE_REQUEST_BYTES",
    "BundleError",
    "BundleRecord",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_record",
    "encode_request",
]

BUNDLE_PROTOCOL: Final = "/pigeon/bundle/1.0.0"
BUNDLE_VERSION: Final = 1
#: A request is a 16-byte token in a small map (about 30 bytes); anything larger is not one.
MAX_BUNDLE_REQUEST_BYTES: Final = 64
#: A reply carries one signed record (at most MAX_RECORD_BYTES) in a small map.
MAX_BUNDLE_REPLY_BYTES: Final = MAX_RECORD_BYTES + 64
#: Error codes are short words; longer text is refused.
_MAX_CODE_BYTES: Final = 32

#: Reply codes (section 14.2): no unexpired invite has this token; the device answers no more
#: requests for now.
UNKNOWN_TOKEN: Final = "unknown-token"
RATE_LIMITED: Final = "rate-limited"
#: Reply code (section 25.4): a request without a token from a device the answering one does
#: not know.
UNKNOWN_DEVICE: Final = "unknown-device"


@dataclass(frozen=True, kw_only=True, slots=True)
class BundleRecord:
    """A reply carrying the device's signed device record (verified by the caller)."""

    record: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class BundleError:
    """A reply refusing the request, with its code."""

    code: str


def encode_request(token: bytes | None) -> bytes:
    """The request frame's body for the invite token `token` (None: a known device asking)."""
    if token is None:
        return codec.encode({"v": BUNDLE_VERSION, "t": "get"})
    if len(token) != INVITE_TOKEN_BYTES:
        raise ValueError(f"an invite token is {INVITE_TOKEN_BYTES} bytes")
    return codec.encode({"v": BUNDLE_VERSION, "t": "get", "token": token})


def decode_request(data: bytes) -> bytes | None:
    """The token of a request frame (None when it has none: a known device asking, section
    25.4); DecodeError (or LimitExceeded, UnknownVersion) otherwise."""
    f = codec.decode_map(data, limit=MAX_BUNDLE_REQUEST_BYTES, what="bundle request",
                         version=BUNDLE_VERSION)
    if f.text("t", max_size=_MAX_CODE_BYTES) != "get":
        raise DecodeError("bundle request: unknown type")
    token = f.bytes("token", INVITE_TOKEN_BYTES, optional=True)
    f.done()
    return token


def encode_record(record: bytes) -> bytes:
    """A reply frame's body carrying the signed device record `record`."""
    return codec.encode({"v": BUNDLE_VERSION, "t": "record", "record": record})


def encode_error(code: str) -> bytes:
    """A reply frame's body refusing the request with `code`."""
    return codec.encode({"v": BUNDLE_VERSION, "t": "error", "code": code})


def decode_reply(data: bytes) -> BundleRecord | BundleError:
    """Decode a reply strictly; DecodeError (or LimitExceeded, UnknownVersion) otherwise. Error
    codes are checked for shape only, so codes a newer device adds come through."""
    f = codec.decode_map(data, limit=MAX_BUNDLE_REPLY_BYTES, what="bundle reply",
                         version=BUNDLE_VERSION)
    kind = f.text("t", max_size=_MAX_CODE_BYTES)
    reply: BundleRecord | BundleError
    if kind == "record":
        reply = BundleRecord(record=f.bytes("record", max_size=MAX_RECORD_BYTES))
    elif kind == "error":
        reply = BundleError(code=f.text("code", max_size=_MAX_CODE_BYTES))
    else:
        raise DecodeError("bundle reply: unknown type")
    f.done()
    return reply
