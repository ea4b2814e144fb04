"""Wake-ups for devices that do not stay online (PROTOCOL.md section 29): the push endpoint a
device registers at its relays, the payload a relay POSTs there, and the rule for which addresses
a relay may POST to. Pure: no I/O, no clock (the relay resolves names and sends; this module
judges the addresses it found).

A device registers, on its authenticated mailbox stream (the same key proof as the mailbox,
section 21), an HTTP(S) URL of a push service (UnifiedPush-style: RFC 8030 semantics) and its
Web Push keys (RFC 8291): `p256dh`, the uncompressed P-256 public key whose private half the
device keeps, and `auth`, a 16-byte secret. When a message arrives for a mailbox that nobody is
subscribed to, the relay POSTs

    aes128gcm(p256dh, auth, b"fetch")       RFC 8291 message encryption, RFC 8188 content coding

to the URL: the push service and anyone watching learn nothing but that a wake-up was sent, and
the device, once woken, runs `pigeon fetch`. The encryption is RFC 8291's, with one record of
RECORD_SIZE bytes and a fresh application-server key and salt per wake-up.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Self
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from node.errors import DecryptionFailed
from node.protocol.kdf import hkdf
from node.protocol.keys import Random

__all__ = [
    "AUTH_SECRET_BYTES",
    "MAX_PUSH_URL_BYTES",
    "MAX_WAKEUP_BYTES",
    "P256_PUBLIC_BYTES",
    "WAKEUP_PLAINTEXT",
    "IpNetwork",
    "PushKeys",
    "PushTarget",
    "address_allowed",
    "decrypt",
    "encrypt",
    "parse_networks",
    "parse_push_url",
]

#: An uncompressed P-256 point (0x04 || X || Y), the form RFC 8291 puts in `p256dh` and in the
#: aes128gcm header's key id.
P256_PUBLIC_BYTES: Final = 65
#: The user agent's authentication secret (RFC 8291 section 3.2: 16 bytes).
AUTH_SECRET_BYTES: Final = 16
SALT_BYTES: Final = 16
TAG_BYTES: Final = 16
#: The record size written in the header: one record holds the whole payload (RFC 8291 section 4
#: lets a push service refuse anything larger than 4096 bytes of body).
RECORD_SIZE: Final = 4096
#: Largest wake-up body a device accepts to decrypt: the header and one record.
MAX_WAKEUP_BYTES: Final = SALT_BYTES + 4 + 1 + P256_PUBLIC_BYTES + RECORD_SIZE
#: Longest push URL a relay stores: push services' URLs are well under 1 KiB; a relay keeps one
#: per registered mailbox.
MAX_PUSH_URL_BYTES: Final = 1024
#: What a wake-up says: only that messages wait (content-free, PROTOCOL.md section 29).
WAKEUP_PLAINTEXT: Final = b"fetch"

_KEY_INFO: Final = b"WebPush: info\x00"
_CEK_INFO: Final = b"Content-Encoding: aes128gcm\x00"
_NONCE_INFO: Final = b"Content-Encoding: nonce\x00"
#: RFC 8188 section 2: the padding delimiter of the last record.
_LAST_RECORD: Final = 0x02

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
"""One range of addresses a relay operator allows wake-ups to (`push_allow`)."""


def _public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _private_key(secret: bytes) -> ec.EllipticCurvePrivateKey:
    if len(secret) != 32:
        raise ValueError("a P-256 private key has 32 bytes")
    return ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP256R1())


def _public_key(point: bytes) -> ec.EllipticCurvePublicKey:
    if len(point) != P256_PUBLIC_BYTES or point[0] != 0x04:
        raise ValueError("p256dh must be an uncompressed P-256 point of 65 bytes")
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def _keys(ecdh_secret: bytes, auth: bytes, ua_public: bytes, as_public: bytes,
          salt: bytes) -> tuple[bytes, bytes]:
    """(content encryption key, nonce) of RFC 8291 section 3.4 and RFC 8188 section 2.2."""
    ikm = hkdf(ecdh_secret, salt=auth, info=_KEY_INFO + ua_public + as_public, length=32)
    return (hkdf(ikm, salt=salt, info=_CEK_INFO, length=16),
            hkdf(ikm, salt=salt, info=_NONCE_INFO, length=12))


def encrypt(plaintext: bytes, p256dh: bytes, auth: bytes, *, rng: Random = os.urandom,
            server_key: bytes | None = None, salt: bytes | None = None) -> bytes:
    """The aes128gcm body (RFC 8188 header, then one record) that carries `plaintext` to the
    holder of `p256dh`'s private key and `auth` (RFC 8291 section 3). `server_key` (a 32-byte
    P-256 private key, else one the library draws) and `salt` (else `rng`'s) are fresh per
    wake-up unless given (for test vectors).
    ValueError for keys of the wrong form or a plaintext that does not fit one record."""
    if len(auth) != AUTH_SECRET_BYTES:
        raise ValueError(f"auth must be {AUTH_SECRET_BYTES} bytes")
    if len(plaintext) + 1 + TAG_BYTES > RECORD_SIZE:
        raise ValueError(f"a wake-up payload fits one record of {RECORD_SIZE} bytes")
    ua = _public_key(p256dh)
    as_private = (_private_key(server_key) if server_key is not None
                  else ec.generate_private_key(ec.SECP256R1()))
    salt = rng(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise ValueError(f"salt must be {SALT_BYTES} bytes")
    as_public = _public_bytes(as_private)
    cek, nonce = _keys(as_private.exchange(ec.ECDH(), ua), auth, p256dh, as_public, salt)
    record = AESGCM(cek).encrypt(nonce, plaintext + bytes([_LAST_RECORD]), None)
    return salt + struct.pack(">IB", RECORD_SIZE, len(as_public)) + as_public + record


def decrypt(body: bytes, private_key: bytes, auth: bytes) -> bytes:
    """The plaintext of an aes128gcm wake-up body for the device holding `private_key` (32
    bytes) and `auth`. DecryptionFailed for anything wrong (one opaque reason, like every
    decryption of Pigeon): a malformed header, a body above MAX_WAKEUP_BYTES, more than one
    record, a bad tag or bad padding."""
    try:
        if len(body) > MAX_WAKEUP_BYTES:
            raise ValueError("too long")
        salt = body[:SALT_BYTES]
        rs, idlen = struct.unpack(">IB", body[SALT_BYTES:SALT_BYTES + 5])
        start = SALT_BYTES + 5 + idlen
        as_public, record = body[SALT_BYTES + 5:start], body[start:]
        if idlen != P256_PUBLIC_BYTES or rs < TAG_BYTES + 2 or len(record) > rs:
            raise ValueError("not one record from a P-256 key")
        ua_private = _private_key(private_key)
        ua_public = _public_bytes(ua_private)
        secret = ua_private.exchange(ec.ECDH(), _public_key(as_public))
        cek, nonce = _keys(secret, auth, ua_public, as_public, salt)
        padded = AESGCM(cek).decrypt(nonce, record, None).rstrip(b"\x00")
        if not padded or padded[-1] != _LAST_RECORD:
            raise ValueError("bad padding")
        return padded[:-1]
    except (ValueError, InvalidTag, struct.error) as exc:
        raise DecryptionFailed("the wake-up does not decrypt") from exc


@dataclass(frozen=True, slots=True)
class PushKeys:
    """A device's Web Push keys: the P-256 private key and the auth secret (kept on the device),
    and `p256dh`, the public key it registers with its relays."""

    private_key: bytes
    auth: bytes

    def __post_init__(self) -> None:
        _private_key(self.private_key)
        if len(self.auth) != AUTH_SECRET_BYTES:
            raise ValueError(f"auth must be {AUTH_SECRET_BYTES} bytes")

    @classmethod
    def generate(cls, rng: Random = os.urandom) -> Self:
        """Fresh keys. The private key is drawn by the library; `rng` draws the auth secret."""
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(key.private_numbers().private_value.to_bytes(32, "big"),
                   rng(AUTH_SECRET_BYTES))

    @property
    def p256dh(self) -> bytes:
        """The uncompressed public key (65 bytes) a relay encrypts wake-ups to."""
        return _public_bytes(_private_key(self.private_key))

    def decrypt(self, body: bytes) -> bytes:
        """The plaintext of a wake-up POSTed for these keys (DecryptionFailed otherwise)."""
        return decrypt(body, self.private_key, self.auth)


# --- URLs and addresses ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushTarget:
    """A push URL taken apart: what a relay resolves and connects to."""

    url: str
    scheme: str
    host: str
    port: int


def parse_push_url(url: str) -> PushTarget:
    """Check a push URL's form: http or https, a host, at most MAX_PUSH_URL_BYTES, no user
    info, no fragment, printable ASCII only. ValueError saying what is wrong."""
    if len(url.encode()) > MAX_PUSH_URL_BYTES:
        raise ValueError(f"push URL longer than {MAX_PUSH_URL_BYTES} bytes")
    if not url.isascii() or not url.isprintable() or " " in url:
        raise ValueError("push URL must be printable ASCII without spaces")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("push URL must be http:// or https://")
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise ValueError("push URL must not carry user info or a fragment")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError("push URL has a bad port") from exc
    host = parts.hostname
    if not host:
        raise ValueError("push URL has no host")
    return PushTarget(url, parts.scheme, host,
                      port if port is not None else (443 if parts.scheme == "https" else 80))


def parse_networks(ranges: Iterable[str]) -> tuple[IpNetwork, ...]:
    """`push_allow` entries ("127.0.0.1/32", "fd00::/8") as networks; ValueError for a bad one."""
    return tuple(ipaddress.ip_network(r, strict=False) for r in ranges)


def address_allowed(address: str, allow: Iterable[IpNetwork] = ()) -> bool:
    """Whether a relay may POST to `address`: any address inside an `allow` range; otherwise only
    globally routable unicast addresses (never loopback, private, link-local, shared, multicast,
    reserved or unspecified ones: a registration must not make the relay reach into its own
    network, PROTOCOL.md section 29). An IPv4-mapped IPv6 address is judged as its IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allow):
        return True
    return ip.is_global and not ip.is_multicast
