"""Known-answer tests: RFC 5869 for HKDF, and the project's own vectors (tests/vectors/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.errors import InvalidRecord
from node.protocol.binding import verify_binding
from node.protocol.bundle import BundleRecord, decode_reply
from node.protocol.directory import AccountRecord, DeviceRecord, open_dht_record
from node.protocol.kdf import hkdf
from node.protocol.keys import DeviceKey, IdentityKey
from node.protocol.records import PreKeyBundle
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


def test_binding_vectors_bound_accepted_unbound_refused() -> None:
    """The vectors of the device binding (PROTOCOL.md sections 4 and 18): the pre-binding
    bundle and device record (`bob_bundle`, `bundle_reply_frame`, kept byte for byte) are now
    refused; their bound successors verify and carry `bob_device_binding`."""
    document = json.loads(PATH.read_text())
    inputs, out = document["inputs"], document["outputs"]
    now = inputs["now"]
    ik = IdentityKey(bytes.fromhex(out["bob_identity_public"]))
    dk = DeviceKey(bytes.fromhex(out["bob_device_public"]))
    binding = bytes.fromhex(out["bob_device_binding"])
    verify_binding(dk, ik, binding)
    assert PreKeyBundle.verify(bytes.fromhex(out["bob_bundle_bound"]), now=now).binding == binding
    with pytest.raises(InvalidRecord, match="bind"):
        PreKeyBundle.verify(bytes.fromhex(out["bob_bundle"]), now=now)
    record_now = inputs["device_record_exp"] - 3600
    bound = decode_reply(bytes.fromhex(out["bundle_reply_frame_bound"]))
    legacy = decode_reply(bytes.fromhex(out["bundle_reply_frame"]))
    assert isinstance(bound, BundleRecord) and isinstance(legacy, BundleRecord)
    device = DeviceRecord.verify(bound.record, record_now)
    assert (device.identity, device.device, device.key) == (ik, dk, out["device_record_dht_key"])
    with pytest.raises(InvalidRecord, match="bind"):
        DeviceRecord.verify(legacy.record, record_now)
    account = open_dht_record(out["account_record_dht_key"],
                              bytes.fromhex(out["account_record"]), record_now)
    assert isinstance(account, AccountRecord)
    assert account.devices == (dk,) and account.bindings == (binding,)
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


def test_read_sync_vector_decodes_as_specified() -> None:
    """PROTOCOL.md section 25.6, `read`: the committed read sync decodes to the message and
    timestamp the inputs name, for Alice's conversation."""
    from node.protocol.content import Sync, decode_content

    document = json.loads(PATH.read_text())
    inputs, outputs = document["inputs"], document["outputs"]
    sync = decode_content(bytes.fromhex(outputs["read_sync_plaintext"]))
    assert isinstance(sync, Sync) and sync.op == "read"
    assert sync.id.hex() == inputs["read_sync_id"] and sync.sent_at_ms == inputs["read_sync_ts"]
    assert sync.account.hex() == outputs["alice_identity_public"]
    assert sync.read_id is not None and sync.read_id.hex() == inputs["read_sync_message_id"]
    assert sync.read_sent_at_ms == inputs["read_sync_message_ts"]
    assert sync.name == "" and sync.devices == ()


def test_group_vectors_verify_and_decrypt() -> None:
    """Section 27: the committed operations verify, the state they give is the one named, and
    the sender-key message opens with the distributed chain (a receiver's view, from the file)."""
    from node.protocol.content import GroupMessage, SenderKey, Text, decode_content
    from node.protocol.groups import GroupLog
    from node.protocol.senderkey import ReceiverChain

    document = json.loads(PATH.read_text())
    out, inputs = document["outputs"], document["inputs"]
    gid = bytes.fromhex(inputs["group_id"])
    log = GroupLog.from_signed(gid, [bytes.fromhex(out["group_op_add"]),
                                     bytes.fromhex(out["group_op_create"])])
    assert log.state.state_hash.hex() == out["group_state_hash"]
    assert log.state.name == inputs["group_name"] and len(log.state.members) == 3
    key = decode_content(bytes.fromhex(out["group_sender_key_plaintext"]))
    message = decode_content(bytes.fromhex(out["group_message_plaintext"]))
    assert isinstance(key, SenderKey) and isinstance(message, GroupMessage)
    chain = ReceiverChain(group_id=gid, key_id=key.key_id, chain_key=key.chain_key,
                          iteration=key.iteration)
    text = decode_content(chain.decrypt(message.message))
    assert isinstance(text, Text) and text.body == inputs["group_message_body"]
    assert text.id == message.id
