"""DHT directory records: round trips, every rejection, the select order and known keys; and
the device binding (PROTOCOL.md section 4 "Binding"): no record names someone else's device."""

from __future__ import annotations

import hashlib

import pytest

from node.errors import InvalidRecord
from node.protocol import codec
from node.protocol.binding import sign_binding
from node.protocol.directory import (
    MAX_DEVICES,
    MAX_DHT_RECORD_LIFETIME_S,
    RECORD_LIFETIME_S,
    AccountRecord,
    DeviceRecord,
    account_key,
    device_key,
    next_seq,
    open_dht_record,
    select,
    validate,
)
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.protocol.limits import MAX_RECORD_BYTES, MAX_RECORD_LIFETIME_S
from node.protocol.records import MAX_SEQ, SIGNATURE_CONTEXT, PreKeyBundle, sign_record
from node.testing import FIXED_NOW, Party

NOW = FIXED_NOW
EXP = NOW + RECORD_LIFETIME_S
RELAY = "/ip4/127.0.0.1/tcp/4001/p2p/" + DeviceKeyPair(bytes([9]) * 32).public.peer_id()


def bundle_of(party: Party, *, one_time: bool = False, expires: int = EXP) -> PreKeyBundle:
    return party.prekeys.bundle(party.identity, party.device, seq=1, expires=expires,
                                one_time=one_time)


def account(party: Party, seq: int = 1, *, expires: int = EXP, extra: int = 0) -> AccountRecord:
    pairs = (party.device, *(DeviceKeyPair(bytes([i + 1]) * 32) for i in range(extra)))
    return AccountRecord(identity=party.identity.public, devices=tuple(p.public for p in pairs),
                         bindings=tuple(sign_binding(p, party.identity.public) for p in pairs),
                         seq=seq, expires=expires)


def account_body(party: Party, seq: int = 1, **fields: object) -> dict[str, object]:
    """An account record body listing `party`'s device with its binding, before signing."""
    return {"kind": "account", "seq": seq, "exp": EXP,
            "devices": [party.device.public.to_bytes()],
            "binds": [sign_binding(party.device, party.identity.public)], **fields}


def device(party: Party, seq: int = 1, *, expires: int = EXP,
           addrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/4002",)) -> DeviceRecord:
    return DeviceRecord(identity=party.identity.public, device=party.device.public, addrs=addrs,
                        relays=(RELAY,), bundle=bundle_of(party), seq=seq, expires=expires)


def raw_record(identity: IdentityKeyPair, body: dict[str, object]) -> bytes:
    """Sign a body without sign_record's size check (to build oversized records)."""
    body_bytes = codec.encode(dict(body, ik=identity.public.to_bytes()))
    return codec.encode({"v": 1, "body": body_bytes,
                         "sig": identity.sign(SIGNATURE_CONTEXT + body_bytes)})


@pytest.fixture(scope="module")
def alice() -> Party:
    return Party.create("alice")


@pytest.fixture(scope="module")
def mallory() -> Party:
    return Party.create("mallory")


# --- keys ------------------------------------------------------------------------------------------


def test_known_keys() -> None:
    ik = IdentityKeyPair(bytes(32)).public
    dk = DeviceKeyPair(bytes([1]) * 32).public
    assert account_key(ik) == "/pigeon-acct/db7696156fa142b059a1305251788175"
    assert device_key(ik, dk) == "/pigeon-dev/c984c27a7e155a51d75face86bc559df"
    # The same, derived independently of the module.
    assert account_key(ik) == "/pigeon-acct/" + hashlib.sha256(
        b"pigeon-account-record" + ik.to_bytes()).digest()[:16].hex()
    assert device_key(ik, dk) == "/pigeon-dev/" + hashlib.sha256(
        b"pigeon-device-record" + ik.to_bytes() + dk.to_bytes()).digest()[:16].hex()
    # Keys over 50 bytes break py-libp2p's FIND_NODE routing (docs/libp2p.md L28).
    assert len(account_key(ik)) == 45 and len(device_key(ik, dk)) == 44


def test_next_seq_is_unix_ms_and_strictly_increasing() -> None:
    assert next_seq(NOW * 1000) == NOW * 1000
    assert next_seq(NOW * 1000, last_seq=NOW * 1000) == NOW * 1000 + 1
    assert next_seq(5, last_seq=10) == 11  # the clock stepped back


# --- round trips -------------------------------------------------------------------------------


def test_account_record_round_trips(alice: Party) -> None:
    rec = account(alice, seq=7, extra=2)
    signed = rec.sign(alice.identity)
    assert AccountRecord.verify(signed, NOW) == rec
    assert open_dht_record(rec.key, signed, NOW) == rec
    validate(rec.key, signed, NOW)
    assert rec.key == account_key(alice.identity.public)


def test_device_record_round_trips(alice: Party) -> None:
    rec = device(alice, seq=3)
    signed = rec.sign(alice.identity)
    assert DeviceRecord.verify(signed, now=NOW) == rec
    assert open_dht_record(rec.key, signed, NOW) == rec
    assert rec.key == device_key(alice.identity.public, alice.device.public)
    assert rec.bundle.kem_last_resort and rec.bundle.one_time_prekey is None


def test_construction_refuses_what_verify_would() -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    bind = sign_binding(alice.device, alice.identity.public)
    with pytest.raises(ValueError, match="1 to 16"):
        AccountRecord(identity=alice.identity.public, devices=(), bindings=(), seq=1, expires=EXP)
    with pytest.raises(ValueError, match="once"):
        AccountRecord(identity=alice.identity.public, bindings=(bind, bind),
                      devices=(alice.device.public, alice.device.public), seq=1, expires=EXP)
    with pytest.raises(ValueError, match="one binding per device"):
        AccountRecord(identity=alice.identity.public, devices=(alice.device.public,),
                      bindings=(), seq=1, expires=EXP)
    with pytest.raises(ValueError, match="one-time"):
        DeviceRecord(identity=alice.identity.public, device=alice.device.public, addrs=(),
                     relays=(), bundle=bundle_of(alice, one_time=True), seq=1, expires=EXP)
    with pytest.raises(ValueError, match="another identity"):
        DeviceRecord(identity=alice.identity.public, device=alice.device.public, addrs=(),
                     relays=(), bundle=bundle_of(bob), seq=1, expires=EXP)
    with pytest.raises(ValueError, match="/p2p/"):
        DeviceRecord(identity=alice.identity.public, device=alice.device.public, addrs=(),
                     relays=("/ip4/1.2.3.4/tcp/1",), bundle=bundle_of(alice), seq=1, expires=EXP)
    with pytest.raises(ValueError, match="signed by"):
        account(alice).sign(bob.identity)


# --- rejections --------------------------------------------------------------------------------


def test_forged_signature_is_refused(alice: Party, mallory: Party) -> None:
    signed = account(alice).sign(alice.identity)
    outer = codec.decode(signed, limit=MAX_RECORD_BYTES, what="t")
    body = codec.decode(outer["body"], limit=MAX_RECORD_BYTES, what="t")
    body["seq"] = 99  # tampered, old signature kept
    outer["body"] = codec.encode(body)
    with pytest.raises(InvalidRecord, match="bad signature"):
        validate(account(alice).key, codec.encode(outer), NOW)
    # Mallory re-signs Alice's body as her own: valid, but only under Mallory's key.
    resigned = sign_record(mallory.identity, account_body(mallory, seq=99))
    with pytest.raises(InvalidRecord, match="not derived"):
        validate(account(alice).key, resigned, NOW)
    validate(account(mallory).key, resigned, NOW)


def test_any_flipped_byte_is_refused(alice: Party) -> None:
    rec = device(alice)
    signed = rec.sign(alice.identity)
    for i in range(0, len(signed), 13):
        tampered = bytearray(signed)
        tampered[i] ^= 0x01
        with pytest.raises(InvalidRecord):
            validate(rec.key, bytes(tampered), NOW)


def test_expired_and_overlong_lifetimes_are_refused(alice: Party) -> None:
    rec = account(alice, expires=NOW + 10)
    signed = rec.sign(alice.identity)
    validate(rec.key, signed, NOW)
    with pytest.raises(InvalidRecord, match="expired"):
        validate(rec.key, signed, NOW + 10)
    far = account(alice, expires=NOW + MAX_DHT_RECORD_LIFETIME_S + 1).sign(alice.identity)
    with pytest.raises(InvalidRecord, match="MAX_DHT_RECORD_LIFETIME_S"):
        validate(rec.key, far, NOW)
    farther = account(alice, expires=NOW + MAX_RECORD_LIFETIME_S + 1).sign(alice.identity)
    with pytest.raises(InvalidRecord, match="MAX_RECORD_LIFETIME_S"):
        validate(rec.key, farther, NOW)
    validate(rec.key, account(alice, expires=NOW + MAX_DHT_RECORD_LIFETIME_S).sign(alice.identity), NOW)


def test_device_record_with_expired_bundle_is_refused(alice: Party) -> None:
    rec = DeviceRecord(identity=alice.identity.public, device=alice.device.public, addrs=(),
                       relays=(), bundle=bundle_of(alice, expires=NOW + 5), seq=1, expires=EXP)
    signed = rec.sign(alice.identity)
    validate(rec.key, signed, NOW)
    with pytest.raises(InvalidRecord, match="bundle"):
        validate(rec.key, signed, NOW + 5)


def test_oversized_records_are_refused(alice: Party) -> None:
    key = account(alice).key
    big = raw_record(alice.identity, account_body(alice, pad=b"\x00" * MAX_RECORD_BYTES))
    assert len(big) > MAX_RECORD_BYTES
    with pytest.raises(InvalidRecord, match="MAX_RECORD_BYTES"):
        validate(key, big, NOW)
    with pytest.raises(InvalidRecord):  # too many long addresses: refused when signing
        device(alice, addrs=tuple("/dns4/" + "a" * 490 + f"/tcp/{i}" for i in range(16))).sign(
            alice.identity)


def test_wrong_namespace_and_kind_are_refused(alice: Party) -> None:
    acct = account(alice).sign(alice.identity)
    dev = device(alice).sign(alice.identity)
    suffix = account_key(alice.identity.public).rsplit("/", 1)[1]
    for key in (f"/junk/{suffix}", f"/pk/{suffix}", f"/ipns/{suffix}"):
        with pytest.raises(InvalidRecord, match="unknown DHT namespace"):
            validate(key, acct, NOW)
    for key in ("plain-key", suffix, "/", "/pigeon-acct", ""):
        with pytest.raises(InvalidRecord, match="namespaced"):
            validate(key, acct, NOW)
    # A device record under the account key of the same identity, and the reverse.
    with pytest.raises(InvalidRecord, match="expected a account"):
        validate(account(alice).key, dev, NOW)
    with pytest.raises(InvalidRecord, match="expected a device"):
        validate(device(alice).key, acct, NOW)
    # A prekey bundle (a signed record of another kind) is not a directory record.
    with pytest.raises(InvalidRecord, match="expected a device"):
        validate(device(alice).key, bundle_of(alice).sign(alice.identity), NOW)


def test_malformed_bodies_are_refused(alice: Party, mallory: Party) -> None:
    key = account(alice).key
    base = {"kind": "account", "seq": 1, "exp": EXP}
    bad_bodies = [
        dict(base),  # no devices
        dict(base, devices=[]),
        dict(base, devices=[b"\x01" * 31]),
        dict(base, devices=[alice.device.public.to_bytes()] * 2),
        dict(base, devices=[bytes([i]) * 32 for i in range(MAX_DEVICES + 1)]),
        dict(base, devices=[alice.device.public.to_bytes()], extra=1),
        dict(base, devices="x"),
        {k: v for k, v in account_body(alice).items() if k != "binds"},
        account_body(alice, binds=[]),
        account_body(alice, binds=[b"\x00" * 63]),
        account_body(alice, binds="x"),
    ]
    for body in bad_bodies:
        with pytest.raises(InvalidRecord):
            validate(key, sign_record(alice.identity, body), NOW)
    for junk in (b"", b"\x00", b"\xa0", b"not cbor at all", codec.encode([1, 2])):
        with pytest.raises(InvalidRecord):
            validate(key, junk, NOW)
    with pytest.raises(InvalidRecord):
        validate(key, "text, not bytes", NOW)  # type: ignore[arg-type]

    dkey = device(alice).key
    good_bundle = bundle_of(alice).sign(alice.identity)
    dbase = {"kind": "device", "seq": 1, "exp": EXP, "dev": alice.device.public.to_bytes(),
             "addrs": [], "relays": [], "bundle": good_bundle}
    bad_device_bodies = [
        dict(dbase, addrs=["no-slash"]),
        dict(dbase, addrs=[1]),
        dict(dbase, addrs=["/x" * 300]),
        dict(dbase, addrs=["/ip4/1.2.3.4/tcp/1"] * 17),
        dict(dbase, relays=["/ip4/1.2.3.4/tcp/1"]),
        dict(dbase, relays=["/ip4/1.2.3.4/tcp/1/p2p/QmNotEd25519"]),
        dict(dbase, relays=[RELAY + "/p2p-circuit"]),
        dict(dbase, bundle=b"junk"),
        dict(dbase, bundle=bundle_of(alice, one_time=True).sign(alice.identity)),
        dict(dbase, bundle=bundle_of(mallory).sign(mallory.identity)),
        {k: v for k, v in dbase.items() if k != "bundle"},
    ]
    for body in bad_device_bodies:
        with pytest.raises(InvalidRecord):
            validate(dkey, sign_record(alice.identity, body), NOW)
    validate(dkey, sign_record(alice.identity, dbase), NOW)  # the base itself is fine
    validate(key, sign_record(alice.identity, account_body(alice)), NOW)  # and this one


def test_a_device_record_cannot_sit_under_another_devices_key(alice: Party,
                                                                mallory: Party) -> None:
    other = DeviceKeyPair(bytes([7]) * 32).public
    with pytest.raises(InvalidRecord, match="not derived"):
        validate(device_key(alice.identity.public, other), device(alice).sign(alice.identity), NOW)
    # Nor under the key of the same device for another account.
    with pytest.raises(InvalidRecord, match="not derived"):
        validate(device_key(mallory.identity.public, alice.device.public),
                 device(alice).sign(alice.identity), NOW)


# --- device binding: the hijack of someone else's device ---------------------------------------


def hijack_bundle(mallory: Party, victim: Party, *, bind: bytes | None = None) -> bytes:
    """A prekey bundle Mallory signs for the victim's device key, with Mallory's own prekeys:
    the bundle body of PROTOCOL.md section 5 built by hand, with `bind` (absent if None)."""
    own = bundle_of(mallory).body()
    own["dev"] = victim.device.public.to_bytes()
    own.pop("bind")
    if bind is not None:
        own["bind"] = bind
    return sign_record(mallory.identity, own)


def hijack_record(mallory: Party, victim: Party, *, seq: int = MAX_SEQ,
                  bind: bytes | None = None) -> bytes:
    """A device record for the victim's device signed by Mallory, with the highest seq."""
    return sign_record(mallory.identity, {
        "kind": "device", "seq": seq, "exp": EXP, "dev": victim.device.public.to_bytes(),
        "addrs": ["/ip4/203.0.113.66/tcp/4001"], "relays": [],
        "bundle": hijack_bundle(mallory, victim, bind=bind)})


def test_a_record_for_someone_elses_device_is_refused(alice: Party, mallory: Party) -> None:
    key = device_key(mallory.identity.public, alice.device.public)
    # Without a binding, with Mallory's own device's binding, with Alice's binding to Alice's
    # account (a real signature, copied from her bundle), with a binding signed by Mallory's
    # identity key: the device key never bound itself to Mallory's account.
    for bind in (None, sign_binding(mallory.device, mallory.identity.public),
                 bundle_of(alice).binding, mallory.identity.sign(b"x"), b"\x00" * 64):
        signed = hijack_record(mallory, alice, bind=bind)
        with pytest.raises(InvalidRecord):
            validate(key, signed, NOW)
        with pytest.raises(InvalidRecord):
            DeviceRecord.verify(signed, NOW)
        with pytest.raises(InvalidRecord):
            PreKeyBundle.verify(hijack_bundle(mallory, alice, bind=bind), now=NOW)
        # The genuine record wins every select, whatever seq the forgery claims.
        genuine = device(alice).sign(alice.identity)
        assert select(device(alice).key, [genuine, signed], NOW) == 0
    # And the genuine owner's record under the owner's key is untouched by any of it.
    validate(device(alice).key, device(alice).sign(alice.identity), NOW)


def test_an_account_record_cannot_list_someone_elses_device(alice: Party, mallory: Party) -> None:
    key = account_key(mallory.identity.public)
    for bind in (sign_binding(mallory.device, mallory.identity.public),
                 sign_binding(alice.device, alice.identity.public)):
        body = account_body(mallory, devices=[alice.device.public.to_bytes()], binds=[bind])
        with pytest.raises(InvalidRecord, match="did not bind"):
            validate(key, sign_record(mallory.identity, body), NOW)
    with pytest.raises(ValueError, match="did not bind"):
        AccountRecord(identity=mallory.identity.public, devices=(alice.device.public,),
                      bindings=(sign_binding(alice.device, alice.identity.public),),
                      seq=1, expires=EXP)
    # Bindings are per position: two genuine devices with their bindings swapped are refused.
    two = account(alice, extra=1)
    swapped = account_body(alice, devices=[d.to_bytes() for d in two.devices],
                           binds=list(reversed(two.bindings)))
    with pytest.raises(InvalidRecord, match="did not bind"):
        validate(two.key, sign_record(alice.identity, swapped), NOW)


def test_a_seq_beyond_the_records_own_expiry_is_refused(alice: Party) -> None:
    """seq is unix ms (next_seq): a record claiming a seq after its own exp would otherwise win
    every later select, so its owner could never replace it."""
    rec = device(alice)
    forever = device(alice, seq=MAX_SEQ).sign(alice.identity)
    with pytest.raises(InvalidRecord, match="seq"):
        validate(rec.key, forever, NOW)
    akey = account(alice).key
    with pytest.raises(InvalidRecord, match="seq"):
        validate(akey, account(alice, seq=EXP * 1000 + 1).sign(alice.identity), NOW)
    validate(akey, account(alice, seq=EXP * 1000).sign(alice.identity), NOW)
    # A genuine republish (seq = now in ms) beats the absurd one on every node.
    genuine = device(alice, seq=next_seq(NOW * 1000)).sign(alice.identity)
    assert select(rec.key, [forever, genuine], NOW) == 1
    assert select(rec.key, [genuine, forever], NOW) == 0


# --- select ------------------------------------------------------------------------------------


def test_select_prefers_valid_then_seq_then_bytes_then_later_index(alice: Party) -> None:
    key = account(alice).key
    s1 = account(alice, seq=1).sign(alice.identity)
    s2 = account(alice, seq=2).sign(alice.identity)
    expired = account(alice, seq=50, expires=NOW).sign(alice.identity)
    forged = s2.replace(s2[-5:], bytes(b ^ 1 for b in s2[-5:]))
    assert select(key, [s1, s2], NOW) == 1
    assert select(key, [s2, s1], NOW) == 0
    # Invalid records rank below every valid one, whatever seq they claim.
    assert select(key, [forged, s1], NOW) == 1
    assert select(key, [s1, forged], NOW) == 0
    assert select(key, [s1, expired], NOW) == 0
    assert select(key, [b"junk", s1, b"junk"], NOW) == 1
    # Equal seq, different bytes (equivocation): the larger bytes win, in either order.
    a = account(alice, seq=5).sign(alice.identity)
    b = account(alice, seq=5, extra=1).sign(alice.identity)
    big = max(a, b)
    assert select(key, [a, b], NOW) == [a, b].index(big)
    assert select(key, [b, a], NOW) == [b, a].index(big)
    # Full tie: the later index, so an identical re-PUT ([existing, new]) is accepted.
    assert select(key, [s2, s2], NOW) == 1
    assert select(key, [s2, s1, s2], NOW) == 2
    assert select(key, [b"x", b"y"], NOW) == 1
    with pytest.raises(ValueError):
        select(key, [], NOW)


def test_select_judges_validity_under_the_key(alice: Party, mallory: Party) -> None:
    key = account(alice).key
    mine = account(alice, seq=1).sign(alice.identity)
    theirs = account(mallory, seq=1000).sign(mallory.identity)  # valid, but for another key
    assert select(key, [mine, theirs], NOW) == 0
    assert select(key, [theirs, mine], NOW) == 1
