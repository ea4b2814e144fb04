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
