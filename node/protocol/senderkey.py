"""Sender keys: a group message encrypted once for every member device (PROTOCOL.md section
27.4, Signal's SenderKey construction).

Each member device has, per group, a **sender chain**: a chain key and an Ed25519 signing key.
It hands the chain key (at its current iteration) and the signing public key to every other
member device in a `sender-key` content over the pairwise session (section 27.5). A message is
then encrypted once:

    mk_n, ck_(n+1) = KDF_CK(ck_n)                        (section 7: HMAC(ck, 0x01), HMAC(ck, 0x02))
    prefix         = 0x01 || group id (32) || chain key id = signing public key (32) || u32be(n)
    sk-message     = prefix || AEAD(mk_n, nonce = 0x00*24, plaintext, ad = prefix)
                     || Ed25519-Sign(signing key, prefix || ciphertext)

149 bytes plus the plaintext. The signature shows the message comes from the holder of the chain
(not just from some member who knows the chain key); a receiver checks it before deriving any
key. It may derive at most MAX_SKIP keys ahead in one step and keeps at most MAX_SKIPPED_KEYS
skipped ones, as for the pairwise ratchet (section 7). A used message key is deleted, so a
message decrypts once; any failure leaves the state as it was.

A chain is replaced (a new chain key and signing key, distributed afresh) whenever a member
leaves or is removed, so a former member's copy of the old chain opens nothing sent later.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import Final, Self

import nacl.exceptions
import nacl.signing
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt as _aead_open
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt as _aead_seal

from node.errors import DecodeError, DecryptionFailed, LimitExceeded
from node.protocol import codec
from node.protocol.groups import GROUP_ID_BYTES
from node.protocol.kdf import kdf_ck
from node.protocol.keys import KEY_BYTES, SIGNATURE_BYTES, Random
from node.protocol.limits import MAX_PLAINTEXT_BYTES, MAX_SKIP, MAX_SKIPPED_KEYS

__all__ = ["MESSAGE_OVERHEAD", "ReceiverChain", "SenderChain", "peek_message"]

SK_MESSAGE_TYPE: Final = b"\x01"
_PREFIX: Final = struct.Struct(">32s32sI")
PREFIX_BYTES: Final = 1 + _PREFIX.size  # 69
TAG_BYTES: Final = 16
MESSAGE_OVERHEAD: Final = PREFIX_BYTES + TAG_BYTES + SIGNATURE_BYTES  # 149
MAX_ITERATION: Final = 2**32 - 1
_ZERO_NONCE: Final = bytes(24)
STATE_VERSION: Final = 1


def peek_message(message: bytes) -> tuple[bytes, bytes, int]:
    """(group id, chain key id, iteration) of a sender-key message, before any crypto;
    DecodeError if it is too short or of another type."""
    if len(message) < MESSAGE_OVERHEAD or message[:1] != SK_MESSAGE_TYPE:
        raise DecodeError("sender-key message: too short or unknown type")
    if len(message) > MAX_PLAINTEXT_BYTES + MESSAGE_OVERHEAD:
        raise LimitExceeded("MAX_PLAINTEXT_BYTES", "sender-key message")
    group_id, key_id, n = _PREFIX.unpack_from(message, 1)
    return group_id, key_id, n


class SenderChain:
    """This device's own chain in one group: encrypts and signs."""

    __slots__ = ("_signing", "chain_key", "group_id", "iteration")

    def __init__(self, *, group_id: bytes, signing_seed: bytes, chain_key: bytes,
                 iteration: int) -> None:
        if len(group_id) != GROUP_ID_BYTES or len(chain_key) != KEY_BYTES:
            raise ValueError("a sender chain has a 32-byte group id and chain key")
        self.group_id = group_id
        self._signing = nacl.signing.SigningKey(signing_seed)
        self.chain_key = chain_key
        self.iteration = iteration

    @classmethod
    def generate(cls, group_id: bytes, rng: Random = os.urandom) -> Self:
        """A fresh chain: a random signing key seed, then a random chain key, iteration 0."""
        seed = rng(KEY_BYTES)
        return cls(group_id=group_id, signing_seed=seed, chain_key=rng(KEY_BYTES), iteration=0)

    @property
    def key_id(self) -> bytes:
        """The chain's signing public key, which names the chain in its messages."""
        return bytes(self._signing.verify_key)

    def encrypt(self, plaintext: bytes) -> bytes:
        """One sender-key message; the chain advances (commit the new state with the message)."""
        if len(plaintext) > MAX_PLAINTEXT_BYTES:
            raise LimitExceeded("MAX_PLAINTEXT_BYTES", f"{len(plaintext)} bytes")
        if self.iteration >= MAX_ITERATION:
            raise LimitExceeded("MAX_ITERATION", "sender chain exhausted; make a new one")
        next_ck, mk = kdf_ck(self.chain_key)
        prefix = SK_MESSAGE_TYPE + _PREFIX.pack(self.group_id, self.key_id, self.iteration)
        body = prefix + _aead_seal(plaintext, prefix, _ZERO_NONCE, mk)
        self.chain_key, self.iteration = next_ck, self.iteration + 1
        return body + self._signing.sign(body).signature

    def distribution(self) -> tuple[bytes, bytes, int]:
        """(key id, chain key, iteration) for a `sender-key` content: what a receiver needs to
        read every message from the next one on."""
        return self.key_id, self.chain_key, self.iteration

    def to_bytes(self) -> bytes:
        """Serialized state (keep it secret)."""
        return codec.encode({"v": STATE_VERSION, "g": self.group_id,
                             "seed": bytes(self._signing), "ck": self.chain_key,
                             "n": self.iteration})

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """From `to_bytes`; DecodeError if malformed."""
        f = codec.decode_map(data, limit=512, what="sender chain", version=STATE_VERSION)
        chain = cls(group_id=f.bytes("g", GROUP_ID_BYTES), signing_seed=f.bytes("seed", KEY_BYTES),
                    chain_key=f.bytes("ck", KEY_BYTES), iteration=f.int("n", 0, MAX_ITERATION))
        f.done()
        return chain


class ReceiverChain:
    """Another member device's chain in one group, as distributed to us: verifies and decrypts.

    `decrypt` works on copies and commits only on success (PROTOCOL.md section 27.4)."""

    __slots__ = ("chain_key", "group_id", "iteration", "key_id", "skipped")

    def __init__(self, *, group_id: bytes, key_id: bytes, chain_key: bytes, iteration: int,
                 skipped: OrderedDict[int, bytes] | None = None) -> None:
        if len(group_id) != GROUP_ID_BYTES or len(key_id) != KEY_BYTES or len(chain_key) != KEY_BYTES:
            raise ValueError("a receiver chain has a 32-byte group id, key id and chain key")
        if not 0 <= iteration <= MAX_ITERATION:
            raise ValueError("iteration out of range")
        self.group_id = group_id
        self.key_id = key_id
        self.chain_key = chain_key
        self.iteration = iteration
        self.skipped: OrderedDict[int, bytes] = skipped if skipped is not None else OrderedDict()

    def decrypt(self, message: bytes) -> bytes:
        """The plaintext of a sender-key message of this chain. DecryptionFailed (state
        unchanged) for a bad signature, another chain, a used or evicted key, tampering;
        LimitExceeded for a jump beyond MAX_SKIP."""
        try:
            group_id, key_id, n = peek_message(message)
        except DecodeError as exc:
            raise DecryptionFailed("sender-key message did not decrypt") from exc
        if group_id != self.group_id or key_id != self.key_id:
            raise DecryptionFailed("sender-key message did not decrypt")
        body, sig = message[:-SIGNATURE_BYTES], message[-SIGNATURE_BYTES:]
        try:
            nacl.signing.VerifyKey(self.key_id).verify(body, sig)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError) as exc:
            raise DecryptionFailed("sender-key message did not decrypt") from exc
        prefix, ciphertext = body[:PREFIX_BYTES], body[PREFIX_BYTES:]
        skipped = OrderedDict(self.skipped)
        chain_key, iteration = self.chain_key, self.iteration
        if n < iteration:
            mk = skipped.pop(n, None)
            if mk is None:
                raise DecryptionFailed("sender-key message did not decrypt")
        else:
            if n - iteration > MAX_SKIP:
                raise LimitExceeded("MAX_SKIP", f"sender-key message {n - iteration} ahead")
            while iteration < n:
                chain_key, skipped_mk = kdf_ck(chain_key)
                skipped[iteration] = skipped_mk
                iteration += 1
            chain_key, mk = kdf_ck(chain_key)
            iteration += 1
            while len(skipped) > MAX_SKIPPED_KEYS:
                skipped.popitem(last=False)
        try:
            plaintext = _aead_open(ciphertext, prefix, _ZERO_NONCE, mk)
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            raise DecryptionFailed("sender-key message did not decrypt") from exc
        self.chain_key, self.iteration, self.skipped = chain_key, iteration, skipped
        return plaintext

    def to_bytes(self) -> bytes:
        """Serialized state."""
        return codec.encode({"v": STATE_VERSION, "g": self.group_id, "kid": self.key_id,
                             "ck": self.chain_key, "n": self.iteration,
                             "skip": [[n, mk] for n, mk in self.skipped.items()]})

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """From `to_bytes`; DecodeError if malformed."""
        f = codec.decode_map(data, limit=64 + MAX_SKIPPED_KEYS * 48 + 1024,
                             what="receiver chain", version=STATE_VERSION)
        skipped: OrderedDict[int, bytes] = OrderedDict()
        for item in f.list("skip", max_items=MAX_SKIPPED_KEYS):
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], int)
                    or not isinstance(item[1], bytes) or len(item[1]) != KEY_BYTES):
                raise DecodeError("receiver chain: a skipped key is [n, 32 bytes]")
            skipped[item[0]] = item[1]
        chain = cls(group_id=f.bytes("g", GROUP_ID_BYTES), key_id=f.bytes("kid", KEY_BYTES),
                    chain_key=f.bytes("ck", KEY_BYTES), iteration=f.int("n", 0, MAX_ITERATION),
                    skipped=skipped)
        f.done()
        return chain
