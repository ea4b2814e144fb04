"""Linking a new device to an account (PROTOCOL.md section 25.2): the link code, the frames of
`/pigeon/link/1.0.0`, the encryption of the provisioning payload and the confirmation string.

The new device shows a *link code*; a device already in the account (the approver) reads it,
dials the new device and sends it the account's keys, contacts and settings:

    link code = {"v": 1, "body": bstr, "sig": bstr .size 64}
    body      = {"kind": "link-code", "dev": bstr .size 32,   the new device's key (its peer id)
                 "addrs": [* bstr],                            binary multiaddrs (as short invites)
                 "epk": bstr .size 32,                         one-time X25519 public key
                 "nonce": bstr .size 16, "exp": uint}          expiry, unix seconds
    sig       = Ed25519 by "dev" over "pigeon-link-code-v1" || 0x00 || body
    text      = "pigeon-link:" || base32(link code), upper case, no padding

Keys of the stream (approver ephemeral e_A, new device's one-time key E_N from the code):

    okm     = HKDF-SHA256(ikm = X25519(e_A, E_N), salt = E_A || E_N,
                          info = INFO_LINK || SHA-256(link code), length = 68)
    k_a     = okm[0:32]   approver -> new device,   k_n = okm[32:64]   new device -> approver
    confirm = okm[64:68] as a big-endian integer mod 10^6, shown as "123 456"

Every frame after the clear `hello` is sealed: XChaCha20-Poly1305(k, nonce = 16 zero bytes ||
counter (u64 BE, from 0 per direction), CBOR message, AD = INFO_LINK), so frames cannot be
dropped, repeated or reordered without the next one failing to open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Self

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from node.errors import DecodeError, DecryptionFailed, DeviceError, InvalidRecord, NodeError
from node.protocol import codec
from node.protocol.content import MAX_ADDR_BYTES, MAX_ADDRS, MAX_NAME_BYTES
from node.protocol.directory import MAX_DEVICES
from node.protocol.invite import (
    SHORT_INVITE_ADDR_BUDGET,
    SHORT_INVITE_MAX_ADDRS,
    short_addresses,
)
from node.protocol.kdf import hkdf
from node.protocol.keys import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    DeviceKey,
    DeviceKeyPair,
    DHKeyPair,
    DHPublicKey,
    IdentityKey,
    IdentityKeyPair,
)
from node.protocol.limits import MAX_RECORD_BYTES
from node.protocol.multiaddrs import from_binary, to_binary

__all__ = [
    "INFO_LINK",
    "LINK_CODE_LIFETIME_S",
    "LINK_CODE_PREFIX",
    "LINK_PROTOCOL",
    "MAX_LINK_FRAME_BYTES",
    "ContactPayload",
    "DevicePayload",
    "LinkChannel",
    "LinkCode",
    "Provisioning",
    "chunk_payload",
    "decode_hello",
    "encode_error",
    "encode_hello",
    "link_addresses",
    "link_code_record",
]

LINK_PROTOCOL: Final = "/pigeon/link/1.0.0"
LINK_VERSION: Final = 1
LINK_CODE_PREFIX: Final = "pigeon-link:"
LINK_CODE_KIND: Final = "link-code"
#: Domain separation of the link code's signature (no other Pigeon signature starts with it).
LINK_CODE_CONTEXT: Final = b"pigeon-link-code-v1\x00"
#: Key derivation info and AEAD associated data of the link stream.
INFO_LINK: Final = b"Pigeon_Link_v1"
#: How long a link code is valid: long enough to walk to the other device and type it.
LINK_CODE_LIFETIME_S: Final = 600
#: A code claiming more than this (its lifetime plus clock skew) is refused as not ours.
_MAX_CODE_VALIDITY_S: Final = LINK_CODE_LIFETIME_S + 300
LINK_NONCE_BYTES: Final = 16
#: Largest link code record: the short invite's address budget plus keys and signature.
MAX_LINK_CODE_BYTES: Final = 512
#: Provisioning payload pieces: each sealed frame carries at most this many payload bytes.
PROVISION_CHUNK_BYTES: Final = 60 * 1024
#: Largest provisioning payload (all chunks): room for thousands of contacts with their devices
#: and device lists; anything larger is refused before it is reassembled.
MAX_PROVISION_BYTES: Final = 8 * 1024 * 1024
#: Largest frame on the link stream: one sealed chunk and its small map.
MAX_LINK_FRAME_BYTES: Final = PROVISION_CHUNK_BYTES + 1024
#: Most contacts a payload may carry (a bound on the decoding work).
MAX_PROVISION_CONTACTS: Final = 10_000
#: Error codes of the link stream (section 25.2).
CODE_USED: Final = "used"  # the new device was provisioned already, or this is not its code
_MAX_ERROR_CODE_BYTES: Final = 32
_AEAD_TAG_BYTES: Final = 16


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkCode:
    """What the new device shows: who it is (with proof: it signs the code), where it listens,
    the one-time key the payload is encrypted to, a nonce naming this attempt, and an expiry."""

    device: DeviceKey
    addrs: tuple[str, ...]
    ephemeral: DHPublicKey
    nonce: bytes
    expires: int

    def __post_init__(self) -> None:
        if len(self.nonce) != LINK_NONCE_BYTES:
            raise ValueError(f"a link nonce is {LINK_NONCE_BYTES} bytes")
        if len(self.addrs) > SHORT_INVITE_MAX_ADDRS or \
                sum(len(to_binary(a)) for a in self.addrs) > SHORT_INVITE_ADDR_BUDGET:
            raise ValueError("too many addresses for a link code: pick with short_addresses()")

    def record(self, device: DeviceKeyPair) -> bytes:
        """The signed code (the new device signs it with its own device key)."""
        if device.public != self.device:
            raise ValueError("a link code is signed by the device it names")
        body = codec.encode({
            "kind": LINK_CODE_KIND, "dev": self.device.to_bytes(),
            "addrs": [to_binary(a) for a in self.addrs], "epk": self.ephemeral.to_bytes(),
            "nonce": self.nonce, "exp": self.expires})
        return codec.encode({"v": LINK_VERSION, "body": body,
                             "sig": device.sign(LINK_CODE_CONTEXT + body)})

    def to_text(self, device: DeviceKeyPair) -> str:
        """"pigeon-link:" and upper-case base32 (a QR code's alphanumeric mode holds it)."""
        return LINK_CODE_PREFIX + _b32(self.record(device))

    @classmethod
    def from_record(cls, record: bytes, *, now: int) -> Self:
        """Verify a signed code at `now` (unix seconds). DeviceError with a plain reason for a
        damaged, tampered or expired code."""
        if len(record) > MAX_LINK_CODE_BYTES:
            raise DeviceError("this link code is damaged (too long); copy it again")
        try:
            outer = codec.decode_map(record, limit=MAX_LINK_CODE_BYTES, what="link code",
                                     version=LINK_VERSION)
            body = outer.bytes("body", max_size=MAX_LINK_CODE_BYTES)
            sig = outer.bytes("sig", SIGNATURE_BYTES)
            outer.done()
            f = codec.decode_map(body, limit=MAX_LINK_CODE_BYTES, what="link code body")
            if f.text("kind", max_size=16) != LINK_CODE_KIND:
                raise DecodeError("not a link code")
            device = DeviceKey.from_bytes(f.bytes("dev", KEY_BYTES))
            raw = f.list("addrs", max_items=SHORT_INVITE_MAX_ADDRS)
            if not all(isinstance(a, bytes) for a in raw):
                raise DecodeError("addresses must be binary multiaddrs")
            addrs = tuple(from_binary(a) for a in raw)
            ephemeral = DHPublicKey.from_bytes(f.bytes("epk", KEY_BYTES))
            nonce = f.bytes("nonce", LINK_NONCE_BYTES)
            expires = f.int("exp", 0, 2**40)
            f.done()
            code = cls(device=device, addrs=addrs, ephemeral=ephemeral, nonce=nonce,
                       expires=expires)
        except (NodeError, ValueError) as exc:
            raise DeviceError(f"this link code is damaged ({exc}); copy it again") from exc
        try:
            device.verify(sig, LINK_CODE_CONTEXT + body)
        except (InvalidRecord, DecryptionFailed, NodeError) as exc:
            raise DeviceError("this link code is not genuine (its signature does not verify):"
                              " it was changed or mistyped; copy it again") from exc
        if now >= expires:
            raise DeviceError("this link code has expired (codes last 10 minutes): run"
                              " `pigeon link` again on the new device for a new one")
        if expires > now + _MAX_CODE_VALIDITY_S:
            raise DeviceError("this link code claims to be valid for too long (check both"
                              " devices' clocks); run `pigeon link` again")
        return code

    @classmethod
    def from_text(cls, text: str, *, now: int) -> Self:
        """Parse and verify the text form; whitespace anywhere is ignored."""
        return cls.from_record(link_code_record(text), now=now)


def link_code_record(text: str) -> bytes:
    """The signed record inside a link code's text (not verified yet: `LinkCode.from_record`).
    DeviceError if the text is not a link code at all."""
    if len(text) > 4 * MAX_LINK_CODE_BYTES:
        raise DeviceError("this is not a link code (too long)")
    text = "".join(text.split())
    if text[:len(LINK_CODE_PREFIX)].lower() != LINK_CODE_PREFIX:
        raise DeviceError("this is not a link code (it should start with 'pigeon-link:',"
                          " as `pigeon link` on the new device prints it)")
    body = text[len(LINK_CODE_PREFIX):].upper()
    try:
        return base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError) as exc:
        raise DeviceError("this link code is damaged (not valid base32); copy it again") from exc


# --- the stream ------------------------------------------------------------------------------------


def encode_hello(nonce: bytes, ephemeral: DHPublicKey) -> bytes:
    """The approver's first frame (clear): the code's nonce and its own ephemeral key."""
    return codec.encode({"v": LINK_VERSION, "t": "hello", "nonce": nonce,
                         "epk": ephemeral.to_bytes()})


def decode_hello(data: bytes) -> tuple[bytes, DHPublicKey]:
    """(nonce, approver's ephemeral key) of a hello frame; DecodeError otherwise."""
    f = codec.decode_map(data, limit=256, what="link hello", version=LINK_VERSION)
    if f.text("t", max_size=16) != "hello":
        raise DecodeError("link hello: unexpected frame")
    nonce = f.bytes("nonce", LINK_NONCE_BYTES)
    epk = DHPublicKey.from_bytes(f.bytes("epk", KEY_BYTES))
    f.done()
    return nonce, epk


def encode_error(code: str) -> bytes:
    """A clear frame refusing the link (`CODE_USED`...)."""
    return codec.encode({"v": LINK_VERSION, "t": "error", "code": code})


def decode_error(data: bytes) -> str | None:
    """The code of a clear error frame, or None if `data` is not one."""
    try:
        f = codec.decode_map(data, limit=256, what="link error", version=LINK_VERSION)
        if f.text("t", max_size=16) != "error":
            return None
        return f.text("code", max_size=_MAX_ERROR_CODE_BYTES)
    except NodeError:
        return None


class LinkChannel:
    """The keys of one link stream, with a frame counter per direction. `approver` says which
    side this is. Sealing and opening advance the counters, so use one channel per stream."""

    def __init__(self, *, k_send: bytes, k_receive: bytes, confirmation: str) -> None:
        self._k_send = k_send
        self._k_receive = k_receive
        self._sent = 0
        self._received = 0
        self.confirmation = confirmation

    @staticmethod
    def _keys(shared: bytes, approver_epk: DHPublicKey, new_epk: DHPublicKey,
              code_record: bytes) -> tuple[bytes, bytes, str]:
        okm = hkdf(shared, salt=approver_epk.to_bytes() + new_epk.to_bytes(),
                   info=INFO_LINK + hashlib.sha256(code_record).digest(), length=68)
        number = int.from_bytes(okm[64:68], "big") % 1_000_000
        return okm[:32], okm[32:64], f"{number // 1000:03d} {number % 1000:03d}"

    @classmethod
    def for_approver(cls, ephemeral: DHKeyPair, code: LinkCode, code_record: bytes) -> Self:
        """The approver's side: its fresh ephemeral key pair and the code it read."""
        k_a, k_n, confirm = cls._keys(ephemeral.dh(code.ephemeral), ephemeral.public,
                                      code.ephemeral, code_record)
        return cls(k_send=k_a, k_receive=k_n, confirmation=confirm)

    @classmethod
    def for_new_device(cls, ephemeral: DHKeyPair, approver_epk: DHPublicKey,
                       code_record: bytes) -> Self:
        """The new device's side: its one-time key pair and the approver's hello key."""
        k_a, k_n, confirm = cls._keys(ephemeral.dh(approver_epk), approver_epk,
                                      ephemeral.public, code_record)
        return cls(k_send=k_n, k_receive=k_a, confirmation=confirm)

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return bytes(16) + counter.to_bytes(8, "big")

    def seal(self, message: dict[str, Any]) -> bytes:
        """One sealed frame carrying the CBOR map `message`."""
        frame = crypto_aead_xchacha20poly1305_ietf_encrypt(
            codec.encode(message), INFO_LINK, self._nonce(self._sent), self._k_send)
        self._sent += 1
        return frame

    def open(self, frame: bytes, *, expect: str) -> codec.Fields:
        """The message of the next sealed frame, which must be of type `expect`. DecryptionFailed
        if it does not open (tampered, reordered, or not for this stream), DecodeError if it is
        not the message expected."""
        if len(frame) > MAX_LINK_FRAME_BYTES:
            raise DecodeError("link frame too large")
        try:
            plain = crypto_aead_xchacha20poly1305_ietf_decrypt(
                frame, INFO_LINK, self._nonce(self._received), self._k_receive)
        except CryptoError:
            raise DecryptionFailed("link frame does not open") from None
        self._received += 1
        f = codec.decode_map(plain, limit=MAX_LINK_FRAME_BYTES, what="link message")
        kind = f.text("t", max_size=16)
        if kind != expect:
            raise DecodeError(f"link stream: expected {expect!r}, got {kind!r}")
        return f


def chunk_payload(payload: bytes) -> list[dict[str, Any]]:
    """The provisioning payload as "provision" messages of at most PROVISION_CHUNK_BYTES each."""
    if len(payload) > MAX_PROVISION_BYTES:
        raise DeviceError("this account's data is too large to provision a device with")
    count = max(1, -(-len(payload) // PROVISION_CHUNK_BYTES))
    return [{"t": "provision", "i": i, "n": count,
             "data": payload[i * PROVISION_CHUNK_BYTES:(i + 1) * PROVISION_CHUNK_BYTES]}
            for i in range(count)]


class PayloadAssembler:
    """Collects "provision" messages in order until the payload is whole."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._count: int | None = None
        self._size = 0

    def add(self, f: codec.Fields) -> bytes | None:
        """Add one message; the whole payload once the last piece arrived, else None."""
        index = f.int("i", 0, MAX_PROVISION_BYTES // PROVISION_CHUNK_BYTES + 1)
        count = f.int("n", 1, MAX_PROVISION_BYTES // PROVISION_CHUNK_BYTES + 1)
        data = f.bytes("data", max_size=PROVISION_CHUNK_BYTES)
        f.done()
        if index != len(self._parts) or (self._count is not None and count != self._count):
            raise DecodeError("provisioning pieces out of order")
        self._count = count
        self._size += len(data)
        if self._size > MAX_PROVISION_BYTES:
            raise DecodeError("provisioning payload too large")
        self._parts.append(data)
        return b"".join(self._parts) if len(self._parts) == count else None


# --- the provisioning payload ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class DevicePayload:
    """A device as the payload carries it: its key and where it is reached."""

    device: DeviceKey
    addrs: tuple[str, ...]
    relays: tuple[str, ...]

    def to_cbor(self) -> dict[str, Any]:
        return {"dev": self.device.to_bytes(), "addrs": list(self.addrs),
                "relays": list(self.relays)}

    @classmethod
    def from_cbor(cls, obj: Any) -> Self:
        f = codec.Fields(obj, "provisioned device")
        device = DeviceKey.from_bytes(f.bytes("dev", KEY_BYTES))
        addrs = _addrs(f, "addrs")
        relays = _addrs(f, "relays")
        f.done()
        return cls(device=device, addrs=addrs, relays=relays)


def _addrs(f: codec.Fields, key: str) -> tuple[str, ...]:
    values = f.list(key, max_items=MAX_ADDRS)
    if not all(isinstance(a, str) and len(a.encode()) <= MAX_ADDR_BYTES for a in values):
        raise DecodeError(f"{f.what}: {key} must be short text")
    return tuple(values)


@dataclass(frozen=True, kw_only=True, slots=True)
class ContactPayload:
    """A contact as the payload carries it: the name, the verified identity key, the devices and
    the newest device list this account has of them (if any)."""

    name: str
    identity: IdentityKey
    added_at_ms: int
    devices: tuple[DevicePayload, ...]
    device_list: bytes | None

    def to_cbor(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "name": self.name, "ik": self.identity.to_bytes(), "added": self.added_at_ms,
            "devices": [d.to_cbor() for d in self.devices]}
        if self.device_list is not None:
            value["list"] = self.device_list
        return value

    @classmethod
    def from_cbor(cls, obj: Any) -> Self:
        f = codec.Fields(obj, "provisioned contact")
        name = f.text("name", max_size=MAX_NAME_BYTES)
        identity = IdentityKey.from_bytes(f.bytes("ik", KEY_BYTES))
        added = f.int("added", 0, 2**53)
        devices = tuple(DevicePayload.from_cbor(d) for d in f.list("devices",
                                                                     max_items=MAX_DEVICES))
        raw_list = f.bytes("list", max_size=MAX_RECORD_BYTES, optional=True)
        f.done()
        return cls(name=name, identity=identity, added_at_ms=added, devices=devices,
                   device_list=raw_list)


@dataclass(frozen=True, kw_only=True, slots=True)
class Provisioning:
    """What the approver gives the new device: the account key, the account's signed device
    list (as it stands before the new device is added), the account's other devices, contacts,
    display name and relays."""

    identity: IdentityKeyPair
    device_list: bytes
    devices: tuple[DevicePayload, ...]
    contacts: tuple[ContactPayload, ...]
    display_name: str
    relays: tuple[str, ...]

    def to_bytes(self) -> bytes:
        """The CBOR payload (then chunked and sealed)."""
        return codec.encode({
            "v": LINK_VERSION, "seed": self.identity.to_bytes(), "list": self.device_list,
            "devices": [d.to_cbor() for d in self.devices],
            "contacts": [c.to_cbor() for c in self.contacts],
            "name": self.display_name, "relays": list(self.relays)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Decode strictly; DecodeError (or LimitExceeded) otherwise. The device list is checked
        by the caller (it needs the time)."""
        f = codec.decode_map(data, limit=MAX_PROVISION_BYTES, what="provisioning payload",
                             version=LINK_VERSION)
        identity = IdentityKeyPair.from_bytes(f.bytes("seed", KEY_BYTES))
        device_list = f.bytes("list", max_size=MAX_RECORD_BYTES)
        devices = tuple(DevicePayload.from_cbor(d)
                        for d in f.list("devices", max_items=MAX_DEVICES))
        contacts = tuple(ContactPayload.from_cbor(c)
                         for c in f.list("contacts", max_items=MAX_PROVISION_CONTACTS))
        name = f.text("name", max_size=MAX_NAME_BYTES)
        relays = _addrs(f, "relays")
        f.done()
        return cls(identity=identity, device_list=device_list, devices=devices,
                   contacts=contacts, display_name=name, relays=relays)


def describe_error(code: str) -> str:
    """The user's words for a link error code the other side sent."""
    if code == CODE_USED:
        return ("the new device refused: this link code was used already (run `pigeon link`"
                " again on the new device for a new one)")
    return f"the new device refused the link ({code})"


def link_addresses(addrs: Sequence[str]) -> tuple[str, ...]:
    """The addresses a link code carries (as a short invite's: `short_addresses`)."""
    return short_addresses(addrs)
