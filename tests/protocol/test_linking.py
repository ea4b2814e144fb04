"""The pure parts of linking (PROTOCOL.md section 25.2): link codes, the stream keys, sealed
frames, the provisioning payload, and the history frames (section 25.3)."""

from __future__ import annotations

import dataclasses
import io

import pytest

from node.errors import DecodeError, DecryptionFailed, DeviceError, LimitExceeded
from node.protocol import codec
from node.protocol.devicelist import DeviceList
from node.protocol.history import (
    HistoryEnd,
    HistoryRange,
    HistoryRow,
    HistoryRows,
    decode_reply,
    decode_request,
    encode_end,
    encode_range,
    encode_request,
    encode_rows,
)
from node.protocol.invite import SHORT_INVITE_ADDR_BUDGET
from node.protocol.keys import DeviceKeyPair, DHKeyPair, IdentityKey, IdentityKeyPair
from node.protocol.linking import (
    LINK_CODE_LIFETIME_S,
    PROVISION_CHUNK_BYTES,
    ContactPayload,
    DevicePayload,
    LinkChannel,
    LinkCode,
    PayloadAssembler,
    Provisioning,
    chunk_payload,
    decode_hello,
    encode_hello,
)
from node.testing import FIXED_NOW

NOW = FIXED_NOW


def _code(device: DeviceKeyPair, ephemeral: DHKeyPair, *, addrs: tuple[str, ...] = (
        "/ip4/192.0.2.1/tcp/4001",), expires: int = NOW + LINK_CODE_LIFETIME_S) -> LinkCode:
    return LinkCode(device=device.public, addrs=addrs, ephemeral=ephemeral.public,
                    nonce=b"\x07" * 16, expires=expires)


def test_a_link_code_round_trips_and_names_its_device() -> None:
    device, ephemeral = DeviceKeyPair.generate(), DHKeyPair.generate()
    code = _code(device, ephemeral)
    text = code.to_text(device)
    assert text.startswith("pigeon-link:")
    wrapped = text[:30] + "\n  " + text[30:]  # a mail client's line break
    assert LinkCode.from_text(wrapped, now=NOW) == code
    with pytest.raises(ValueError, match="signed by the device"):
        code.record(DeviceKeyPair.generate())


def test_every_changed_character_of_a_code_is_refused() -> None:
    device, ephemeral = DeviceKeyPair.generate(), DHKeyPair.generate()
    text = _code(device, ephemeral).to_text(device)
    prefix = len("pigeon-link:")
    for i in range(prefix, len(text) - 1):  # the last character may hold only padding bits
        flip = "A" if text[i] != "A" else "B"
        with pytest.raises(DeviceError, match=r"damaged|not genuine|expired|too long"):
            LinkCode.from_text(text[:i] + flip + text[i + 1:], now=NOW)


def test_a_code_signed_by_another_device_is_not_genuine() -> None:
    device, other, ephemeral = DeviceKeyPair.generate(), DeviceKeyPair.generate(), \
        DHKeyPair.generate()
    record = codec.decode(_code(device, ephemeral).record(device), limit=1024, what="t")
    body = codec.decode(record["body"], limit=1024, what="t")
    body["dev"] = other.public.to_bytes()  # claims another device, keeps the signature
    record["body"] = codec.encode(body)
    with pytest.raises(DeviceError, match="not genuine"):
        LinkCode.from_record(codec.encode(record), now=NOW)


def test_expired_and_overlong_codes_are_refused() -> None:
    device, ephemeral = DeviceKeyPair.generate(), DHKeyPair.generate()
    code = _code(device, ephemeral)
    assert LinkCode.from_text(code.to_text(device), now=code.expires - 1) == code
    with pytest.raises(DeviceError, match="expired"):
        LinkCode.from_text(code.to_text(device), now=code.expires)
    far = _code(device, ephemeral, expires=NOW + 7 * 24 * 3600)
    with pytest.raises(DeviceError, match="too long"):
        LinkCode.from_text(far.to_text(device), now=NOW)


@pytest.mark.parametrize("text", ["", "pigeon:UABC", "pigeon-link:", "pigeon-link:!!!!",
                                  "pigeon-link:" + "A" * 5000, "hello"])
def test_garbage_is_not_a_link_code(text: str) -> None:
    with pytest.raises(DeviceError):
        LinkCode.from_text(text, now=NOW)


def test_the_largest_code_fits_an_80_column_qr_code() -> None:
    from node.cli.device import QR_BORDER, _print_qr

    device, ephemeral = DeviceKeyPair.generate(), DHKeyPair.generate()
    relayed = ("/ip4/198.51.100.7/tcp/4001/p2p/12D3KooWJX11sa7vuW1Q1pMMA8j76s8QbTGtEcudsUwGHE5hvMbs"
               "/p2p-circuit")
    addrs = ("/ip4/192.0.2.1/tcp/4001", "/ip4/192.0.2.1/udp/4001/quic-v1", relayed, relayed)
    from node.protocol.multiaddrs import to_binary

    assert sum(len(to_binary(a)) for a in addrs) <= SHORT_INVITE_ADDR_BUDGET
    text = _code(device, ephemeral, addrs=addrs).to_text(device)
    out = io.StringIO()
    assert _print_qr(text, out)
    widths = {len(line) for line in out.getvalue().splitlines()}
    assert max(widths) <= 80 and QR_BORDER > 0


def test_both_sides_derive_the_same_keys_and_confirmation() -> None:
    device, ephemeral, approver_e = DeviceKeyPair.generate(), DHKeyPair.generate(), \
        DHKeyPair.generate()
    code = _code(device, ephemeral)
    record = code.record(device)
    nonce, epk = decode_hello(encode_hello(code.nonce, approver_e.public))
    assert nonce == code.nonce and epk == approver_e.public
    approver = LinkChannel.for_approver(approver_e, code, record)
    new = LinkChannel.for_new_device(ephemeral, epk, record)
    assert approver.confirmation == new.confirmation
    assert len(approver.confirmation) == 7 and approver.confirmation[3] == " "
    frames = [approver.seal({"t": "provision", "i": i}) for i in range(3)]
    assert [new.open(f, expect="provision").int("i", 0, 9) for f in frames] == [0, 1, 2]
    reply = new.seal({"t": "done"})
    approver.open(reply, expect="done").done()
    # Another code (another one-time key) gives other keys and another confirmation.
    other = LinkChannel.for_new_device(DHKeyPair.generate(), epk, record)
    with pytest.raises(DecryptionFailed):
        other.open(approver.seal({"t": "provision"}), expect="provision")


def test_sealed_frames_cannot_be_reordered_repeated_or_changed() -> None:
    device, ephemeral, approver_e = DeviceKeyPair.generate(), DHKeyPair.generate(), \
        DHKeyPair.generate()
    code = _code(device, ephemeral)
    record = code.record(device)
    a = LinkChannel.for_approver(approver_e, code, record)
    first, second = a.seal({"t": "provision"}), a.seal({"t": "provision"})
    n = LinkChannel.for_new_device(ephemeral, approver_e.public, record)
    with pytest.raises(DecryptionFailed):
        n.open(second, expect="provision")  # out of order
    n = LinkChannel.for_new_device(ephemeral, approver_e.public, record)
    n.open(first, expect="provision")
    with pytest.raises(DecryptionFailed):
        n.open(first, expect="provision")  # repeated
    n = LinkChannel.for_new_device(ephemeral, approver_e.public, record)
    with pytest.raises(DecryptionFailed):
        n.open(first[:-1] + bytes([first[-1] ^ 1]), expect="provision")
    with pytest.raises(DecodeError, match="expected"):
        LinkChannel.for_new_device(ephemeral, approver_e.public, record).open(
            first, expect="list")


def _payload(contacts: int = 2, name_size: int = 10) -> Provisioning:
    identity, device = IdentityKeyPair.generate(), DeviceKeyPair.generate()
    listed = DeviceList.first(identity, device, seq=1, expires=NOW + 3600).sign(identity)
    people = tuple(ContactPayload(
        name=f"c{i}".ljust(name_size, "x"), identity=IdentityKey(bytes([i % 256]) * 32),
        added_at_ms=i, devices=(DevicePayload(device=DeviceKeyPair.generate().public,
                                              addrs=("/ip4/192.0.2.1/tcp/1",), relays=()),),
        device_list=None if i % 2 else listed) for i in range(contacts))
    return Provisioning(identity=identity, device_list=listed,
                        devices=(DevicePayload(device=device.public, addrs=(), relays=()),),
                        contacts=people, display_name="alice", relays=())


def _opened(message: dict[str, object]) -> codec.Fields:
    """A message as `LinkChannel.open` hands it on (its type read)."""
    f = codec.Fields(codec.decode(codec.encode(message), limit=2**20, what="t"), "t")
    assert f.text("t", max_size=16) == "provision"
    return f


def test_a_large_payload_goes_in_pieces_and_comes_back_whole() -> None:
    payload = _payload(contacts=1500, name_size=200)
    data = payload.to_bytes()
    pieces = chunk_payload(data)
    assert len(pieces) > 2 and all(len(p["data"]) <= PROVISION_CHUNK_BYTES for p in pieces)
    assembler = PayloadAssembler()
    results = [assembler.add(_opened(p)) for p in pieces]
    assert results[:-1] == [None] * (len(pieces) - 1) and results[-1] == data
    decoded = Provisioning.from_bytes(data)
    assert decoded.identity.to_bytes() == payload.identity.to_bytes()  # key pairs have no ==
    assert dataclasses.replace(decoded, identity=payload.identity) == payload


def test_pieces_out_of_order_are_refused() -> None:
    pieces = chunk_payload(_payload(contacts=1500, name_size=200).to_bytes())
    assembler = PayloadAssembler()
    with pytest.raises(DecodeError, match="out of order"):
        assembler.add(_opened(pieces[1]))


def test_a_payload_with_extra_or_bad_fields_is_refused() -> None:
    data = codec.decode(_payload().to_bytes(), limit=2**20, what="t")
    with pytest.raises(DecodeError):
        Provisioning.from_bytes(codec.encode({**data, "extra": 1}))
    with pytest.raises(DecodeError):
        Provisioning.from_bytes(codec.encode({**data, "seed": b"short"}))
    with pytest.raises((DecodeError, LimitExceeded)):
        Provisioning.from_bytes(b"\xa1" + b"\xff" * 10)


def test_history_frames_round_trip_and_refuse_bad_rows() -> None:
    assert decode_request(encode_request(5, 9)) == (5, 9)
    assert decode_reply(encode_range(1, 9, 8)) == HistoryRange(after=1, until=9, total=8)
    assert decode_reply(encode_end()) == HistoryEnd()
    rows = (HistoryRow(account=b"\x01" * 32, direction="in", message_id=b"\x02" * 16, body="hi",
                       sent_at_ms=5, received_at_ms=6, state="received"),
            HistoryRow(account=b"\x01" * 32, direction="out", message_id=b"\x03" * 16, body="yo",
                       sent_at_ms=7, received_at_ms=None, state="delivered"))
    assert decode_reply(encode_rows(12, rows)) == HistoryRows(last=12, rows=rows)
    bad = codec.decode(encode_rows(12, rows), limit=2**20, what="t")
    bad["rows"][0]["state"] = "delivered"  # an incoming message is never "delivered"
    with pytest.raises(DecodeError):
        decode_reply(codec.encode(bad))
    bad["rows"] = []
    with pytest.raises(DecodeError):
        decode_reply(codec.encode(bad))
