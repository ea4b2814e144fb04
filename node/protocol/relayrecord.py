"""Relay records: a relay's signed self-description in the DHT (PROTOCOL.md section 28.1).

A relay signs, with its own Ed25519 host key RK (the key of its peer id), a record of kind
"relay" (records.py envelope, `ik` = RK):

    body = {"kind": "relay", "ik", "seq", "exp",
            "addrs": [+ tstr],        multiaddrs to dial it at (without /p2p/<id>)
            "cap":   uint,            mailboxes it serves at most (its capacity)
            "load":  uint,            mailboxes registered now
            "lim":   {"msgs": uint, "bytes": uint, "ttl": uint, "env": uint},
                                      per-mailbox messages and bytes, longest TTL, largest envelope
            "ver":   tstr,            software version (at most 32 bytes)
            "op":    tstr}            operator id (at most 64 bytes; "" when none is configured)

and stores it under "/pigeon-relay/" + hex(SHA-256("pigeon-relay-record" || RK)[:16]) (46
bytes: under the 50 of docs/libp2p.md L28). The record names only its own signer, so nobody can
publish one for another relay; readers find relays through the provider records of the one
well-known key `DIRECTORY_KEY` (section 28.1), then read each relay's record and keep it only if
it validates (`RelayRecord.verify`, `open_relay_record`).

Lifetimes are short, unlike device records: load changes, and a relay that died should drop out
of everyone's candidates within hours, not days.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Self

from node.errors import DecodeError, InvalidRecord
from node.protocol.content import MAX_ADDR_BYTES, MAX_ADDRS
from node.protocol.keys import DeviceKey, IdentityKey, IdentityKeyPair
from node.protocol.limits import MAX_RECORD_BYTES
from node.protocol.records import MAX_SEQ, RecordBody, open_record, sign_record

__all__ = [
    "DIRECTORY_KEY",
    "MAX_RELAY_RECORD_LIFETIME_S",
    "RELAY_KIND",
    "RELAY_NAMESPACE",
    "RELAY_RECORD_LIFETIME_S",
    "RelayLimits",
    "RelayRecord",
    "open_relay_record",
    "relay_key",
]

#: The signed body's "kind" and the DHT namespace of relay records (section 28.1).
RELAY_KIND: Final = "relay"
RELAY_NAMESPACE: Final = "pigeon-relay"
_KEY_CONTEXT: Final = b"pigeon-relay-record"

#: The one well-known DHT key every relay provides (kad-dht ADD_PROVIDER) and readers look up
#: (GET_PROVIDERS): the sha2-256 multihash (0x12 0x20 || digest) of "pigeon-relay-directory-v1",
#: as hex. A value key holds one record; a provider key holds a set of peers, which is what a
#: directory needs.
DIRECTORY_KEY: Final = (b"\x12\x20" + hashlib.sha256(b"pigeon-relay-directory-v1").digest()).hex()

#: Validity a relay gives its record (exp = now + this): two hours survive several missed
#: republishes (every `announce_interval_s`, 10 minutes by default), while a relay that died
#: leaves readers' candidate lists within two hours instead of the two days of device records.
RELAY_RECORD_LIFETIME_S: Final = 2 * 3600

#: Most validity a relay record may claim beyond `now`: the lifetime plus an hour of clock skew.
MAX_RELAY_RECORD_LIFETIME_S: Final = RELAY_RECORD_LIFETIME_S + 3600

#: Longest software version and operator id, in UTF-8 bytes: a version string, and an operator's
#: name or domain, not a free-form text.
MAX_VERSION_BYTES: Final = 32
MAX_OPERATOR_BYTES: Final = 64

#: Largest number a count field may carry (capacity, load, limits): SQLite's signed 64-bit range.
_MAX_COUNT: Final = 2**63 - 1


def relay_key(relay: DeviceKey | IdentityKey) -> str:
    """DHT key of a relay's record: "/pigeon-relay/" + hex(SHA-256("pigeon-relay-record" ||
    RK)[:16]). The relay's peer id gives RK, so anyone who knows a relay finds its record."""
    return f"/{RELAY_NAMESPACE}/" + hashlib.sha256(_KEY_CONTEXT + relay.to_bytes()).digest()[:16].hex()


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayLimits:
    """What one mailbox may use at the relay: messages, bytes, the longest TTL (seconds) and
    the largest envelope (bytes). A client compares them with its needs before choosing."""

    messages: int
    bytes: int
    ttl_s: int
    envelope_bytes: int

    def __post_init__(self) -> None:
        for name in ("messages", "bytes", "ttl_s", "envelope_bytes"):
            if not 0 <= getattr(self, name) <= _MAX_COUNT:
                raise ValueError(f"relay limit {name} out of range")

    def body(self) -> dict[str, int]:
        """The "lim" map of the record."""
        return {"msgs": self.messages, "bytes": self.bytes, "ttl": self.ttl_s,
                "env": self.envelope_bytes}


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayRecord:
    """A relay's signed description of itself (section 28.1): where to dial it, how many
    mailboxes it serves and holds now, its limits, version and operator."""

    relay: IdentityKey  # the relay's host key RK, as the signer of the record
    addrs: tuple[str, ...]
    capacity: int
    load: int
    limits: RelayLimits
    version: str
    operator: str
    seq: int
    expires: int

    def __post_init__(self) -> None:
        if not 0 <= self.seq <= MAX_SEQ or self.expires < 0:
            raise ValueError("seq or expires out of range")
        problem = _addresses_problem(self.addrs)
        if problem is not None:
            raise ValueError(problem)
        if not 0 <= self.capacity <= _MAX_COUNT or not 0 <= self.load <= _MAX_COUNT:
            raise ValueError("capacity or load out of range")
        if len(self.version.encode("utf-8", "surrogatepass")) > MAX_VERSION_BYTES:
            raise ValueError(f"version longer than {MAX_VERSION_BYTES} bytes")
        if len(self.operator.encode("utf-8", "surrogatepass")) > MAX_OPERATOR_BYTES:
            raise ValueError(f"operator longer than {MAX_OPERATOR_BYTES} bytes")

    @property
    def peer_id(self) -> str:
        """The relay's peer id (its host key's)."""
        return DeviceKey(self.relay.to_bytes()).peer_id()

    @property
    def key(self) -> str:
        """The DHT key this record is stored under."""
        return relay_key(self.relay)

    @property
    def full(self) -> bool:
        """Whether the relay serves as many mailboxes as it may: it refuses new ones."""
        return self.load >= self.capacity

    def dial_addresses(self) -> list[str]:
        """The record's addresses, each ending in /p2p/<the relay's peer id>: what a device puts
        in its `relays` (section 21)."""
        return [f"{a}/p2p/{self.peer_id}" for a in self.addrs]

    def sign(self, relay: IdentityKeyPair) -> bytes:
        """The signed record bytes. ValueError unless `relay` is the record's own key;
        InvalidRecord if it would exceed MAX_RECORD_BYTES."""
        if relay.public != self.relay:
            raise ValueError("a relay record is signed by the relay's own key")
        body: dict[str, Any] = {
            "kind": RELAY_KIND, "seq": self.seq, "exp": self.expires,
            "addrs": list(self.addrs), "cap": self.capacity, "load": self.load,
            "lim": self.limits.body(), "ver": self.version, "op": self.operator,
        }
        return sign_record(relay, body)

    @classmethod
    def verify(cls, data: bytes, now: int) -> Self:
        """Decode and verify at time `now` (unix seconds); InvalidRecord for anything wrong:
        oversized, malformed, badly signed, expired, a lifetime beyond
        MAX_RELAY_RECORD_LIFETIME_S, a seq beyond its own expiry (section 28.1)."""
        if not isinstance(data, bytes | bytearray):
            raise InvalidRecord("a record is bytes")
        if len(data) > MAX_RECORD_BYTES:
            raise InvalidRecord(f"relay record is {len(data)} bytes, over MAX_RECORD_BYTES")
        record = open_record(bytes(data), kind=RELAY_KIND, now=now)
        if record.expires > now + MAX_RELAY_RECORD_LIFETIME_S:
            raise InvalidRecord("relay record claims a lifetime beyond MAX_RELAY_RECORD_LIFETIME_S")
        if record.seq > record.expires * 1000:
            # seq is the relay's clock in ms, as for device records (PROTOCOL.md section 23.6):
            # a seq beyond the expiry would win every select for good.
            raise InvalidRecord("relay record's seq lies beyond its own expiry")
        return cls._from_body(record)

    @classmethod
    def _from_body(cls, record: RecordBody) -> Self:
        f = record.fields
        try:
            addrs = f.list("addrs", max_items=MAX_ADDRS)
            capacity = f.int("cap", 0, _MAX_COUNT)
            load = f.int("load", 0, _MAX_COUNT)
            lim = f.map("lim")
            limits = RelayLimits(messages=lim.int("msgs", 0, _MAX_COUNT),
                                 bytes=lim.int("bytes", 0, _MAX_COUNT),
                                 ttl_s=lim.int("ttl", 0, _MAX_COUNT),
                                 envelope_bytes=lim.int("env", 0, _MAX_COUNT))
            lim.done()
            version = f.text("ver", max_size=MAX_VERSION_BYTES)
            operator = f.text("op", max_size=MAX_OPERATOR_BYTES)
            f.done()
            problem = _addresses_problem(addrs)
            if problem is not None:
                raise DecodeError(problem)
        except DecodeError as exc:
            raise InvalidRecord(f"malformed relay record: {exc}") from exc
        return cls(relay=record.signer, addrs=tuple(addrs), capacity=capacity, load=load,
                   limits=limits, version=version, operator=operator, seq=record.seq,
                   expires=record.expires)


def _addresses_problem(addrs: Sequence[Any]) -> str | None:
    if not addrs:
        return "a relay record lists at least one address"
    if len(addrs) > MAX_ADDRS:
        return f"more than {MAX_ADDRS} addresses"
    for addr in addrs:
        if not isinstance(addr, str) or not addr.startswith("/"):
            return "addresses must be multiaddr text"
        if len(addr.encode("utf-8", "surrogatepass")) > MAX_ADDR_BYTES:
            return f"an address is longer than {MAX_ADDR_BYTES} bytes"
        if "/p2p/" in addr:
            return "a relay record's addresses do not name a peer (the record's key does)"
    return None


def open_relay_record(key: str, value: bytes, now: int) -> RelayRecord:
    """Verify `value` as the relay record stored under DHT `key` at `now`: InvalidRecord if it
    is not valid (`RelayRecord.verify`) or `key` is not the one derived from its own signer."""
    record = RelayRecord.verify(value, now)
    if record.key != key:
        raise InvalidRecord("DHT key is not derived from the relay record's own key")
    return record
