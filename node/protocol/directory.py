"""DHT directory records: where an account's devices are and how to reach them
(PROTOCOL.md "DHT records").

Two kinds of signed records (records.py envelope), both signed by the account identity key IK,
which every device of the account holds:

    account record, kind "account", under "/pigeon-acct/" + hex(SHA-256("pigeon-account-record" || IK)[:16])
        body = {"kind", "ik", "seq", "exp",
                "devices": [+ bstr .size 32],     the device keys (at most MAX_DEVICES)
                "binds":   [+ bstr .size 64]}     each device's binding to IK, in the same order

    device record, kind "device", under
        "/pigeon-dev/" + hex(SHA-256("pigeon-device-record" || IK || DK)[:16])
        body = {"kind", "ik", "seq", "exp",
                "dev":    bstr .size 32,          the device key DK (its libp2p peer id)
                "addrs":  [* tstr],               multiaddrs where the device listens
                "relays": [* tstr],               relays holding its mailbox, each ending in /p2p/<id>
                "bundle": bstr}                   a signed prekey bundle of (ik, dev) carrying the
                                                  device's binding to ik, no one-time prekey
                                                  (one handed over directly may have one, section 14.2)

A record names a device only with the device key's own binding to the account (PROTOCOL.md
section 4 "Binding"), so nobody can publish a record for someone else's device. The device
record's key needs both IK and DK: a bare peer id does not locate its account. A record's `seq`
(unix milliseconds) may not lie beyond its own expiry, so no record can win every future
select with an absurd `seq`.

Keys are 45 and 44 bytes: py-libp2p 0.8.1 breaks FIND_NODE routing for keys over 50 bytes
(docs/libp2p.md L28), and the 128-bit hash prefix keeps keys unlinkable to the raw public key
while leaving collisions out of reach.

The DHT rules are pure functions the transport's validator calls (`validate`, `select`); the
current time is passed in, like everywhere in `node.protocol`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Self

from node.errors import DecodeError, InvalidRecord
from node.protocol.binding import verify_binding
from node.protocol.content import MAX_ADDR_BYTES, MAX_ADDRS
from node.protocol.keys import KEY_BYTES, SIGNATURE_BYTES, DeviceKey, IdentityKey, IdentityKeyPair
from node.protocol.limits import MAX_RECORD_BYTES
from node.protocol.records import MAX_SEQ, PreKeyBundle, RecordBody, RecordKind, open_record, sign_record
from node.protocol.relayrecord import RELAY_NAMESPACE, RelayRecord, open_relay_record

__all__ = [
    "ACCOUNT_KIND",
    "ACCOUNT_NAMESPACE",
    "DEVICE_KIND",
    "DEVICE_NAMESPACE",
    "MAX_DEVICES",
    "MAX_DHT_RECORD_LIFETIME_S",
    "NAMESPACES",
    "RECORD_LIFETIME_S",
    "REPUBLISH_INTERVAL_S",
    "AccountRecord",
    "DeviceRecord",
    "account_key",
    "device_key",
    "next_seq",
    "open_dht_record",
    "select",
    "validate",
]

#: Record kinds (the signed body's "kind") of account and device records.
ACCOUNT_KIND: Final = "account"
DEVICE_KIND: Final = "device"
#: DHT key namespaces (PROTOCOL.md section 23.2): /pigeon-acct/<hash>, /pigeon-dev/<hash>.
ACCOUNT_NAMESPACE: Final = "pigeon-acct"
DEVICE_NAMESPACE: Final = "pigeon-dev"
#: Every namespace Pigeon stores in the DHT; a Pigeon DHT node refuses all others. Relay records
#: (/pigeon-relay/<hash>, PROTOCOL.md section 28.1) live in `node.protocol.relayrecord`.
NAMESPACES: Final = (ACCOUNT_NAMESPACE, DEVICE_NAMESPACE, RELAY_NAMESPACE)

_ACCOUNT_KEY_CONTEXT: Final = b"pigeon-account-record"
_DEVICE_KEY_CONTEXT: Final = b"pigeon-device-record"
_KEY_HASH_BYTES: Final = 16

#: Devices one account record may list. Signal allows 5 linked devices; 16 is generous and keeps
#: the record (16 x 34 bytes) tiny.
MAX_DEVICES: Final = 16

#: Validity a publisher gives a record (exp = now + this). Four republish periods, so a record
#: survives three missed republishes (a laptop asleep overnight), yet the addresses of a device
#: that vanished stop being served within two days. It equals libp2p's MAX_RECORD_AGE (48 h),
#: after which a DHT server stops serving a stored copy anyway.
RECORD_LIFETIME_S: Final = 48 * 3600

#: Most validity a DHT record may claim beyond `now` (RECORD_LIFETIME_S plus an hour of clock
#: skew between publisher and validator). Tighter than records.MAX_RECORD_LIFETIME_S (90 days,
#: the bound for every signed record): a DHT record that claims longer is refused, so a stolen
#: old record cannot outlive its publisher's republishing by weeks.
MAX_DHT_RECORD_LIFETIME_S: Final = RECORD_LIFETIME_S + 3600

#: How often a device republishes its records even when nothing changed (it also republishes at
#: once when its addresses, relays, devices or prekey bundle change). libp2p servers forget a
#: stored value 24 h after receiving it (kad_dht DEFAULT_TTL); every 12 h keeps a copy alive
#: through one failed republish and refreshes the set of closest peers as the network churns.
REPUBLISH_INTERVAL_S: Final = 12 * 3600


# --- keys ----------------------------------------------------------------------------------------


def _dht_key(namespace: str, context: bytes, public: bytes) -> str:
    return f"/{namespace}/" + hashlib.sha256(context + public).digest()[:_KEY_HASH_BYTES].hex()


def account_key(identity: IdentityKey) -> str:
    """DHT key of an account record: "/pigeon-acct/" + hex(SHA-256("pigeon-account-record" || IK)[:16])."""
    return _dht_key(ACCOUNT_NAMESPACE, _ACCOUNT_KEY_CONTEXT, identity.to_bytes())


def device_key(identity: IdentityKey, device: DeviceKey) -> str:
    """DHT key of a device record: "/pigeon-dev/" + hex(SHA-256("pigeon-device-record" || IK ||
    DK)[:16]). Both keys go in, so a peer id alone (DK) does not find the record, and with it the
    account, addresses and relays behind that peer (PROTOCOL.md section 23.2)."""
    return _dht_key(DEVICE_NAMESPACE, _DEVICE_KEY_CONTEXT, identity.to_bytes() + device.to_bytes())


def next_seq(now_ms: int, last_seq: int = 0) -> int:
    """The sequence number of the next record a publisher signs: unix milliseconds, strictly
    above the last one it used (two publishes within a millisecond, or a clock stepped back,
    still increase). Every device of an account uses the same clock-based scheme, so the device
    that published last wins an account record race."""
    return min(MAX_SEQ, max(now_ms, last_seq + 1))


# --- records -------------------------------------------------------------------------------------


def _check_common(seq: int, expires: int) -> None:
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError("seq out of range")
    if expires < 0:
        raise ValueError("expires out of range")


def _address_problem(addrs: Sequence[Any], *, relays: bool) -> str | None:
    """Why `addrs` is not an acceptable address list, or None."""
    if len(addrs) > MAX_ADDRS:
        return f"more than {MAX_ADDRS} addresses"
    for addr in addrs:
        if not isinstance(addr, str) or not addr.startswith("/"):
            return "addresses must be multiaddr text"
        if len(addr.encode("utf-8", "surrogatepass")) > MAX_ADDR_BYTES:
            return f"an address is longer than {MAX_ADDR_BYTES} bytes"
        if relays:
            head, sep, peer_id = addr.rpartition("/p2p/")
            if not sep or not head or "/" in peer_id:
                return "relay addresses must end in /p2p/<peer id>"
            try:
                DeviceKey.from_peer_id(peer_id)
            except DecodeError:
                return "relay address does not end in an Ed25519 peer id"
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class AccountRecord:
    """Which devices belong to an account, signed by the account's identity key.

    `bindings[i]` is `devices[i]`'s binding to `identity` (`node.protocol.binding`, PROTOCOL.md
    section 4 "Binding"): checked on construction (ValueError), so an account record can list
    only devices that consented to the account. A device's binding is in its prekey bundle
    (`PreKeyBundle.binding`), or made with `sign_binding` by the device itself.
    """

    identity: IdentityKey
    devices: tuple[DeviceKey, ...]
    bindings: tuple[bytes, ...]
    seq: int
    expires: int

    def __post_init__(self) -> None:
        _check_common(self.seq, self.expires)
        if not 1 <= len(self.devices) <= MAX_DEVICES:
            raise ValueError(f"an account record lists 1 to {MAX_DEVICES} devices")
        if len(set(self.devices)) != len(self.devices):
            raise ValueError("an account record lists each device once")
        if len(self.bindings) != len(self.devices):
            raise ValueError("an account record has one binding per device")
        for device, binding in zip(self.devices, self.bindings, strict=True):
            try:
                verify_binding(device, self.identity, binding)
            except InvalidRecord as exc:
                raise ValueError(f"device {device.peer_id()} did not bind itself to this account"
                                 f" ({exc})") from exc

    @property
    def key(self) -> str:
        """The DHT key this record is stored under."""
        return account_key(self.identity)

    def sign(self, identity: IdentityKeyPair) -> bytes:
        """The signed record bytes (what is stored in the DHT)."""
        if identity.public != self.identity:
            raise ValueError("an account record is signed by its own identity key")
        return sign_record(identity, {
            "kind": ACCOUNT_KIND,
            "seq": self.seq,
            "exp": self.expires,
            "devices": [d.to_bytes() for d in self.devices],
            "binds": list(self.bindings),
        })

    @classmethod
    def verify(cls, data: bytes, now: int) -> Self:
        """Decode and verify at time `now` (unix seconds); InvalidRecord for anything wrong."""
        return cls._from_body(_open(data, ACCOUNT_KIND, now))

    @classmethod
    def _from_body(cls, record: RecordBody) -> Self:
        f = record.fields
        try:
            raw = f.list("devices", max_items=MAX_DEVICES)
            binds = f.list("binds", max_items=MAX_DEVICES)
            f.done()
            if not raw or not all(isinstance(d, bytes) and len(d) == KEY_BYTES for d in raw):
                raise DecodeError("devices must be 1 or more 32-byte keys")
            if len(set(raw)) != len(raw):
                raise DecodeError("a device is listed twice")
            if len(binds) != len(raw) or \
                    not all(isinstance(b, bytes) and len(b) == SIGNATURE_BYTES for b in binds):
                raise DecodeError("binds must be one 64-byte binding per device")
        except DecodeError as exc:
            raise InvalidRecord(f"malformed account record: {exc}") from exc
        try:
            return cls(
                identity=record.signer,
                devices=tuple(DeviceKey.from_bytes(d) for d in raw),
                bindings=tuple(binds),
                seq=record.seq,
                expires=record.expires,
            )
        except ValueError as exc:  # a binding that does not verify
            raise InvalidRecord(f"account record: {exc}") from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceRecord:
    """How to reach one device: its addresses, its relays and a prekey bundle to start a session.

    The bundle must belong to the same identity and device and carry no classical one-time
    prekey: a record many people read would hand the same one-time key to all of them
    (PROTOCOL.md section 5). Only a `direct` record, handed by the device to one requester
    over `/pigeon/bundle/1.0.0` (PROTOCOL.md section 14.2), may carry one-time prekeys; the
    flag is not part of the signed bytes, and the DHT's rules never set it.
    """

    identity: IdentityKey
    device: DeviceKey
    addrs: tuple[str, ...]
    relays: tuple[str, ...]
    bundle: PreKeyBundle
    seq: int
    expires: int
    direct: bool = False

    def __post_init__(self) -> None:
        _check_common(self.seq, self.expires)
        problem = _address_problem(self.addrs, relays=False) or \
            _address_problem(self.relays, relays=True) or _bundle_problem(self)
        if problem is not None:
            raise ValueError(problem)

    @property
    def key(self) -> str:
        """The DHT key this record is stored under."""
        return device_key(self.identity, self.device)

    def sign(self, identity: IdentityKeyPair) -> bytes:
        """The signed record bytes (what is stored in the DHT). Raises InvalidRecord if the
        result would exceed MAX_RECORD_BYTES (too many long addresses)."""
        if identity.public != self.identity:
            raise ValueError("a device record is signed by its account's identity key")
        return sign_record(identity, {
            "kind": DEVICE_KIND,
            "seq": self.seq,
            "exp": self.expires,
            "dev": self.device.to_bytes(),
            "addrs": list(self.addrs),
            "relays": list(self.relays),
            "bundle": self.bundle.sign(identity),
        })

    @classmethod
    def verify(cls, data: bytes, now: int, *, direct: bool = False) -> Self:
        """Decode and verify at time `now` (unix seconds), bundle included; InvalidRecord for
        anything wrong. `direct` for a record the device itself handed over (section 14.2):
        its bundle may then carry one-time prekeys."""
        return cls._from_body(_open(data, DEVICE_KIND, now), now, direct=direct)

    @classmethod
    def _from_body(cls, record: RecordBody, now: int, *, direct: bool = False) -> Self:
        f = record.fields
        try:
            device = DeviceKey.from_bytes(f.bytes("dev", KEY_BYTES))
            addrs = f.list("addrs", max_items=MAX_ADDRS)
            relays = f.list("relays", max_items=MAX_ADDRS)
            bundle_bytes = f.bytes("bundle", max_size=MAX_RECORD_BYTES)
            f.done()
            problem = _address_problem(addrs, relays=False) or _address_problem(relays, relays=True)
            if problem is not None:
                raise DecodeError(problem)
        except DecodeError as exc:
            raise InvalidRecord(f"malformed device record: {exc}") from exc
        try:
            bundle = PreKeyBundle.verify(bundle_bytes, now=now)
        except InvalidRecord as exc:
            raise InvalidRecord(f"device record's prekey bundle: {exc}") from exc
        try:
            return cls(
                identity=record.signer,
                device=device,
                addrs=tuple(addrs),
                relays=tuple(relays),
                bundle=bundle,
                seq=record.seq,
                expires=record.expires,
                direct=direct,
            )
        except ValueError as exc:  # _bundle_problem
            raise InvalidRecord(f"device record: {exc}") from exc


def _bundle_problem(record: DeviceRecord) -> str | None:
    if record.bundle.identity != record.identity or record.bundle.device != record.device:
        return "the prekey bundle belongs to another identity or device"
    if record.bundle.one_time_prekey is not None and not record.direct:
        return "the prekey bundle carries a one-time prekey (a DHT record must not)"
    return None


def _open(data: bytes, kind: RecordKind, now: int) -> RecordBody:
    if not isinstance(data, bytes | bytearray):
        raise InvalidRecord("a record is bytes")
    if len(data) > MAX_RECORD_BYTES:
        raise InvalidRecord(f"{kind} record is {len(data)} bytes, over MAX_RECORD_BYTES")
    record = open_record(bytes(data), kind=kind, now=now)
    if record.expires > now + MAX_DHT_RECORD_LIFETIME_S:
        raise InvalidRecord(f"{kind} record claims a lifetime beyond MAX_DHT_RECORD_LIFETIME_S")
    if record.seq > record.expires * 1000:
        # seq is the publisher's clock in ms (next_seq), so it cannot lie beyond the record's
        # own expiry; otherwise one record with seq 2**63-1 would win every select (23.5) for
        # good, and the key's owner could never replace it (PROTOCOL.md section 23.6).
        raise InvalidRecord(f"{kind} record's seq lies beyond its own expiry")
    return record


# --- DHT rules -----------------------------------------------------------------------------------

DhtRecord = AccountRecord | DeviceRecord | RelayRecord


def open_dht_record(key: str, value: bytes, now: int) -> DhtRecord:
    """Verify `value` as the record stored under DHT `key` at time `now` and return it.

    InvalidRecord when: the key is not in a Pigeon namespace; the value is oversized, malformed,
    of the wrong kind for the namespace, badly signed, expired, claims a lifetime beyond
    MAX_DHT_RECORD_LIFETIME_S or a seq beyond its expiry, or names a device without that
    device's binding to the record's ik; or the key is not the one derived from the record's
    own ik (account) or ik and dev (device), which stops anyone storing a record under
    another's key.
    """
    if not isinstance(key, str) or not key.startswith("/") or key.count("/") < 2:
        raise InvalidRecord(f"not a namespaced DHT key: {key!r:.80}")
    namespace = key.split("/", 2)[1]
    record: DhtRecord
    if namespace == ACCOUNT_NAMESPACE:
        record = AccountRecord.verify(value, now)
    elif namespace == DEVICE_NAMESPACE:
        record = DeviceRecord.verify(value, now)
    elif namespace == RELAY_NAMESPACE:
        return open_relay_record(key, value, now)
    else:
        raise InvalidRecord(f"unknown DHT namespace {namespace!r:.40}")
    if record.key != key:
        raise InvalidRecord("DHT key is not derived from the record's own key")
    return record


def validate(key: str, value: bytes, now: int) -> None:
    """The DHT validator: return if `value` may be stored under `key` at `now`, raise
    InvalidRecord otherwise (see `open_dht_record`)."""
    open_dht_record(key, value, now)


def select(key: str, values: Sequence[bytes], now: int) -> int:
    """The DHT selector: the index of the best of `values` for `key` at `now`.

    Valid records rank above invalid ones; among valid ones the highest seq wins; on equal seq
    the larger value bytes win (a publisher that signed two different records with one seq, say
    two devices in the same millisecond, still converges to one value on every node); on a full
    tie the LATER index wins. libp2p's PUT handler calls select([existing, new]) and refuses the
    PUT when the answer is 0, so "first wins" would make every identical republish fail
    (docs/libp2p.md L31).
    """
    if not values:
        raise ValueError("select needs at least one value")
    best, best_rank = 0, (-1, -1, b"")
    for i, value in enumerate(values):
        try:
            rank = (1, open_dht_record(key, value, now).seq, bytes(value))
        except InvalidRecord:
            rank = (0, -1, b"")
        if rank >= best_rank:
            best, best_rank = i, rank
    return best
