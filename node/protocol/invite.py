"""Invites: the one-line text a person gives someone so they can become a contact
(PROTOCOL.md "Invites").

An invite is a signed record (records.py) of kind "invite", signed by the inviter's identity key:

    body = {"kind": "invite", "ik", "seq", "exp",
            "name":  tstr,                 display name the inviter suggests
            "dev":   bstr .size 32,        the inviting device's key (its peer id)
            "addrs": [* tstr],             multiaddrs where that device listens
            "relays": [* tstr],            relays holding that device's mailbox (with /p2p/)
            "bundle": bstr,                a signed prekey bundle of that device (same ik, dev)
            "token": bstr .size 16}        proves, in the new contact's intro, that they were invited

    text = "pigeon:" || base64url(record), no padding
    QR   = the record bytes themselves (byte mode): the text would not fit a QR code

The bundle carries the signed prekey and the last-resort PQ prekey but no one-time keys: the same
invite may be used by several people (a one-time key would serve only the first). It also carries
the device's binding to the account (PROTOCOL.md section 4 "Binding"), so an invite names a
device only with the device key's consent; a short invite carries none, and the device record
the joiner fetches for it carries the bundle, binding included.

A *short invite* (PROTOCOL.md section 14.1) leaves the bundle out so that it fits a QR code a
terminal can show: a signed record of kind "short-invite" with the device key, a few addresses
and the token; the joiner fetches the device's signed device record (with its bundle) when it
uses the invite (`/pigeon/bundle/1.0.0`, node.protocol.bundle, or the DHT):

    body = {"kind": "short-invite", "ik", "seq", "exp",
            "dev":   bstr .size 32,
            "addrs": [* bstr],             binary multiaddrs (multiaddrs.py): at most
                                           SHORT_INVITE_MAX_ADDRS, SHORT_INVITE_ADDR_BUDGET bytes
            "token": bstr .size 16}

    text = "pigeon:" || base32(record), upper case, no padding (QR alphanumeric mode)

Whitespace anywhere in a pasted invite (a mail client's line breaks) is ignored; the first
character after the prefix tells the forms apart: both records are CBOR maps of three entries
(first byte 0xa3), which base64url writes as "o" and base32 as "U".
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Self

from node.errors import DecodeError, InvalidRecord, InviteError
from node.protocol.content import INVITE_TOKEN_BYTES, MAX_ADDR_BYTES, MAX_ADDRS, MAX_NAME_BYTES
from node.protocol.keys import KEY_BYTES, DeviceKey, IdentityKey, IdentityKeyPair
from node.protocol.limits import MAX_RECORD_BYTES
from node.protocol.multiaddrs import UnsupportedAddress, from_binary, to_binary
from node.protocol.records import PreKeyBundle, RecordBody, RecordKind, open_record, sign_record

__all__ = ["INVITE_PREFIX", "Invite", "ShortInvite", "invite_record", "parse_invite",
           "short_addresses"]

#: What an invite's text form starts with (PROTOCOL.md section 14).
INVITE_PREFIX: Final = "pigeon:"
INVITE_KIND: Final = "invite"
MAX_INVITE_TEXT: Final = len(INVITE_PREFIX) + (MAX_RECORD_BYTES * 4) // 3 + 4
SHORT_INVITE_KIND: Final = "short-invite"
#: Most addresses a short invite carries, and most bytes of binary multiaddrs in all (a direct
#: TCP address is 8 bytes, a relayed one about 51): with them the worst-case invite still fits a
#: version 14 QR code (73 modules: 79 terminal columns with its 3-module border,
#: tests/test_short_invites.py). The joiner learns the rest from the device.
SHORT_INVITE_MAX_ADDRS: Final = 6
SHORT_INVITE_ADDR_BUDGET: Final = 160
#: Largest short-invite record: the fields above with room to spare; checked before decoding.
MAX_SHORT_INVITE_BYTES: Final = 512
#: The first text character of a short invite's record in base32 (a CBOR map of 3 entries, byte
#: 0xa3); a long invite's base64url starts with "o", and anything else is tried as base64url.
_SHORT_FORM_START: Final = "U"


@dataclass(frozen=True, kw_only=True, slots=True)
class Invite:
    """An invitation to become someone's contact: who they are, how to reach their device, a
    prekey bundle to start a session with, and the token that lets them accept us."""

    identity: IdentityKey
    device: DeviceKey
    name: str
    addrs: tuple[str, ...]
    relays: tuple[str, ...]
    bundle: PreKeyBundle
    token: bytes
    seq: int
    expires: int

    @property
    def account_id(self) -> str:
        """The inviting account's id."""
        return self.identity.account_id()

    def to_text(self, identity: IdentityKeyPair) -> str:
        """Sign with the inviter's identity key and encode as one line."""
        record = sign_record(
            identity,
            {
                "kind": INVITE_KIND,
                "seq": self.seq,
                "exp": self.expires,
                "name": self.name,
                "dev": self.device.to_bytes(),
                "addrs": list(self.addrs),
                "relays": list(self.relays),
                "bundle": self.bundle.sign(identity),
                "token": self.token,
            },
        )
        return INVITE_PREFIX + base64.urlsafe_b64encode(record).decode("ascii").rstrip("=")

    @classmethod
    def from_text(cls, text: str, *, now: int) -> Self:
        """Parse and verify an invite of this (the long) form. InviteError with a plain reason
        for anything wrong, a short invite included (use `parse_invite` for either form)."""
        record, short = _decode_text(text)
        if short:
            raise InviteError("this is a short invite: its keys are fetched from the inviter's"
                              " device when it is used")
        return cls.from_record(record, now=now)

    @classmethod
    def from_record(cls, record: bytes, *, now: int) -> Self:
        """Verify an invite given as its record bytes (what its QR code holds)."""
        opened = _open_invite(record, INVITE_KIND, now)
        f = opened.fields
        try:
            name = f.text("name", max_size=MAX_NAME_BYTES)
            device = DeviceKey.from_bytes(f.bytes("dev", KEY_BYTES))
            addrs = f.list("addrs", max_items=MAX_ADDRS)
            relays = f.list("relays", max_items=MAX_ADDRS)
            if not all(isinstance(a, str) and len(a) <= MAX_ADDR_BYTES for a in addrs + relays):
                raise DecodeError("addresses must be short text")
            if not all("/p2p/" in r for r in relays):
                raise DecodeError("relay addresses must name the relay (/p2p/...)")
            bundle_bytes = f.bytes("bundle", max_size=MAX_RECORD_BYTES)
            token = f.bytes("token", INVITE_TOKEN_BYTES)
            f.done()
        except (DecodeError, InvalidRecord) as exc:
            raise InviteError(f"invite is malformed ({exc})") from exc
        try:
            # The bundle carries the device's binding to the account (PROTOCOL.md section 4
            # "Binding"): without it anyone could invite with someone else's device key.
            bundle = PreKeyBundle.verify(bundle_bytes, now=now)
        except InvalidRecord as exc:
            raise InviteError(f"invite is not genuine: its device keys do not check out ({exc})"
                              ) from exc
        if bundle.identity != opened.signer or bundle.device != device:
            raise InviteError("invite is not genuine: its prekey bundle belongs to someone else")
        return cls(
            identity=opened.signer,
            device=device,
            name=name,
            addrs=tuple(addrs),
            relays=tuple(relays),
            bundle=bundle,
            token=token,
            seq=opened.seq,
            expires=opened.expires,
        )


def _open_invite(record: bytes, kind: RecordKind, now: int) -> RecordBody:
    try:
        return open_record(record, kind=kind, now=now)
    except InvalidRecord as exc:
        reason = str(exc)
        if "expired" in reason:
            raise InviteError("invite has expired; ask for a new one") from exc
        raise InviteError(f"invite is not genuine or is damaged ({reason})") from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class ShortInvite:
    """An invite without the prekey bundle (PROTOCOL.md section 14.1): who the inviter is, which
    device to ask for its signed device record, where that device listens, and the token. Small
    enough for a QR code in an 80-column terminal."""

    identity: IdentityKey
    device: DeviceKey
    addrs: tuple[str, ...]
    token: bytes
    seq: int
    expires: int

    def __post_init__(self) -> None:
        if len(self.token) != INVITE_TOKEN_BYTES:
            raise ValueError(f"an invite token is {INVITE_TOKEN_BYTES} bytes")
        if len(self.addrs) > SHORT_INVITE_MAX_ADDRS or \
                sum(len(to_binary(a)) for a in self.addrs) > SHORT_INVITE_ADDR_BUDGET:
            raise ValueError("too many addresses for a short invite: pick with short_addresses()")

    @property
    def account_id(self) -> str:
        """The inviting account's id."""
        return self.identity.account_id()

    def record(self, identity: IdentityKeyPair) -> bytes:
        """The signed record (kind "short-invite")."""
        if identity.public != self.identity:
            raise ValueError("an invite is signed by its account's identity key")
        return sign_record(identity, {
            "kind": SHORT_INVITE_KIND,
            "seq": self.seq,
            "exp": self.expires,
            "dev": self.device.to_bytes(),
            "addrs": [to_binary(a) for a in self.addrs],
            "token": self.token,
        })

    def to_text(self, identity: IdentityKeyPair) -> str:
        """Sign and encode: "pigeon:" and upper-case base32, which a QR code holds in its dense
        alphanumeric mode."""
        text = base64.b32encode(self.record(identity)).decode("ascii").rstrip("=")
        return INVITE_PREFIX + text

    @classmethod
    def from_record(cls, record: bytes, *, now: int) -> Self:
        """Verify a short invite's record bytes. InviteError with a plain reason otherwise."""
        if len(record) > MAX_SHORT_INVITE_BYTES:
            raise InviteError("invite is not genuine or is damaged (too long for a short invite)")
        opened = _open_invite(record, SHORT_INVITE_KIND, now)
        f = opened.fields
        try:
            device = DeviceKey.from_bytes(f.bytes("dev", KEY_BYTES))
            raw = f.list("addrs", max_items=SHORT_INVITE_MAX_ADDRS)
            if not all(isinstance(a, bytes) for a in raw):
                raise DecodeError("addresses must be binary multiaddrs")
            addrs = tuple(from_binary(a) for a in raw)
            token = f.bytes("token", INVITE_TOKEN_BYTES)
            f.done()
            return cls(identity=opened.signer, device=device, addrs=addrs, token=token,
                       seq=opened.seq, expires=opened.expires)
        except (DecodeError, ValueError) as exc:
            raise InviteError(f"invite is malformed ({exc})") from exc


def short_addresses(addrs: Sequence[str]) -> tuple[str, ...]:
    """The addresses a short invite carries, from the device's own list (direct ones first,
    relayed ones after): the first direct and the first relayed address if they fit, so that
    both a LAN and a NAT-bound joiner have a way in, then the others in order, within
    SHORT_INVITE_MAX_ADDRS and SHORT_INVITE_ADDR_BUDGET (binary sizes)."""
    relayed = [a for a in addrs if "/p2p-circuit" in a]
    direct = [a for a in addrs if "/p2p-circuit" not in a]
    order = [*direct[:1], *relayed[:1], *direct[1:], *relayed[1:]]
    chosen: list[str] = []
    used = 0
    for addr in order:
        try:
            size = len(to_binary(addr))
        except UnsupportedAddress:
            continue  # a protocol the binary form does not know: the device record has it
        if len(chosen) < SHORT_INVITE_MAX_ADDRS and used + size <= SHORT_INVITE_ADDR_BUDGET:
            chosen.append(addr)
            used += size
    return tuple(a for a in addrs if a in chosen)


def parse_invite(text: str, *, now: int) -> Invite | ShortInvite:
    """Parse and verify an invite in either form (section 14 or 14.1). InviteError otherwise."""
    record, short = _decode_text(text)
    if short:
        return ShortInvite.from_record(record, now=now)
    return Invite.from_record(record, now=now)


def invite_record(text: str) -> bytes:
    """The signed record inside an invite's text form, either form. InviteError if it is not
    one."""
    return _decode_text(text)[0]


def _decode_text(text: str) -> tuple[bytes, bool]:
    """(record bytes, whether it is a short invite). Whitespace anywhere is ignored: a pasted
    invite may have been wrapped by a mail client."""
    if len(text) > 2 * MAX_INVITE_TEXT:  # bound the work before removing whitespace
        raise InviteError("invite is too long")
    text = "".join(text.split())
    if not text[:len(INVITE_PREFIX)].lower() == INVITE_PREFIX:
        raise InviteError("not a Pigeon invite (it should start with 'pigeon:')")
    if len(text) > MAX_INVITE_TEXT:
        raise InviteError("invite is too long")
    body = text[len(INVITE_PREFIX):]
    if body[:1].upper() == _SHORT_FORM_START:
        try:
            return base64.b32decode(body.upper() + "=" * (-len(body) % 8)), True
        except (binascii.Error, ValueError) as exc:
            raise InviteError("invite is damaged (not valid base32); copy it again") from exc
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)), False
    except (binascii.Error, ValueError) as exc:
        raise InviteError("invite is damaged (not valid base64url); copy it again") from exc
