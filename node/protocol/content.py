"""Message content: what the ratchet encrypts (PROTOCOL.md "Message content").

    plaintext = pad(CBOR content)
    pad(x)    = x || 0x80 || 0x00 ... to the next multiple of PAD_BLOCK bytes (ISO/IEC 7816-4)

so that ciphertext lengths reveal only a size bucket. Content kinds:

    text   {"v": 1, "t": "text", "id": bstr .size 16, "ts": uint, "body": tstr}
    intro  {"v": 1, "t": "intro", "id": bstr .size 16, "ts": uint, "name": tstr,
            "addrs": [* tstr], "relays": [* tstr], ? "token": bstr .size 16,
            ? "cap": bstr .size 16, ? "box": bstr .size 32}
    receipt {"v": 1, "t": "receipt", "id": bstr .size 16, "ts": uint, "ids": [+ bstr .size 16]}

`id` is the message id (random, chosen by the sender; the transport frame repeats it so duplicates
are dropped before decryption, and the receiver checks the two agree). `ts` is the sender's clock
in milliseconds, strictly increasing per sending device: histories are ordered by it.

An intro is the first message a device sends to a new contact: the display name it suggests, the
addresses where it can be reached, the relays that hold its mailbox, and the token of the invite it
used (if any), which is what lets the invite's owner accept the sender as a contact, and the
deposit capability the receiver presents at the sender's relays (PROTOCOL.md section 21). A device
also sends one to a contact that introduced itself to it, so both sides hold a capability.

A receipt tells the sender that messages which came through a relay were committed (a direct
connection carries this as an `ack` frame instead). Receipts are not themselves receipted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from node.errors import DecodeError
from node.protocol import codec
from node.protocol.limits import MAX_PLAINTEXT_BYTES

__all__ = ["PAD_BLOCK", "Content", "ContentKind", "Intro", "Receipt", "Text", "decode_content",
           "encode_content"]

#: Padding block (ISO/IEC 7816-4 padding to a multiple of it): ciphertext lengths reveal only a
#: size bucket.
PAD_BLOCK: Final = 128
MESSAGE_ID_BYTES: Final = 16
INVITE_TOKEN_BYTES: Final = 16
DEPOSIT_CAP_BYTES: Final = 16
MAILBOX_ID_BYTES: Final = 32
CONTENT_VERSION: Final = 1
#: Largest text of one message, in bytes of UTF-8. Longer content belongs in attachments.
MAX_TEXT_BYTES: Final = 64 * 1024
MAX_NAME_BYTES: Final = 256
MAX_ADDRS: Final = 16
MAX_RECEIPT_IDS: Final = 1024
MAX_ADDR_BYTES: Final = 512
MAX_TIMESTAMP_MS: Final = 2**53


@dataclass(frozen=True, kw_only=True, slots=True)
class Text:
    """A text message written by a person."""

    id: bytes
    sent_at_ms: int
    body: str

    def __post_init__(self) -> None:
        _check_id(self.id)
        if len(self.body.encode("utf-8")) > MAX_TEXT_BYTES:
            raise ValueError(f"text longer than {MAX_TEXT_BYTES} bytes")


@dataclass(frozen=True, kw_only=True, slots=True)
class Intro:
    """A device introducing itself to a new contact."""

    id: bytes
    sent_at_ms: int
    name: str
    addrs: tuple[str, ...]
    relays: tuple[str, ...] = ()
    token: bytes | None = None
    #: The deposit capability the receiver presents when it deposits into the sender's mailbox
    #: (PROTOCOL.md section 21 "Deposit capabilities").
    cap: bytes | None = None
    #: The id of the sender's contacts' mailbox, where the receiver deposits (PROTOCOL.md
    #: section 21 "Two mailboxes"); None: the one derived from the sender's device key.
    box: bytes | None = None

    def __post_init__(self) -> None:
        _check_id(self.id)
        if self.token is not None and len(self.token) != INVITE_TOKEN_BYTES:
            raise ValueError("invite token must be 16 bytes")
        if self.cap is not None and len(self.cap) != DEPOSIT_CAP_BYTES:
            raise ValueError("deposit capability must be 16 bytes")
        if self.box is not None and len(self.box) != MAILBOX_ID_BYTES:
            raise ValueError("mailbox id must be 32 bytes")
        if len(self.addrs) > MAX_ADDRS or len(self.relays) > MAX_ADDRS:
            raise ValueError(f"more than {MAX_ADDRS} addresses")


@dataclass(frozen=True, kw_only=True, slots=True)
class Receipt:
    """Messages (by id) that arrived through a relay and were committed by the recipient."""

    id: bytes
    sent_at_ms: int
    ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not 1 <= len(self.ids) <= MAX_RECEIPT_IDS:
            raise ValueError(f"a receipt names 1 to {MAX_RECEIPT_IDS} messages")
        for message_id in self.ids:
            _check_id(message_id)


Content = Text | Intro | Receipt
"""Any decoded message content."""

ContentKind = Literal["text", "intro", "receipt"]
"""The content kinds: the "t" field on the wire, and the kind of a message in the history."""


def _check_id(message_id: bytes) -> None:
    if not isinstance(message_id, bytes) or len(message_id) != MESSAGE_ID_BYTES:
        raise ValueError("message ids are 16 bytes")


def encode_content(content: Content) -> bytes:
    """Canonical CBOR of `content`, padded to a multiple of PAD_BLOCK bytes."""
    body: dict[str, object] = {"v": CONTENT_VERSION, "id": content.id, "ts": content.sent_at_ms}
    if isinstance(content, Text):
        body.update(t="text", body=content.body)
    elif isinstance(content, Receipt):
        body.update(t="receipt", ids=list(content.ids))
    else:
        body.update(t="intro", name=content.name, addrs=list(content.addrs),
                    relays=list(content.relays))
        if content.token is not None:
            body["token"] = content.token
        if content.cap is not None:
            body["cap"] = content.cap
        if content.box is not None:
            body["box"] = content.box
    encoded = codec.encode(body)
    padded_length = (len(encoded) // PAD_BLOCK + 1) * PAD_BLOCK
    return encoded + b"\x80" + bytes(padded_length - len(encoded) - 1)


def decode_content(plaintext: bytes) -> Content:
    """Strip the padding and decode; DecodeError for anything malformed."""
    if len(plaintext) > MAX_PLAINTEXT_BYTES or len(plaintext) % PAD_BLOCK:
        raise DecodeError("content: padded length is not a multiple of the block")
    end = len(plaintext.rstrip(b"\x00"))
    if end == 0 or plaintext[end - 1] != 0x80:
        raise DecodeError("content: bad padding")
    f = codec.decode_map(plaintext[: end - 1], limit=MAX_PLAINTEXT_BYTES, what="content",
                         version=CONTENT_VERSION)
    kind = f.text("t", max_size=16)
    message_id = f.bytes("id", MESSAGE_ID_BYTES)
    sent_at = f.int("ts", 0, MAX_TIMESTAMP_MS)
    content: Content
    if kind == "text":
        content = Text(id=message_id, sent_at_ms=sent_at, body=f.text("body", max_size=MAX_TEXT_BYTES))
    elif kind == "intro":
        content = Intro(
            id=message_id,
            sent_at_ms=sent_at,
            name=f.text("name", max_size=MAX_NAME_BYTES),
            addrs=_addresses(f, "addrs"),
            relays=_addresses(f, "relays"),
            token=f.bytes("token", INVITE_TOKEN_BYTES, optional=True),
            cap=f.bytes("cap", DEPOSIT_CAP_BYTES, optional=True),
            box=f.bytes("box", MAILBOX_ID_BYTES, optional=True),
        )
    elif kind == "receipt":
        ids = f.list("ids", max_items=MAX_RECEIPT_IDS)
        if not ids or not all(isinstance(i, bytes) and len(i) == MESSAGE_ID_BYTES for i in ids):
            raise DecodeError("content: receipt ids must be 1 or more 16-byte strings")
        content = Receipt(id=message_id, sent_at_ms=sent_at, ids=tuple(ids))
    else:
        raise DecodeError(f"content: unknown kind {kind!r}")
    f.done()
    return content


def _addresses(f: codec.Fields, key: str) -> tuple[str, ...]:
    addrs = f.list(key, max_items=MAX_ADDRS)
    if not all(isinstance(a, str) and len(a) <= MAX_ADDR_BYTES for a in addrs):
        raise DecodeError(f"content: {key} must be short text")
    return tuple(addrs)
