"""Sync messages between the devices of one account (PROTOCOL.md section 25.6): the content
format, and the inbound machine accepting them only from our own account."""

from __future__ import annotations

import pytest

from node.errors import DecodeError
from node.protocol import codec
from node.protocol.content import Sync, decode_content, encode_content
from node.protocol.inbound import SyncChange
from tests.protocol.test_inbound_machine import (
    NOW_MS,
    account,
    alice_knows_bob,
    feed,
    mid,
    msg,
    stream_from,
)

DEVICES = ((b"\x05" * 32, ("/ip4/192.0.2.1/tcp/1",), ("/ip4/192.0.2.9/tcp/2/p2p/x",)),)


def test_sync_content_round_trips() -> None:
    for op in ("contact-add", "contact-rename", "contact-remove"):
        sync = Sync(id=mid(1), sent_at_ms=5, op=op, account=b"\x01" * 32, name="bob",  # type: ignore[arg-type]
                    devices=DEVICES if op == "contact-add" else ())
        assert decode_content(encode_content(sync)) == sync


def test_sync_content_with_an_unknown_operation_or_bad_key_is_malformed() -> None:
    good = encode_content(Sync(id=mid(1), sent_at_ms=5, op="contact-add", account=b"\x01" * 32,
                               name="bob"))
    raw = codec.decode(good[:good.rindex(b"\x80")], limit=4096, what="t")
    for change in ({"op": "contact-eat"}, {"ik": b"\x01" * 31}, {"devices": [{"dev": b"x"}]}):
        body = codec.encode({**raw, **change})
        padded = body + b"\x80" + bytes(-(len(body) + 1) % 128)
        with pytest.raises(DecodeError):
            decode_content(padded)
    with pytest.raises(ValueError):
        Sync(id=mid(1), sent_at_ms=5, op="contact-eat", account=b"\x01" * 32,  # type: ignore[arg-type]
             name="x")


def test_a_sync_from_a_contact_is_refused_and_changes_nothing() -> None:
    alice, bob, view = alice_knows_bob()
    sync = Sync(id=mid(3), sent_at_ms=NOW_MS, op="contact-remove", account=b"\x01" * 32,
                name="x")
    plan = feed(stream_from(bob), view, [msg(3, bob.encrypt(alice, encode_content(sync)))])
    assert plan.syncs == () and [n.code for n in plan.nacks] == ["malformed"]


def test_a_sync_from_a_device_of_our_own_account_is_applied() -> None:
    alice, bob, view = alice_knows_bob()
    view.identity = bob.identity  # bob's device is now a device of the viewing account
    sync = Sync(id=mid(4), sent_at_ms=NOW_MS, op="contact-add", account=b"\x02" * 32,
                name="carol", devices=DEVICES)
    plan = feed(stream_from(bob), view, [msg(4, bob.encrypt(alice, encode_content(sync)))])
    assert plan.nacks == () and plan.acks == (mid(4),)
    assert plan.syncs == (SyncChange(op="contact-add", account=b"\x02" * 32, name="carol",
                                     devices=DEVICES),)
    assert plan.texts == () and plan.seen == ((account(bob), mid(4)),)


READ = Sync(id=mid(5), sent_at_ms=7, op="read", account=b"\x01" * 32, name="",
            read_id=mid(9), read_sent_at_ms=6)


def _padded(raw: dict[str, object]) -> bytes:
    body = codec.encode(raw)
    return body + b"\x80" + bytes(-(len(body) + 1) % 128)


def test_read_sync_round_trips_and_names_the_message() -> None:
    decoded = decode_content(encode_content(READ))
    assert decoded == READ
    assert isinstance(decoded, Sync) and (decoded.read_id, decoded.read_sent_at_ms) == (mid(9), 6)


def test_read_sync_with_a_bad_or_missing_message_is_malformed() -> None:
    good = encode_content(READ)
    raw = codec.decode(good[:good.rindex(b"\x80")], limit=4096, what="t")
    bad: list[dict[str, object]] = [
        {"mid": b"\x09" * 17}, {"mid": b"\x09" * 4000}, {"mid": "not bytes"},
        {"mts": -1}, {"mts": 2**53 + 1}, {"mts": True}, {"mts": "6"},
        {"name": "bob"}, {"devices": [{"dev": b"\x05" * 32, "addrs": [], "relays": []}]},
    ]
    for change in bad:
        with pytest.raises(DecodeError):
            decode_content(_padded({**raw, **change}))
    for missing in ("mid", "mts"):
        with pytest.raises(DecodeError):
            decode_content(_padded({k: v for k, v in raw.items() if k != missing}))
    # Another operation naming a message is malformed too: only `read` carries one.
    rename = {**raw, "op": "contact-rename", "name": "bob"}
    with pytest.raises(DecodeError):
        decode_content(_padded(rename))
    assert decode_content(_padded({k: v for k, v in rename.items()
                                   if k not in ("mid", "mts")})).op == "contact-rename"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        Sync(id=mid(1), sent_at_ms=5, op="read", account=b"\x01" * 32, name="")


def test_a_read_sync_from_our_own_device_reaches_the_plan_with_its_message() -> None:
    alice, bob, view = alice_knows_bob()
    view.identity = bob.identity  # bob's device is now a device of the viewing account
    plan = feed(stream_from(bob), view, [msg(5, bob.encrypt(alice, encode_content(READ)))])
    assert plan.nacks == () and plan.acks == (mid(5),)
    assert plan.syncs == (SyncChange(op="read", account=b"\x01" * 32, name="", devices=(),
                                     read_id=mid(9), read_sent_at_ms=6),)


def test_a_read_sync_from_a_contact_is_refused() -> None:
    alice, bob, view = alice_knows_bob()
    plan = feed(stream_from(bob), view, [msg(5, bob.encrypt(alice, encode_content(READ)))])
    assert plan.syncs == () and [n.code for n in plan.nacks] == ["malformed"]
