"""The outbound machine (node.protocol.outbound), driven with plain numbers: no sockets, no clock,
no database. Each test plays the shell: it asks `next_action(now)`, pretends to carry it out and
reports the outcome. The property test at the end plays a random shell and a random device and
checks the rules on every step."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.protocol.outbound import (
    JITTER_MAX,
    NACK_REASONS,
    RETRY_LATER_S,
    Action,
    ClearError,
    CloseStream,
    Connect,
    Delivered,
    Deposit,
    Fail,
    NoteError,
    OutboundMachine,
    OutRow,
    Ping,
    Refresh,
    Settings,
    Stop,
    Wait,
    Write,
)

T0_MS = 1_700_000_000_000
SETTINGS = Settings(ack_timeout_s=15.0, retry_initial_s=0.5, retry_max_s=60.0, fail_after_s=3600.0,
                    max_batch=4, max_in_flight=10, idle_stream_s=60.0, refresh_interval_s=30.0)
RELAYS = dataclasses.replace(SETTINGS, can_deposit=True)


def max_jitter() -> float:
    return 1.0


def min_jitter() -> float:
    return 0.5


def mid(seq: int) -> bytes:
    return seq.to_bytes(16, "big")


def row(seq: int, **changes: object) -> OutRow:
    fields: dict[str, object] = {"seq": seq, "message_id": mid(seq), "created_at_ms": T0_MS + seq}
    fields.update(changes)
    return OutRow(**fields)  # type: ignore[arg-type]


def rows(*seqs: int, **changes: object) -> list[OutRow]:
    return [row(seq, **changes) for seq in seqs]


def seqs(items: Iterable[OutRow]) -> list[int]:
    return [r.seq for r in items]


def make(*queued: OutRow, config: Settings = SETTINGS,
         jitter: random.Random | Callable[[], float] = max_jitter) -> OutboundMachine:
    return OutboundMachine.resume(config, queued, jitter=jitter)


def connect(m: OutboundMachine, now: float = 0.0, *, relays: bool = False) -> None:
    assert m.next_action(now) == Connect()
    m.dialing("12D3KooWpeer", relays=relays)
    m.connected(now)


def fail_dial(m: OutboundMachine, now: float, *, relays: bool = False,
              error: str = "unreachable: no route") -> list[object]:
    assert m.next_action(now) == Connect()
    m.dialing("12D3KooWpeer", relays=relays)
    return list(m.connect_failed(now, error))


def write(m: OutboundMachine, now: float) -> Write:
    """Take the next action, which must be a Write, and report it done (payloads stored)."""
    action = m.next_action(now)
    assert isinstance(action, Write), action
    m.payloads_stored(seqs(action.to_encrypt))
    m.written(now, seqs(action.rows))
    return action


def wait_until(m: OutboundMachine, now: float) -> float:
    action = m.next_action(now)
    assert isinstance(action, Wait), action
    assert action.until > now
    return action.until


# --- writing and acks -------------------------------------------------------------------------------


def test_rows_are_written_in_order_in_batches_and_an_ack_delivers() -> None:
    m = make(*rows(1, 2, 3, 4, 5, 6))
    connect(m)
    first, second = write(m, 0.0), write(m, 0.0)
    assert seqs(first.rows) == [1, 2, 3, 4] and seqs(second.rows) == [5, 6]
    assert seqs(first.to_encrypt) == [1, 2, 3, 4]
    assert m.status().in_flight == 6 and m.status().connected
    assert wait_until(m, 0.1) == 15.0  # the oldest write's ack deadline

    assert m.acked([mid(1), mid(2)]) == [Delivered((mid(1), mid(2)))]
    assert seqs(m.pending()) == [3, 4, 5, 6]
    assert m.in_flight == (mid(3), mid(4), mid(5), mid(6))


def test_acks_in_any_order_settle_each_row_once() -> None:
    m = make(*rows(1, 2, 3))
    connect(m)
    write(m, 0.0)
    assert m.acked([mid(3)]) == [Delivered((mid(3),))]
    assert m.acked([mid(1), mid(1)]) == [Delivered((mid(1),))]  # a repeated id counts once
    assert m.acked([mid(2)]) == [Delivered((mid(2),))]
    assert m.pending() == () and m.in_flight == ()


def test_duplicate_acks_and_acks_of_unknown_ids_are_ignored() -> None:
    m = make(*rows(1, 2))
    connect(m)
    write(m, 0.0)
    assert m.acked([mid(1)]) == [Delivered((mid(1),))]
    assert m.acked([mid(1)]) == []        # already delivered
    assert m.acked([mid(99)]) == []       # never queued
    assert m.acked([mid(99), mid(2)]) == [Delivered((mid(2),))]
    assert m.nacked(mid(2), "malformed") == []  # settled: a late nack changes nothing


def test_a_nack_fails_the_message_with_the_reason() -> None:
    m = make(*rows(1, 2, 3))
    connect(m)
    write(m, 0.0)
    assert m.nacked(mid(2), "undecryptable") == [Fail(mid(2), NACK_REASONS["undecryptable"])]
    assert m.nacked(mid(3), "some-new-code") == [Fail(mid(3), "some-new-code")]
    assert m.nacked(mid(7), "malformed") == []
    assert seqs(m.pending()) == [1] and m.in_flight == (mid(1),)


def test_an_overdue_ack_means_the_path_is_dead_and_unacked_rows_go_to_the_relays() -> None:
    # A silent connection (a partition, a frozen peer): writing again on it cannot help, so the
    # stream is reset, the connection closed, and what no relay holds yet is deposited at once.
    m = make(*rows(1, 2, 3, 4, 5, 6), config=RELAYS)
    connect(m, relays=True)
    write(m, 0.0)          # 1-4 at t=0
    write(m, 2.0)          # 5-6 at t=2
    m.acked([mid(2), mid(5)])
    assert wait_until(m, 3.0) == 15.0
    error = "path down: no ack within 15 s"
    assert m.next_action(15.0) == CloseStream(reset=True, disconnect=True,
                                              note=NoteError(error, False))
    status = m.status()
    assert not status.connected and status.path_down == error and status.last_error == error
    assert status.attempts == 1 and m.in_flight == ()
    deposit = m.next_action(15.0)
    assert isinstance(deposit, Deposit) and seqs(deposit.rows) == [1, 3, 4, 6]
    assert deposit.to_encrypt == ()  # the stored bytes are sealed, never re-encrypted
    assert m.deposited(15.5, {1, 3, 4, 6}, None) == []
    # Then the device is dialed again with backoff; the relayed rows are still written on the
    # next stream (the receiver de-duplicates) and recovery clears the error.
    retry = wait_until(m, 15.5)
    assert retry == 15.5 + 0.5
    assert m.next_action(retry) == Connect()
    m.dialing("12D3KooWpeer", relays=True)
    assert m.connected(retry) == [ClearError()]
    assert m.status().path_down is None and m.status().last_error is None
    again = write(m, retry)
    assert seqs(again.rows) == [1, 3, 4, 6] and all(r.relayed for r in again.rows)


def test_a_stream_that_opens_clears_the_error_shown_even_one_from_an_earlier_run() -> None:
    m = make(*rows(1))
    assert m.next_action(0.0) == Connect()
    m.dialing("12D3KooWpeer", relays=False)
    assert m.connected(0.0) == [ClearError()]  # the database may hold an error from before
    assert m.status().last_error is None and m.status().path_down is None


def test_a_dead_path_without_relays_backs_off_and_dials_again() -> None:
    m = make(*rows(1, 2))
    connect(m)
    write(m, 0.0)
    close = m.next_action(15.0)
    assert isinstance(close, CloseStream) and close.disconnect and close.note is not None
    assert wait_until(m, 15.0) == 15.5  # no relays: straight to the backoff
    assert m.next_action(15.5) == Connect()


def test_a_write_that_misses_its_deadline_is_a_dead_path() -> None:
    m = make(*rows(1, 2), config=RELAYS)
    connect(m, relays=True)
    action = m.next_action(0.0)
    assert isinstance(action, Write)
    m.payloads_stored(seqs(action.to_encrypt))
    assert m.path_dead(5.0, "path down: write timed out") == [
        NoteError("path down: write timed out", False)]
    assert m.path_dead(5.0, "again") == []  # the stream is already gone
    m.written(5.0, [1, 2])                  # a late report is ignored
    assert m.next_action(5.0) == CloseStream(reset=True, disconnect=True)
    deposit = m.next_action(5.0)
    assert isinstance(deposit, Deposit) and seqs(deposit.rows) == [1, 2]


def test_an_idle_stream_is_pinged_and_an_unanswered_ping_is_a_dead_path() -> None:
    config = dataclasses.replace(RELAYS, keepalive_s=4.0)
    m = make(*rows(1), config=config)
    connect(m, relays=True)
    write(m, 0.0)
    assert wait_until(m, 0.5) == 15.0  # something in flight: the ack deadline covers it
    m.acked([mid(1)])
    assert wait_until(m, 1.0) == 5.0   # idle: a ping is due keepalive_s later
    assert m.next_deadline() == 5.0
    assert m.next_action(5.0) == Ping()
    with pytest.raises(RuntimeError):
        m.next_action(5.1)             # the ping is still being carried out
    m.pong(5.2)
    assert wait_until(m, 5.2) == 9.2
    assert m.next_action(9.2) == Ping()
    m.add_rows(rows(2))
    assert m.path_dead(13.2, "path down: no answer to a keepalive ping") != []
    assert m.next_action(13.2) == CloseStream(reset=True, disconnect=True)
    deposit = m.next_action(13.2)
    assert isinstance(deposit, Deposit) and seqs(deposit.rows) == [2]


def test_a_ping_answered_after_the_stream_broke_changes_nothing() -> None:
    m = make(*rows(1), config=dataclasses.replace(SETTINGS, keepalive_s=1.0))
    connect(m)
    write(m, 0.0)
    m.acked([mid(1)])
    m.add_rows(rows(2))
    m.forget([mid(2)])
    assert wait_until(m, 0.0) == 1.0
    assert m.next_action(1.0) == Ping()
    m.stream_broken(1.5, "stream reset")
    m.pong(1.6)
    assert m.next_action(1.6) == CloseStream(reset=True)
    assert m.status().path_down == "stream reset"


def test_writing_stops_the_pings_and_the_idle_timer_still_closes() -> None:
    m = make(*rows(1), config=dataclasses.replace(SETTINGS, keepalive_s=40.0))
    connect(m)
    write(m, 0.0)
    m.acked([mid(1)])
    assert wait_until(m, 1.0) == 41.0
    m.add_rows(rows(2))
    assert seqs(write(m, 2.0).rows) == [2]
    m.acked([mid(2)])
    assert wait_until(m, 3.0) == 43.0
    assert m.next_action(43.0) == Ping()
    m.pong(43.0)
    assert wait_until(m, 43.0) == 63.0  # the idle close (60 s after 3.0) comes before the ping


def test_a_nack_for_a_message_of_another_device_is_ignored() -> None:
    # A contact's nack naming a message we sent to someone else must not
    # fail that message; only the device a row was written to may refuse it.
    m = make(*rows(1, 2))
    connect(m)
    write(m, 0.0)
    other = bytes(range(16))  # a message id this device was never sent
    assert m.nacked(other, "undecryptable") == []
    assert seqs(m.pending()) == [1, 2]
    unsent = make(*rows(1, 2, 3), config=dataclasses.replace(SETTINGS, max_batch=1))
    connect(unsent)
    write(unsent, 0.0)
    assert unsent.nacked(mid(3), "malformed") == []  # queued, but not written on this stream
    assert seqs(unsent.pending()) == [1, 2, 3]


def write_or_none(m: OutboundMachine, now: float) -> Write | None:
    action = m.next_action(now)
    return action if isinstance(action, Write) else None


def test_flow_control_keeps_at_most_max_in_flight_unacknowledged() -> None:
    m = make(*rows(*range(1, 26)))
    connect(m)
    written = [seqs(write(m, 0.0).rows) for _ in range(3)]
    assert written == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]  # 10 in flight: the window is full
    assert m.status().in_flight == 10
    assert isinstance(m.next_action(0.0), Wait)
    m.acked([mid(4), mid(1), mid(9)])
    assert seqs(write(m, 1.0).rows) == [11, 12, 13]  # exactly the room the acks made
    assert isinstance(m.next_action(1.0), Wait)


def test_new_rows_on_an_open_stream_are_written_after_the_others() -> None:
    m = make(*rows(1, 2))
    connect(m)
    write(m, 0.0)
    m.add_rows(rows(3, 4))
    m.add_rows(rows(2, 3))  # already known: ignored
    assert seqs(write(m, 1.0).rows) == [3, 4]
    assert m.last_seq == 4


def test_an_idle_stream_is_closed_and_the_lane_stops() -> None:
    m = make(*rows(1))
    connect(m)
    write(m, 0.0)
    m.acked([mid(1)])
    assert wait_until(m, 1.0) == 61.0
    assert wait_until(m, 30.0) == 61.0  # an early wake-up changes nothing
    assert m.next_action(61.0) == CloseStream(reset=False)
    assert not m.status().connected
    assert m.next_action(61.0) == Stop()
    m.add_rows(rows(2))
    assert m.next_action(62.0) == Connect()  # a new message dials at once, no backoff


def test_activity_restarts_the_idle_timer() -> None:
    m = make(*rows(1))
    connect(m)
    write(m, 0.0)
    m.acked([mid(1)])
    assert wait_until(m, 10.0) == 70.0
    m.add_rows(rows(2))
    write(m, 50.0)
    m.acked([mid(2)])
    assert wait_until(m, 51.0) == 111.0


# --- failures, backoff, relays ------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_the_largest_jitter() -> None:
    m = make(*rows(1), jitter=max_jitter)
    now, waits = 0.0, []
    for _ in range(10):
        assert fail_dial(m, now)
        until = wait_until(m, now)
        waits.append(until - now)
        now = until
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert m.status().attempts == 10


def test_backoff_with_the_smallest_jitter_is_half_the_delay() -> None:
    m = make(*rows(1), jitter=min_jitter)
    now, waits = 0.0, []
    for _ in range(9):
        fail_dial(m, now)
        until = wait_until(m, now)
        waits.append(until - now)
        now = until
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_seeded_jitter_stays_within_half_and_all_of_the_nominal_delay() -> None:
    def waits(seed: int) -> list[float]:
        m = make(*rows(1), jitter=random.Random(seed))
        now, out = 0.0, []
        for _ in range(12):
            fail_dial(m, now)
            until = wait_until(m, now)
            out.append(until - now)
            now = until
        return out

    nominal = [min(60.0, 0.5 * 2 ** n) for n in range(12)]
    got = waits(7)
    assert all(0.5 * d <= w <= d for w, d in zip(got, nominal, strict=True))
    assert got == waits(7)           # the seed decides: reproducible
    assert got != waits(8)           # and it is random, not fixed
    assert len({round(w / d, 9) for w, d in zip(got, nominal, strict=True)}) > 1


def test_jitter_outside_its_range_is_refused() -> None:
    m = make(*rows(1), jitter=lambda: 1.5)
    assert m.next_action(0.0) == Connect()
    m.dialing("peer", relays=False)
    with pytest.raises(ValueError, match="jitter"):
        m.connect_failed(0.0, "unreachable")


def test_a_stream_that_opens_resets_the_backoff() -> None:
    m = make(*rows(1, 2))
    now = 0.0
    for _ in range(4):
        fail_dial(m, now)
        now = wait_until(m, now)
    assert m.status().attempts == 4
    connect(m, now)
    assert m.status().attempts == 0
    write(m, now)
    assert m.stream_broken(now + 1, "stream reset") == [NoteError("stream reset", False)]
    assert m.next_action(now + 1) == CloseStream(reset=True)
    assert wait_until(m, now + 1) == now + 1 + 0.5  # first failure again: retry_initial_s


def test_a_broken_stream_is_reset_and_everything_is_written_again_on_the_next() -> None:
    m = make(*rows(1, 2, 3))
    connect(m)
    write(m, 0.0)
    m.acked([mid(2)])
    m.stream_broken(1.0, "the device closed the stream")
    assert m.stream_broken(1.0, "stream reset") == []  # the same break, reported twice
    assert m.in_flight == () and not m.status().connected
    assert m.status().last_error == "the device closed the stream"
    assert m.next_action(1.0) == CloseStream(reset=True)
    assert m.next_action(1.5) == Connect()
    m.dialing("peer", relays=False)
    m.connected(1.5)
    again = write(m, 1.5)
    assert seqs(again.rows) == [1, 3] and again.to_encrypt == ()


def test_a_write_that_fails_breaks_the_stream() -> None:
    m = make(*rows(1, 2))
    connect(m)
    action = m.next_action(0.0)
    assert isinstance(action, Write)
    m.stream_broken(0.0, "send failed")   # instead of `written`
    assert m.next_action(0.0) == CloseStream(reset=True)
    m.written(0.0, [1, 2])                # a late report is ignored
    assert m.in_flight == ()


def test_a_kick_retries_at_once_instead_of_waiting() -> None:
    m = make(*rows(1))
    fail_dial(m, 0.0)
    fail_dial(m, wait_until(m, 0.0))
    assert wait_until(m, 0.6) == 1.5
    m.kicked(0.7)
    assert m.next_action(0.7) == Connect()
    m.dialing("peer", relays=False)
    m.kicked(0.8)  # during the dial (the device came online meanwhile)
    m.connect_failed(0.9, "unreachable")
    assert m.next_action(0.9) == Connect()  # not lost: retried at once


def test_repeated_errors_are_marked_so_the_shell_says_them_once() -> None:
    m = make(*rows(1))
    assert fail_dial(m, 0.0, error="unreachable: x") == [NoteError("unreachable: x", False)]
    assert fail_dial(m, 10.0, error="unreachable: x") == [NoteError("unreachable: x", True)]
    assert fail_dial(m, 20.0, error="unreachable: y") == [NoteError("unreachable: y", False)]


def test_unreachable_device_gets_the_backlog_deposited_at_its_relays_in_pages() -> None:
    m = make(*rows(1, 2, 3, 4, 5), row(6, receipt=True), config=RELAYS)
    fail_dial(m, 0.0, relays=True)
    page = m.next_action(0.0)
    assert isinstance(page, Deposit) and seqs(page.rows) == [1, 2, 3, 4]
    assert seqs(page.to_encrypt) == [1, 2, 3, 4]
    m.payloads_stored([1, 2, 3, 4])
    assert m.deposited(0.1, {1, 2, 3, 4}, None) == []
    page = m.next_action(0.1)
    assert isinstance(page, Deposit) and seqs(page.rows) == [5, 6]
    m.deposited(0.2, {5, 6}, None)
    assert seqs(m.pending()) == [1, 2, 3, 4, 5]  # the receipt is done; the rest wait for acks
    assert all(r.relayed for r in m.pending())
    until = wait_until(m, 0.2)
    assert until == 0.7  # and the direct path is retried with backoff

    fail_dial(m, until, relays=True)  # relayed rows are not deposited again
    assert isinstance(m.next_action(until), Wait)
    connect(m, 10.0)
    assert seqs(write(m, 10.0).rows) == [1, 2, 3, 4]  # still written directly once it opens


def test_rows_held_by_old_relays_are_deposited_again_when_the_device_moves() -> None:
    """PROTOCOL.md section 28.3: the device's old relays may have died with its messages."""
    m = make(*rows(1, 2, 3), config=RELAYS)
    fail_dial(m, 0.0, relays=True)
    page = m.next_action(0.0)
    assert isinstance(page, Deposit)
    m.payloads_stored(seqs(page.to_encrypt))
    m.deposited(0.1, {1, 2, 3}, None)
    assert all(r.relayed for r in m.pending())
    until = wait_until(m, 0.1)
    m.relays_changed(0.2)  # an intro named other relays
    assert not any(r.relayed for r in m.pending())
    fail_dial(m, max(0.2, until), relays=True)
    again = m.next_action(max(0.2, until))
    assert isinstance(again, Deposit) and seqs(again.rows) == [1, 2, 3]
    assert again.to_encrypt == ()  # the stored payloads, not encrypted again


def test_a_page_the_relays_refuse_stops_deposits_and_keeps_the_order() -> None:
    m = make(*rows(1, 2, 3, 4, 5, 6), config=RELAYS)
    fail_dial(m, 0.0, relays=True)
    page = m.next_action(0.0)
    assert isinstance(page, Deposit)
    effects = m.deposited(0.0, {1, 2}, "relay x refused: mailbox-full")
    assert effects == [NoteError("relay x refused: mailbox-full", False)]
    assert isinstance(m.next_action(0.0), Wait)  # no deposit of rows after the refused one
    assert m.status().last_error == "relay x refused: mailbox-full"
    fail_dial(m, 5.0, relays=True)
    page = m.next_action(5.0)
    assert isinstance(page, Deposit) and seqs(page.rows) == [3, 4, 5, 6]


def test_a_page_refused_for_a_passing_reason_is_tried_again_soon() -> None:
    # After many failed dials the backoff is long; a relay whose disk was full (or that rate
    # limited us) is asked again after RETRY_LATER_S, so delivery resumes soon after its fault
    # clears, without waiting out the backoff.
    def refused_page(passing: bool) -> float:
        m = make(*rows(1, 2), config=RELAYS)  # max_jitter
        for t in range(8):  # the backoff grows to its cap
            fail_dial(m, 1000.0 * t, relays=False)
            wait_until(m, 1000.0 * t)
        now = 9000.0
        fail_dial(m, now, relays=True)
        page = m.next_action(now)
        assert isinstance(page, Deposit)
        m.deposited(now, set(), "relay x refused: storage-full", passing=passing)
        return wait_until(m, now) - now

    assert refused_page(passing=True) == RETRY_LATER_S * JITTER_MAX
    assert refused_page(passing=False) == SETTINGS.retry_max_s * JITTER_MAX


def test_no_deposit_without_relays_or_without_a_depositor() -> None:
    m = make(*rows(1), config=RELAYS)
    fail_dial(m, 0.0, relays=False)
    assert isinstance(m.next_action(0.0), Wait)
    m = make(*rows(1))  # can_deposit=False
    fail_dial(m, 0.0, relays=True)
    assert isinstance(m.next_action(0.0), Wait)


def test_addresses_are_looked_up_again_at_most_every_refresh_interval() -> None:
    config = dataclasses.replace(RELAYS, can_refresh=True)
    m = make(*rows(1), config=config)
    fail_dial(m, 0.0, relays=True)
    assert m.next_action(0.0) == Refresh()
    with pytest.raises(RuntimeError):
        m.next_action(0.0)  # the lookup is still being carried out
    m.refreshed(1.0, True)
    assert m.next_action(1.0) == Connect()  # new addresses: tried at once
    m.dialing("peer", relays=True)
    m.connect_failed(2.0, "unreachable")
    page = m.next_action(2.0)  # looked up 2 s ago: no lookup, deposit instead
    assert isinstance(page, Deposit)
    m.deposited(2.0, {1}, None)
    now = wait_until(m, 2.0)
    fail_dial(m, now, relays=True)
    assert isinstance(m.next_action(now), Wait)  # still within 30 s, relayed: just back off
    fail_dial(m, 30.0, relays=True)
    assert m.next_action(30.0) == Refresh()
    m.refreshed(30.5, False)
    assert wait_until(m, 30.5) > 30.5


def test_a_removed_device_stops_the_lane() -> None:
    m = make(*rows(1, 2))
    assert m.next_action(0.0) == Connect()
    m.device_gone()
    assert m.pending() == () and m.next_action(0.0) == Stop()


# --- expiry and rows settled elsewhere ------------------------------------------------------------


def test_rows_older_than_the_failure_age_fail_with_the_last_error() -> None:
    m = make(row(1, created_at_ms=T0_MS), row(2, created_at_ms=T0_MS + 1_000),
             row(3, created_at_ms=T0_MS + 5_000))
    assert m.expire(T0_MS + 3_600_000) == []  # exactly the age: not yet
    assert m.expire(T0_MS + 3_600_001) == [Fail(mid(1), "not delivered within 3600 s")]
    fail_dial(m, 0.0, error="unreachable: timeout")
    assert m.expire(T0_MS + 3_602_000) == [
        Fail(mid(2), "not delivered within 3600 s (last error: unreachable: timeout)")]
    assert seqs(m.pending()) == [3]


def test_expired_rows_in_flight_leave_the_window() -> None:
    m = make(row(1, created_at_ms=T0_MS), row(2, created_at_ms=T0_MS + 10_000_000))
    connect(m)
    write(m, 0.0)
    m.expire(T0_MS + 4_000_000)
    assert m.in_flight == (mid(2),)


def test_rows_settled_elsewhere_are_forgotten() -> None:
    m = make(*rows(1, 2, 3))
    connect(m)
    write(m, 0.0)
    m.forget([mid(2), mid(9)])  # a receipt came through a relay; an unknown id is ignored
    assert seqs(m.pending()) == [1, 3] and m.in_flight == (mid(1), mid(3))
    assert m.acked([mid(2)]) == []


# --- crash recovery -------------------------------------------------------------------------------


def test_a_machine_resumed_from_stored_rows_resends_stored_payloads_unchanged() -> None:
    stored = [row(1, stored=True), row(2, stored=True, relayed=True), row(3, stored=True),
              row(4)]  # 1-3 were encrypted (and written or deposited) before the crash
    m = OutboundMachine.resume(RELAYS, stored, jitter=max_jitter)
    assert m.status().in_flight == 0 and m.last_seq == 4
    fail_dial(m, 0.0, relays=True)
    page = m.next_action(0.0)
    assert isinstance(page, Deposit)
    assert seqs(page.rows) == [1, 3, 4]     # row 2 is held by a relay already
    assert seqs(page.to_encrypt) == [4]     # only the row never encrypted
    m.payloads_stored([4])
    m.deposited(0.0, {1, 3, 4}, None)
    assert wait_until(m, 0.0) == 0.5  # the direct path again, after the backoff
    connect(m, 0.5, relays=True)
    action = write(m, 0.5)
    assert seqs(action.rows) == [1, 2, 3, 4] and action.to_encrypt == ()


def test_resumed_rows_are_written_oldest_first_and_new_rows_after_them() -> None:
    m = OutboundMachine.resume(SETTINGS, [row(5, stored=True), row(7, stored=True)],
                               jitter=max_jitter)
    m.add_rows([row(9)])
    m.add_rows([row(3, stored=True)])  # found again in the database: kept in order
    connect(m)
    action = write(m, 0.0)
    assert seqs(action.rows) == [3, 5, 7, 9] and seqs(action.to_encrypt) == [9]


def test_results_without_their_action_are_refused() -> None:
    m = make(*rows(1))
    with pytest.raises(RuntimeError):
        m.connected(0.0)
    with pytest.raises(RuntimeError):
        m.deposited(0.0, set(), None)
    assert m.next_action(0.0) == Connect()
    with pytest.raises(RuntimeError, match="Connect"):
        m.next_action(0.0)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        Settings(ack_timeout_s=0, retry_initial_s=1, retry_max_s=1, fail_after_s=1,
                 max_batch=1, max_in_flight=1)
    with pytest.raises(ValueError):
        Settings(ack_timeout_s=1, retry_initial_s=2, retry_max_s=1, fail_after_s=1,
                 max_batch=1, max_in_flight=1)
    with pytest.raises(ValueError):
        OutRow(seq=1, message_id=b"short", created_at_ms=0)


def test_next_deadline_names_the_timer_that_fires_next() -> None:
    m = make(*rows(1))
    assert m.next_deadline() is None  # nothing has failed: no timer, dial now
    fail_dial(m, 0.0)
    assert m.next_deadline() == 0.5
    connect(m, 0.5)
    write(m, 1.0)
    assert m.next_deadline() == 16.0
    m.acked([mid(1)])
    wait_until(m, 2.0)
    assert m.next_deadline() == 62.0
    m.kicked(2.0)
    close = m.next_action(62.0)
    assert close == CloseStream(reset=False)


# --- random schedules --------------------------------------------------------------------------------

OPS = ["step"] * 6 + ["ack", "ack", "late-ack", "unknown-ack", "nack", "break", "dead", "advance",
                      "add", "kick", "expire", "forget"]


class Shell:
    """A random shell and device around a machine, checking the rules at every step."""

    def __init__(self, config: Settings, jitter: int) -> None:
        self.config = config
        self.now = 0.0
        self.m = OutboundMachine(config, jitter=random.Random(jitter))
        self.alive: dict[int, OutRow] = {}     # the model: rows not settled
        self.stored: set[int] = set()          # rows whose payload the shell committed
        self.relayed: set[int] = set()         # rows a relay holds
        self.ever_written: list[bytes] = []
        self.next_seq = 1
        self.stream_open = False
        self.round: set[int] = set()           # seqs written on this stream (never twice)
        self.round_last = 0
        self.pending_close: bool | None = None

    def add(self, count: int) -> None:
        new = []
        for _ in range(count):
            seq = self.next_seq
            self.next_seq += 1 + seq % 3  # seqs are global: other devices' rows leave gaps
            new.append(row(seq, created_at_ms=T0_MS + int(self.now * 1000), receipt=seq % 7 == 0))
        self.alive.update((r.seq, r) for r in new)
        self.m.add_rows(new)

    def settle(self, effects: Iterable[object]) -> None:
        for effect in effects:
            if isinstance(effect, Delivered):
                for message_id in effect.ids:
                    seq = int.from_bytes(message_id, "big")
                    assert self.alive.pop(seq, None) is not None, "delivered twice or unknown"
            elif isinstance(effect, Fail):
                seq = int.from_bytes(effect.message_id, "big")
                assert self.alive.pop(seq, None) is not None, "failed twice or unknown"
            else:
                assert isinstance(effect, NoteError | ClearError)

    def check_rows(self, action: Write | Deposit) -> None:
        assert 0 < len(action.rows) <= self.config.max_batch
        assert seqs(action.rows) == sorted(set(seqs(action.rows)))
        assert all(r.seq in self.alive for r in action.rows), "a settled row handed out"
        assert not {r.seq for r in action.to_encrypt} & self.stored, "encrypted twice"
        self.stored.update(r.seq for r in action.to_encrypt)
        self.m.payloads_stored(seqs(action.to_encrypt))

    def step(self, choice: int) -> None:
        action: Action = self.m.next_action(self.now)
        if isinstance(action, Stop):
            assert not self.alive
        elif isinstance(action, Wait):
            assert action.until > self.now
            if self.m.status().connected:  # waiting on a stream: nothing left it could write
                in_flight = set(self.m.in_flight)
                assert len(in_flight) == self.config.max_in_flight or \
                    in_flight == {r.message_id for r in self.alive.values()}
            self.now = action.until  # nothing else happens: the timer fires
        elif isinstance(action, Connect):
            assert not self.stream_open and self.alive
            self.m.dialing("peer", relays=self.config.can_deposit or choice % 2 == 0)
            if choice % 2 == 0:
                self.m.connected(self.now)
                self.stream_open, self.round, self.round_last = True, set(), 0
            else:
                self.settle(self.m.connect_failed(self.now, f"unreachable {choice % 2}"))
        elif isinstance(action, Refresh):
            self.m.refreshed(self.now, choice % 4 == 0)
        elif isinstance(action, Deposit):
            assert not self.stream_open
            assert not {r.seq for r in action.rows} & self.relayed, "deposited twice"
            self.check_rows(action)
            held = set(seqs(action.rows)[: choice % (len(action.rows) + 2)])
            for r in action.rows:
                if r.seq in held and r.receipt:
                    del self.alive[r.seq]
            self.relayed |= held
            self.settle(self.m.deposited(self.now, held, None if choice % 5 else "refused"))
        elif isinstance(action, Write):
            assert self.stream_open
            self.check_rows(action)
            assert not set(seqs(action.rows)) & self.round, "written twice without a reason"
            assert action.rows[0].seq > self.round_last, "order not kept"
            self.round.update(seqs(action.rows))
            self.round_last = action.rows[-1].seq
            self.ever_written.extend(r.message_id for r in action.rows)
            if choice % 13 == 7:
                self.settle(self.m.stream_broken(self.now, "send failed"))
            elif choice % 13 == 8:
                self.settle(self.m.path_dead(self.now, "write timed out"))
            else:
                self.m.written(self.now, seqs(action.rows))
        elif isinstance(action, Ping):
            assert self.stream_open and not self.m.in_flight
            if choice % 3 == 0:
                self.settle(self.m.path_dead(self.now, "ping timed out"))
            else:
                self.m.pong(self.now)
        elif isinstance(action, CloseStream):
            assert self.stream_open
            assert action.disconnect or action.note is None
            self.stream_open = False
        else:
            raise AssertionError(action)

    def apply(self, op: str, choice: int) -> None:
        m = self.m
        in_flight = m.in_flight
        if op == "step":
            self.step(choice)
        elif op == "ack" and in_flight:
            picked = {in_flight[(choice >> i) % len(in_flight)] for i in range(1 + choice % 3)}
            self.settle(m.acked(sorted(picked, reverse=choice % 2 == 0)))
        elif op == "late-ack" and self.ever_written:
            self.settle(m.acked([self.ever_written[choice % len(self.ever_written)]]))
        elif op == "unknown-ack":
            assert m.acked([mid(10_000_000 + choice)]) == []
        elif op == "nack" and in_flight:
            self.settle(m.nacked(in_flight[choice % len(in_flight)], "undecryptable"))
        elif op == "break" and self.stream_open:
            self.settle(m.stream_broken(self.now, "stream reset"))
        elif op == "dead" and self.stream_open:
            self.settle(m.path_dead(self.now, "ping timed out"))
        elif op == "advance":
            self.now += choice / 37
        elif op == "add":
            self.add(1 + choice % 9)
        elif op == "kick":
            m.kicked(self.now)
        elif op == "expire":
            before = dict(self.alive)
            self.settle(m.expire(T0_MS + int(self.now * 1000) + choice * 10))
            cutoff = T0_MS + int(self.now * 1000) + choice * 10 - int(self.config.fail_after_s * 1000)
            assert all(r.created_at_ms >= cutoff for r in self.alive.values())
            assert {s for s, r in before.items() if r.created_at_ms >= cutoff} == set(self.alive)
        elif op == "forget" and self.alive:
            seq = sorted(self.alive)[choice % len(self.alive)]
            del self.alive[seq]
            m.forget([mid(seq)])
        self.check()

    def check(self) -> None:
        m = self.m
        assert len(m.in_flight) <= self.config.max_in_flight
        assert seqs(m.pending()) == sorted(self.alive)
        assert set(m.in_flight) <= {r.message_id for r in m.pending()}
        assert self.stream_open or not m.status().connected  # connected means a stream

    def deliver_everything(self) -> None:
        """A good network from now on: every dial works and the device acks all it gets. The
        machine must deliver every row and stop."""
        for _ in range(10_000):
            self.settle(self.m.acked(self.m.in_flight))
            action = self.m.next_action(self.now)
            if isinstance(action, Stop):
                assert not self.alive
                return
            if isinstance(action, Wait):
                assert action.until > self.now
                self.now = action.until
            elif isinstance(action, Connect):
                self.m.dialing("peer", relays=False)
                self.m.connected(self.now)
                self.stream_open, self.round, self.round_last = True, set(), 0
            elif isinstance(action, Write):
                self.check_rows(action)
                self.m.written(self.now, seqs(action.rows))
            elif isinstance(action, Ping):
                self.m.pong(self.now)
            elif isinstance(action, CloseStream):
                self.stream_open = False
            elif isinstance(action, Refresh):
                self.m.refreshed(self.now, False)
            elif isinstance(action, Deposit):
                self.check_rows(action)
                self.settle(self.m.deposited(self.now, set(), None))
            self.check()
        raise AssertionError("the machine never finished")


schedules = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 10_000)), max_size=150)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=schedules, jitter=st.integers(0, 2**32), small=st.booleans(),
       relays=st.booleans(), refresh=st.booleans())
def test_random_schedules_keep_the_rules(schedule: list[tuple[str, int]], jitter: int,
                                         small: bool, relays: bool, refresh: bool) -> None:
    config = Settings(ack_timeout_s=2.0, retry_initial_s=0.1, retry_max_s=1.0, fail_after_s=50.0,
                      max_batch=3 if small else 256, max_in_flight=5 if small else 1024,
                      idle_stream_s=4.0, refresh_interval_s=3.0, can_deposit=relays,
                      can_refresh=refresh, keepalive_s=1.5 if small else None)
    shell = Shell(config, jitter)
    shell.add(8)
    for op, choice in schedule:
        shell.apply(op, choice)
    shell.deliver_everything()
    assert math.isfinite(shell.now)
