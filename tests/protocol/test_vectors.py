"""Known-answer tests: RFC 5869 for HKDF, and the project's own vectors (tests/vectors/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.protocol.kdf import hkdf
from tests.vectors.generate import PATH, compute

VECTORS = Path(__file__).parent.parent / "vectors"


@pytest.mark.parametrize(
    "case", json.loads((VECTORS / "rfc5869.json").read_text())["cases"], ids=["A.1", "A.2", "A.3"]
)
def test_hkdf_rfc5869(case: dict[str, str]) -> None:
    okm = hkdf(
        bytes.fromhex(case["ikm"]),
        salt=bytes.fromhex(case["salt"]),
        info=bytes.fromhex(case["info"]),
        length=int(case["length"]),
    )
    assert okm.hex() == case["okm"]


def test_project_vectors_match_the_committed_file() -> None:
    document = json.loads(PATH.read_text())
    computed = compute(document["inputs"])
    # Compare key by key so a failure names the first output that changed.
    for name, expected in document["outputs"].items():
        assert computed[name] == expected, f"vector output {name!r} changed"
    assert set(computed) == set(document["outputs"])


def test_vectors_cover_every_message_kind() -> None:
    outputs = json.loads(PATH.read_text())["outputs"]
    assert bytes.fromhex(outputs["message_1_prekey"])[0] == 0x02
    assert bytes.fromhex(outputs["message_2_ratchet"])[0] == 0x01
    assert bytes.fromhex(outputs["sealed_envelope_of_message_1"])[0] == 0x01
    assert len(outputs["safety_number"]) == 60


def test_multi_device_vectors_decode_as_specified() -> None:
    """PROTOCOL.md sections 25.4 and 25.5: the committed device-list update and transcript decode
    to what the inputs say, and the list verifies at the vectors' `now`."""
    from node.protocol.bundle import decode_request
    from node.protocol.content import DeviceListUpdate, Transcript, decode_content
    from node.protocol.devicelist import DeviceList

    document = json.loads(PATH.read_text())
    inputs, outputs = document["inputs"], document["outputs"]
    signed = bytes.fromhex(outputs["device_list_record"])
    device_list = DeviceList.verify(signed, now=inputs["now"])
    assert device_list.seq == inputs["device_list_seq"] and len(device_list.entries) == 2
    update = decode_content(bytes.fromhex(outputs["device_list_update_plaintext"]))
    assert isinstance(update, DeviceListUpdate) and update.signed_list == signed
    assert update.hints[0].device == device_list.entries[1].device.to_bytes()
    transcript = decode_content(bytes.fromhex(outputs["transcript_plaintext"]))
    assert isinstance(transcript, Transcript)
    assert transcript.body == inputs["transcript_body"]
    assert transcript.to.hex() == outputs["alice_identity_public"]
    assert decode_request(bytes.fromhex(outputs["bundle_request_frame_known_device"])) is None
