"""Bad input to every decoder raises one of the project's errors, never a bare exception from
cbor2, pynacl or cryptography: truncated, oversized, wrong-type and unknown-version objects, and
random mutations of valid ones."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import DecodeError, NodeError, UnknownVersion
from node.protocol import codec
from node.protocol.fingerprint import SafetyNumber
from node.protocol.keys import DeviceKey, IdentityKey
from node.protocol.prekeys import MAX_STORE_BYTES, PreKeyStore
from node.protocol.records import PreKeyBundle
from node.protocol.sealed import SealedContent, seal, unseal
from node.protocol.session import MAX_RECORD_BYTES, SessionRecord
from node.testing import FIXED_NOW, Party, session_pair

ALICE, BOB = session_pair()
SAMPLE_SESSION = ALICE.sessions["bob"].to_bytes()
SAMPLE_PREKEYS = BOB.prekeys.to_bytes()
SAMPLE_BUNDLE = Party.create("carol").bundle()
SAMPLE_ENVELOPE = seal(
    BOB.device.public,
    SealedContent(sender=ALICE.identity.public, sender_device=ALICE.device.public, message=b"m"),
)
SAMPLE_MESSAGE = ALICE.encrypt(BOB, b"sample")


def _decrypt(data: bytes) -> object:
    record = SessionRecord.from_bytes(BOB.sessions["alice"].to_bytes())  # a fresh copy each time
    return record.decrypt(
        data, identity=BOB.identity, remote_identity=ALICE.identity.public, prekeys=BOB.prekeys
    )


DECODERS: dict[str, tuple[Callable[[bytes], object], bytes]] = {
    "session record": (SessionRecord.from_bytes, SAMPLE_SESSION),
    "prekey store": (PreKeyStore.from_bytes, SAMPLE_PREKEYS),
    "prekey bundle": (lambda d: PreKeyBundle.verify(d, now=FIXED_NOW), SAMPLE_BUNDLE),
    "sealed envelope": (lambda d: unseal(BOB.device, d), SAMPLE_ENVELOPE),
    "session message": (_decrypt, SAMPLE_MESSAGE),
    "safety number qr": (
        SafetyNumber.of(BOB.identity.public, ALICE.identity.public).matches_scanned,
        SafetyNumber.of(ALICE.identity.public, BOB.identity.public).qr_payload(),
    ),
    "account id": (
        lambda d: IdentityKey.from_account_id(d.decode("latin-1")),
        ALICE.identity.public.account_id().encode(),
    ),
    "peer id": (
        lambda d: DeviceKey.from_peer_id(d.decode("latin-1")),
        ALICE.device.public.peer_id().encode(),
    ),
}


def _only_project_errors(decode: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(NodeError):  # the only acceptable way to fail
        decode(data)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_samples_are_valid(name: str) -> None:
    decode, sample = DECODERS[name]
    result = decode(sample)
    assert result is not False  # the sample itself decodes (qr: matches)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_truncations_raise_project_errors(name: str) -> None:
    decode, sample = DECODERS[name]
    for cut in sorted({0, 1, 2, len(sample) // 3, len(sample) // 2, len(sample) - 1}):
        with pytest.raises(NodeError):
            decode(sample[:cut])


@pytest.mark.parametrize(
    ("decode", "limit"),
    [
        (SessionRecord.from_bytes, MAX_RECORD_BYTES),
        (PreKeyStore.from_bytes, MAX_STORE_BYTES),
    ],
)
def test_oversized_state_is_refused_before_parsing(decode: Callable[[bytes], object], limit: int) -> None:
    with pytest.raises(NodeError):
        decode(b"\x00" * (limit + 1))


@pytest.mark.parametrize("name", ["session record", "prekey store"])
def test_unknown_version_and_wrong_types(name: str) -> None:
    decode, sample = DECODERS[name]
    obj = codec.decode(sample, limit=len(sample), what="t")
    with pytest.raises(UnknownVersion):
        decode(codec.encode(dict(obj, v=99)))
    for key in obj:
        if key == "v":
            continue
        for wrong in (7, "text", [1, [2]], {"x": 1}, b"\x00", None, True):
            if type(wrong) is type(obj[key]) or (wrong is None and key == "cur"):
                continue  # a valid value of the right type ("cur" may be null: no session yet)
            with pytest.raises(DecodeError):
                decode(codec.encode(dict(obj, **{key: wrong})))
    for wrong_top in ([obj], 5, b"bytes", "text"):
        with pytest.raises(DecodeError):
            decode(codec.encode(wrong_top))


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(DECODERS)),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    tail=st.binary(max_size=8),
)
def test_mutated_inputs_raise_only_project_errors(
    name: str, edits: list[tuple[int, int]], tail: bytes
) -> None:
    decode, sample = DECODERS[name]
    data = bytearray(sample)
    for position, value in edits:
        data[position % len(data)] = value
    _only_project_errors(decode, bytes(data) + tail)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(DECODERS)), data=st.binary(max_size=300))
def test_random_bytes_raise_only_project_errors(name: str, data: bytes) -> None:
    decode, _ = DECODERS[name]
    _only_project_errors(decode, data)
