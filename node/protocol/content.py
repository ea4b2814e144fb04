"""Message content: what the ratchet encrypts (PROTOCOL.md "Message content").

    plaintext = pad(CBOR content)
    pad(x)    = x || 0x80 || 0x00 ... to the next multiple of PAD_BLOCK bytes (ISO/IEC 7816-4)

so that ciphertext lengths reveal only a size bucket. Content kinds:

    text   {"v": 1, "t": "text", "id": bstr .size 16, "ts": uint, "body": tstr}
    intro  {"v": 1, "t": "intro", "id": bstr .size 16, "ts": uint, "name": tstr,
            "addrs": [* tstr], "relays": [* tstr], ? "token": bstr .size 16,
            ? "bind": bstr .size 64, ? "cap": bstr .size 16, ? "box": bstr .size 32}
    receipt {"v": 1, "t": "receipt", "id": bstr .size 16, "ts": uint, "ids": [+ bstr .size 16]}
    sync   {"v": 1, "t": "sync", "id": bstr .size 16, "ts": uint, "op": tstr, "ik": bstr .size 32,
            "name": tstr, "devices": [* {"dev": bstr .size 32, "addrs": [* tstr],
                                         "relays": [* tstr]}],
            ? "mid": bstr .size 16, ? "mts": uint}     ("mid", "mts": op "read" only)
    device-list {"v": 1, "t": "device-list", "id": bstr .size 16, "ts": uint, "list": bstr,
            "hints": [* {"dev": bstr .size 32, "addrs": [* tstr], "relays": [* tstr]}]}
    transcript {"v": 1, "t": "transcript", "id": bstr .size 16, "ts": uint,
            "to": bstr .size 32, "body": tstr, ? "att": bstr .cbor attachment}
    group-ops {"v": 1, "t": "group-ops", "id": bstr .size 16, "ts": uint, "g": bstr .size 32,
            "ops": [+ bstr]}
    sender-key {"v": 1, "t": "sender-key", "id": bstr .size 16, "ts": uint, "g": bstr .size 32,
            "kid": bstr .size 32, "ck": bstr .size 32, "n": uint}
    group  {"v": 1, "t": "group", "id": bstr .size 16, "ts": uint, "g": bstr .size 32,
            "m": bstr}
    file   {"v": 1, "t": "file", "id": bstr .size 16, "ts": uint,
            "att": bstr .cbor attachment, ? "body": tstr}          (PROTOCOL.md section 26.4)

`id` is the message id (random, chosen by the sender; the transport frame repeats it so duplicates
are dropped before decryption, and the receiver checks the two agree). `ts` is the sender's clock
in milliseconds, strictly increasing per sending device: histories are ordered by it.

An intro is the first message a device sends to a new contact: the display name it suggests, the
addresses where it can be reached, the relays that hold its mailbox, and the token of the invite it
used (if any), which is what lets the invite's owner accept the sender as a contact, and the
sending device's binding to its account (PROTOCOL.md section 4 "Binding"), which proves the device
an intro from a mailbox only claims. It also carries the
deposit capability the receiver presents at the sender's relays (PROTOCOL.md section 21). A device
also sends one to a contact that introduced itself to it, so both sides hold a capability. An
intro's `ts` is when its addresses and relays were current (both are taken when it is encrypted,
not when it was queued): a receiver keeps whichever information about a device is newest
(section 21).

A receipt tells the sender that messages which came through a relay were committed (a direct
connection carries this as an `ack` frame instead). Receipts are not themselves receipted.

A sync tells the account's other devices of a change made on one of them (PROTOCOL.md section
25.6): a contact added (with its devices), renamed or removed, or its incoming messages read up
to one of them (`read`: that message's id and sender timestamp). Only a device of our own
account may send it.

A device-list update carries the sender account's signed device list (PROTOCOL.md section 25.4)
and, for listed devices, where the sender last knew them to be (dial hints, not trusted). A
transcript is a copy of a text or file we sent, for our own other devices: `to` is the account of
the conversation, `id`, `ts` and `body` (a file's caption) are the original message's, and `att`
a file's descriptor (sections 25.5, 26.4).

Groups (PROTOCOL.md section 27): `group-ops` carries signed membership operations of group `g`
(its whole log to a member who was just added); `sender-key` hands the sending device's sender
chain of group `g` to one member device; `group` carries one sender-key message, the same bytes
for every member device (its plaintext is a padded `text` content with the same `id` and `ts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from node.errors import DecodeError
from node.protocol import codec
from node.protocol.attachment import MAX_DESCRIPTOR_BYTES, Descriptor
from node.protocol.keys import SIGNATURE_BYTES as BINDING_BYTES
from node.protocol.limits import MAX_PLAINTEXT_BYTES

__all__ = ["PAD_BLOCK", "SYNC_OPS", "Content", "ContentKind", "DeviceHint", "DeviceListUpdate",
           "File", "GroupMessage", "GroupOps", "Intro", "Receipt", "SenderKey", "Sync", "SyncOp",
           "Text", "Transcript", "decode_content", "encode_content"]

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
#: Devices a sync may name: an account has at most 16 (node.protocol.directory.MAX_DEVICES).
MAX_SYNC_DEVICES: Final = 16
#: A signed device list of MAX_DEVICES entries is about 1.7 KiB; this leaves room and no more.
MAX_DEVICE_LIST_BYTES: Final = 4096
#: Hints name listed devices, at most MAX_DEVICES (16) of them.
MAX_DEVICE_HINTS: Final = 16
#: Relays per hinted device: the intro's bound (MAX_ADDRS) would let 16 hints fill a message.
MAX_HINT_ADDRS: Final = 8
KEY_BYTES: Final = 32


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
    binding: bytes | None = None  # the sending device's binding to its account (64 bytes)
    #: The deposit capability the receiver presents when it deposits into the sender's mailbox
    #: (PROTOCOL.md section 21 "Deposit capabilities").
    cap: bytes | None = None
    #: The id of the sender's contacts' mailbox, where the receiver deposits (PROTOCOL.md
    #: section 21 "Two mailboxes"); None: the one derived from the sender's device key.
    box: bytes | None = None

    @property
    def seen_at_ms(self) -> int:
        """The freshness of the addresses and relays (PROTOCOL.md section 21 "Where a device
        is"): an intro's `ts`, taken with them when it is encrypted (section 11)."""
        return self.sent_at_ms

    def __post_init__(self) -> None:
        _check_id(self.id)
        if self.token is not None and len(self.token) != INVITE_TOKEN_BYTES:
            raise ValueError("invite token must be 16 bytes")
        if self.binding is not None and len(self.binding) != BINDING_BYTES:
            raise ValueError(f"a device binding is {BINDING_BYTES} bytes")
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


SyncOp = Literal["contact-add", "contact-rename", "contact-remove", "read"]
"""What a sync message changes (PROTOCOL.md section 25.6)."""
SYNC_OPS: Final = ("contact-add", "contact-rename", "contact-remove", "read")


@dataclass(frozen=True, kw_only=True, slots=True)
class Sync:
    """A change made on another device of our account, to make here too: the contact with
    identity key `account` was added (with `devices`: key, addresses, relays), renamed to `name`
    or removed; or (`read`) its incoming messages were read up to the one with id `read_id`,
    sent at `read_sent_at_ms` by the contact's clock (`name` is then empty, `devices` too)."""

    id: bytes
    sent_at_ms: int
    op: SyncOp
    account: bytes
    name: str
    devices: tuple[tuple[bytes, tuple[str, ...], tuple[str, ...]], ...] = ()
    read_id: bytes | None = None
    read_sent_at_ms: int | None = None

    def __post_init__(self) -> None:
        _check_id(self.id)
        if self.op not in SYNC_OPS:
            raise ValueError(f"unknown sync operation {self.op!r}")
        if len(self.account) != KEY_BYTES or len(self.devices) > MAX_SYNC_DEVICES:
            raise ValueError("a sync names one account and at most 16 devices")
        if self.op != "read":
            if self.read_id is not None or self.read_sent_at_ms is not None:
                raise ValueError("only a read sync names a message")
            return
        if self.name or self.devices:
            raise ValueError("a read sync names no name and no devices")
        if self.read_id is None or self.read_sent_at_ms is None:
            raise ValueError("a read sync names the newest message read and its timestamp")
        _check_id(self.read_id)
        if not 0 <= self.read_sent_at_ms <= MAX_TIMESTAMP_MS:
            raise ValueError("a read sync's timestamp is out of range")


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceHint:
    """Where the sender of a device-list update last knew one listed device to be."""

    device: bytes
    addrs: tuple[str, ...] = ()
    relays: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.device, bytes) or len(self.device) != KEY_BYTES:
            raise ValueError("a hint names a 32-byte device key")
        if len(self.addrs) > MAX_HINT_ADDRS or len(self.relays) > MAX_HINT_ADDRS:
            raise ValueError(f"more than {MAX_HINT_ADDRS} addresses in a hint")


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceListUpdate:
    """The sender account's signed device list (verified by the receiver), with dial hints."""

    id: bytes
    sent_at_ms: int
    signed_list: bytes
    hints: tuple[DeviceHint, ...] = ()

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not 0 < len(self.signed_list) <= MAX_DEVICE_LIST_BYTES:
            raise ValueError(f"a device list is 1 to {MAX_DEVICE_LIST_BYTES} bytes")
        if len(self.hints) > MAX_DEVICE_HINTS:
            raise ValueError(f"at most {MAX_DEVICE_HINTS} hints")


@dataclass(frozen=True, kw_only=True, slots=True)
class Transcript:
    """A text or file (`attachment`; `body` is then its caption) we sent to account `to`,
    copied to our own other devices."""

    id: bytes
    sent_at_ms: int
    to: bytes
    body: str
    attachment: Descriptor | None = None

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.to, bytes) or len(self.to) != KEY_BYTES:
            raise ValueError("a transcript names a 32-byte account key")
        if len(self.body.encode("utf-8")) > MAX_TEXT_BYTES:
            raise ValueError(f"text longer than {MAX_TEXT_BYTES} bytes")


#: Operations one group-ops content carries: a group's whole log (node.protocol.groups.MAX_GROUP_OPS).
MAX_GROUP_OPS_PER_CONTENT: Final = 1000
#: A sender-key message is its plaintext (a padded text) plus 149 bytes.
MAX_GROUP_MESSAGE_BYTES: Final = MAX_TEXT_BYTES + 1024
#: The sender-key message of an empty plaintext (node.protocol.senderkey.MESSAGE_OVERHEAD).
MIN_GROUP_MESSAGE_BYTES: Final = 149
GROUP_ID_BYTES: Final = 32


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupOps:
    """Signed membership operations of group `group_id` (PROTOCOL.md section 27.5)."""

    id: bytes
    sent_at_ms: int
    group_id: bytes
    ops: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_id(self.id)
        if len(self.group_id) != GROUP_ID_BYTES:
            raise ValueError("a group id is 32 bytes")
        if not 1 <= len(self.ops) <= MAX_GROUP_OPS_PER_CONTENT:
            raise ValueError(f"group-ops carries 1 to {MAX_GROUP_OPS_PER_CONTENT} operations")


@dataclass(frozen=True, kw_only=True, slots=True)
class SenderKey:
    """The sending device's sender chain of group `group_id`: its key id (signing public key),
    chain key and iteration (PROTOCOL.md section 27.5)."""

    id: bytes
    sent_at_ms: int
    group_id: bytes
    key_id: bytes
    chain_key: bytes
    iteration: int

    def __post_init__(self) -> None:
        _check_id(self.id)
        if (len(self.group_id) != GROUP_ID_BYTES or len(self.key_id) != KEY_BYTES
                or len(self.chain_key) != KEY_BYTES):
            raise ValueError("a sender key names a 32-byte group, key id and chain key")
        if not 0 <= self.iteration < 2**32:
            raise ValueError("a sender key's iteration is a u32")


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupMessage:
    """One sender-key message of group `group_id`, the same bytes for every member device."""

    id: bytes
    sent_at_ms: int
    group_id: bytes
    message: bytes

    def __post_init__(self) -> None:
        _check_id(self.id)
        if len(self.group_id) != GROUP_ID_BYTES:
            raise ValueError("a group id is 32 bytes")
        if not MIN_GROUP_MESSAGE_BYTES <= len(self.message) <= MAX_GROUP_MESSAGE_BYTES:
            raise ValueError(f"a group message is {MIN_GROUP_MESSAGE_BYTES} to"
                             f" {MAX_GROUP_MESSAGE_BYTES} bytes")


@dataclass(frozen=True, kw_only=True, slots=True)
class File:
    """A file sent by a person (PROTOCOL.md section 26.4): the attachment's descriptor, which
    holds its key (section 26.1), and a caption (empty: none)."""

    id: bytes
    sent_at_ms: int
    attachment: Descriptor
    caption: str = ""

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.attachment, Descriptor):
            raise ValueError("a file message carries one attachment descriptor")
        if len(self.caption.encode("utf-8")) > MAX_TEXT_BYTES:
            raise ValueError(f"caption longer than {MAX_TEXT_BYTES} bytes")


Content = (Text | Intro | Receipt | Sync | DeviceListUpdate | Transcript | File | GroupOps
           | SenderKey | GroupMessage)
"""Any decoded message content."""

ContentKind = Literal["text", "intro", "receipt", "sync", "device-list", "transcript", "file",
                      "notice", "group-ops", "sender-key", "group"]
"""The content kinds: the "t" field on the wire, and the kind of a message in the history
("notice" is local only: a line such as "device added" in a contact's history)."""


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
    elif isinstance(content, Sync):
        body.update(t="sync", op=content.op, ik=content.account, name=content.name,
                    devices=[{"dev": d, "addrs": list(a), "relays": list(r)}
                             for d, a, r in content.devices])
        if content.read_id is not None:
            body.update(mid=content.read_id, mts=content.read_sent_at_ms)
    elif isinstance(content, DeviceListUpdate):
        body.update(t="device-list", list=content.signed_list, hints=[
            {"dev": h.device, "addrs": list(h.addrs), "relays": list(h.relays)}
            for h in content.hints])
    elif isinstance(content, Transcript):
        body.update(t="transcript", to=content.to, body=content.body)
        if content.attachment is not None:
            body["att"] = content.attachment.to_bytes()
    elif isinstance(content, GroupOps):
        body.update(t="group-ops", g=content.group_id, ops=list(content.ops))
    elif isinstance(content, SenderKey):
        body.update(t="sender-key", g=content.group_id, kid=content.key_id, ck=content.chain_key,
                    n=content.iteration)
    elif isinstance(content, GroupMessage):
        body.update(t="group", g=content.group_id, m=content.message)
    elif isinstance(content, File):
        body.update(t="file", att=content.attachment.to_bytes())
        if content.caption:
            body["body"] = content.caption
    else:
        body.update(t="intro", name=content.name, addrs=list(content.addrs),
                    relays=list(content.relays))
        if content.token is not None:
            body["token"] = content.token
        if content.binding is not None:
            body["bind"] = content.binding
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
    try:
        content = _decode_kind(f, kind, message_id, sent_at)
    except ValueError as exc:  # a field the dataclass refuses: malformed, like any other
        raise DecodeError(f"content: {exc}") from exc
    f.done()
    return content


def _decode_kind(f: codec.Fields, kind: str, message_id: bytes, sent_at: int) -> Content:
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
            binding=f.bytes("bind", BINDING_BYTES, optional=True),
            cap=f.bytes("cap", DEPOSIT_CAP_BYTES, optional=True),
            box=f.bytes("box", MAILBOX_ID_BYTES, optional=True),
        )
    elif kind == "receipt":
        ids = f.list("ids", max_items=MAX_RECEIPT_IDS)
        if not ids or not all(isinstance(i, bytes) and len(i) == MESSAGE_ID_BYTES for i in ids):
            raise DecodeError("content: receipt ids must be 1 or more 16-byte strings")
        content = Receipt(id=message_id, sent_at_ms=sent_at, ids=tuple(ids))
    elif kind == "sync":
        content = _sync(f, message_id, sent_at)
    elif kind == "device-list":
        content = DeviceListUpdate(
            id=message_id, sent_at_ms=sent_at,
            signed_list=f.bytes("list", max_size=MAX_DEVICE_LIST_BYTES),
            hints=_hints(f.list("hints", max_items=MAX_DEVICE_HINTS)))
    elif kind == "transcript":
        attachment = f.bytes("att", max_size=MAX_DESCRIPTOR_BYTES, optional=True)
        content = Transcript(id=message_id, sent_at_ms=sent_at, to=f.bytes("to", KEY_BYTES),
                             body=f.text("body", max_size=MAX_TEXT_BYTES),
                             attachment=None if attachment is None
                             else Descriptor.from_bytes(attachment))
    elif kind == "group-ops":
        group_id = f.bytes("g", GROUP_ID_BYTES)
        ops = f.list("ops", max_items=MAX_GROUP_OPS_PER_CONTENT)
        if not all(isinstance(op, bytes) for op in ops):
            raise DecodeError("content: group operations are byte strings")
        content = GroupOps(id=message_id, sent_at_ms=sent_at, group_id=group_id, ops=tuple(ops))
    elif kind == "sender-key":
        content = SenderKey(id=message_id, sent_at_ms=sent_at, group_id=f.bytes("g", GROUP_ID_BYTES),
                            key_id=f.bytes("kid", KEY_BYTES), chain_key=f.bytes("ck", KEY_BYTES),
                            iteration=f.int("n", 0, 2**32 - 1))
    elif kind == "group":
        content = GroupMessage(id=message_id, sent_at_ms=sent_at,
                               group_id=f.bytes("g", GROUP_ID_BYTES),
                               message=f.bytes("m", max_size=MAX_GROUP_MESSAGE_BYTES))
    elif kind == "file":
        # The descriptor is refused before parsing if over its limit (Descriptor.from_bytes).
        content = File(id=message_id, sent_at_ms=sent_at,
                       attachment=Descriptor.from_bytes(
                           f.bytes("att", max_size=MAX_DESCRIPTOR_BYTES)),
                       caption=f.text("body", max_size=MAX_TEXT_BYTES, optional=True) or "")
    else:
        raise DecodeError(f"content: unknown kind {kind!r}")
    return content


def _sync(f: codec.Fields, message_id: bytes, sent_at: int) -> Sync:
    op = f.text("op", max_size=32)
    if op not in SYNC_OPS:
        raise DecodeError(f"content: unknown sync operation {op!r}")
    account = f.bytes("ik", KEY_BYTES)
    name = f.text("name", max_size=MAX_NAME_BYTES)
    devices = []
    for item in f.list("devices", max_items=MAX_SYNC_DEVICES):
        d = codec.Fields(item, "content: sync device")
        devices.append((d.bytes("dev", KEY_BYTES), _addresses(d, "addrs"),
                        _addresses(d, "relays")))
        d.done()
    read = op == "read"  # only a read sync names a message; any other carrying one is malformed
    read_id = f.bytes("mid", MESSAGE_ID_BYTES, optional=not read)
    read_ts = f.int("mts", 0, MAX_TIMESTAMP_MS, optional=not read)
    return Sync(id=message_id, sent_at_ms=sent_at, op=op,  # type: ignore[arg-type]
                account=account, name=name, devices=tuple(devices), read_id=read_id,
                read_sent_at_ms=read_ts)


def _hints(raw: list[object]) -> tuple[DeviceHint, ...]:
    hints = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"dev", "addrs", "relays"}:
            raise DecodeError("content: a hint is a map of dev, addrs and relays")
        addrs, relays = item["addrs"], item["relays"]
        for value in (addrs, relays):
            if not isinstance(value, list) or len(value) > MAX_HINT_ADDRS or not all(
                    isinstance(a, str) and len(a) <= MAX_ADDR_BYTES for a in value):
                raise DecodeError(f"content: hint addresses must be at most {MAX_HINT_ADDRS}"
                                  " short texts")
        device = item["dev"]
        if not isinstance(device, bytes) or len(device) != KEY_BYTES:
            raise DecodeError("content: a hint names a 32-byte device key")
        hints.append(DeviceHint(device=device, addrs=tuple(addrs), relays=tuple(relays)))
    return tuple(hints)


def _addresses(f: codec.Fields, key: str) -> tuple[str, ...]:
    addrs = f.list(key, max_items=MAX_ADDRS)
    if not all(isinstance(a, str) and len(a) <= MAX_ADDR_BYTES for a in addrs):
        raise DecodeError(f"content: {key} must be short text")
    return tuple(addrs)
