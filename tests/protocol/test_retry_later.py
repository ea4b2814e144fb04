"""The `retry-later` nack (PROTOCOL.md sections 13 and 15): a receiver whose storage fails asks
for its messages again instead of failing them; the sender's machine resends them after
RETRY_LATER_S, whatever its backoff was, and fails nothing."""

from __future__ import annotations

import pytest

from node.errors import DecodeError
from node.protocol.inbound import InboundLimits, InboundStream
from node.protocol.outbound import RETRY_LATER, RETRY_LATER_S, CloseStream, Connect, NoteError
from node.protocol.wire import Msg, Nack, decode_frame, encode_frame
from tests.protocol.test_outbound_machine import (
    connect,
    fail_dial,
    make,
    mid,
    min_jitter,
    rows,
    seqs,
    wait_until,
    write,
)


def test_retry_later_closes_the_stream_and_resends_everything_after_a_short_wait() -> None:
    m = make(*rows(1, 2, 3))
    fail_dial(m, 0.0)
    now = wait_until(m, 0.0)
    connect(m, now)
    write(m, now)
    assert m.acked([mid(1)])  # the first was stored before the disk filled up

    effects = m.nacked(mid(2), RETRY_LATER, now=now)
    assert len(effects) == 1 and isinstance(effects[0], NoteError)
    assert "cannot store" in effects[0].error
    assert m.nacked(mid(3), RETRY_LATER, now=now) == []  # the same batch: already handled
    assert seqs(m.pending()) == [2, 3]  # nothing failed
    assert m.next_action(now) == CloseStream(reset=True)
    assert wait_until(m, now) == now + RETRY_LATER_S  # max jitter; not the backoff (0.5 s)
    connect(m, now + RETRY_LATER_S)
    again = write(m, now + RETRY_LATER_S)
    assert seqs(again.rows) == [2, 3] and again.to_encrypt == ()  # the same bytes again


def test_retry_later_waits_at_least_half_the_delay_with_jitter() -> None:
    m = make(*rows(1), jitter=min_jitter)
    connect(m)
    write(m, 0.0)
    m.nacked(mid(1), RETRY_LATER, now=10.0)
    assert m.next_action(10.0) == CloseStream(reset=True)
    assert wait_until(m, 10.0) == 10.0 + RETRY_LATER_S / 2
    assert m.next_action(10.0 + RETRY_LATER_S / 2) == Connect()


def test_retry_later_for_an_unknown_id_changes_nothing_and_needs_the_time() -> None:
    m = make(*rows(1))
    connect(m)
    write(m, 0.0)
    assert m.nacked(mid(9), RETRY_LATER, now=1.0) == []
    assert m.status().connected and m.in_flight == (mid(1),)
    with pytest.raises(ValueError, match="needs the time"):
        m.nacked(mid(1), RETRY_LATER)


def test_retry_later_nack_frame_bytes() -> None:
    # Deterministic CBOR (PROTOCOL.md section 2) of the CDDL nack-frame, worked out by hand:
    # keys in bytewise order of their encodings: "t", "v", "id", "code".
    expected = bytes.fromhex(
        "a4" "6174" "646e61636b" "6176" "01" "626964" "50" "000102030405060708090a0b0c0d0e0f"
        "64636f6465" "6b72657472792d6c61746572")
    frame = Nack(bytes(range(16)), "retry-later")
    assert encode_frame(frame) == expected
    assert decode_frame(expected) == frame
    with pytest.raises(DecodeError, match="unknown nack code"):
        decode_frame(expected.replace(b"retry-later", b"retry-never"))


def test_a_receiver_defers_every_message_of_a_batch_it_could_not_store() -> None:
    stream = InboundStream(device=b"\x01" * 32, peer_id="12D3KooWpeer", now=0.0,
                           limits=InboundLimits(frames_per_s=100, max_consecutive_failures=4,
                                                max_name_chars=64))
    frames = [encode_frame(Msg(mid(i), b"sealed")) for i in (1, 2, 3)]
    plan = stream.defer(frames, now_ms=5)
    assert [(r.message_id, r.code) for r in plan.nacks] == [(mid(i), "retry-later") for i in (1, 2, 3)]
    assert plan.acks == () and plan.seen == () and plan.texts == () and plan.sessions == ()
    assert [decode_frame(f) for f in plan.reply_frames()] == [
        Nack(mid(i), "retry-later") for i in (1, 2, 3)]
