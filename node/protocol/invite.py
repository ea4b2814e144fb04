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
invite may be used by several people (a one-time key would serve only the first).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Final, Self

from node.errors import DecodeError, InvalidRecord, InviteError
from node.protocol.content import INVITE_TOKEN_BYTES, MAX_ADDR_BYTES, MAX_ADDRS, MAX_NAME_BYTES
from node.protocol.keys import KEY_BYTES, DeviceKey, IdentityKey, IdentityKeyPair
from node.protocol.limits import MAX_RECORD_BYTES
from node.protocol.records import PreKeyBundle, open_record, sign_record

__all__ = ["INVITE_PREFIX", "Invite", "invite_record"]

#: What an invite's text form starts with (PROTOCOL.md section 14).
INVITE_PREFIX: Final = "pigeon:"
INVITE_KIND: Final = "invite"
MAX_INVITE_TEXT: Final = len(INVITE_PREFIX) + (MAX_RECORD_BYTES * 4) // 3 + 4


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
        """Parse and verify an invite. InviteError with a plain reason for anything wrong."""
        return cls.from_record(invite_record(text), now=now)

    @classmethod
    def from_record(cls, record: bytes, *, now: int) -> Self:
        """Verify an invite given as its record bytes (what its QR code holds)."""
        try:
            opened = open_record(record, kind=INVITE_KIND, now=now)
        except InvalidRecord as exc:
            reason = str(exc)
            if "expired" in reason:
                raise InviteError("invite has expired; ask for a new one") from exc
            raise InviteError(f"invite is not genuine or is damaged ({reason})") from exc
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
            bundle = PreKeyBundle.verify(bundle_bytes, now=now)
        except (DecodeError, InvalidRecord) as exc:
            raise InviteError(f"invite is malformed ({exc})") from exc
        if bundle.identity != opened.signer or bundle.device != device:
            raise InviteError("invite's prekey bundle belongs to someone else")
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


def invite_record(text: str) -> bytes:
    """The signed record inside an invite's text form. InviteError if it is not one."""
    text = text.strip()
    if not text.startswith(INVITE_PREFIX):
        raise InviteError("not a Pigeon invite (it should start with 'pigeon:')")
    if len(text) > MAX_INVITE_TEXT:
        raise InviteError("invite is too long")
    body = text[len(INVITE_PREFIX):]
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InviteError("invite is damaged (not valid base64url); copy it again") from exc
