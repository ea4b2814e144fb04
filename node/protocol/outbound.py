"""The outbound machine: delivery to ONE recipient device, decided without doing any I/O
(PROTOCOL.md section 13 "Sending", and section 21 for deposits at the device's relays).

Pure and sans-IO like h11's `Connection`: the shell (node.device.outbound) feeds it events, each
with the current monotonic time `now` in seconds, and asks it what to do next. It never reads a
clock, a database, a socket or the global `random`; its jitter comes from the function or
`random.Random` it is given.

Rows. Every undelivered message for the device is one outbox row in the database; the machine
knows each by a small `OutRow` (send order `seq`, message id, creation time, whether its
encrypted payload is already stored, whether a relay holds it, whether it is a receipt). The
shell hands rows in with `add_rows` and tells it about rows settled elsewhere with `forget`.

Driving. `next_action(now)` returns the one thing to do now, and the shell reports its outcome
with the matching event before asking again:

    Connect      -> dialing(peer_id, relays=...), then connected(now) | connect_failed(now, error)
                    (or device_gone() when the device is no longer known)
    Refresh      -> refreshed(now, changed)        look the device's addresses up again (DHT)
    Deposit(rows)-> deposited(now, held, error)    seal and deposit these rows at the relays
    Write(rows)  -> written(now, seqs)             encrypt `to_encrypt`, write all of them
                    | stream_broken(now, error)    within the write deadline; a write that
                    | path_dead(now, error)        misses it is a dead path
    Ping         -> pong(now) | path_dead(now, error)   keepalive: ping the idle connection
    CloseStream(reset, disconnect, note)           end the stream: close it when idle, reset it
                                                   when it broke; `disconnect`: the path is dead,
                                                   close the whole connection too
    Wait(until)                                    nothing to do before `until` unless an event
                                                   comes (a kick, an ack, a broken stream)
    Stop                                           no rows left: the lane may end

Events that can come at any time (from the stream's reader, or from elsewhere in the node):
`acked(ids)`, `nacked(id, code)`, `stream_broken(now, error)`, `path_dead(now, error)`,
`kicked(now)`, `add_rows`, `forget`, `payloads_stored(seqs)`, and the expiry sweep
`expire(now_ms)`. Those that settle rows return effects for the shell to carry out at once:
`Delivered(ids)` (mark them delivered), `Fail(message_id, reason)` (mark the message failed),
`NoteError(error, repeated)` (show the last delivery error) and `ClearError()` (a stream opened
again: the error shown is stale).

Rules it implements:

- Rows are written in `seq` order, at most `max_batch` per write and at most `max_in_flight`
  written and not yet acknowledged. A row is written at most once per stream. A broken stream
  forgets what was in flight; the next stream starts again from the oldest row. Receivers drop
  duplicates by message id and acknowledge them again (PROTOCOL.md section 13, "Receiving").
- Liveness. A path is dead when an ack is overdue (`ack_timeout_s` after the oldest write still
  unacknowledged: a stream is reliable and ordered, and a live receiver acks or nacks every
  frame, so writing the rows again on the same connection cannot help), when a write misses
  its deadline, or when a keepalive ping goes unanswered (the shell reports `path_dead`). An
  open stream with nothing in flight is pinged every `keepalive_s` (None: never). A dead path
  counts as a failure like an unreachable device: the stream is reset and the connection closed
  (`CloseStream(disconnect=True)`: a silent connection would otherwise be reused by the next
  dial), every row no relay holds yet is deposited at the device's relays at once (the receiver
  de-duplicates whatever also arrives directly later), and the device is dialed again with
  backoff. `status().path_down` says why the path is down until a stream opens again; a stream
  that opens clears the last error (`ClearError`).
- A row whose payload is stored is never encrypted again: `Write.to_encrypt` and
  `Deposit.to_encrypt` name only rows without one, so a resend after a crash sends the same
  bytes. A machine built with `resume()` from the database's rows carries on from there.
- Failures (unreachable, broken stream) back off exponentially: the n-th failure in a row waits
  `min(retry_max_s, retry_initial_s * 2**(n-1))` times a jitter factor in [0.5, 1.0]; a stream
  that opens resets the count. A kick (new message, the device came online) retries at once.
- After a failed dial the device's addresses are looked up again, at most every
  `refresh_interval_s`; if they changed, the dial is retried at once. Otherwise, if the device has
  relays, every row no relay holds yet is deposited there, page by page in order; a page a relay
  refuses (in part) stops the deposits until the next failure, so order is kept. Deposited rows
  are still written to the direct stream once it opens; receipts are done once a relay holds them.
- A stream with nothing to write and nothing in flight is closed after `idle_stream_s`.
- `ack` settles the rows it names (in any order); `nack` fails the row with the reason, but only
  a row written on the current stream and not acknowledged yet: a device cannot refuse what it
  was never sent. Acks and nacks for ids the machine does not know are ignored.
  A `retry-later` nack fails nothing: the device could not store the row now (a full disk), so
  the stream is closed and everything unacknowledged is written again on a new one after
  RETRY_LATER_S (times the jitter), however many failures came before: the device is up and
  answering, and nothing on our side tells when its fault clears.
- `expire(now_ms)` fails rows created more than `fail_after_s` ago. It takes the Unix time in
  milliseconds, not `now`: rows are stamped when stored and outlive the process, so their age is
  measured on the clock that stamped them.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import math
import random
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from node.protocol.content import MESSAGE_ID_BYTES

__all__ = [
    "IDLE_STREAM_S",
    "JITTER_MAX",
    "JITTER_MIN",
    "KEEPALIVE_S",
    "NACK_REASONS",
    "REFRESH_INTERVAL_S",
    "RETRY_LATER",
    "RETRY_LATER_S",
    "Action",
    "ClearError",
    "CloseStream",
    "Connect",
    "Delivered",
    "Deposit",
    "Effect",
    "Fail",
    "LaneStatus",
    "NoteError",
    "OutRow",
    "OutboundMachine",
    "Ping",
    "Refresh",
    "Settings",
    "Stop",
    "Wait",
    "Write",
]

#: Seconds a lane keeps its stream open with nothing to send, so a conversation does not pay for
#: a new stream (~3 ms) on every message; after that the lane ends until the next message.
IDLE_STREAM_S: Final = 60.0

#: Least time between two lookups (DHT) of an unreachable device's current addresses: a lookup
#: costs tens of RPCs, and a device that is simply offline has not moved.
REFRESH_INTERVAL_S: Final = 30.0

#: Seconds between keepalive pings on an open stream with nothing in flight: with a ping timeout
#: of the same order, a silent path (a partition, a frozen or sleeping peer) is noticed within
#: about 10 s, so unacknowledged messages reach the device's relays well within 15 s.
KEEPALIVE_S: Final = 4.0

#: Range of the random factor applied to every backoff delay, so that many senders that failed
#: together (a relay or network outage) do not retry in lockstep.
JITTER_MIN: Final = 0.5
JITTER_MAX: Final = 1.0

#: Wait before writing rows again after a `retry-later` nack (PROTOCOL.md section 13): short,
#: since the device's storage fault (a full disk) clears without notice and delivery should
#: resume within seconds of it; not shorter, since each try costs the device a failed commit.
RETRY_LATER_S: Final = 2.0

#: The nack code that defers a message instead of refusing it (PROTOCOL.md section 15).
RETRY_LATER: Final = "retry-later"

#: What the user is told when a device refuses a message for good (PROTOCOL.md section 15).
NACK_REASONS: Final = {
    "undecryptable": "the recipient could not decrypt it (their session state was lost?)",
    "malformed": "the recipient rejected it as malformed",
    "unknown-sender": "the recipient does not know us (were they invited by someone else?)",
}


# --- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OutRow:
    """One outbox row as the machine sees it (the shell builds it from the stored row).

    `stored`: its encrypted payload is in the database (it must be sent as is, never encrypted
    again). `relayed`: at least one of the device's relays holds it (it is not deposited again).
    `receipt`: a receipt, which needs no confirmation once a relay holds it."""

    seq: int
    message_id: bytes
    created_at_ms: int
    stored: bool = False
    relayed: bool = False
    receipt: bool = False

    def __post_init__(self) -> None:
        if self.seq <= 0:
            raise ValueError("an outbox row's seq is positive")
        if len(self.message_id) != MESSAGE_ID_BYTES:
            raise ValueError(f"a message id has {MESSAGE_ID_BYTES} bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Timers and limits of the machine (the shell fills them from its Config and limits).

    `can_refresh`: the shell can look a device's addresses up again (it has a DHT).
    `can_deposit`: the shell can deposit at a device's relays.
    `keepalive_s`: ping an open stream's idle connection this often (None: never)."""

    ack_timeout_s: float
    retry_initial_s: float
    retry_max_s: float
    fail_after_s: float
    max_batch: int
    max_in_flight: int
    idle_stream_s: float = IDLE_STREAM_S
    refresh_interval_s: float = REFRESH_INTERVAL_S
    can_refresh: bool = False
    can_deposit: bool = False
    keepalive_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ack_timeout_s", "retry_initial_s", "retry_max_s", "fail_after_s",
                     "idle_stream_s", "refresh_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.keepalive_s is not None and not self.keepalive_s > 0:
            raise ValueError("keepalive_s must be positive (or None)")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be at least retry_initial_s")
        if self.max_batch < 1 or self.max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")


# --- actions (what next_action asks the shell to do) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a stream to the device (report `dialing`, then `connected` or `connect_failed`)."""


@dataclass(frozen=True, slots=True)
class Refresh:
    """Look the device's addresses and relays up again (report `refreshed`)."""


@dataclass(frozen=True, slots=True)
class Write:
    """Encrypt `to_encrypt` (committing payloads and ratchet state together), then write all
    `rows` in this order in one write (report `written`, `stream_broken`, or `path_dead` when the
    write missed its deadline)."""

    rows: tuple[OutRow, ...]

    @property
    def to_encrypt(self) -> tuple[OutRow, ...]:
        """The rows without a stored payload; the others are sent with the stored bytes."""
        return tuple(row for row in self.rows if not row.stored)


@dataclass(frozen=True, slots=True)
class Deposit:
    """Encrypt `to_encrypt`, seal every row and deposit them at the device's relays, in order
    (report `deposited`)."""

    rows: tuple[OutRow, ...]

    @property
    def to_encrypt(self) -> tuple[OutRow, ...]:
        """The rows without a stored payload; the others are sealed from the stored bytes."""
        return tuple(row for row in self.rows if not row.stored)


@dataclass(frozen=True, slots=True)
class Ping:
    """Ping the device over the open stream's connection, within the shell's ping deadline
    (report `pong`, or `path_dead` when no answer came in time)."""


@dataclass(frozen=True, slots=True)
class CloseStream:
    """End the stream and stop reading it: `reset` when it broke, a clean close when idle.
    `disconnect`: the path is dead; close the device's connection too (bounded in time), so the
    next dial does not reuse it. `note`: an error found by the machine itself (an overdue ack),
    to show like a `NoteError` effect."""

    reset: bool
    disconnect: bool = False
    note: NoteError | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do before `until` (monotonic seconds) unless an event comes first."""

    until: float


@dataclass(frozen=True, slots=True)
class Stop:
    """No rows left for the device: the lane may end (a new row starts it again)."""


Action = Connect | Refresh | Write | Deposit | Ping | CloseStream | Wait | Stop


# --- effects (returned by the events that settle rows) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    """The device acknowledged these messages: mark them delivered."""

    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Fail:
    """Mark the message failed with `reason` (a nack, or too old)."""

    message_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class NoteError:
    """The latest delivery error, to show the user. `repeated`: the same as the one before (a
    device that stays unreachable fails the same way on every retry: say it once)."""

    error: str
    repeated: bool


@dataclass(frozen=True, slots=True)
class ClearError:
    """A stream to the device opened: forget the delivery error shown (it is stale)."""


Effect = Delivered | Fail | NoteError | ClearError


@dataclass(frozen=True, slots=True)
class LaneStatus:
    """What `pigeon status` shows about delivery to one device. `path_down`: why the last
    path to it ended or could not be opened (None while a stream is open, or before any
    failure)."""

    peer_id: str
    connected: bool
    in_flight: int
    attempts: int
    last_error: str | None
    path_down: str | None = None


class _Phase(enum.Enum):
    IDLE = "idle"              # no stream; dial when retry_at has come (and there are rows)
    DIALING = "dialing"        # Connect handed out
    REFRESH = "refresh"        # the dial failed; Refresh is next
    REFRESHING = "refreshing"  # Refresh handed out
    DEPOSITING = "depositing"  # depositing the backlog, page by page
    OPEN = "open"              # a stream is open
    CLOSING = "closing"        # CloseStream is next


# --- the machine -----------------------------------------------------------------------------------


class OutboundMachine:
    """Delivery to one recipient device (see the module docstring for the rules).

    `jitter`: a `random.Random` (a factor is drawn uniformly from [JITTER_MIN, JITTER_MAX]) or a
    function returning such a factor (tests pass fixed ones)."""

    def __init__(self, settings: Settings, *, jitter: random.Random | Callable[[], float]
                 ) -> None:
        self.settings = settings
        if isinstance(jitter, random.Random):
            rng = jitter
            self._jitter: Callable[[], float] = lambda: rng.uniform(JITTER_MIN, JITTER_MAX)
        else:
            self._jitter = jitter
        self.peer_id = ""
        self.attempts = 0  # failures in a row (dial or stream); reset when a stream opens
        self.last_error: str | None = None
        self._rows: dict[int, OutRow] = {}       # seq -> row, every unsettled row
        self._seqs: list[int] = []               # sorted; may still hold settled seqs (skipped)
        self._by_id: dict[bytes, int] = {}       # message id -> seq
        self._last_seq = 0
        self._phase = _Phase.IDLE
        self._outstanding: type[Action] | None = None  # the action being carried out
        self._retry_at = -math.inf
        self._kick_pending = False
        self._refreshed_at = -math.inf
        self._relays = False  # the device being dialed has relays
        self._deposit_after = 0
        self._deposit_batch: tuple[OutRow, ...] = ()
        self._close_reset = False
        self._close_disconnect = False
        self._close_note: NoteError | None = None
        self._dead = False  # the stream being closed ended because the path is dead
        self.path_down: str | None = None
        # on the open stream:
        self._in_flight: dict[bytes, float] = {}  # message id -> written at; in write order
        self._written_upto = 0                    # rows up to this seq were written (this round)
        self._idle_since: float | None = None
        self._ping_at: float | None = None       # when the idle stream is pinged next

    @classmethod
    def resume(cls, settings: Settings, stored: Iterable[OutRow], *,
               jitter: random.Random | Callable[[], float]) -> OutboundMachine:
        """A machine for rows found in the database, e.g. after a crash or a restart. Rows with a
        stored payload are written (or deposited) with those bytes, never encrypted again; rows a
        relay holds are not deposited again; everything is written on the next stream, oldest
        first, since nothing says the device received it."""
        machine = cls(settings, jitter=jitter)
        machine.add_rows(stored)
        return machine

    # --- rows ---------------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The highest seq ever handed in: the shell adds rows after it."""
        return self._last_seq

    def add_rows(self, rows: Iterable[OutRow]) -> None:
        """Rows queued for the device. Rows already known are ignored."""
        for row in rows:
            if row.seq in self._rows or row.message_id in self._by_id:
                continue
            if row.seq > self._last_seq:
                self._seqs.append(row.seq)
                self._last_seq = row.seq
            else:
                # An older row found again (the shell re-read the database). It is written on
                # the next stream or resend: writing it now would repeat the rows after it.
                bisect.insort(self._seqs, row.seq)
                self._deposit_after = min(self._deposit_after, row.seq - 1)
            self._rows[row.seq] = row
            self._by_id[row.message_id] = row.seq

    def forget(self, ids: Iterable[bytes]) -> None:
        """These messages were settled elsewhere (a receipt through a relay, failed for every
        device, gone from the database): drop their rows."""
        for message_id in ids:
            self._remove(message_id)

    def payloads_stored(self, seqs: Iterable[int]) -> None:
        """The shell committed encrypted payloads for these rows."""
        for seq in seqs:
            row = self._rows.get(seq)
            if row is not None and not row.stored:
                self._rows[seq] = dataclasses.replace(row, stored=True)

    def relays_changed(self, now: float) -> None:
        """The device receives at other relays now (PROTOCOL.md section 28.3): what the old
        ones hold may never reach it (a relay that died with its disk), so every unsettled row
        is deposited again at the new ones; the receiver drops the second copy of what it
        already has (section 13)."""
        for seq, row in list(self._rows.items()):
            if row.relayed and not row.receipt:
                self._rows[seq] = dataclasses.replace(row, relayed=False)
        self._deposit_after = 0
        self.kicked(now)

    def pending(self) -> tuple[OutRow, ...]:
        """Every unsettled row, in send order."""
        return tuple(self._iter_rows(0))

    # --- dialing ------------------------------------------------------------------------------

    def kicked(self, now: float) -> None:
        """There may be new work, or the device came online: stop waiting for a retry."""
        if self._phase in (_Phase.IDLE, _Phase.CLOSING):
            self._retry_at = min(self._retry_at, now)
        elif self._phase is not _Phase.OPEN:
            self._kick_pending = True  # retry at once when the dial, refresh or deposit is over

    def dialing(self, peer_id: str, *, relays: bool) -> None:
        """The shell dials `peer_id`; `relays`: the device has relays we could deposit at."""
        self._expect(Connect)
        self.peer_id = peer_id
        self._relays = relays

    def device_gone(self) -> None:
        """The device is no longer known (the contact was removed): nothing left to deliver."""
        self._expect(Connect)
        self._outstanding = None
        self._phase = _Phase.IDLE
        self.forget(list(self._by_id))

    def connected(self, now: float) -> list[Effect]:
        """The stream is open: the path is up again, and the last error is stale."""
        self._expect(Connect)
        self._outstanding = None
        self._phase = _Phase.OPEN
        self.attempts = 0
        self._kick_pending = False
        self._in_flight.clear()
        self._written_upto = 0
        self._idle_since = None
        self._ping_at = None
        self.path_down = None
        self.last_error = None
        # Always: an error stored by an earlier run of the node is just as stale.
        return [ClearError()]

    def connect_failed(self, now: float, error: str) -> list[Effect]:
        """The stream could not be opened."""
        self._expect(Connect)
        self._outstanding = None
        self.attempts += 1
        self.path_down = error
        effects: list[Effect] = [self._note_error(error)]
        settings = self.settings
        if settings.can_refresh and now >= self._refreshed_at + settings.refresh_interval_s:
            self._phase = _Phase.REFRESH
        else:
            self._fall_back(now)
        return effects

    def refreshed(self, now: float, changed: bool) -> None:
        """The lookup is over; `changed`: the device has new addresses or relays."""
        self._expect(Refresh)
        self._outstanding = None
        if changed:
            self._phase, self._retry_at = _Phase.IDLE, now  # try them at once
        else:
            self._fall_back(now)

    def deposited(self, now: float, held: Collection[int], error: str | None, *,
                  passing: bool = False) -> list[Effect]:
        """Of the last `Deposit`, the rows (seqs) at least one relay now holds; `error`: what the
        relays said about the others (or why the deposit failed). `passing`: the relays refused
        for a reason that clears by itself (a full disk, a rate limit: PROTOCOL.md section 21),
        so the page is tried again after RETRY_LATER_S, not after the growing backoff of an
        unreachable device (which would keep a relay whose disk was full for an hour waiting a
        minute after its space returned)."""
        self._expect(Deposit)
        self._outstanding = None
        batch, self._deposit_batch = self._deposit_batch, ()
        refused = False
        for row in batch:
            current = self._rows.get(row.seq)
            if current is None:
                continue  # settled meanwhile
            if row.seq not in held:
                refused = True
            elif current.receipt:
                self._remove(current.message_id)  # a receipt is done once a relay holds it
            else:
                self._rows[row.seq] = dataclasses.replace(current, relayed=True)
        effects: list[Effect] = [self._note_error(error)] if error else []
        if refused:
            self._start_backoff(now)  # keep the order: try this page again next time
            if passing:
                self._retry_at = min(self._retry_at,
                                     now + RETRY_LATER_S * self._checked_jitter())
        elif batch:
            self._deposit_after = batch[-1].seq
        return effects

    # --- the stream ---------------------------------------------------------------------------

    def written(self, now: float, seqs: Iterable[int]) -> None:
        """The last `Write` is done: these rows (those of it the shell still found) were written."""
        if self._outstanding is Write:
            self._outstanding = None
        # (the shell reports a write that missed its deadline with `path_dead` instead)
        if self._phase is not _Phase.OPEN:
            return  # the stream broke meanwhile
        for seq in seqs:
            row = self._rows.get(seq)
            if row is not None and row.message_id in self._in_flight:
                self._in_flight[row.message_id] = now  # the ack timeout runs from the write

    def acked(self, ids: Iterable[bytes]) -> list[Effect]:
        """The device acknowledged these ids (in any order; unknown ones are ignored)."""
        settled = tuple(mid for mid in dict.fromkeys(ids) if self._remove(mid))
        return [Delivered(settled)] if settled else []

    def nacked(self, message_id: bytes, code: str, *, now: float | None = None) -> list[Effect]:
        """The device refused this message: for good, or with `retry-later` (which needs `now`)
        for now: then the stream is closed and the rows are written again after RETRY_LATER_S.
        Only a message written to it on this stream and not settled yet can be refused: a nack
        naming anything else (another device's message, a row not written yet) is ignored, since
        a device can only refuse what it received (PROTOCOL.md section 13)."""
        if message_id not in self._in_flight:
            return []
        if code == RETRY_LATER:
            if now is None:
                raise ValueError("a retry-later nack needs the time")
            effects = self.stream_broken(
                now, "the device cannot store messages right now (its disk may be full);"
                     " retrying")
            if effects:
                self._retry_at = now + RETRY_LATER_S * self._checked_jitter()
            return effects
        if not self._remove(message_id):
            return []
        return [Fail(message_id, NACK_REASONS.get(code, code))]

    def stream_broken(self, now: float, error: str) -> list[Effect]:
        """The stream failed (reset, closed by the device, a bad frame, a failed write, a failed
        commit): reset it and retry after a backoff. Ignored once the stream is already gone."""
        if self._phase is not _Phase.OPEN:
            return []
        self._end_stream(now, error, dead=False)
        return [self._note_error(error)]

    def path_dead(self, now: float, error: str) -> list[Effect]:
        """The path went silent (a write missed its deadline, a keepalive ping went unanswered):
        reset the stream, close the connection, deposit what no relay holds yet, and dial again
        with backoff. Ignored once the stream is already gone."""
        if self._outstanding is Ping:
            self._outstanding = None
        if self._phase is not _Phase.OPEN:
            return []
        self._end_stream(now, error, dead=True)
        return [self._note_error(error)]

    def pong(self, now: float) -> None:
        """The keepalive ping was answered: the path is alive."""
        if self._outstanding is Ping:
            self._outstanding = None
        if self._phase is _Phase.OPEN and self._ping_at is not None:
            self._ping_at = now + self._keepalive()

    # --- expiry -------------------------------------------------------------------------------

    def expire(self, now_ms: int) -> list[Effect]:
        """Fail the rows created more than `fail_after_s` before `now_ms` (Unix milliseconds)."""
        cutoff = now_ms - int(self.settings.fail_after_s * 1000)
        reason = f"not delivered within {self.settings.fail_after_s:g} s"
        if self.last_error:
            reason += f" (last error: {self.last_error})"
        old = [row.message_id for row in self._iter_rows(0) if row.created_at_ms < cutoff]
        for message_id in old:
            self._remove(message_id)
        return [Fail(message_id, reason) for message_id in old]

    # --- what next ----------------------------------------------------------------------------

    def next_action(self, now: float) -> Action:
        """The one thing to do now. The shell carries it out and reports the outcome (see the
        module docstring) before asking again; asking while it is still outstanding is a bug."""
        if self._outstanding is not None:
            raise RuntimeError(f"{self._outstanding.__name__} is still being carried out")
        phase = self._phase
        if phase is _Phase.OPEN:
            return self._next_on_stream(now)
        if phase is _Phase.CLOSING:
            if self._dead and self.settings.can_deposit and self._relays:
                self._phase, self._deposit_after = _Phase.DEPOSITING, 0
            else:
                self._phase = _Phase.IDLE
            note, self._close_note = self._close_note, None
            return CloseStream(reset=self._close_reset, disconnect=self._close_disconnect,
                               note=note)
        if phase is _Phase.REFRESH:
            self._phase, self._outstanding = _Phase.REFRESHING, Refresh
            self._refreshed_at = now
            return Refresh()
        if phase is _Phase.DEPOSITING:
            batch = tuple(self._deposit_page())
            if batch:
                self._deposit_batch, self._outstanding = batch, Deposit
                return Deposit(batch)
            self._start_backoff(now)
        assert self._phase is _Phase.IDLE, self._phase
        if not self._rows:
            return Stop()
        if now < self._retry_at:
            return Wait(self._retry_at)
        self._phase, self._outstanding = _Phase.DIALING, Connect
        return Connect()

    def next_deadline(self) -> float | None:
        """When a timer of the machine fires next (a retry, an overdue ack, an idle stream), or
        None if none runs. Events may make something due earlier; `next_action` tells."""
        if self._phase is _Phase.IDLE:
            return self._retry_at if self._rows and self._retry_at > -math.inf else None
        if self._phase is _Phase.OPEN:
            if self._in_flight:
                return next(iter(self._in_flight.values())) + self.settings.ack_timeout_s
            if self._idle_since is not None:
                idle_end = self._idle_since + self.settings.idle_stream_s
                return idle_end if self._ping_at is None else min(idle_end, self._ping_at)
        return None

    def status(self) -> LaneStatus:
        """The device's peer id, whether a stream is open, how many rows are in flight, failures
        in a row and the last error."""
        return LaneStatus(self.peer_id, self._phase is _Phase.OPEN, len(self._in_flight),
                          self.attempts, self.last_error, self.path_down)

    @property
    def in_flight(self) -> tuple[bytes, ...]:
        """Ids written on the stream and not acknowledged yet, oldest first."""
        return tuple(self._in_flight)

    # --- internals ----------------------------------------------------------------------------

    def _next_on_stream(self, now: float) -> Action:
        settings = self.settings
        if self._in_flight:
            oldest = next(iter(self._in_flight.values()))
            if now >= oldest + settings.ack_timeout_s:
                # An ack is overdue: the path is dead (see the module docstring, "Liveness").
                error = f"path down: no ack within {settings.ack_timeout_s:g} s"
                self._end_stream(now, error, dead=True)
                self._close_note = self._note_error(error)
                return self.next_action(now)
        room = settings.max_in_flight - len(self._in_flight)
        batch: list[OutRow] = []
        if room > 0:
            for row in self._iter_rows(self._written_upto):
                batch.append(row)
                if len(batch) >= min(settings.max_batch, room):
                    break
        if batch:
            self._idle_since = self._ping_at = None
            for row in batch:
                self._in_flight[row.message_id] = now
            self._written_upto = batch[-1].seq
            self._outstanding = Write
            return Write(tuple(batch))
        if self._in_flight:
            return Wait(next(iter(self._in_flight.values())) + settings.ack_timeout_s)
        if self._idle_since is None:
            self._idle_since = now
            if settings.keepalive_s is not None:
                self._ping_at = now + self._keepalive()
        if now >= self._idle_since + settings.idle_stream_s:
            # Idle long enough: give the stream back; new rows dial again at once.
            self._phase, self._close_reset, self._close_disconnect = _Phase.CLOSING, False, False
            self._dead = False
            self._idle_since = self._ping_at = None
            self._retry_at = now
            return self.next_action(now)
        if self._ping_at is not None and now >= self._ping_at:
            self._outstanding = Ping
            return Ping()
        idle_end = self._idle_since + settings.idle_stream_s
        return Wait(idle_end if self._ping_at is None else min(idle_end, self._ping_at))

    def _keepalive(self) -> float:
        assert self.settings.keepalive_s is not None
        return self.settings.keepalive_s

    def _end_stream(self, now: float, error: str, *, dead: bool) -> None:
        """The open stream ends in failure: forget what was in flight, count a failure, and
        close it next (reset; a dead path also closes the connection and deposits)."""
        if self._outstanding in (Write, Ping):
            self._outstanding = None
        self.attempts += 1
        self.path_down = error
        self._in_flight.clear()
        self._written_upto = 0
        self._idle_since = self._ping_at = None
        self._phase, self._close_reset, self._close_disconnect = _Phase.CLOSING, True, dead
        self._dead = dead
        self._retry_at = now + self._backoff()

    def _fall_back(self, now: float) -> None:
        """After a failed dial (and lookup): deposit at the relays if there are any, then wait."""
        if self.settings.can_deposit and self._relays:
            self._phase, self._deposit_after = _Phase.DEPOSITING, 0
        else:
            self._start_backoff(now)

    def _start_backoff(self, now: float) -> None:
        self._phase = _Phase.IDLE
        if self._kick_pending:
            self._kick_pending = False
            self._retry_at = now
        else:
            self._retry_at = now + self._backoff()

    def _backoff(self) -> float:
        settings = self.settings
        doublings = min(max(self.attempts - 1, 0), 64)
        delay = min(settings.retry_max_s, settings.retry_initial_s * 2.0 ** doublings)
        return delay * self._checked_jitter()

    def _checked_jitter(self) -> float:
        factor = self._jitter()
        if not JITTER_MIN <= factor <= JITTER_MAX:
            raise ValueError(f"jitter factor {factor} outside [{JITTER_MIN}, {JITTER_MAX}]")
        return factor

    def _deposit_page(self) -> Iterator[OutRow]:
        count = 0
        for row in self._iter_rows(self._deposit_after):
            if row.relayed:
                continue
            yield row
            count += 1
            if count >= self.settings.max_batch:
                return

    def _note_error(self, error: str) -> NoteError:
        repeated = error == self.last_error
        self.last_error = error
        return NoteError(error, repeated)

    def _expect(self, action: type[Action]) -> None:
        if self._outstanding is not action:
            raise RuntimeError(f"no {action.__name__} is being carried out")

    def _iter_rows(self, after_seq: int) -> Iterator[OutRow]:
        """Unsettled rows with seq > after_seq, in order."""
        seqs, rows = self._seqs, self._rows
        for i in range(bisect.bisect_right(seqs, after_seq), len(seqs)):
            row = rows.get(seqs[i])
            if row is not None:
                yield row

    def _remove(self, message_id: bytes) -> bool:
        seq = self._by_id.pop(message_id, None)
        if seq is None:
            return False
        del self._rows[seq]
        self._in_flight.pop(message_id, None)
        if len(self._seqs) > 2 * len(self._rows) + 64:  # drop settled seqs now and then
            self._seqs = [s for s in self._seqs if s in self._rows]
        return True
