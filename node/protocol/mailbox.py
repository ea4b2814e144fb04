"""The relay mailbox protocol `/pigeon/mailbox/1.0.0` (PROTOCOL.md "Relay mailbox"): frames, strict
encoding and decoding, mailbox ids and the authentication signature. Pure: no I/O, no clock.

A relay stores sealed envelopes (PROTOCOL.md "Sealed sender") for devices that are offline, in
mailboxes named by

    box = SHA-256("pigeon-mailbox-v1" || K)

where K is the recipient device's Ed25519 key DK (its public mailbox, which anyone can compute)
or its mailbox key `mailbox_key(DK)` (the mailbox it tells its contacts in intros).

A mailbox exists once its device has authenticated it (`auth` registers it); deposits into
any other are refused "unknown-mailbox". A deposit that presents a deposit capability the
mailbox's device registered (`caps`: SHA-256 hashes of 16-byte capabilities, one per contact and
one per open invite) counts against the mailbox's quotas; one without (a stranger's) counts
against a small separate quota with a short TTL (PROTOCOL.md section 21 "Deposit
capabilities"). Only the device holding DK may read and delete, after proving it on the stream:

    sig = Ed25519-Sign(K, "pigeon-mailbox-auth-v1" || 0x00 || relay key (32) || nonce (32))

where `nonce` is the fresh random challenge the relay sent first on that stream. The signature is
bound to one relay and one stream, so it cannot be replayed to another relay or later.

Frames (each one deterministic CBOR map with "v": 1 and "t"; client requests carry "rid", which
the relay echoes in its reply):

    relay -> client  challenge {"nonce"}                          first frame of every stream
    client -> relay  deposit   {"rid", "box", "id", "env", "ttl", ? "cap"} -> ok | error
                     auth      {"rid", "dev", "sig"}              -> ok | error "unauthorized"
                     caps      {"rid", "set"}                     -> ok | error
                     fetch     {"rid", "after", "limit"}          -> items | error
                     ack       {"rid", "ids"}                     -> ok | error
                     subscribe {"rid"}                            -> ok | error; then push frames
                     wake      {"rid", ? "url", ? "key", ? "auth"}  -> ok | error "wake-refused"
    relay -> client  ok {"rid"}, error {"rid", "code", "msg"}, items {"rid", "items", "more"},
                     push {"items"}

Decoding a request distinguishes a frame that cannot be understood at all (not CBOR, not a map,
another version, no "t" or "rid": DecodeError, the relay resets the stream) from a request that
can be answered with an error (`MalformedRequest`: a known type with bad fields is "malformed",
an unknown type is "unknown-request").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from node.errors import DecodeError, InvalidRecord, RemoteError
from node.protocol import codec
from node.protocol.content import MESSAGE_ID_BYTES
from node.protocol.kdf import hkdf, hmac_sha256
from node.protocol.keys import KEY_BYTES, DeviceKey, DeviceKeyPair, IdentityKeyPair
from node.protocol.wakeup import AUTH_SECRET_BYTES, MAX_PUSH_URL_BYTES, P256_PUBLIC_BYTES

__all__ = [
    "ERROR_CODES",
    "MAILBOX_PROTOCOL",
    "MAX_BLOB_PIECE_BYTES",
    "MAX_MAILBOX_FRAME_BYTES",
    "Ack",
    "Auth",
    "AuthFailed",
    "BlobData",
    "BlobDelete",
    "BlobHave",
    "BlobPut",
    "BlobRead",
    "Caps",
    "Challenge",
    "Deposit",
    "ErrorReply",
    "Fetch",
    "Item",
    "Items",
    "MalformedRequest",
    "Ok",
    "Push",
    "Reply",
    "Request",
    "Subscribe",
    "Wake",
    "auth_message",
    "cap_hash",
    "contact_cap",
    "decode_reply",
    "decode_request",
    "deposit_id",
    "encode_frame",
    "invite_cap",
    "item_cost",
    "mailbox_id",
    "mailbox_key",
    "sign_auth",
    "verify_auth",
]

#: The libp2p protocol id of mailbox streams (PROTOCOL.md section 21).
MAILBOX_PROTOCOL: Final = "/pigeon/mailbox/1.0.0"
MAILBOX_VERSION: Final = 1

MAILBOX_ID_CONTEXT: Final = b"pigeon-mailbox-v1"
AUTH_CONTEXT: Final = b"pigeon-mailbox-auth-v1\x00"

BOX_BYTES: Final = 32
#: A deposit capability: 16 random-looking bytes, and the hash a mailbox's device registers.
CAP_BYTES: Final = 16
CAP_HASH_BYTES: Final = 32
CAP_CONTEXT: Final = b"pigeon-deposit-cap-v1"
INVITE_CAP_CONTEXT: Final = b"pigeon-invite-cap-v1"
CONTACT_CAP_CONTEXT: Final = b"pigeon-contact-cap-v1"
DEPOSIT_ID_CONTEXT: Final = b"pigeon-deposit-id-v1"
MAILBOX_SECRET_INFO: Final = b"pigeon-mailbox-secret-v1"
MAILBOX_KEY_INFO: Final = b"pigeon-mailbox-key-v1"
OWN_CAP_CONTEXT: Final = b"pigeon-own-cap-v1"
OWN_CAP_SECRET_INFO: Final = b"pigeon-own-cap-secret-v1"
NONCE_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64

# --- limits (PROTOCOL.md "Relay mailbox", limits) -----------------------------------------------

#: Largest frame either side sends or accepts on a mailbox stream, checked on the length prefix.
#: Four largest sealed envelopes fit an `items` page; a deposit of an envelope above the relay's
#: envelope limit but within this frame is answered "too-large" instead of a reset.
MAX_MAILBOX_FRAME_BYTES: Final = 1024 * 1024

#: Most items in one `items` or `push` frame, and most ids in one `ack`: bounds the per-frame work
#: of both sides whatever the envelope sizes.
MAX_ITEMS_PER_FRAME: Final = 1024
#: Largest piece of a blob in one `blob-put` or `blob-data` (PROTOCOL.md section 26.6): half the
#: frame limit, so a piece and its fields always fit one frame.
MAX_BLOB_PIECE_BYTES: Final = 512 * 1024
MAX_ACK_IDS: Final = 1024

#: Most capability hashes one mailbox registers (one `caps` frame, ~140 KB): a contact list
#: of thousands plus the open invites.
MAX_CAPS: Final = 4096

#: Bytes of an `items`/`push` frame that are not item bytes (type, rid, "more", array header),
#: and the most one item costs besides its envelope (keys, seq, id, exp, length prefixes). The
#: relay fills a page while the sum stays within the frame limit.
FRAME_OVERHEAD_BYTES: Final = 64
ITEM_OVERHEAD_BYTES: Final = 64
ITEMS_BUDGET_BYTES: Final = MAX_MAILBOX_FRAME_BYTES - FRAME_OVERHEAD_BYTES

#: Request ids, sequence numbers, cursors and expiry times are CBOR unsigned integers of at most
#: 64 bits; seq and exp stay within SQLite's signed 64-bit range.
MAX_UINT: Final = 2**64 - 1
MAX_SEQ: Final = 2**63 - 1

#: Longest human-readable text in an error reply; longest error code.
MAX_ERROR_MSG_BYTES: Final = 256
MAX_CODE_BYTES: Final = 32
_MAX_TYPE_BYTES: Final = 32

# --- error codes: each a reason the client can act on ---------------------------------------------

#: The envelope is larger than this relay accepts: nothing will make it fit; fail the message.
TOO_LARGE: Final = "too-large"
#: The mailbox holds as many messages or bytes as this relay allows: try another relay, or later.
MAILBOX_FULL: Final = "mailbox-full"
#: `ttl` is above the relay's maximum: deposit again with a shorter TTL.
BAD_TTL: Final = "bad-ttl"
#: The relay's total storage is full: try another relay.
STORAGE_FULL: Final = "storage-full"
#: Deposits from this connection exceed the relay's rate: slow down and retry.
RATE_LIMITED: Final = "rate-limited"
#: The request's fields are invalid (a client bug): do not retry as is.
MALFORMED: Final = "malformed"
#: The request needs an authenticated mailbox, or the authentication failed.
UNAUTHORIZED: Final = "unauthorized"
#: The relay does not know this request type (an older relay): do without it.
UNKNOWN_REQUEST: Final = "unknown-request"
#: No device registered this mailbox at this relay (it never authenticated there, or its
#: registration lapsed): nothing was stored; try the recipient's other relays.
UNKNOWN_MAILBOX: Final = "unknown-mailbox"
#: The relay will not send wake-ups to this push URL (PROTOCOL.md section 29): not http(s), a
#: host that does not resolve, or an address its operator has not allowed (loopback, private,
#: link-local ...), or it sends no wake-ups at all. Go on without wake-ups there.
WAKE_REFUSED: Final = "wake-refused"
#: Error: no such blob for this mailbox (section 26.6), or not complete yet.
UNKNOWN_BLOB: Final = "unknown-blob"
#: Error: a blob whose bytes, once all there, do not hash to its name (section 26.6).
BAD_BLOB: Final = "bad-blob"

#: The relay serves as many mailboxes as it may (its capacity, PROTOCOL.md section 28.2): a
#: mailbox it does not hold yet is refused at `auth`; use another relay.
RELAY_FULL: Final = "relay-full"

#: Every error code this relay sends. A client accepts any well-formed code: a newer relay may
#: add some.
ERROR_CODES: Final = frozenset({
    TOO_LARGE, MAILBOX_FULL, BAD_TTL, STORAGE_FULL, RATE_LIMITED, MALFORMED, UNAUTHORIZED,
    UNKNOWN_REQUEST, UNKNOWN_MAILBOX, WAKE_REFUSED, UNKNOWN_BLOB, BAD_BLOB, RELAY_FULL,
})


class MalformedRequest(DecodeError):
    """A request that was understood well enough to be answered with an error reply: `rid` is its
    request id and `code` is "malformed" (bad fields) or "unknown-request" (unknown type)."""

    def __init__(self, rid: int, code: str, detail: str) -> None:
        self.rid, self.code = rid, code
        super().__init__(detail)


class AuthFailed(RemoteError):
    """A mailbox authentication signature did not verify for this relay and challenge."""


# --- mailbox ids and authentication ---------------------------------------------------------------


def mailbox_id(device: DeviceKey) -> bytes:
    """The mailbox of a device: SHA-256("pigeon-mailbox-v1" || DK), 32 bytes."""
    return hashlib.sha256(MAILBOX_ID_CONTEXT + device.to_bytes()).digest()


def auth_message(relay: DeviceKey, nonce: bytes) -> bytes:
    """What a device signs to open its mailbox on `relay` (the relay's Ed25519 host key) in reply to
    the challenge `nonce` of one stream."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a challenge nonce has {NONCE_BYTES} bytes")
    return AUTH_CONTEXT + relay.to_bytes() + nonce


def sign_auth(device: DeviceKeyPair, relay: DeviceKey, nonce: bytes) -> bytes:
    """The `auth` signature that opens `device`'s mailbox on `relay` for the stream of `nonce`."""
    return device.sign(auth_message(relay, nonce))


def verify_auth(dev: bytes, sig: bytes, relay: DeviceKey, nonce: bytes) -> bytes:
    """Check an `auth` request against this relay and this stream's nonce; return the mailbox id
    of the device that signed. AuthFailed for anything wrong (one opaque reason)."""
    try:
        device = DeviceKey.from_bytes(dev)
        device.verify(sig, auth_message(relay, nonce))
    except (InvalidRecord, DecodeError, ValueError) as exc:
        raise AuthFailed("mailbox authentication failed") from exc
    return mailbox_id(device)


# --- deposit capabilities and deposit ids (PROTOCOL.md section 21) -------------------------------


def _mailbox_secret(device: DeviceKeyPair) -> bytes:
    """A secret only this device can compute, for its contacts' capabilities and its deposit
    ids (never sent anywhere)."""
    return hkdf(device.to_bytes(), salt=None, info=MAILBOX_SECRET_INFO, length=32)


def mailbox_key(device: DeviceKeyPair) -> DeviceKeyPair:
    """The key of a device's contacts' mailbox: an Ed25519 key derived from the device key and
    published nowhere, so its mailbox id (`mailbox_id(mailbox_key(device).public)`, which the
    device tells its contacts in intros) cannot be computed from the device's public key, and
    its `auth` is not signed by the device key (PROTOCOL.md section 21 "Two mailboxes")."""
    return DeviceKeyPair(hkdf(device.to_bytes(), salt=None, info=MAILBOX_KEY_INFO, length=32))


def cap_hash(cap: bytes) -> bytes:
    """What a mailbox's device registers for capability `cap`, and what the relay compares a
    deposit's `cap` against: SHA-256("pigeon-deposit-cap-v1" || cap). The relay's store never
    holds a capability itself."""
    if len(cap) != CAP_BYTES:
        raise ValueError(f"a deposit capability has {CAP_BYTES} bytes")
    return hashlib.sha256(CAP_CONTEXT + cap).digest()


def contact_cap(device: DeviceKeyPair, account: bytes) -> bytes:
    """The capability `device` gives the contact with identity key `account` for depositing
    into its mailbox: HMAC-SHA256(secret of the device, context || account)[:16]. Derived, not
    stored: the device recomputes its whole set for every `caps`, so a removed contact drops out
    of it (revoked) at the next registration."""
    return hmac_sha256(_mailbox_secret(device), CONTACT_CAP_CONTEXT + account)[:CAP_BYTES]


def own_cap(identity: IdentityKeyPair, device: DeviceKey) -> bytes:
    """The capability for the public mailbox of `device`, held by every device of its account:
    HMAC-SHA256(HKDF(IK seed, info "pigeon-own-cap-secret-v1"), "pigeon-own-cap-v1" || DK)[:16].
    Every device of an account holds the identity key (PROTOCOL.md section 4), so each computes
    the others' capabilities without being told: the account's own devices (sent transcripts,
    device lists, syncs) never deposit into each other's mailboxes as strangers (section 21)."""
    secret = hkdf(identity.to_bytes(), salt=None, info=OWN_CAP_SECRET_INFO, length=32)
    return hmac_sha256(secret, OWN_CAP_CONTEXT + device.to_bytes())[:CAP_BYTES]


def invite_cap(token: bytes) -> bytes:
    """The capability an invite's token gives whoever holds the invite (its inviter registers it
    while the invite is valid), so a first message after an invite is not a stranger's."""
    return hmac_sha256(token, INVITE_CAP_CONTEXT)[:CAP_BYTES]


def deposit_id(device: DeviceKeyPair, box: bytes, message_id: bytes) -> bytes:
    """The id a deposit carries instead of the message id: HMAC-SHA256(secret of the sending
    device, context || box || message id)[:16]. The same message deposited again (a lost `ok`,
    another relay) gets the same id, so relays de-duplicate; the relay cannot compute it, so it
    cannot match a deposit to the message id that a receipt or an ack names. The real id
    travels inside the sealed envelope (PROTOCOL.md section 9)."""
    return hmac_sha256(_mailbox_secret(device), DEPOSIT_ID_CONTEXT + box + message_id)[
        :MESSAGE_ID_BYTES]


# --- frames -----------------------------------------------------------------------------------------


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def _check_rid(rid: int) -> None:
    _check(isinstance(rid, int) and 0 <= rid <= MAX_UINT, "rid must be a 64-bit unsigned integer")


@dataclass(frozen=True, slots=True, kw_only=True)
class Item:
    """One stored message as the relay serves it: `seq` is the relay's cursor (strictly increasing
    in deposit order), `exp` the unix time after which it is deleted unread."""

    seq: int
    id: bytes
    env: bytes
    exp: int

    def __post_init__(self) -> None:
        _check(1 <= self.seq <= MAX_SEQ, "seq out of range")
        _check(len(self.id) == MESSAGE_ID_BYTES, "id must be 16 bytes")
        _check(0 <= self.exp <= MAX_SEQ, "exp out of range")


def item_cost(envelope_bytes: int) -> int:
    """Upper bound of the bytes one item adds to an items/push frame."""
    return envelope_bytes + ITEM_OVERHEAD_BYTES


# requests (client -> relay)

@dataclass(frozen=True, slots=True, kw_only=True)
class Deposit:
    """Leave the sealed envelope `env` (deposit id `id`) in mailbox `box` for `ttl` seconds
    (0: the relay's default), presenting the deposit capability `cap` if the sender has one."""

    rid: int
    box: bytes
    id: bytes
    env: bytes
    ttl: int
    cap: bytes | None = None

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(len(self.box) == BOX_BYTES, "box must be 32 bytes")
        _check(len(self.id) == MESSAGE_ID_BYTES, "id must be 16 bytes")
        _check(len(self.env) > 0, "env must not be empty")
        _check(0 <= self.ttl <= MAX_UINT, "ttl out of range")
        _check(self.cap is None or len(self.cap) == CAP_BYTES, "cap must be 16 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class Caps:
    """Replace the capability hashes registered for the authenticated mailbox by `set`
    (`cap_hash` of each capability; an empty set leaves only strangers' quota)."""

    rid: int
    set: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(len(self.set) <= MAX_CAPS, f"at most {MAX_CAPS} capabilities")
        _check(all(len(h) == CAP_HASH_BYTES for h in self.set), "cap hashes must be 32 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    """Open the mailbox of device key `dev` on this stream: `sig` is `sign_auth`'s signature."""

    rid: int
    dev: bytes
    sig: bytes

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(len(self.dev) == KEY_BYTES, "dev must be 32 bytes")
        _check(len(self.sig) == SIGNATURE_BYTES, "sig must be 64 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetch:
    """Ask for up to `limit` stored items after the cursor `after` (0: from the start)."""

    rid: int
    after: int
    limit: int

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(0 <= self.after <= MAX_UINT, "after out of range")
        _check(1 <= self.limit <= MAX_UINT, "limit must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """The client committed these messages: the relay deletes them."""

    rid: int
    ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(1 <= len(self.ids) <= MAX_ACK_IDS, f"ack carries 1..{MAX_ACK_IDS} ids")
        _check(all(len(i) == MESSAGE_ID_BYTES for i in self.ids), "ids must be 16 bytes each")


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    """Ask the relay to push new items of the open mailbox as they arrive."""

    rid: int

    def __post_init__(self) -> None:
        _check_rid(self.rid)


@dataclass(frozen=True, slots=True, kw_only=True)
class Wake:
    """Register the push endpoint of the authenticated mailbox (PROTOCOL.md section 29): `url`
    of a push service, `key` (the device's P-256 public key, RFC 8291 `p256dh`) and `auth`
    (its 16-byte secret). All three None: remove the registration."""

    rid: int
    url: str | None = None
    key: bytes | None = None
    auth: bytes | None = None

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        given = (self.url is not None, self.key is not None, self.auth is not None)
        _check(all(given) or not any(given), "url, key and auth go together")
        if self.url is not None:
            _check(0 < len(self.url.encode()) <= MAX_PUSH_URL_BYTES,
                   f"url must be 1..{MAX_PUSH_URL_BYTES} bytes")
            _check(self.key is not None and len(self.key) == P256_PUBLIC_BYTES,
                   f"key must be {P256_PUBLIC_BYTES} bytes")
            _check(self.auth is not None and len(self.auth) == AUTH_SECRET_BYTES,
                   f"auth must be {AUTH_SECRET_BYTES} bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobPut:
    """Store `data` at byte `off` of the blob `hash` (`size` bytes in all) for mailbox `box`
    (PROTOCOL.md section 26.6): a ranged, resumable upload; `data` empty asks how much is held.
    """

    rid: int
    box: bytes
    hash: bytes
    size: int
    off: int
    data: bytes
    ttl: int
    cap: bytes | None = None

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(len(self.box) == BOX_BYTES and len(self.hash) == 32, "box and hash are 32 bytes")
        _check(self.off >= 0 and self.off + len(self.data) <= self.size <= MAX_UINT,
               "the piece lies inside the blob")
        _check(len(self.data) <= MAX_BLOB_PIECE_BYTES, "a piece is at most 512 KiB")
        _check(0 <= self.ttl <= MAX_UINT, "ttl out of range")
        _check(self.cap is None or len(self.cap) == CAP_BYTES, "cap is 16 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobRead:
    """Read `len` bytes at `off` of the blob `hash` held for the bound mailbox."""

    rid: int
    hash: bytes
    off: int
    len: int

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(len(self.hash) == 32, "hash is 32 bytes")
        _check(0 <= self.off <= MAX_UINT and 1 <= self.len <= MAX_BLOB_PIECE_BYTES,
               "a read is 1 byte to 512 KiB")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobDelete:
    """Drop the blob `hash` from the bound mailbox (its device has it)."""

    rid: int
    hash: bytes

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(len(self.hash) == 32, "hash is 32 bytes")


Request = (Deposit | Auth | Caps | Fetch | Ack | Subscribe | Wake | BlobPut | BlobRead
           | BlobDelete)
"""Any client request."""


# replies (relay -> client)

@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """The relay's first frame on every stream: the nonce an `auth` signs."""

    nonce: bytes

    def __post_init__(self) -> None:
        _check(len(self.nonce) == NONCE_BYTES, "nonce must be 32 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class Ok:
    """Request `rid` succeeded."""

    rid: int

    def __post_init__(self) -> None:
        _check_rid(self.rid)


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply:
    """Request `rid` was refused: `code` says why (ERROR_CODES, or one a newer relay added), `msg`
    says it for people."""

    rid: int
    code: str
    msg: str = ""

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(_valid_code(self.code), "code must be 1..32 of a-z and '-'")
        _check(len(self.msg.encode()) <= MAX_ERROR_MSG_BYTES, "msg too long")


@dataclass(frozen=True, slots=True, kw_only=True)
class Items:
    """A page of stored items in answer to a `fetch`; `more`: further items are waiting."""

    rid: int
    items: tuple[Item, ...]
    more: bool

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(len(self.items) <= MAX_ITEMS_PER_FRAME, "too many items")


@dataclass(frozen=True, slots=True, kw_only=True)
class Push:
    """New items for a subscribed mailbox, sent as they arrive."""

    items: tuple[Item, ...]

    def __post_init__(self) -> None:
        _check(1 <= len(self.items) <= MAX_ITEMS_PER_FRAME, "push carries 1..1024 items")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobHave:
    """How many bytes of the blob the relay holds for that mailbox, from the start."""

    rid: int
    have: int

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(0 <= self.have <= MAX_UINT, "have out of range")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobData:
    """Bytes of a blob, from `off`."""

    rid: int
    off: int
    data: bytes

    def __post_init__(self) -> None:
        _check_rid(self.rid)
        _check(0 <= self.off <= MAX_UINT and len(self.data) <= MAX_BLOB_PIECE_BYTES,
               "a piece is at most 512 KiB")


Reply = Challenge | Ok | ErrorReply | Items | Push | BlobHave | BlobData
"""Any relay frame."""
Frame = Request | Reply


def _valid_code(code: str) -> bool:
    return 0 < len(code) <= MAX_CODE_BYTES and all(c == "-" or "a" <= c <= "z" for c in code)


# --- encoding ---------------------------------------------------------------------------------------


def _item_map(item: Item) -> dict[str, object]:
    return {"seq": item.seq, "id": item.id, "env": item.env, "exp": item.exp}


def encode_frame(frame: Frame) -> bytes:
    """The deterministic CBOR body of one frame (the transport length-prefixes it)."""
    body: dict[str, object] = {"v": MAILBOX_VERSION}
    if isinstance(frame, Deposit):
        body |= {"t": "deposit", "rid": frame.rid, "box": frame.box, "id": frame.id,
                 "env": frame.env, "ttl": frame.ttl}
        if frame.cap is not None:
            body["cap"] = frame.cap
    elif isinstance(frame, Caps):
        body |= {"t": "caps", "rid": frame.rid, "set": list(frame.set)}
    elif isinstance(frame, Auth):
        body |= {"t": "auth", "rid": frame.rid, "dev": frame.dev, "sig": frame.sig}
    elif isinstance(frame, Fetch):
        body |= {"t": "fetch", "rid": frame.rid, "after": frame.after, "limit": frame.limit}
    elif isinstance(frame, Ack):
        body |= {"t": "ack", "rid": frame.rid, "ids": list(frame.ids)}
    elif isinstance(frame, Subscribe):
        body |= {"t": "subscribe", "rid": frame.rid}
    elif isinstance(frame, Wake):
        body |= {"t": "wake", "rid": frame.rid}
        if frame.url is not None:
            body |= {"url": frame.url, "key": frame.key, "auth": frame.auth}
    elif isinstance(frame, Challenge):
        body |= {"t": "challenge", "nonce": frame.nonce}
    elif isinstance(frame, Ok):
        body |= {"t": "ok", "rid": frame.rid}
    elif isinstance(frame, ErrorReply):
        body |= {"t": "error", "rid": frame.rid, "code": frame.code, "msg": frame.msg}
    elif isinstance(frame, Items):
        body |= {"t": "items", "rid": frame.rid, "items": [_item_map(i) for i in frame.items],
                 "more": frame.more}
    elif isinstance(frame, Push):
        body |= {"t": "push", "items": [_item_map(i) for i in frame.items]}
    elif isinstance(frame, BlobPut):
        body |= {"t": "blob-put", "rid": frame.rid, "box": frame.box, "hash": frame.hash,
                 "size": frame.size, "off": frame.off, "data": frame.data, "ttl": frame.ttl}
        if frame.cap is not None:
            body["cap"] = frame.cap
    elif isinstance(frame, BlobRead):
        body |= {"t": "blob-get", "rid": frame.rid, "hash": frame.hash, "off": frame.off,
                 "len": frame.len}
    elif isinstance(frame, BlobDelete):
        body |= {"t": "blob-del", "rid": frame.rid, "hash": frame.hash}
    elif isinstance(frame, BlobHave):
        body |= {"t": "blob-have", "rid": frame.rid, "have": frame.have}
    elif isinstance(frame, BlobData):
        body |= {"t": "blob-data", "rid": frame.rid, "off": frame.off, "data": frame.data}
    else:  # pragma: no cover - the type union is closed
        raise TypeError(f"not a mailbox frame: {frame!r}")
    return codec.encode(body)


# --- decoding ---------------------------------------------------------------------------------------


def decode_request(data: bytes) -> Request:
    """Decode a client request strictly.

    Raises DecodeError (or UnknownVersion, LimitExceeded) when the frame cannot be answered at
    all: the relay resets the stream. Raises MalformedRequest (a DecodeError with `rid` and
    `code`) for a request that gets an error reply. Sizes the relay judges by policy (the
    envelope size, the TTL) are not checked here, so they can be refused with their own codes.
    """
    f = codec.decode_map(data, limit=MAX_MAILBOX_FRAME_BYTES, what="mailbox request",
                         version=MAILBOX_VERSION)
    kind = f.text("t", max_size=_MAX_TYPE_BYTES)
    rid = f.int("rid", 0, MAX_UINT)
    try:
        request: Request
        if kind == "deposit":
            env = f.bytes("env", max_size=MAX_MAILBOX_FRAME_BYTES)
            if not env:
                raise DecodeError("mailbox request: empty envelope")
            request = Deposit(rid=rid, box=f.bytes("box", BOX_BYTES),
                              id=f.bytes("id", MESSAGE_ID_BYTES), env=env,
                              ttl=f.int("ttl", 0, MAX_UINT),
                              cap=f.bytes("cap", CAP_BYTES, optional=True))
        elif kind == "caps":
            hashes = f.list("set", max_items=MAX_CAPS)
            if not all(isinstance(h, bytes) and len(h) == CAP_HASH_BYTES for h in hashes):
                raise DecodeError(f"caps: set must be 0..{MAX_CAPS} strings of 32 bytes")
            request = Caps(rid=rid, set=tuple(h for h in hashes if isinstance(h, bytes)))
        elif kind == "auth":
            request = Auth(rid=rid, dev=f.bytes("dev", KEY_BYTES),
                           sig=f.bytes("sig", SIGNATURE_BYTES))
        elif kind == "fetch":
            request = Fetch(rid=rid, after=f.int("after", 0, MAX_UINT),
                            limit=f.int("limit", 1, MAX_UINT))
        elif kind == "ack":
            request = Ack(rid=rid, ids=_ids(f.list("ids", max_items=MAX_ACK_IDS)))
        elif kind == "subscribe":
            request = Subscribe(rid=rid)
        elif kind == "wake":
            url = f.text("url", max_size=MAX_PUSH_URL_BYTES, optional=True)
            key = f.bytes("key", P256_PUBLIC_BYTES, optional=True)
            auth = f.bytes("auth", AUTH_SECRET_BYTES, optional=True)
            if (url is None) != (key is None) or (url is None) != (auth is None) or url == "":
                raise DecodeError("wake: url, key and auth go together")
            request = Wake(rid=rid, url=url, key=key, auth=auth)
        elif kind == "blob-put":
            request = BlobPut(rid=rid, box=f.bytes("box", BOX_BYTES), hash=f.bytes("hash", 32),
                              size=f.int("size", 0, MAX_UINT), off=f.int("off", 0, MAX_UINT),
                              data=f.bytes("data", max_size=MAX_BLOB_PIECE_BYTES),
                              ttl=f.int("ttl", 0, MAX_UINT),
                              cap=f.bytes("cap", CAP_BYTES, optional=True))
        elif kind == "blob-get":
            request = BlobRead(rid=rid, hash=f.bytes("hash", 32), off=f.int("off", 0, MAX_UINT),
                               len=f.int("len", 1, MAX_BLOB_PIECE_BYTES))
        elif kind == "blob-del":
            request = BlobDelete(rid=rid, hash=f.bytes("hash", 32))
        else:
            raise MalformedRequest(rid, UNKNOWN_REQUEST, f"unknown request type {kind!r}")
        f.done()
    except MalformedRequest:
        raise
    except DecodeError as exc:
        raise MalformedRequest(rid, MALFORMED, str(exc)) from exc
    except ValueError as exc:  # a field the dataclass refuses (a piece outside its blob)
        raise MalformedRequest(rid, MALFORMED, f"mailbox request: {exc}") from exc
    return request


def _ids(values: list[object]) -> tuple[bytes, ...]:
    ids = tuple(i for i in values if isinstance(i, bytes) and len(i) == MESSAGE_ID_BYTES)
    if not ids or len(ids) != len(values):
        raise DecodeError(f"ids must be 1..{MAX_ACK_IDS} strings of 16 bytes")
    return ids


def _decode_items(f: codec.Fields) -> tuple[Item, ...]:
    items: list[Item] = []
    for raw in f.list("items", max_items=MAX_ITEMS_PER_FRAME):
        g = codec.Fields(raw, f"{f.what}.item")
        env = g.bytes("env", max_size=MAX_MAILBOX_FRAME_BYTES)
        if not env:
            raise DecodeError(f"{f.what}: empty envelope")
        items.append(Item(seq=g.int("seq", 1, MAX_SEQ), id=g.bytes("id", MESSAGE_ID_BYTES),
                          env=env, exp=g.int("exp", 0, MAX_SEQ)))
        g.done()
    return tuple(items)


def decode_reply(data: bytes) -> Reply:
    """Decode a relay frame strictly; DecodeError for anything else (the client resets the
    stream). Error codes are checked for shape only, so codes a newer relay adds come through."""
    f = codec.decode_map(data, limit=MAX_MAILBOX_FRAME_BYTES, what="mailbox reply",
                         version=MAILBOX_VERSION)
    kind = f.text("t", max_size=_MAX_TYPE_BYTES)
    reply: Reply
    if kind == "challenge":
        reply = Challenge(nonce=f.bytes("nonce", NONCE_BYTES))
    elif kind == "ok":
        reply = Ok(rid=f.int("rid", 0, MAX_UINT))
    elif kind == "error":
        rid = f.int("rid", 0, MAX_UINT)
        code = f.text("code", max_size=MAX_CODE_BYTES)
        if not _valid_code(code):
            raise DecodeError(f"mailbox reply: bad error code {code!r}")
        reply = ErrorReply(rid=rid, code=code, msg=f.text("msg", max_size=MAX_ERROR_MSG_BYTES))
    elif kind == "items":
        reply = Items(rid=f.int("rid", 0, MAX_UINT), items=_decode_items(f), more=f.bool("more"))
    elif kind == "push":
        items = _decode_items(f)
        if not items:
            raise DecodeError("mailbox reply: empty push")
        reply = Push(items=items)
    elif kind == "blob-have":
        reply = BlobHave(rid=f.int("rid", 0, MAX_UINT), have=f.int("have", 0, MAX_UINT))
    elif kind == "blob-data":
        reply = BlobData(rid=f.int("rid", 0, MAX_UINT), off=f.int("off", 0, MAX_UINT),
                         data=f.bytes("data", max_size=MAX_BLOB_PIECE_BYTES))
    else:
        raise DecodeError(f"mailbox reply: unknown type {kind!r}")
    f.done()
    return reply


def split_ids(ids: Sequence[bytes]) -> list[tuple[bytes, ...]]:
    """`ids` in chunks that each fit one ack request."""
    return [tuple(ids[i:i + MAX_ACK_IDS]) for i in range(0, len(ids), MAX_ACK_IDS)]
