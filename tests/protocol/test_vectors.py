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
