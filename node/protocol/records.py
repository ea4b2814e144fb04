"""Signed records: objects others must trust, wherever they got them (invite, DHT, peer).

Every record has the same outer form (PROTOCOL.md "Signed records"):

    record = {"v": 1, "body": bstr, "sig": bstr .size 64}
    body   = canonical CBOR map {"kind": text, "ik": identity key, "seq": uint, "exp": uint, ...}
    sig    = Ed25519 signature by body.ik over  "pigeon-record-v1" || 0x00 || body

The signature covers the exact body bytes (nothing is re-encoded before verifying). A record is
valid at time `now` when it decodes, is no larger than MAX_RECORD_BYTES, has the expected kind,
verifies, `now < exp` and `exp <= now + MAX_RECORD_LIFETIME_S`. Of two valid records of the same
kind and signer, the higher `seq` wins (`newer_than`).

This module defines the record envelope and the prekey bundle; other record kinds (device lists,
device records) reuse `sign_record` / `open_record`. A bundle carries its device's binding to the
account (`node.protocol.binding`, PROTOCOL.md section 4 "Binding"), so every record that embeds a
bundle (device records, invites) names its device only with the device's own proof.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, Self

from node.errors import DecodeError, InvalidRecord, NodeError
from node.protocol import codec
from node.protocol.binding import verify_binding
from node.protocol.keys import (
    KEM_PUBLIC_BYTES,
    KEY_BYTES,
    SIGNATURE_BYTES,
    DeviceKey,
    DHPublicKey,
    IdentityKey,
    IdentityKeyPair,
    KEMPublicKey,
)
from node.protocol.limits import MAX_RECORD_BYTES, MAX_RECORD_LIFETIME_S

__all__ = ["PreKeyBundle", "RecordBody", "RecordKind", "open_record", "sign_record"]

RECORD_VERSION: Final = 1
SIGNATURE_CONTEXT: Final = b"pigeon-record-v1\x00"
MAX_PREKEY_ID: Final = 2**32 - 1
MAX_SEQ: Final = 2**63 - 1
MAX_TIME: Final = 2**40  # seconds; far beyond any real expiry, keeps integers small
PREKEY_BUNDLE_KIND: Final = "prekey-bundle"

RecordKind = Literal["prekey-bundle", "invite", "short-invite", "account", "device", "device-list",
                     "relay"]
"""Every kind of signed record (the body's "kind"): prekey bundles here, invites
(`node.protocol.invite`), account and device records (`node.protocol.directory`), device
lists (`node.protocol.devicelist`), relay records (`node.protocol.relayrecord`)."""


def sign_record(identity: IdentityKeyPair, body: dict[str, Any]) -> bytes:
    """Encode and sign a record body (a dict that must hold kind, seq and exp; ik is added)."""
    body = dict(body, ik=identity.public.to_bytes())
    body_bytes = codec.encode(body)
    record = codec.encode(
        {"v": RECORD_VERSION, "body": body_bytes, "sig": identity.sign(SIGNATURE_CONTEXT + body_bytes)}
    )
    if len(record) > MAX_RECORD_BYTES:
        raise InvalidRecord(f"record is {len(record)} bytes, over MAX_RECORD_BYTES")
    return record


@dataclass(frozen=True, slots=True)
class RecordBody:
    """A verified record body: the signer, sequence number, expiry and the remaining fields."""

    kind: RecordKind
    signer: IdentityKey
    seq: int
    expires: int
    fields: codec.Fields

    def newer_than(self, other: RecordBody) -> bool:
        """Whether this record replaces `other` (same kind and signer, higher sequence number)."""
        return self.kind == other.kind and self.signer == other.signer and self.seq > other.seq


def open_record(data: bytes, *, kind: RecordKind, now: int) -> RecordBody:
    """Verify a signed record of `kind` at time `now` (unix seconds). InvalidRecord otherwise.

    The caller reads its kind-specific fields from `.fields` and calls `.fields.done()`.
    """
    try:
        outer = codec.decode_map(data, limit=MAX_RECORD_BYTES, what="record", version=RECORD_VERSION)
        body_bytes = outer.bytes("body", max_size=MAX_RECORD_BYTES)
        signature = outer.bytes("sig", SIGNATURE_BYTES)
        outer.done()
        body = codec.decode_map(body_bytes, limit=MAX_RECORD_BYTES, what=f"{kind} record")
        found_kind = body.text("kind", max_size=64)
        signer = IdentityKey.from_bytes(body.bytes("ik", KEY_BYTES))
        seq = body.int("seq", 0, MAX_SEQ)
        expires = body.int("exp", 0, MAX_TIME)
    except InvalidRecord:
        raise
    except NodeError as exc:  # DecodeError, LimitExceeded, UnknownVersion
        raise InvalidRecord(f"malformed {kind} record: {exc}") from exc
    if found_kind != kind:
        raise InvalidRecord(f"expected a {kind} record, got {found_kind!r}")
    signer.verify(signature, SIGNATURE_CONTEXT + body_bytes)
    if expires <= now:
        raise InvalidRecord(f"{kind} record expired")
    if expires > now + MAX_RECORD_LIFETIME_S:
        raise InvalidRecord(f"{kind} record claims a lifetime beyond MAX_RECORD_LIFETIME_S")
    return RecordBody(kind=kind, signer=signer, seq=seq, expires=expires, fields=body)


# --- prekey bundle -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PreKeyBundle:
    """What an initiator needs to start a PQXDH session with one device (PQXDH section 3.2).

    `one_time_prekey` is optional (a bundle published where many can read it leaves it out);
    `kem_prekey` is a one-time PQ prekey or, when `kem_last_resort` is true, the last-resort one.
    `binding` is the device key's signature of its membership of `identity` (PROTOCOL.md
    section 4 "Binding"); it is checked on construction (ValueError), so no bundle object names
    a device that did not consent to the account.
    """

    identity: IdentityKey
    device: DeviceKey
    binding: bytes
    seq: int
    expires: int
    signed_prekey_id: int
    signed_prekey: DHPublicKey
    one_time_prekey_id: int | None = None
    one_time_prekey: DHPublicKey | None = None
    kem_prekey_id: int
    kem_prekey: KEMPublicKey
    kem_last_resort: bool

    def __post_init__(self) -> None:
        for name in ("signed_prekey_id", "kem_prekey_id"):
            if not 0 <= getattr(self, name) <= MAX_PREKEY_ID:
                raise ValueError(f"{name} out of range")
        if (self.one_time_prekey_id is None) != (self.one_time_prekey is None):
            raise ValueError("one_time_prekey and its id go together")
        try:
            verify_binding(self.device, self.identity, self.binding)
        except InvalidRecord as exc:
            raise ValueError(f"the device key did not bind itself to this account ({exc})") \
                from exc

    def body(self) -> dict[str, Any]:
        """The record body to sign (without "ik", which `sign_record` adds)."""
        body: dict[str, Any] = {
            "kind": PREKEY_BUNDLE_KIND,
            "seq": self.seq,
            "exp": self.expires,
            "dev": self.device.to_bytes(),
            "bind": self.binding,
            "spk": {"id": self.signed_prekey_id, "key": self.signed_prekey.to_bytes()},
            "pqpk": {
                "id": self.kem_prekey_id,
                "key": self.kem_prekey.to_bytes(),
                "lr": self.kem_last_resort,
            },
        }
        if self.one_time_prekey is not None:
            body["opk"] = {"id": self.one_time_prekey_id, "key": self.one_time_prekey.to_bytes()}
        return body

    def sign(self, identity: IdentityKeyPair) -> bytes:
        """The signed record of this bundle; ValueError unless `identity` is the bundle's own."""
        if identity.public != self.identity:
            raise ValueError("a bundle is signed by its own identity key")
        return sign_record(identity, self.body())

    @classmethod
    def verify(cls, data: bytes, *, now: int) -> Self:
        """Decode and verify a signed bundle; InvalidRecord for anything wrong."""
        record = open_record(data, kind=PREKEY_BUNDLE_KIND, now=now)
        return cls.from_body(record)

    @classmethod
    def from_body(cls, record: RecordBody) -> Self:
        """The bundle in a verified record body (a device record embeds one); InvalidRecord if
        its fields are malformed."""
        fields = record.fields
        try:
            device = DeviceKey.from_bytes(fields.bytes("dev", KEY_BYTES))
            binding = fields.bytes("bind", SIGNATURE_BYTES)
            spk = fields.map("spk")
            spk_id = spk.int("id", 0, MAX_PREKEY_ID)
            spk_key = DHPublicKey.from_bytes(spk.bytes("key", KEY_BYTES))
            spk.done()
            pq = fields.map("pqpk")
            pq_id = pq.int("id", 0, MAX_PREKEY_ID)
            pq_key = KEMPublicKey.from_bytes(pq.bytes("key", KEM_PUBLIC_BYTES))
            last_resort = pq.bool("lr")
            pq.done()
            opk = fields.optional_map("opk")
            opk_id = opk_key = None
            if opk is not None:
                opk_id = opk.int("id", 0, MAX_PREKEY_ID)
                opk_key = DHPublicKey.from_bytes(opk.bytes("key", KEY_BYTES))
                opk.done()
            fields.done()
        except DecodeError as exc:
            raise InvalidRecord(f"malformed prekey bundle: {exc}") from exc
        try:
            return cls(
                identity=record.signer,
                device=device,
                binding=binding,
                seq=record.seq,
                expires=record.expires,
                signed_prekey_id=spk_id,
                signed_prekey=spk_key,
                one_time_prekey_id=opk_id,
                one_time_prekey=opk_key,
                kem_prekey_id=pq_id,
                kem_prekey=pq_key,
                kem_last_resort=last_resort,
            )
        except ValueError as exc:  # the binding (ids and keys were checked while decoding)
            raise InvalidRecord(f"prekey bundle: {exc}") from exc
