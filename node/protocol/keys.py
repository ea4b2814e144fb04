"""Typed key objects (pyca/cryptography style): `generate()`, `from_bytes()`, `to_bytes()`.

No bare `bytes` key wanders through the rest of the code: a function that needs an identity key
takes an `IdentityKey`, so a prekey can never be passed where an identity key is meant.

Kinds of keys (PROTOCOL.md "Identities and keys"):

- `IdentityKeyPair` / `IdentityKey`: the account's long-term Ed25519 key. Its public half is the
  account; `account_id()` is the text people exchange. It signs records (prekey bundles, device
  lists) and, converted to X25519 (RFC 7748 birational map, as libsodium does), takes part in PQXDH.
  It never signs messages: conversations stay deniable (X3DH section 4.4).
- `DeviceKeyPair` / `DeviceKey`: one Ed25519 key per device. It is the device's libp2p host key, so
  its `peer_id()` is how the network names the device. Converted to X25519 it receives sealed-sender
  envelopes addressed to the device.
- `DHKeyPair` / `DHPublicKey`: X25519 keys for signed prekeys, one-time prekeys, ephemeral and
  ratchet keys.
- `KEMKeyPair` / `KEMPublicKey`: ML-KEM-1024 (FIPS 203) keys for post-quantum prekeys.

Randomness comes from a `Random` callable (default `os.urandom`) so tests and test vectors can fix it.
"""

from __future__ import annotations

import hashlib
import os
from base64 import b32decode, b32encode
from collections.abc import Callable
from typing import Final, Generic, Self, TypeVar

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives.asymmetric import mlkem

from node.errors import DecodeError, DecryptionFailed, InvalidRecord

__all__ = [
    "DHKeyPair",
    "DHPublicKey",
    "DeviceKey",
    "DeviceKeyPair",
    "IdentityKey",
    "IdentityKeyPair",
    "KEMKeyPair",
    "KEMPublicKey",
    "Random",
    "b58decode",
    "b58encode",
    "x25519",
]

Random = Callable[[int], bytes]
"""A source of random bytes: called with a length, returns that many bytes (`os.urandom`, or a
fixed stream in tests and vectors)."""

KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
KEM_PUBLIC_BYTES: Final = 1568  # ML-KEM-1024 encapsulation key
KEM_SEED_BYTES: Final = 64  # FIPS 203 (d, z) seed; the private key is regenerated from it
KEM_CIPHERTEXT_BYTES: Final = 1568
KEM_SHARED_BYTES: Final = 32
_X25519_P: Final = 2**255 - 19


def _check_len(data: bytes, size: int, what: str) -> bytes:
    if not isinstance(data, bytes | bytearray) or len(data) != size:
        raise DecodeError(f"{what} must be {size} bytes")
    return bytes(data)


def x25519(private: bytes, public: bytes) -> bytes:
    """X25519 Diffie-Hellman. A low-order public key (all-zero result) raises DecryptionFailed,
    which is what every caller turns such a key into anyway."""
    try:
        return sodium.crypto_scalarmult(private, public)
    except (RuntimeError, nacl.exceptions.CryptoError, TypeError) as exc:
        raise DecryptionFailed("key agreement failed") from exc


# --- Ed25519: identity and device keys -------------------------------------------------------


class _Ed25519Public:
    """Shared behaviour of Ed25519 public keys; subclasses give the key its role."""

    __slots__ = ("_raw", "_x25519")
    _what = "Ed25519 public key"

    def __init__(self, raw: bytes) -> None:
        self._raw = _check_len(raw, KEY_BYTES, self._what)
        self._x25519: bytes | None = None

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Only the length is checked here (the point check costs ~40 us): a key that is not a
        curve point fails where it is used, in `verify` (InvalidRecord) or `to_x25519`
        (DecodeError)."""
        return cls(data)

    def to_bytes(self) -> bytes:
        """The 32-byte Ed25519 public key (RFC 8032 encoding)."""
        return self._raw

    def to_x25519(self) -> bytes:
        """The X25519 form of this key (RFC 7748 birational map), computed once."""
        if self._x25519 is None:
            try:
                self._x25519 = sodium.crypto_sign_ed25519_pk_to_curve25519(self._raw)
            except (RuntimeError, nacl.exceptions.CryptoError) as exc:
                raise DecodeError(f"{self._what} is not a valid curve point") from exc
        return self._x25519

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise InvalidRecord unless `signature` is this key's Ed25519 signature of `message`."""
        try:
            nacl.signing.VerifyKey(self._raw).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError,
                TypeError) as exc:
            raise InvalidRecord("bad signature") from exc

    def __eq__(self, other: object) -> bool:
        # Same bytes under two roles (an identity key and a device key) are different keys.
        return isinstance(other, _Ed25519Public) and type(other) is type(self) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._raw))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._raw.hex()[:16]}…)"


_PublicT = TypeVar("_PublicT", bound=_Ed25519Public)


class _Ed25519Pair(Generic[_PublicT]):
    """Shared behaviour of Ed25519 key pairs; `_PublicT` is the role of the public half."""

    __slots__ = ("_public", "_seed", "_signing", "_x25519")
    _public_type: type[_PublicT]

    def __init__(self, seed: bytes) -> None:
        self._seed = _check_len(seed, KEY_BYTES, "Ed25519 seed")
        self._signing = nacl.signing.SigningKey(self._seed)
        self._public = self._public_type(bytes(self._signing.verify_key))
        self._x25519: bytes | None = None

    @classmethod
    def generate(cls, rng: Random = os.urandom) -> Self:
        """A new key pair from a 32-byte seed drawn from `rng`."""
        return cls(rng(KEY_BYTES))

    @classmethod
    def from_bytes(cls, seed: bytes) -> Self:
        """From the 32-byte seed (RFC 8032 private key)."""
        return cls(seed)

    def to_bytes(self) -> bytes:
        """The 32-byte seed (RFC 8032 private key); keep it secret."""
        return self._seed

    @property
    def public(self) -> _PublicT:
        """The public half, typed by the pair's role."""
        return self._public

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        return self._signing.sign(message).signature

    def x25519_private(self) -> bytes:
        """The X25519 form of the private key (RFC 7748 birational map), computed once."""
        if self._x25519 is None:
            self._x25519 = sodium.crypto_sign_ed25519_sk_to_curve25519(
                self._seed + self._public.to_bytes()
            )
        return self._x25519

    def dh(self, public: bytes) -> bytes:
        """X25519 with this key's X25519 form and an X25519 public key."""
        return x25519(self.x25519_private(), public)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(public={self._public!r})"


class IdentityKey(_Ed25519Public):
    """An account's public identity key. `account_id()` is its shareable text form."""

    __slots__ = ()
    _what = "identity key"

    ACCOUNT_ID_PREFIX: Final = "pg"
    _ACCOUNT_ID_VERSION: Final = b"\x01"

    def account_id(self) -> str:
        """Text form: "pg" + lowercase base32 (RFC 4648, no padding) of
        0x01 || key || SHA-256("pigeon-account-id" || key)[:3]. The checksum catches typos."""
        check = hashlib.sha256(b"pigeon-account-id" + self._raw).digest()[:3]
        body = b32encode(self._ACCOUNT_ID_VERSION + self._raw + check).decode("ascii")
        return self.ACCOUNT_ID_PREFIX + body.rstrip("=").lower()

    @classmethod
    def from_account_id(cls, text: str) -> Self:
        """Parse an account id; DecodeError if malformed or the checksum fails."""
        text = text.strip()
        if not text.startswith(cls.ACCOUNT_ID_PREFIX) or len(text) > 80:
            raise DecodeError("account id must start with 'pg'")
        body = text[len(cls.ACCOUNT_ID_PREFIX):].upper()
        try:
            raw = b32decode(body + "=" * (-len(body) % 8))
        except ValueError as exc:
            raise DecodeError("account id is not valid base32") from exc
        if len(raw) != 36 or raw[:1] != cls._ACCOUNT_ID_VERSION:
            raise DecodeError("account id has the wrong length or version")
        key = raw[1:33]
        if hashlib.sha256(b"pigeon-account-id" + key).digest()[:3] != raw[33:]:
            raise DecodeError("account id checksum does not match (typo?)")
        return cls.from_bytes(key)


class IdentityKeyPair(_Ed25519Pair[IdentityKey]):
    """An account's identity key pair. Held by each device of the account (as in Signal)."""

    __slots__ = ()
    _public_type = IdentityKey


class DeviceKey(_Ed25519Public):
    """A device's public key: its libp2p peer id and its sealed-sender address."""

    __slots__ = ()
    _what = "device key"

    def peer_id(self) -> str:
        """The libp2p peer id (base58btc) of this Ed25519 key: identity multihash of the protobuf
        PublicKey {Type: Ed25519 (1), Data: key} (libp2p peer-ids spec)."""
        protobuf = b"\x08\x01\x12\x20" + self._raw
        return b58encode(b"\x00" + bytes([len(protobuf)]) + protobuf)

    @classmethod
    def from_peer_id(cls, peer_id: str) -> Self:
        """The key inside an Ed25519 peer id; DecodeError for any other kind of peer id."""
        raw = b58decode(peer_id)
        if len(raw) != 38 or raw[:6] != b"\x00\x24\x08\x01\x12\x20":
            raise DecodeError("not an Ed25519 libp2p peer id")
        return cls.from_bytes(raw[6:])


class DeviceKeyPair(_Ed25519Pair[DeviceKey]):
    """A device's key pair (also the seed of its libp2p host key)."""

    __slots__ = ()
    _public_type = DeviceKey


# --- X25519 ------------------------------------------------------------------------------------


class DHPublicKey:
    """An X25519 public key (prekey, ephemeral or ratchet key)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        self._raw = _check_len(raw, KEY_BYTES, "X25519 public key")

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Only the canonical encoding (u < 2^255 - 19, top bit clear) is accepted: X25519 ignores
        the top bit, so without this check a flipped bit would give a second valid encoding of the
        same key, and a tampered message would still decrypt."""
        key = cls(data)
        if int.from_bytes(key._raw, "little") >= _X25519_P:
            raise DecodeError("X25519 public key is not canonically encoded")
        return key

    def to_bytes(self) -> bytes:
        """The 32-byte X25519 public key (RFC 7748 encoding)."""
        return self._raw

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DHPublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"DHPublicKey({self._raw.hex()[:16]}…)"


class DHKeyPair:
    """An X25519 key pair. `to_bytes()` is the 32-byte private scalar (clamped on use)."""

    __slots__ = ("_private", "public")

    def __init__(self, private: bytes) -> None:
        self._private = _check_len(private, KEY_BYTES, "X25519 private key")
        self.public = DHPublicKey(sodium.crypto_scalarmult_base(self._private))

    @classmethod
    def generate(cls, rng: Random = os.urandom) -> Self:
        """A new key pair from a 32-byte private scalar drawn from `rng`."""
        return cls(rng(KEY_BYTES))

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """From the 32-byte private scalar."""
        return cls(data)

    def to_bytes(self) -> bytes:
        """The 32-byte private scalar; keep it secret."""
        return self._private

    def dh(self, public: DHPublicKey | bytes) -> bytes:
        """X25519 of this private key with `public`; DecryptionFailed for a low-order key."""
        raw = public.to_bytes() if isinstance(public, DHPublicKey) else public
        return x25519(self._private, raw)

    def __repr__(self) -> str:
        return f"DHKeyPair(public={self.public!r})"


# --- ML-KEM-1024 --------------------------------------------------------------------------------


class KEMPublicKey:
    """An ML-KEM-1024 encapsulation key (1568 bytes)."""

    __slots__ = ("_key", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = _check_len(raw, KEM_PUBLIC_BYTES, "ML-KEM-1024 public key")
        try:
            self._key = mlkem.MLKEM1024PublicKey.from_public_bytes(self._raw)
        except ValueError as exc:  # FIPS 203 modulus check failed
            raise DecodeError("ML-KEM-1024 public key is malformed") from exc

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """From the 1568-byte encapsulation key; DecodeError if it fails the FIPS 203 check."""
        return cls(data)

    def to_bytes(self) -> bytes:
        """The 1568-byte encapsulation key."""
        return self._raw

    def encapsulate(self) -> tuple[bytes, bytes]:
        """Return (ciphertext, shared secret). The randomness is the library's own (FIPS 203
        ML-KEM.Encaps takes it internally), so this is the one step vectors cannot fix."""
        shared, ciphertext = self._key.encapsulate()
        return ciphertext, shared

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KEMPublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"KEMPublicKey({hashlib.sha256(self._raw).hexdigest()[:16]}…)"


class KEMKeyPair:
    """An ML-KEM-1024 key pair, stored as its 64-byte FIPS 203 seed."""

    __slots__ = ("_key", "_seed", "public")

    def __init__(self, seed: bytes) -> None:
        self._seed = _check_len(seed, KEM_SEED_BYTES, "ML-KEM-1024 seed")
        self._key = mlkem.MLKEM1024PrivateKey.from_seed_bytes(self._seed)
        self.public = KEMPublicKey(self._key.public_key().public_bytes_raw())

    @classmethod
    def generate(cls, rng: Random = os.urandom) -> Self:
        """A new key pair from a 64-byte seed drawn from `rng`."""
        return cls(rng(KEM_SEED_BYTES))

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """From the 64-byte FIPS 203 seed."""
        return cls(data)

    def to_bytes(self) -> bytes:
        """The 64-byte FIPS 203 seed; keep it secret."""
        return self._seed

    def decapsulate(self, ciphertext: bytes) -> bytes:
        """Shared secret for `ciphertext`. ML-KEM decapsulation never fails on a wrong ciphertext
        (implicit rejection gives a pseudo-random secret); only a wrong length raises."""
        if len(ciphertext) != KEM_CIPHERTEXT_BYTES:
            raise DecryptionFailed("bad KEM ciphertext")
        try:
            return self._key.decapsulate(ciphertext)
        except ValueError as exc:  # pragma: no cover - length already checked
            raise DecryptionFailed("bad KEM ciphertext") from exc

    def __repr__(self) -> str:
        return f"KEMKeyPair(public={self.public!r})"


# --- base58btc (peer ids) ---------------------------------------------------------------------

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58, as libp2p uses for peer ids."""
    zeros = len(data) - len(data.lstrip(b"\x00"))
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, rem = divmod(number, 58)
        out.append(_B58[rem])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Inverse of `b58encode`; DecodeError for empty, over-long or non-base58 text."""
    if not isinstance(text, str) or not text or len(text) > 128:
        raise DecodeError("base58 text is empty or too long")
    number = 0
    for char in text:
        if char not in _B58_INDEX:
            raise DecodeError(f"invalid base58 character {char!r}")
        number = number * 58 + _B58_INDEX[char]
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * zeros + body
