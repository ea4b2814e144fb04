"""Relay records (PROTOCOL.md section 28.1): round trips, every refusal, the DHT rules they share
with device records, and the known key."""

from __future__ import annotations

import hashlib

import pytest

from node.errors import InvalidRecord
from node.protocol.directory import select, validate
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.protocol.records import sign_record
from node.protocol.relayrecord import (
    DIRECTORY_KEY,
    MAX_RELAY_RECORD_LIFETIME_S,
    RELAY_RECORD_LIFETIME_S,
    RelayLimits,
    RelayRecord,
    open_relay_record,
    relay_key,
)
from node.testing import FIXED_NOW

NOW = FIXED_NOW
RELAY = IdentityKeyPair(bytes([7]) * 32)
LIMITS = RelayLimits(messages=20_000, bytes=128 << 20, ttl_s=30 * 86400, envelope_bytes=262_144)


def record(seq: int = NOW * 1000, *, expires: int = NOW + RELAY_RECORD_LIFETIME_S,
           signer: IdentityKeyPair = RELAY, **changes: object) -> RelayRecord:
    fields: dict[str, object] = dict(
        relay=signer.public, addrs=("/ip4/127.0.0.1/tcp/4040",), capacity=100, load=7,
        limits=LIMITS, version="0.1.0", operator="example.org", seq=seq, expires=expires)
    fields.update(changes)
    return RelayRecord(**fields)  # type: ignore[arg-type]


def body(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "kind": "relay", "seq": NOW * 1000, "exp": NOW + RELAY_RECORD_LIFETIME_S,
        "addrs": ["/ip4/127.0.0.1/tcp/4040"], "cap": 100, "load": 7, "lim": LIMITS.body(),
        "ver": "0.1.0", "op": "example.org"}
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def test_a_signed_record_verifies_to_itself_under_its_own_key() -> None:
    rec = record()
    signed = rec.sign(RELAY)
    assert RelayRecord.verify(signed, NOW) == rec
    assert open_relay_record(rec.key, signed, NOW) == rec
    validate(rec.key, signed, NOW)  # the DHT's validator takes it
    peer_id = DeviceKeyPair(bytes([7]) * 32).public.peer_id()
    assert rec.peer_id == peer_id
    assert rec.dial_addresses() == [f"/ip4/127.0.0.1/tcp/4040/p2p/{peer_id}"]
    assert not rec.full and record(load=100).full


def test_the_key_is_derived_from_the_relay_key_as_specified() -> None:
    expected = "/pigeon-relay/" + hashlib.sha256(
        b"pigeon-relay-record" + RELAY.public.to_bytes()).digest()[:16].hex()
    assert relay_key(RELAY.public) == expected == record().key
    assert len(expected) == 46  # under the 50 bytes of docs/libp2p.md L28
    # the directory key is a sha2-256 multihash, as kad-dht provider keys are
    assert DIRECTORY_KEY.startswith("1220") and len(bytes.fromhex(DIRECTORY_KEY)) == 34
    assert bytes.fromhex(DIRECTORY_KEY)[2:] == hashlib.sha256(b"pigeon-relay-directory-v1").digest()


def test_a_record_under_another_relays_key_is_refused() -> None:
    other = IdentityKeyPair(bytes([8]) * 32)
    signed = record().sign(RELAY)
    with pytest.raises(InvalidRecord, match="not derived"):
        validate(relay_key(other.public), signed, NOW)


def test_a_forged_signature_is_refused() -> None:
    signed = bytearray(record().sign(RELAY))
    signed[-5] ^= 1  # inside the signature
    with pytest.raises(InvalidRecord):
        RelayRecord.verify(bytes(signed), NOW)
    # a record signed by another key for this relay's key: the key says whose it must be
    forged = record(signer=IdentityKeyPair(bytes([8]) * 32)).sign(IdentityKeyPair(bytes([8]) * 32))
    with pytest.raises(InvalidRecord):
        validate(record().key, forged, NOW)


def test_expired_and_overlong_records_are_refused() -> None:
    signed = record().sign(RELAY)
    with pytest.raises(InvalidRecord, match="expired"):
        RelayRecord.verify(signed, NOW + RELAY_RECORD_LIFETIME_S)
    far = record(expires=NOW + MAX_RELAY_RECORD_LIFETIME_S + 1).sign(RELAY)
    with pytest.raises(InvalidRecord, match="lifetime"):
        RelayRecord.verify(far, NOW)
    greedy = record(seq=(NOW + RELAY_RECORD_LIFETIME_S) * 1000 + 1).sign(RELAY)
    with pytest.raises(InvalidRecord, match="seq"):
        RelayRecord.verify(greedy, NOW)


@pytest.mark.parametrize(("changes", "why"), [
    ({"addrs": []}, "at least one address"),
    ({"addrs": ["/ip4/1.2.3.4/tcp/1/p2p/12D3KooWx"]}, "do not name a peer"),
    ({"addrs": ["not-a-multiaddr"]}, "multiaddr"),
    ({"addrs": ["/ip4/1.2.3.4/tcp/1"] * 17}, "more than"),
    ({"cap": -1}, "cap"),
    ({"load": "many"}, "load"),
    ({"lim": {"msgs": 1}}, "missing"),
    ({"ver": "v" * 33}, "ver"),
    ({"op": "o" * 65}, "op"),
    ({"extra": 1}, "unknown fields"),
    ({"op": None}, "missing"),
])
def test_malformed_bodies_are_refused(changes: dict[str, object], why: str) -> None:
    signed = sign_record(RELAY, body(**changes))
    with pytest.raises(InvalidRecord, match=why):
        RelayRecord.verify(signed, NOW)


def test_the_newer_record_wins_select() -> None:
    old, new = record().sign(RELAY), record(seq=NOW * 1000 + 5, load=9).sign(RELAY)
    key = record().key
    assert select(key, [old, new], NOW) == 1
    assert select(key, [new, old], NOW) == 0
    junk = b"\xa0"
    assert select(key, [new, junk], NOW) == 0


def test_constructing_a_bad_record_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        record(addrs=())
    with pytest.raises(ValueError):
        record(operator="o" * 65)
    with pytest.raises(ValueError):
        record().sign(IdentityKeyPair(bytes([8]) * 32))
    with pytest.raises(ValueError):
        RelayLimits(messages=-1, bytes=0, ttl_s=0, envelope_bytes=0)


def test_relay_vectors_decode_as_specified() -> None:
    """The committed vectors of section 28.1 verify with the rules there."""
    import json

    from node.protocol import mailbox as mb
    from tests.vectors.generate import PATH

    document = json.loads(PATH.read_text())
    inputs, out = document["inputs"], document["outputs"]
    now = inputs["relay_record_exp"] - 60
    rec = open_relay_record(out["relay_record_dht_key"], bytes.fromhex(out["relay_record"]), now)
    assert (rec.peer_id, rec.load, rec.capacity, rec.operator) == (
        out["relay_peer_id"], inputs["relay_record_load"], inputs["relay_record_capacity"],
        inputs["relay_record_operator"])
    assert list(rec.addrs) == inputs["relay_record_addrs"]
    assert out["relay_directory_key"] == DIRECTORY_KEY
    reply = mb.decode_reply(bytes.fromhex(out["mailbox_relay_full_frame"]))
    assert isinstance(reply, mb.ErrorReply) and reply.code == mb.RELAY_FULL
