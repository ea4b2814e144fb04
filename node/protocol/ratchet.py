"""Double Ratchet with header encryption (Signal's Double Ratchet spec, sections 3 and 4).

Message layout (PROTOCOL.md "Ratchet message"), all lengths fixed except the body:

    0x01                                  version / session-message type "ratchet"
    nonce (24) || XChaCha20-Poly1305(HK, header) (40 + 16)      = encrypted header, 80 bytes
    XChaCha20-Poly1305(MK, nonce = 24 zero bytes, plaintext, AD = session AD || first 81 bytes)

    header = DHs public key (32) || PN (u32 big-endian) || N (u32 big-endian)

Relays therefore see no counter and no ratchet key. Each message key MK encrypts exactly one
message, so a constant nonce is safe (spec section 5.2 allows it); header keys encrypt many
headers, so those nonces are random.

Decryption never changes the state unless the message authenticates: every new value is computed
into locals and assigned only after the AEAD check passed ("decrypt on a copy, commit on
success", without copying the skipped-key store on every message).

Skipped message keys are stored per (header key, N), at most MAX_SKIPPED_KEYS per session with
the oldest evicted first; a header asking to skip more than MAX_SKIP keys is refused before any
key is derived. The responder's first receiving chain (a new session, opened by a prekey message
that anyone holding our public bundle can make) may skip only MAX_NEW_SESSION_SKIP keys
(PROTOCOL.md section 7).
"""

from __future__ import annotations

import itertools
import os
import struct
from collections import OrderedDict
from typing import Final, Self

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt as _aead_open,
)
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_encrypt as _aead_seal,
)
from nacl.bindings import crypto_scalarmult_base
from nacl.exceptions import CryptoError

from node.errors import DecodeError, DecryptionFailed, LimitExceeded, LocalError
from node.protocol import codec
from node.protocol.kdf import kdf_ck, kdf_rk_he
from node.protocol.keys import KEY_BYTES, DHKeyPair, DHPublicKey, Random, x25519
from node.protocol.limits import (
    MAX_NEW_SESSION_SKIP,
    MAX_PLAINTEXT_BYTES,
    MAX_SKIP,
    MAX_SKIPPED_KEYS,
)

__all__ = ["RATCHET_MESSAGE_TYPE", "RatchetState"]

#: First byte of a ratchet message (PROTOCOL.md section 8).
RATCHET_MESSAGE_TYPE: Final = 0x01
_TYPE_BYTE: Final = bytes([RATCHET_MESSAGE_TYPE])
NONCE_BYTES: Final = 24
TAG_BYTES: Final = 16
HEADER_BYTES: Final = KEY_BYTES + 8
ENC_HEADER_BYTES: Final = NONCE_BYTES + HEADER_BYTES + TAG_BYTES
PREFIX_BYTES: Final = 1 + ENC_HEADER_BYTES
MIN_MESSAGE_BYTES: Final = PREFIX_BYTES + TAG_BYTES
MAX_COUNTER: Final = 2**32 - 1
_ZERO_NONCE: Final = bytes(NONCE_BYTES)
_COUNTERS = struct.Struct(">II")
STATE_VERSION: Final = 1
MAX_STATE_BYTES: Final = 1024 * 1024  # ~2,000 skipped keys at ~100 bytes each, with room
#: Stamps of skipped-key changes, unique in the process: equal stamps mean equal skipped keys,
#: even between copies of a state, so a store can tell cheaply which sessions' keys to rewrite.
_STAMPS: Final = itertools.count(1)


def _aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return _aead_seal(plaintext, ad, nonce, key)


def _aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
    try:
        return _aead_open(ciphertext, ad, nonce, key)
    except CryptoError:
        return None


def _decrypt_header(hk: bytes, enc_header: bytes) -> tuple[bytes, int, int] | None:
    header = _aead_decrypt(hk, enc_header[:NONCE_BYTES], enc_header[NONCE_BYTES:], b"")
    if header is None:
        return None
    pn, n = _COUNTERS.unpack_from(header, KEY_BYTES)
    return header[:KEY_BYTES], pn, n


class RatchetState:
    """One Double Ratchet session's state. Create with `init_initiator` / `init_responder`."""

    __slots__ = (
        "ad", "ckr", "cks", "dhr", "dhs", "dhs_pub", "hkr", "hks", "nhkr", "nhks", "nr", "ns",
        "pn", "rk", "skipped", "skipped_hks", "skipped_shared", "skipped_stamp",
    )

    def __init__(self) -> None:
        self.ad = b""
        self.dhs = b""  # our current ratchet private key
        self.dhs_pub = b""
        self.dhr: bytes | None = None  # their current ratchet public key
        self.rk = b""
        self.cks: bytes | None = None
        self.ckr: bytes | None = None
        self.ns = self.nr = self.pn = 0
        self.hks: bytes | None = None
        self.hkr: bytes | None = None
        self.nhks = b""
        self.nhkr = b""
        # (header key, N) -> message key, oldest first; skipped_hks counts keys per header key so
        # a message is tried against each distinct header key once, not once per stored key.
        self.skipped: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()
        self.skipped_hks: dict[bytes, int] = {}
        # Changes whenever `skipped` does (never reused): see _STAMPS.
        self.skipped_stamp = 0
        # `skipped` and `skipped_hks` are shared with the state this one was copied from, and
        # are copied before their first change here (copying up to MAX_SKIPPED_KEYS keys for
        # every message would cost more than the message).
        self.skipped_shared = False

    # --- initialisation (spec section 4, RatchetInitAliceHE / RatchetInitBobHE) -----------------

    @classmethod
    def init_initiator(
        cls, root_key: bytes, their_ratchet_key: DHPublicKey, *, ad: bytes, hk_send: bytes,
        nhk_recv: bytes, rng: Random = os.urandom,
    ) -> Self:
        """The initiator's state (RatchetInitAliceHE): it can send at once."""
        state = cls()
        state.ad = ad
        ours = DHKeyPair.generate(rng)
        state.dhs, state.dhs_pub = ours.to_bytes(), ours.public.to_bytes()
        state.dhr = their_ratchet_key.to_bytes()
        state.rk, state.cks, state.nhks = kdf_rk_he(root_key, x25519(state.dhs, state.dhr))
        state.hks = hk_send
        state.nhkr = nhk_recv
        return state

    @classmethod
    def init_responder(
        cls, root_key: bytes, our_ratchet_key: DHKeyPair, *, ad: bytes, hk_recv_next: bytes,
        nhk_send: bytes,
    ) -> Self:
        """The responder's state (RatchetInitBobHE): it sends after the first message arrives."""
        state = cls()
        state.ad = ad
        state.dhs, state.dhs_pub = our_ratchet_key.to_bytes(), our_ratchet_key.public.to_bytes()
        state.rk = root_key
        state.nhks = nhk_send
        state.nhkr = hk_recv_next
        return state

    @property
    def can_send(self) -> bool:
        """A responder can send only after the first message arrived (it completes the chain)."""
        return self.cks is not None

    # --- encrypt ------------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, rng: Random = os.urandom) -> bytes:
        """Encrypt one message; the state advances (the caller persists it before sending)."""
        if self.cks is None or self.hks is None:
            raise LocalError("this session cannot send before it has received a message")
        if len(plaintext) > MAX_PLAINTEXT_BYTES:
            raise LimitExceeded("MAX_PLAINTEXT_BYTES", f"{len(plaintext)} bytes")
        if self.ns >= MAX_COUNTER:
            raise LimitExceeded("MAX_COUNTER", "chain exhausted; start a new session")
        self.cks, mk = kdf_ck(self.cks)
        nonce = rng(NONCE_BYTES)
        header = self.dhs_pub + _COUNTERS.pack(self.pn, self.ns)
        prefix = _TYPE_BYTE + nonce + _aead_encrypt(self.hks, nonce, header, b"")
        self.ns += 1
        return prefix + _aead_encrypt(mk, _ZERO_NONCE, plaintext, self.ad + prefix)

    # --- decrypt ------------------------------------------------------------------------------

    def decrypt(self, message: bytes, rng: Random = os.urandom) -> bytes:
        """Decrypt one message or raise DecryptionFailed (or LimitExceeded for a skip beyond
        MAX_SKIP); on any failure the state is exactly as before."""
        if len(message) < MIN_MESSAGE_BYTES or message[0] != RATCHET_MESSAGE_TYPE:
            raise DecryptionFailed("not a ratchet message")
        enc_header = message[1:PREFIX_BYTES]
        body = message[PREFIX_BYTES:]
        ad = self.ad + message[:PREFIX_BYTES]

        # 1. The current receiving chain: the common, in-order case first.
        if self.hkr is not None:
            header = _decrypt_header(self.hkr, enc_header)
            if header is not None:
                n = header[2]
                if n < self.nr:
                    return self._decrypt_skipped(self.hkr, n, body, ad)
                return self._decrypt_in_chain(n, body, ad)

        # 2. An older chain whose keys were skipped.
        for hk in self.skipped_hks:
            if hk == self.hkr:
                continue
            header = _decrypt_header(hk, enc_header)
            if header is not None:
                return self._decrypt_skipped(hk, header[2], body, ad)

        # 3. The next header key: the sender performed a DH ratchet step.
        header = _decrypt_header(self.nhkr, enc_header)
        if header is None:
            raise DecryptionFailed("no header key matches")
        return self._decrypt_after_dh_ratchet(header, body, ad, rng)

    def _decrypt_skipped(self, hk: bytes, n: int, body: bytes, ad: bytes) -> bytes:
        mk = self.skipped.get((hk, n))
        if mk is None:  # a duplicate or replay: the key was used (and deleted) already
            raise DecryptionFailed("message key not available")
        plaintext = _aead_decrypt(mk, _ZERO_NONCE, body, ad)
        if plaintext is None:
            raise DecryptionFailed("message did not authenticate")
        self._own_skipped()
        del self.skipped[(hk, n)]
        self._forget_hk(hk)
        return plaintext

    def _decrypt_in_chain(self, n: int, body: bytes, ad: bytes) -> bytes:
        assert self.ckr is not None and self.hkr is not None
        if n - self.nr > MAX_SKIP:
            raise LimitExceeded("MAX_SKIP", f"header skips {n - self.nr} messages")
        ck, new_skipped = _skip(self.ckr, self.hkr, self.nr, n)
        ck, mk = kdf_ck(ck)
        plaintext = _aead_decrypt(mk, _ZERO_NONCE, body, ad)
        if plaintext is None:
            raise DecryptionFailed("message did not authenticate")
        self.ckr, self.nr = ck, n + 1
        self._store_skipped(new_skipped)
        return plaintext

    def _decrypt_after_dh_ratchet(
        self, header: tuple[bytes, int, int], body: bytes, ad: bytes, rng: Random
    ) -> bytes:
        their_key, pn, n = header
        if n > MAX_SKIP:
            raise LimitExceeded("MAX_SKIP", f"header skips {n} messages in a new chain")
        if self.cks is None and n > MAX_NEW_SESSION_SKIP:
            # The responder's first message of a new session: its sender proved nothing yet.
            raise LimitExceeded("MAX_NEW_SESSION_SKIP",
                                f"first message of a new session skips {n} messages")
        new_skipped: list[tuple[tuple[bytes, int], bytes]] = []
        if self.ckr is not None and self.hkr is not None:
            if pn - self.nr > MAX_SKIP:
                raise LimitExceeded("MAX_SKIP", f"header skips {pn - self.nr} old messages")
            _, new_skipped = _skip(self.ckr, self.hkr, self.nr, pn)
        # DH ratchet step (spec DHRatchetHE), into locals.
        hkr = self.nhkr
        rk, ckr, nhkr = kdf_rk_he(self.rk, x25519(self.dhs, their_key))
        dhs = rng(KEY_BYTES)
        dhs_pub = crypto_scalarmult_base(dhs)
        rk, cks, nhks = kdf_rk_he(rk, x25519(dhs, their_key))
        ckr, more = _skip(ckr, hkr, 0, n)
        ckr, mk = kdf_ck(ckr)
        plaintext = _aead_decrypt(mk, _ZERO_NONCE, body, ad)
        if plaintext is None:
            raise DecryptionFailed("message did not authenticate")
        # Commit.
        self.pn, self.ns, self.nr = self.ns, 0, n + 1
        self.hks, self.hkr = self.nhks, hkr
        self.dhr = their_key
        self.dhs, self.dhs_pub = dhs, dhs_pub
        self.rk, self.ckr, self.cks, self.nhkr, self.nhks = rk, ckr, cks, nhkr, nhks
        self._store_skipped(new_skipped + more)
        return plaintext

    def _store_skipped(self, keys: list[tuple[tuple[bytes, int], bytes]]) -> None:
        if not keys:
            return
        self._own_skipped()
        for slot, mk in keys[-MAX_SKIPPED_KEYS:]:
            self.skipped[slot] = mk
            self.skipped_hks[slot[0]] = self.skipped_hks.get(slot[0], 0) + 1
        while len(self.skipped) > MAX_SKIPPED_KEYS:
            (hk, _), _ = self.skipped.popitem(last=False)
            self._forget_hk(hk)

    def add_skipped(self, keys: list[tuple[tuple[bytes, int], bytes]]) -> None:
        """Add stored skipped keys `((header key, N), message key)`, oldest first (a session
        store that keeps them apart from the state, `to_dict(skipped=False)`)."""
        self._store_skipped(keys)

    def evict_skipped(self, count: int) -> None:
        """Drop the `count` oldest skipped keys (the session record's cap across its sessions)."""
        if count > 0 and self.skipped:
            self._own_skipped()
        for _ in range(min(count, len(self.skipped))):
            (hk, _), _ = self.skipped.popitem(last=False)
            self._forget_hk(hk)

    def _own_skipped(self) -> None:
        """About to change the skipped keys: unshare them, and take a new stamp."""
        if self.skipped_shared:
            self.skipped = OrderedDict(self.skipped)
            self.skipped_hks = dict(self.skipped_hks)
            self.skipped_shared = False
        self.skipped_stamp = next(_STAMPS)

    def _forget_hk(self, hk: bytes) -> None:
        left = self.skipped_hks[hk] - 1
        if left:
            self.skipped_hks[hk] = left
        else:
            del self.skipped_hks[hk]

    def copy(self) -> RatchetState:
        """An independent copy (to decrypt on, and keep only on success). The skipped keys are
        shared until either side changes them (each copies them first)."""
        state = RatchetState()
        for name in self.__slots__:
            setattr(state, name, getattr(self, name))  # bytes, ints and None: immutable
        state.skipped_shared = self.skipped_shared = True
        return state

    # --- serialization ------------------------------------------------------------------------

    def to_dict(self, *, skipped: bool = True) -> dict[str, object]:
        """The state as a CBOR map (PROTOCOL.md section 17); secret, stored only locally. With
        `skipped=False` the skipped keys are left out (an empty list): for a store that keeps
        them apart and writes them only when they change."""
        return {
            "v": STATE_VERSION,
            "ad": self.ad,
            "dhs": self.dhs,
            "dhr": self.dhr,
            "rk": self.rk,
            "cks": self.cks,
            "ckr": self.ckr,
            "ns": self.ns,
            "nr": self.nr,
            "pn": self.pn,
            "hks": self.hks,
            "hkr": self.hkr,
            "nhks": self.nhks,
            "nhkr": self.nhkr,
            "skip": [[hk, n, mk] for (hk, n), mk in self.skipped.items()] if skipped else [],
        }

    @classmethod
    def from_fields(cls, f: codec.Fields) -> Self:
        """The state in a decoded map; DecodeError if malformed."""
        if f.int("v", 0, 2**32) != STATE_VERSION:
            raise DecodeError("ratchet state: unknown version")
        state = cls()
        state.ad = f.bytes("ad", max_size=256)
        state.dhs = f.bytes("dhs", KEY_BYTES)
        state.dhs_pub = crypto_scalarmult_base(state.dhs)
        state.dhr = _optional_key(f, "dhr")
        state.rk = f.bytes("rk", KEY_BYTES)
        state.cks = _optional_key(f, "cks")
        state.ckr = _optional_key(f, "ckr")
        state.ns = f.int("ns", 0, MAX_COUNTER)
        state.nr = f.int("nr", 0, MAX_COUNTER)
        state.pn = f.int("pn", 0, MAX_COUNTER)
        state.hks = _optional_key(f, "hks")
        state.hkr = _optional_key(f, "hkr")
        state.nhks = f.bytes("nhks", KEY_BYTES)
        state.nhkr = f.bytes("nhkr", KEY_BYTES)
        entries = f.list("skip", max_items=MAX_SKIPPED_KEYS)
        keys = []
        for entry in entries:
            if (
                not isinstance(entry, list) or len(entry) != 3
                or not isinstance(entry[0], bytes) or len(entry[0]) != KEY_BYTES
                or not isinstance(entry[1], int) or not 0 <= entry[1] <= MAX_COUNTER
                or not isinstance(entry[2], bytes) or len(entry[2]) != KEY_BYTES
            ):
                raise DecodeError("ratchet state: malformed skipped key")
            keys.append(((entry[0], entry[1]), entry[2]))
        state._store_skipped(keys)
        f.done()
        return state


def _optional_key(f: codec.Fields, key: str) -> bytes | None:
    value: bytes | None = f.bytes(key, KEY_BYTES, optional=True)
    return value


def _skip(
    ck: bytes, hk: bytes, start: int, until: int
) -> tuple[bytes, list[tuple[tuple[bytes, int], bytes]]]:
    """Advance chain key `ck` from counter `start` to `until`, returning the new chain key and the
    skipped (slot, key) pairs. Only the last MAX_SKIPPED_KEYS are kept: older ones would be
    evicted at once anyway, so they are not even held in memory."""
    keep_from = until - MAX_SKIPPED_KEYS
    skipped = []
    for i in range(start, until):
        ck, mk = kdf_ck(ck)
        if i >= keep_from:
            skipped.append(((hk, i), mk))
    return ck, skipped
