"""Safety numbers are the same on both sides and change with either key."""

from __future__ import annotations

import pytest

from node.errors import DecodeError
from node.protocol.fingerprint import SafetyNumber, _fingerprint
from node.protocol.keys import IdentityKeyPair

fingerprint_cache_info = _fingerprint.cache_info


def test_safety_number_is_symmetric_and_key_dependent() -> None:
    a, b, c = (IdentityKeyPair.generate().public for _ in range(3))
    ab, ba = SafetyNumber.of(a, b), SafetyNumber.of(b, a)
    assert ab.digits() == ba.digits()
    assert len(ab.digits()) == 60 and ab.digits().isdigit()
    assert len(ab.display().split()) == 12
    assert SafetyNumber.of(a, c).digits() != ab.digits()


def test_qr_payload_matches_only_the_right_pair() -> None:
    a, b, c = (IdentityKeyPair.generate().public for _ in range(3))
    shown_by_a = SafetyNumber.of(a, b).qr_payload()
    assert SafetyNumber.of(b, a).matches_scanned(shown_by_a)
    assert not SafetyNumber.of(b, c).matches_scanned(shown_by_a)
    assert not SafetyNumber.of(a, b).matches_scanned(shown_by_a)  # scanning one's own screen
    with pytest.raises(DecodeError):
        SafetyNumber.of(b, a).matches_scanned(b"not cbor at all")


def test_a_keys_fingerprint_is_computed_once_and_then_remembered() -> None:
    # A contact list shows a safety number per contact: without the cache every listing redid
    # 5,200 SHA-512 rounds per key (node/protocol/fingerprint.py, CACHED_FINGERPRINTS).
    a, b = (IdentityKeyPair.generate().public for _ in range(2))
    before = fingerprint_cache_info()
    first = SafetyNumber.of(a, b).display()
    middle = fingerprint_cache_info()
    assert middle.misses - before.misses == 2
    assert SafetyNumber.of(a, b).display() == first
    assert SafetyNumber.of(b, a).digits() == SafetyNumber.of(a, b).digits()
    after = fingerprint_cache_info()
    assert after.misses == middle.misses and after.hits - middle.hits == 6
