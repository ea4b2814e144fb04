"""Rotation and deletion of prekeys (PROTOCOL.md section 6, "Rotation"): the signed and the
last-resort PQ prekey are replaced every SIGNED_PREKEY_ROTATION_S, and a replaced key still opens
first messages for PREKEY_GRACE_S, then is gone, so a recorded first message made with it can no
longer be decrypted from what the device stores."""

from __future__ import annotations

import pytest

from node.errors import DecryptionFailed
from node.protocol import codec
from node.protocol.limits import (
    MAX_OLD_SIGNED_PREKEYS,
    MAX_ONE_TIME_PREKEYS,
    ONE_TIME_PREKEYS_LOW,
    PREKEY_GRACE_S,
    SIGNED_PREKEY_ROTATION_S,
)
from node.protocol.prekeys import PreKeyStore
from node.protocol.session import SessionRecord
from node.testing import FIXED_NOW, Party

DAY = 24 * 3600


def _first_message(alice: Party, bob: Party, *, one_time: bool) -> bytes:
    alice.start_session(bob, one_time=one_time)
    return alice.encrypt(bob, b"first")


def _opens(bob: Party, alice: Party, message: bytes, prekeys: PreKeyStore) -> bool:
    """Whether `message` decrypts with `prekeys` in a fresh record: what someone holding a copy
    of Bob's stored keys can do with a recorded first message."""
    try:
        SessionRecord().decrypt(message, identity=bob.identity,
                                remote_identity=alice.identity.public, prekeys=prekeys)
    except DecryptionFailed:
        return False
    return True


def _copy(store: PreKeyStore) -> PreKeyStore:
    return PreKeyStore.from_bytes(store.to_bytes())


def test_nothing_is_due_before_the_rotation_period() -> None:
    store = PreKeyStore.create(now=FIXED_NOW)
    before = store.to_bytes()
    done = store.maintain(now=FIXED_NOW + SIGNED_PREKEY_ROTATION_S - 1)
    assert not done.changed and store.to_bytes() == before
    assert store.next_due() == FIXED_NOW + SIGNED_PREKEY_ROTATION_S


def test_rotation_replaces_both_keys_and_bundles_offer_the_new_ones() -> None:
    store = PreKeyStore.create(now=FIXED_NOW)
    bob = Party.create("bob")
    old = store.bundle(bob.identity, bob.device, seq=1, expires=FIXED_NOW + 60,
                       one_time=False)
    done = store.maintain(now=FIXED_NOW + SIGNED_PREKEY_ROTATION_S)
    assert done.rotated and done.deleted == 0
    new = store.bundle(bob.identity, bob.device, seq=2, expires=FIXED_NOW + 60,
                       one_time=False)
    assert new.signed_prekey_id > old.signed_prekey_id
    assert new.kem_prekey_id > old.kem_prekey_id and new.kem_last_resort
    # The replaced keys are still there during the grace, and survive a save and load.
    again = _copy(store)
    assert again.signed_prekey(old.signed_prekey_id) is not None
    assert again.kem_prekey(old.kem_prekey_id) is not None
    # The next thing due is the deletion at the end of the grace.
    assert store.next_due() == FIXED_NOW + SIGNED_PREKEY_ROTATION_S + min(
        PREKEY_GRACE_S, SIGNED_PREKEY_ROTATION_S)


def test_a_late_first_message_opens_within_the_grace_and_not_after() -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    first = _first_message(alice, bob, one_time=False)  # made before the rotation, delivered late
    rotated_at = FIXED_NOW + SIGNED_PREKEY_ROTATION_S
    assert bob.prekeys.maintain(now=rotated_at).rotated
    assert _opens(bob, alice, first, _copy(bob.prekeys))
    assert bob.prekeys.maintain(now=rotated_at + PREKEY_GRACE_S - 1).deleted == 0
    assert _opens(bob, alice, first, _copy(bob.prekeys))
    done = bob.prekeys.maintain(now=rotated_at + PREKEY_GRACE_S)
    assert done.deleted == 2  # the old signed prekey and the old last-resort PQ prekey
    assert not _opens(bob, alice, first, _copy(bob.prekeys))
    assert not _opens(bob, alice, first, bob.prekeys)


def test_a_received_first_message_with_one_time_keys_is_unreadable_from_the_store_at_once() -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    first = _first_message(alice, bob, one_time=True)
    before = _copy(bob.prekeys)  # a copy stolen before the message arrived
    assert bob.decrypt(alice, first) == b"first"
    assert _opens(bob, alice, first, before)
    # The used one-time keys are deleted on use; the signed prekey alone does not open it.
    assert not _opens(bob, alice, first, _copy(bob.prekeys))


def test_old_keys_are_bounded_by_count_whatever_the_schedule() -> None:
    store = PreKeyStore.create(now=FIXED_NOW)
    for week in range(1, 3 * MAX_OLD_SIGNED_PREKEYS):
        store.maintain(now=FIXED_NOW + week * DAY, rotate_after=DAY, grace=365 * DAY)
    again = _copy(store)
    spk = [k for k in range(1, 10_000) if again.signed_prekey(k) is not None]
    last_resort = [k for k in range(1, 10_000)
                   if (entry := again.kem_prekey(k)) is not None and entry[1]]
    assert len(spk) == len(last_resort) == MAX_OLD_SIGNED_PREKEYS + 1


def test_a_clock_set_far_back_still_rotates() -> None:
    store = PreKeyStore.create(now=FIXED_NOW + 10 * SIGNED_PREKEY_ROTATION_S)  # made by a wrong clock
    assert store.maintain(now=FIXED_NOW).rotated
    assert not store.maintain(now=FIXED_NOW + 1).rotated


def test_the_one_time_pools_are_refilled_when_low() -> None:
    store = PreKeyStore.create(now=FIXED_NOW, one_time=ONE_TIME_PREKEYS_LOW)
    bob = Party.create("bob")
    assert not store.maintain(now=FIXED_NOW).refilled
    bundle = store.bundle(bob.identity, bob.device, seq=1, expires=FIXED_NOW + 60)
    assert bundle.one_time_prekey is not None and not bundle.kem_last_resort
    done = store.maintain(now=FIXED_NOW)
    assert done.refilled and store.unoffered_one_time_count() >= ONE_TIME_PREKEYS_LOW
    # An empty pool falls back to the signed and last-resort keys, then is refilled.
    empty = PreKeyStore.create(now=FIXED_NOW, one_time=0)
    fallback = empty.bundle(bob.identity, bob.device, seq=1, expires=FIXED_NOW + 60)
    assert fallback.one_time_prekey is None and fallback.kem_last_resort
    assert empty.maintain(now=FIXED_NOW).refilled
    refilled = empty.bundle(bob.identity, bob.device, seq=2, expires=FIXED_NOW + 60)
    assert refilled.one_time_prekey is not None and not refilled.kem_last_resort


@pytest.mark.parametrize("grace", [0, DAY])
def test_replay_memory_goes_with_its_signed_prekey(grace: int) -> None:
    alice, bob = Party.create("alice"), Party.create("bob")
    first = _first_message(alice, bob, one_time=False)
    assert bob.decrypt(alice, first) == b"first"
    rotated_at = FIXED_NOW + SIGNED_PREKEY_ROTATION_S
    bob.prekeys.maintain(now=rotated_at, grace=grace)
    bob.prekeys.maintain(now=rotated_at + grace, grace=grace)
    stored = bob.prekeys.to_bytes()
    assert alice.sessions["bob"].current is not None
    assert alice.sessions["bob"].current.base_key not in stored  # its seen set went too
    assert not _opens(bob, alice, first, bob.prekeys)


def test_handed_out_keys_are_never_evicted_and_expire_after_the_grace() -> None:
    bob = Party.create("bob")
    store = PreKeyStore.create(now=FIXED_NOW, one_time=0)
    handed = []
    for i in range(MAX_ONE_TIME_PREKEYS + 10):
        bundle = store.bundle(bob.identity, bob.device, seq=i, expires=FIXED_NOW + 60,
                              now=FIXED_NOW)
        store.refill(now=FIXED_NOW)
        if bundle.one_time_prekey_id is not None:
            handed.append(bundle)
    # Every key handed out is still there (none evicted for room): the pool is full of them,
    # and further bundles go without one-time keys rather than invalidating one in flight.
    assert len(handed) == MAX_ONE_TIME_PREKEYS
    again = _copy(store)
    assert all(again.one_time_prekey(b.one_time_prekey_id or 0) is not None for b in handed)
    assert all(again.kem_prekey(b.kem_prekey_id) is not None for b in handed)
    fallback = store.bundle(bob.identity, bob.device, seq=0, expires=FIXED_NOW + 60,
                            now=FIXED_NOW)
    assert fallback.one_time_prekey is None and fallback.kem_last_resort
    # Unused for the whole grace: deleted, and the pool refilled with keys nobody was given.
    assert store.next_due() <= FIXED_NOW + PREKEY_GRACE_S
    done = store.maintain(now=FIXED_NOW + PREKEY_GRACE_S)
    assert done.deleted >= 2 * MAX_ONE_TIME_PREKEYS and done.refilled
    assert all(store.one_time_prekey(b.one_time_prekey_id or 0) is None for b in handed)
    fresh = store.bundle(bob.identity, bob.device, seq=1, expires=FIXED_NOW + 60)
    assert fresh.one_time_prekey is not None and not fresh.kem_last_resort


def test_a_store_written_before_offers_were_dated_still_loads() -> None:
    bob = Party.create("bob")
    store = PreKeyStore.create(now=FIXED_NOW, one_time=2)
    bundle = store.bundle(bob.identity, bob.device, seq=1, expires=FIXED_NOW + 60)
    fields = dict(codec.decode(store.to_bytes(), limit=1 << 20, what="prekey store"))
    fields["offered"] = [k for k, _ in fields["offered"]]  # the older form: ids only
    old = PreKeyStore.from_bytes(codec.encode(fields))
    assert old.one_time_prekey(bundle.one_time_prekey_id or 0) is not None
    assert old.unoffered_one_time_count() == 1
    # Dated from the current signed prekey: deleted a grace after it was made, not before.
    assert old.maintain(now=FIXED_NOW + PREKEY_GRACE_S - 1, rotate_after=10 * PREKEY_GRACE_S
                        ).deleted == 0
    assert old.maintain(now=FIXED_NOW + PREKEY_GRACE_S, rotate_after=10 * PREKEY_GRACE_S
                        ).deleted == 2
