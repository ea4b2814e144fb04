"""Safety numbers: a fingerprint of both identity keys that two people compare (PROTOCOL.md
"Safety numbers"), following Signal's NumericFingerprintGenerator.

Per account:   h = SHA-512(version (2 bytes BE) || key || account id (UTF-8))
               repeat ITERATIONS times: h = SHA-512(h || key)
               fingerprint = h[:30]
Displayed:     each 5-byte chunk of the fingerprint, as a big-endian integer mod 100000, in five
               digits: 30 digits per account; the two 30-digit strings sorted and concatenated give
               the 60-digit safety number, identical on both sides.
QR payload:    CBOR {"v": 0, "a": fingerprint of the scanner's peer, "b": of the one displaying}
               i.e. the displaying side puts its own fingerprint under "b"; a scanner checks
               a == its own and b == the peer's.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from dataclasses import dataclass
from typing import Final, Self

from node.errors import DecodeError
from node.protocol import codec
from node.protocol.keys import IdentityKey

__all__ = ["SafetyNumber"]

FINGERPRINT_VERSION: Final = 0
#: Signal's iteration count: makes a second-preimage search for a matching number expensive.
ITERATIONS: Final = 5200
FINGERPRINT_BYTES: Final = 30
#: Fingerprints kept (30 bytes each, keyed by the 32-byte key): the identity keys of more
#: contacts than a contact list shows, so listing them does not redo 5,200 hashes per contact
#: (~5 ms of CPU each) every time.
CACHED_FINGERPRINTS: Final = 1024


def fingerprint(key: IdentityKey) -> bytes:
    return _fingerprint(key.to_bytes(), key.account_id())


@functools.lru_cache(maxsize=CACHED_FINGERPRINTS)
def _fingerprint(raw: bytes, account_id: str) -> bytes:
    digest = hashlib.sha512(FINGERPRINT_VERSION.to_bytes(2, "big") + raw + account_id.encode()
                            ).digest()
    for _ in range(ITERATIONS):
        digest = hashlib.sha512(digest + raw).digest()
    return digest[:FINGERPRINT_BYTES]


def _digits(fp: bytes) -> str:
    return "".join(f"{int.from_bytes(fp[i:i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5))


@dataclass(frozen=True, slots=True)
class SafetyNumber:
    """The safety number between `local` and `remote`, seen from `local`."""

    local: bytes
    remote: bytes

    @classmethod
    def of(cls, local: IdentityKey, remote: IdentityKey) -> Self:
        """The safety number between our identity key and a contact's."""
        return cls(fingerprint(local), fingerprint(remote))

    def digits(self) -> str:
        """60 digits, the same on both sides."""
        return "".join(sorted([_digits(self.local), _digits(self.remote)]))

    def display(self) -> str:
        """The digits in twelve groups of five, as Signal shows them."""
        d = self.digits()
        return " ".join(d[i:i + 5] for i in range(0, 60, 5))

    def qr_payload(self) -> bytes:
        """Bytes for a QR code shown by `local` and scanned by `remote`."""
        return codec.encode({"v": FINGERPRINT_VERSION, "a": self.remote, "b": self.local})

    def matches_scanned(self, payload: bytes) -> bool:
        """Whether a QR payload scanned from the peer's screen matches ours. DecodeError if it is
        not a safety-number payload at all."""
        f = codec.decode_map(payload, limit=256, what="safety number", version=FINGERPRINT_VERSION)
        a = f.bytes("a", FINGERPRINT_BYTES)
        b = f.bytes("b", FINGERPRINT_BYTES)
        f.done()
        if len(a) != FINGERPRINT_BYTES:
            raise DecodeError("safety number: bad length")
        return hmac.compare_digest(a + b, self.local + self.remote)
