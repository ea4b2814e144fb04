"""Signed records: a prekey bundle verifies only when genuine, current and small enough."""

from __future__ import annotations

import pytest

from node.errors import InvalidRecord
from node.protocol import codec
from node.protocol.limits import MAX_RECORD_BYTES, MAX_RECORD_LIFETIME_S
from node.protocol.records import PreKeyBundle, open_record, sign_record
from node.testing import FIXED_NOW, Party


def test_genuine_bundle_verifies_and_round_trips() -> None:
    bob = Party.create("bob")
    signed = bob.bundle()
    bundle = PreKeyBundle.verify(signed, now=FIXED_NOW)
    assert bundle.identity == bob.identity.public
    assert bundle.device == bob.device.public
    assert bundle.sign(bob.identity) == signed


def test_any_changed_byte_breaks_the_bundle() -> None:
    signed = Party.create("bob").bundle()
    for i in range(0, len(signed), 7):
        tampered = bytearray(signed)
        tampered[i] ^= 0x40
        with pytest.raises(InvalidRecord):
            PreKeyBundle.verify(bytes(tampered), now=FIXED_NOW)


def test_bundle_signed_by_another_identity_is_refused() -> None:
    bob, mallory = Party.create("bob"), Party.create("mallory")
    bundle = PreKeyBundle.verify(bob.bundle(), now=FIXED_NOW)
    forged = sign_record(mallory.identity, dict(bundle.body()))
    # Re-signed by Mallory, Bob's device and keys as Mallory's: Bob's device bound itself to
    # Bob's account only (PROTOCOL.md section 4 "Binding"), so Mallory cannot claim it.
    with pytest.raises(InvalidRecord, match="did not bind"):
        PreKeyBundle.verify(forged, now=FIXED_NOW)
    outer = codec.decode(bob.bundle(), limit=MAX_RECORD_BYTES, what="t")
    outer["sig"] = codec.decode(forged, limit=MAX_RECORD_BYTES, what="t")["sig"]
    with pytest.raises(InvalidRecord):
        PreKeyBundle.verify(codec.encode(outer), now=FIXED_NOW)


def test_expired_and_far_future_bundles_are_refused() -> None:
    bob = Party.create("bob")
    signed = bob.bundle(now=FIXED_NOW)  # expires an hour later
    with pytest.raises(InvalidRecord, match="expired"):
        PreKeyBundle.verify(signed, now=FIXED_NOW + 3600)
    far = sign_record(bob.identity, {"kind": "prekey-bundle", "seq": 1,
                                     "exp": FIXED_NOW + MAX_RECORD_LIFETIME_S + 10})
    with pytest.raises(InvalidRecord, match="lifetime"):
        open_record(far, kind="prekey-bundle", now=FIXED_NOW)


def test_oversized_and_wrong_kind_records_are_refused() -> None:
    bob = Party.create("bob")
    with pytest.raises(InvalidRecord):
        PreKeyBundle.verify(b"\xa0" + b"\x00" * MAX_RECORD_BYTES, now=FIXED_NOW)
    other = sign_record(bob.identity, {"kind": "device-list", "seq": 1, "exp": FIXED_NOW + 60})
    with pytest.raises(InvalidRecord, match="expected a prekey-bundle"):
        PreKeyBundle.verify(other, now=FIXED_NOW)
    with pytest.raises(InvalidRecord):
        sign_record(bob.identity, {"kind": "x", "seq": 1, "exp": FIXED_NOW + 60,
                                   "pad": b"\x00" * MAX_RECORD_BYTES})


def test_newer_than_compares_sequence_of_the_same_signer() -> None:
    bob, carol = Party.create("bob"), Party.create("carol")
    def rec(party: Party, seq: int):
        data = sign_record(party.identity, {"kind": "k", "seq": seq, "exp": FIXED_NOW + 60})
        return open_record(data, kind="k", now=FIXED_NOW)
    assert rec(bob, 2).newer_than(rec(bob, 1))
    assert not rec(bob, 1).newer_than(rec(bob, 1))
    assert not rec(carol, 5).newer_than(rec(bob, 1))


def test_a_bundle_names_its_device_only_with_the_devices_binding() -> None:
    """PROTOCOL.md section 4 "Binding": the bundle carries DK's signature over IK; a bundle
    without it, or with one that is not DK's for this IK, is refused, and cannot be built."""
    bob, mallory = Party.create("bob"), Party.create("mallory")
    body = PreKeyBundle.verify(mallory.bundle(), now=FIXED_NOW).body()
    claims = {  # Mallory's bundle naming Bob's device, with every binding she can come up with
        "none": None,
        "her own device's": body["bind"],
        "bob's (to bob's account)": PreKeyBundle.verify(bob.bundle(), now=FIXED_NOW).binding,
        "made with her identity key": mallory.identity.sign(b"anything"),
    }
    for what, bind in claims.items():
        claim = dict(body, dev=bob.device.public.to_bytes())
        if bind is None:
            del claim["bind"]
        else:
            claim["bind"] = bind
        with pytest.raises(InvalidRecord):
            PreKeyBundle.verify(sign_record(mallory.identity, claim), now=FIXED_NOW)
        if bind is not None:
            fields = {**_fields(PreKeyBundle.verify(mallory.bundle(), now=FIXED_NOW)),
                      "device": bob.device.public, "binding": bind}
            with pytest.raises(ValueError, match="did not bind"):
                PreKeyBundle(**fields)  # type: ignore[arg-type]
            assert what
    assert PreKeyBundle.verify(mallory.bundle(), now=FIXED_NOW).device == mallory.device.public


def _fields(bundle: PreKeyBundle) -> dict[str, object]:
    return {name: getattr(bundle, name) for name in PreKeyBundle.__dataclass_fields__}
