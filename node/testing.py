"""Helpers for tests and for embedders writing their own tests: deterministic randomness and
ready-made pairs of parties with established sessions.

Nothing here is used by the node itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Self

from node.protocol.content import Intro, encode_content
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.protocol.prekeys import PreKeyStore
from node.protocol.records import PreKeyBundle
from node.protocol.session import SessionRecord

__all__ = ["DeterministicRandom", "Party", "forge_first_message", "session_pair"]

#: A fixed "now" for pure tests (2027-01-15T08:00:00Z), far from any edge.
FIXED_NOW = 1_800_000_000


class DeterministicRandom:
    """A reproducible byte stream standing in for `os.urandom` (PROTOCOL.md "Test vectors"):

        stream = SHA-256(seed || 0 as u64 BE) || SHA-256(seed || 1 as u64 BE) || ...

    and each call returns the next `n` bytes of the stream.
    """

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0
        self._buffer = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            block = hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
            self._buffer += block
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


@dataclass
class Party:
    """One account with one device, its prekeys and its sessions (keyed by the peer's name)."""

    name: str
    identity: IdentityKeyPair
    device: DeviceKeyPair
    prekeys: PreKeyStore
    sessions: dict[str, SessionRecord] = field(default_factory=dict)

    @classmethod
    def create(cls, name: str, *, now: int = FIXED_NOW, seed: bytes | None = None) -> Self:
        """A party whose keys derive from `seed` (default: its name), so runs are reproducible."""
        rng = DeterministicRandom(seed or name.encode())
        return cls(
            name=name,
            identity=IdentityKeyPair.generate(rng),
            device=DeviceKeyPair.generate(rng),
            prekeys=PreKeyStore.create(now=now, rng=rng),
        )

    def bundle(self, *, now: int = FIXED_NOW, one_time: bool = True) -> bytes:
        """A signed prekey bundle of this party's device, valid for an hour from `now`."""
        return self.prekeys.bundle(
            self.identity, self.device, seq=1, expires=now + 3600, one_time=one_time
        ).sign(self.identity)

    def start_session(self, other: Party, *, now: int = FIXED_NOW, one_time: bool = True) -> None:
        """Start a session with `other` from its bundle (PQXDH, as initiator)."""
        bundle = PreKeyBundle.verify(other.bundle(now=now, one_time=one_time), now=now)
        self.sessions.setdefault(other.name, SessionRecord()).initiate(self.identity, bundle)

    def encrypt(self, other: Party, plaintext: bytes) -> bytes:
        """A session message to `other` carrying `plaintext`."""
        return self.sessions[other.name].encrypt(plaintext).message

    def decrypt(self, other: Party, message: bytes) -> bytes:
        """The plaintext of a session message from `other` (a first message starts the session)."""
        record = self.sessions.setdefault(other.name, SessionRecord())
        return record.decrypt(
            message, identity=self.identity, remote_identity=other.identity.public,
            prekeys=self.prekeys,
        )


def session_pair() -> tuple[Party, Party]:
    """Alice and Bob with a session both sides have confirmed (one message each way)."""
    alice, bob = Party.create("alice"), Party.create("bob")
    alice.start_session(bob)
    assert bob.decrypt(alice, alice.encrypt(bob, b"hi")) == b"hi"
    assert alice.decrypt(bob, bob.encrypt(alice, b"hello")) == b"hello"
    return alice, bob


def forge_first_message(bundle: PreKeyBundle, *, message_id: bytes, counter: int = 0,
                        token: bytes | None = None, sent_at_ms: int = FIXED_NOW * 1000,
                        identity: IdentityKeyPair | None = None) -> bytes:
    """A first (prekey) message to the device of `bundle`, as anyone holding that public bundle
    can make one: an intro with `token`, under a fresh identity unless one is given, whose
    ratchet header claims `counter` (PROTOCOL.md section 8). For attack tests and
    benchmarks/abuse.py."""
    sender = identity or IdentityKeyPair.generate()
    record = SessionRecord()
    record.initiate(sender, bundle)
    assert record.current is not None
    record.current.ratchet.ns = counter  # only the header claims the skipped messages
    content = Intro(id=message_id, sent_at_ms=sent_at_ms, name="stranger", addrs=(),
                    token=token)
    return record.encrypt(encode_content(content)).message
