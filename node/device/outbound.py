"""The outbox engine: delivers every queued message to every recipient device, exactly once in
the recipient's view, in order, or marks it failed with a reason.

One `Lane` per recipient device. A lane opens one long-lived stream to the device, encrypts the
queued rows in order (ratchet state and ciphertext committed in one transaction, so a crash never
re-encrypts under a different key), writes them in batches, and reads end-to-end acks back on
the same stream. Unacknowledged rows are resent from the oldest when the stream breaks or an ack
is overdue; the receiver drops duplicates by message id and acks them again. An unreachable
device is retried with exponential backoff and jitter; a connection from it, or a new message,
wakes the lane at once. Rows older than `Config.fail_after_s` are marked failed.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from node.device.config import MAX_BATCH, MAX_IN_FLIGHT, SEEN_RETENTION_S, Config
from node.device.eventbus import EventBus
from node.device.events import Event, MessageDelivered, MessageFailed, MessageSent
from node.device.relay_client import Depositor
from node.device.session_store import SessionStore
from node.device.storage import Database, OutboxRow
from node.errors import DecodeError, NodeError, RemoteError, StorageError, TransportError
from node.net import MSG_PROTOCOL, FrameStream, Transport
from node.protocol.content import Intro, Receipt, Text, encode_content
from node.protocol.keys import DeviceKey
from node.protocol.wire import Ack, Msg, Nack, decode_frame, encode_frame

log = logging.getLogger("pigeon.delivery")

#: Seconds a lane keeps its stream open with nothing to send, so a conversation does not pay for
#: a new stream (~3 ms) on every message; after that the lane ends until the next message.
IDLE_STREAM_S = 60.0

#: Least time between two lookups (DHT) of an unreachable device's current addresses: a lookup
#: costs tens of RPCs, and a device that is simply offline has not moved.
REFRESH_INTERVAL_S = 30.0

__all__ = ["Outbound", "intro_body"]

NACK_REASONS = {
    "undecryptable": "the recipient could not decrypt it (their session state was lost?)",
    "malformed": "the recipient rejected it as malformed",
    "unknown-sender": "the recipient does not know us (were they invited by someone else?)",
}


@dataclass
class LaneStatus:
    peer_id: str
    connected: bool
    in_flight: int
    attempts: int
    last_error: str | None


class Outbound:
    """All lanes of a node, plus the sweeper that fails messages past their age."""

    def __init__(
        self,
        *,
        db: Database,
        sessions: SessionStore,
        transport: Transport,
        bus: EventBus,
        config: Config,
        now_ms: Callable[[], int],
        intro_addrs: Callable[[], list[str]],
        depositor: Depositor | None = None,
        refresh_device: Callable[[bytes], Awaitable[bool]] | None = None,
    ) -> None:
        self.db = db
        self.sessions = sessions
        self.transport = transport
        self.bus = bus
        self.config = config
        self.now_ms = now_ms
        self.intro_addrs = intro_addrs
        self.depositor = depositor
        self.refresh_device = refresh_device
        self._lanes: dict[bytes, Lane] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for device in self.db.outbox_devices():
                self.kick(device)
            nursery.start_soon(self._sweep_forever)
            task_status.started()
            await trio.sleep_forever()

    def kick(self, device: bytes) -> None:
        """There may be work for `device` (new message, it came online): wake or start its lane."""
        lane = self._lanes.get(device)
        if lane is None:
            if self._nursery is None:
                return
            lane = self._lanes[device] = Lane(self, device)
            self._nursery.start_soon(self._run_lane, lane)
        lane.wake()

    async def _run_lane(self, lane: Lane) -> None:
        try:
            await lane.run()
        except Exception:
            # A bug must not take the node down: the lane ends, the next kick starts a new one.
            log.exception("delivery lane for %s crashed", lane.peer_id or lane.device.hex()[:16])
        finally:
            if self._lanes.get(lane.device) is lane:
                del self._lanes[lane.device]

    def status(self) -> dict[bytes, LaneStatus]:
        return {device: lane.status() for device, lane in self._lanes.items()}

    async def _sweep_forever(self) -> None:
        """Housekeeping on a timer: fail messages past their age, and forget the ids of received
        messages older than SEEN_RETENTION_S (their senders stopped resending long ago)."""
        interval = min(60.0, max(0.5, self.config.fail_after_s / 10))
        while True:
            self.fail_expired()
            with self.db.transaction(durable=False):
                self.db.prune_seen(before_ms=self.now_ms() - SEEN_RETENTION_S * 1000)
            await trio.sleep(interval)

    def fail_expired(self) -> None:
        cutoff = self.now_ms() - int(self.config.fail_after_s * 1000)
        failed: set[int] = set()
        for row in self.db.outbox_expired(before_ms=cutoff):
            if row.message_rowid in failed:
                continue
            failed.add(row.message_rowid)
            reason = f"not delivered within {self.config.fail_after_s:g} s"
            lane = self._lanes.get(row.device)
            if lane is not None and lane.last_error:
                reason += f" (last error: {lane.last_error})"
            self._fail(row.message_rowid, row.message_id, reason)

    def record_delivered(self, device: bytes, ids: Sequence[bytes]) -> list[Event]:
        """`device` confirmed these messages (an ack frame, or a receipt that came through a
        relay): drop their outbox rows, stop repeating the PQXDH header in the sessions they
        used, and return the MessageDelivered events to publish once the caller's transaction
        (inside which this runs) is committed."""
        delivered = self.db.mark_delivered(device, ids, now_ms=self.now_ms())
        if not delivered:
            return []
        contact = self.db.contact_by_id(delivered[0][0].contact_id)
        if contact is None:
            return []
        bases = {base for _, base in delivered if base is not None}
        record = self.sessions.record(contact.account, device)
        if bases and any(s.pending is not None for s in [record.current, *record.archived] if s):
            for base in bases:
                record.acknowledge(base)
            self.sessions.save(contact.account, device)
        return [MessageDelivered(message_id=message.id.hex(), contact=contact.name)
                for message, _ in delivered if message.kind == "text"]

    def _fail(self, message_rowid: int, message_id: bytes, reason: str) -> None:
        message = self.db.message(message_id)
        self.db.mark_failed(message_rowid, reason, now_ms=self.now_ms())
        if message is not None:
            contact = self.db.contact_by_id(message.contact_id)
            if message.kind == "text" and contact is not None:
                self.bus.publish(MessageFailed(message_id=message_id.hex(), contact=contact.name,
                                               reason=reason))
        log.info("message %s failed: %s", message_id.hex(), reason)


class Lane:
    """Delivery to one device."""

    def __init__(self, outbound: Outbound, device: bytes) -> None:
        self.out = outbound
        self.device = device
        self.peer_id = ""
        self._wake = trio.Event()
        self._stream: FrameStream | None = None
        self._in_flight: dict[bytes, float] = {}  # message id -> when written (trio clock)
        self.attempts = 0
        self.last_error: str | None = None
        self._refreshed_at = -math.inf

    def wake(self) -> None:
        self._wake.set()

    async def _wait_wake(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._wake.wait()
        self._wake = trio.Event()

    def status(self) -> LaneStatus:
        return LaneStatus(self.peer_id, self._stream is not None, len(self._in_flight),
                          self.attempts, self.last_error)

    # --- main loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        db = self.out.db
        while True:
            target = db.device(self.device)
            if target is None or not db.outbox_for(self.device, limit=1):
                return  # nothing to do (or the contact was removed): the lane ends
            self.peer_id = target.peer_id
            try:
                stream = await self.out.transport.open_stream(
                    target.peer_id, target.addrs, MSG_PROTOCOL,
                    timeout=self.out.config.connect_timeout_s,
                )
            except TransportError as exc:
                self._note_error(f"unreachable: {exc}")
                if await self._refresh_addresses():
                    continue  # the device published new addresses: try them at once
                if target.relays and self.out.depositor is not None:
                    # Not reachable in time: leave the messages at the device's relays. The lane
                    # keeps trying the direct path (with backoff) until the receipt comes.
                    try:
                        await self._deposit_backlog(target.relays)
                    except (RemoteError, StorageError) as deposit_error:
                        self._note_error(f"deposit failed: {deposit_error}")
                await self._wait_wake(self._backoff())
                continue
            self.attempts = 0
            self._stream = stream
            error = await self._pump(stream)
            self._stream = None
            self._in_flight.clear()
            if error is None:
                await stream.aclose()
            else:
                self._note_error(str(error))
                await stream.reset()
                await self._wait_wake(self._backoff())

    async def _pump(self, stream: FrameStream) -> NodeError | None:
        """Write and read replies until idle (None) or until the stream fails (the error)."""
        error: NodeError | None = None

        async def guarded(step: Callable[[FrameStream], Awaitable[None]]) -> None:
            nonlocal error
            try:
                await step(stream)
            except (RemoteError, StorageError) as exc:
                error = error or exc
            finally:
                nursery.cancel_scope.cancel()  # either side ending ends the other

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, self._read_replies)
            nursery.start_soon(guarded, self._write_until_idle)
        return error

    async def _refresh_addresses(self) -> bool:
        """Look the device up again (DHT), at most every REFRESH_INTERVAL_S: its addresses may
        be stale (it restarted on new ports, moved networks). True if they changed."""
        refresh = self.out.refresh_device
        now = trio.current_time()
        if refresh is None or now - self._refreshed_at < REFRESH_INTERVAL_S:
            return False
        self._refreshed_at = now
        try:
            return await refresh(self.device)
        except (RemoteError, StorageError) as exc:
            log.info("looking up %s again failed: %s", self.peer_id, exc)
            return False

    def _note_error(self, error: str) -> None:
        self.attempts += 1
        # A device that stays unreachable fails the same way on every retry: say it once.
        level = logging.DEBUG if error == self.last_error else logging.INFO
        log.log(level, "delivery to %s: %s", self.peer_id or self.device.hex()[:16], error)
        self.last_error = error
        self.out.db.set_outbox_error(self.device, error)

    def _backoff(self) -> float:
        config = self.out.config
        delay = min(config.retry_max_s, config.retry_initial_s * 2 ** min(self.attempts, 30))
        return delay * random.uniform(0.5, 1.0)

    async def _write_until_idle(self, stream: FrameStream) -> None:
        """Write queued rows in order until everything was acknowledged."""
        db = self.out.db
        ack_timeout = self.out.config.ack_timeout_s
        written_upto = 0
        idle_since: float | None = None
        while True:
            now = trio.current_time()
            overdue = [t for t in self._in_flight.values() if now - t > ack_timeout]
            if overdue:
                # An ack is overdue: resend everything unacknowledged, oldest first.
                log.info("acks from %s overdue; resending %d", self.peer_id, len(self._in_flight))
                written_upto = 0
                self._in_flight.clear()
            room = MAX_IN_FLIGHT - len(self._in_flight)
            rows = db.outbox_for(self.device, limit=min(MAX_BATCH, room), after_seq=written_upto) \
                if room > 0 else []
            if not rows:
                if not self._in_flight:
                    if idle_since is None:
                        idle_since = now
                    elif now - idle_since >= IDLE_STREAM_S:
                        return  # idle long enough: give the stream back
                    await self._wait_wake(idle_since + IDLE_STREAM_S - now)
                    continue
                oldest = min(self._in_flight.values())
                await self._wait_wake(max(0.01, oldest + ack_timeout - now))
                continue
            idle_since = None
            payloads, newly_sent = self._prepare(rows)
            if not payloads:
                continue
            await stream.send([encode_frame(Msg(mid, payload)) for _, mid, payload in payloads])
            sent_at = trio.current_time()
            for _, mid, _ in payloads:
                self._in_flight[mid] = sent_at
            written_upto = rows[-1].seq
            if newly_sent:
                contact = db.contact_by_account(rows[0].account)  # a lane serves one contact
                for row in rows:
                    if row.message_rowid in newly_sent and row.kind == "text" and contact:
                        self.out.bus.publish(MessageSent(message_id=row.message_id.hex(),
                                                         contact=contact.name))

    async def _deposit_backlog(self, relays: Sequence[str]) -> None:
        """Seal and deposit every row no relay holds yet, in order, page by page. A page every
        relay refuses stays pending with the relays' reasons shown; the next attempt retries."""
        depositor = self.out.depositor
        assert depositor is not None
        db, after = self.out.db, 0
        while rows := db.outbox_to_deposit(self.device, limit=MAX_BATCH, after_seq=after):
            ready, _ = self._prepare(rows, mark_sent=False)
            held, errors = await depositor.deposit(
                relays, DeviceKey(self.device), [(mid, payload) for _, mid, payload in ready])
            relayed = [seq for (seq, _, _), copies in zip(ready, held, strict=True) if copies]
            newly = set(db.mark_relayed(relayed, now_ms=self.out.now_ms()))
            contact = db.contact_by_account(rows[0].account)
            for row in rows:
                if row.message_rowid in newly and row.kind == "text" and contact:
                    self.out.bus.publish(MessageSent(message_id=row.message_id.hex(),
                                                     contact=contact.name))
            if errors:
                self._note_error("; ".join(errors))
            if len(relayed) < len(ready):
                return  # refused: keep the order, try again later
            after = rows[-1].seq

    def _prepare(self, rows: list[OutboxRow], *, mark_sent: bool = True
                 ) -> tuple[list[tuple[int, bytes, bytes]], set[int]]:
        """In one transaction: encrypt the rows not encrypted yet (with the ratchet state they
        advance) and mark all of them sent. Returns (seq, message id, payload) per row and the
        rowids of messages that went from pending to sent.

        "sent" is recorded just before the write: if the write fails, the stream is reset and the
        rows are written again on the next one, like any unacknowledged row. Deposits mark rows
        relayed instead, once a relay holds them (`mark_sent=False`)."""
        out_ = self.out
        todo = [r for r in rows if r.payload is None]
        payloads = {r.seq: r.payload for r in rows if r.payload is not None}
        account = rows[0].account
        record = out_.sessions.record(account, self.device) if todo else None
        if record is not None and not record.can_encrypt:
            for row in todo:
                out_._fail(row.message_rowid, row.message_id,
                           "no session with this device (add the contact again from an invite)")
            todo, record = [], None
        try:
            with out_.db.transaction():
                encrypted_rows = []
                for row in todo:
                    assert record is not None
                    encrypted = record.encrypt(encode_content(self._content(row)))
                    encrypted_rows.append((row.seq, encrypted.message, encrypted.session_base_key))
                    payloads[row.seq] = encrypted.message
                if record is not None:
                    out_.db.set_payloads(encrypted_rows)
                    out_.sessions.save(account, self.device)
                ready = [(r.seq, r.message_id, p) for r in rows if (p := payloads.get(r.seq))]
                newly_sent = set(out_.db.mark_sent([seq for seq, _, _ in ready],
                                                   now_ms=out_.now_ms())) if mark_sent else set()
        except BaseException:
            if record is not None:
                out_.sessions.forget([(account, self.device)])
            raise
        return ready, newly_sent

    def _content(self, row: OutboxRow) -> Text | Intro | Receipt:
        """The content of a row; an intro gets our addresses and relays as they are at
        encryption time."""
        if row.kind == "text":
            return Text(id=row.message_id, sent_at_ms=row.sent_at_ms, body=row.body)
        if row.kind == "receipt":
            return Receipt(id=row.message_id, sent_at_ms=row.sent_at_ms,
                           ids=tuple(bytes.fromhex(i) for i in json.loads(row.body)))
        intro = json.loads(row.body)
        token = bytes.fromhex(intro["token"]) if intro.get("token") else None
        return Intro(id=row.message_id, sent_at_ms=row.sent_at_ms, name=intro["name"],
                     addrs=tuple(self.out.intro_addrs()), relays=tuple(self.out.config.relays),
                     token=token)

    # --- replies --------------------------------------------------------------------------------

    async def _read_replies(self, stream: FrameStream) -> None:
        """Acks and nacks for what we wrote. The stream ending or misbehaving ends the lane's
        connection (everything unacknowledged is resent on the next one)."""
        while True:
            frames = await stream.receive_batch(MAX_BATCH)
            if not frames:
                raise TransportError("the device closed the stream")
            acked: list[bytes] = []
            for raw in frames:
                frame = decode_frame(raw)
                if isinstance(frame, Ack):
                    acked.extend(frame.ids)
                elif isinstance(frame, Nack):
                    self._nacked(frame)
                else:
                    raise DecodeError("unexpected message frame on an outgoing stream")
            if acked:
                self._acked(acked)
            self.wake()

    def _acked(self, ids: list[bytes]) -> None:
        for message_id in ids:
            self._in_flight.pop(message_id, None)
        # Not synced to disk: losing this commit in a power cut only means a resend, which the
        # receiver recognises and acknowledges again.
        with self.out.db.transaction(durable=False):
            events = self.out.record_delivered(self.device, ids)
        for event in events:
            self.out.bus.publish(event)

    def _nacked(self, frame: Nack) -> None:
        self._in_flight.pop(frame.id, None)
        message = self.out.db.message(frame.id)
        if message is None or message.state in ("delivered", "failed"):
            return
        self.out._fail(message.rowid, frame.id, NACK_REASONS.get(frame.code, frame.code))


def intro_body(name: str, token: bytes | None) -> str:
    """What the outbox stores for an intro until `Lane._content` encrypts it."""
    return json.dumps({"name": name, "token": token.hex() if token else None})
