"""Safety numbers are the same on both sides and change with either key."""

from __future__ import annotations

import pytest

from node.errors import DecodeError
from node.protocol.fingerprint import SafetyNumber
from node.protocol.keys import IdentityKeyPair


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
