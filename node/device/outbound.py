"""The outbox engine's trio shell: delivers every queued message to every recipient device,
exactly once in the recipient's view, in order, or marks it failed with a reason.

What to do, and when, is decided by one `OutboundMachine` per recipient device
(node.protocol.outbound, which states the rules). A `Lane` carries out its actions: it opens the
stream through the `Transport`, encrypts rows and commits their payloads with the ratchet state
in one transaction (so a crash never re-encrypts under a different key), writes them, reads acks
and nacks on the same stream, deposits at the device's relays through the `Depositor`, updates
the database and publishes events; then it reports the outcome back to the machine. Liveness:
every write has a deadline (`Config.write_timeout_s`), an idle stream's connection is
pinged (`keepalive_s`, `ping_timeout_s`), and the machine's ack deadline (`ack_timeout_s`)
covers what is in flight; a path that misses one is reported dead, and the lane closes the
connection (a silent one would be reused by the next dial) before depositing. Every time
comes from the node's one `Clock`: monotonic() for the machine's timers, now_ms() for what is
stored; waits run on trio's clock, so trio's autojump clock drives them in tests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

import trio

from node.clock import Clock
from node.device.config import (
    MAX_BATCH,
    MAX_IN_FLIGHT,
    RESTART_AFTER_FAILURE_S,
    SEEN_RETENTION_S,
    Config,
)
from node.device.eventbus import EventBus
from node.device.events import Event, MessageDelivered, MessageFailed, MessageSent
from node.device.relay_client import Depositor
from node.device.session_store import SessionStore
from node.device.storage import Database, Device, OutboxRow
from node.errors import DecodeError, RemoteError, StorageError, TransportError
from node.net import MSG_PROTOCOL, FrameStream, Transport
from node.protocol.attachment import Descriptor
from node.protocol.content import (
    Content,
    DeviceListUpdate,
    File,
    Intro,
    Receipt,
    Sync,
    Text,
    Transcript,
    encode_content,
)
from node.protocol.keys import DeviceKey
from node.protocol.mailbox import (
    RATE_LIMITED,
    STORAGE_FULL,
    contact_cap,
    mailbox_id,
    mailbox_key,
    own_cap,
)
from node.protocol.outbound import (
    Action,
    ClearError,
    CloseStream,
    Connect,
    Delivered,
    Deposit,
    Effect,
    Fail,
    LaneStatus,
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
from node.protocol.wire import Ack, Msg, Nack, decode_frame, encode_frame

if TYPE_CHECKING:
    # trio-typing's stubs (a libp2p dependency) hide trio's own `trio.TaskStatus`: see node/rpc.py.
    from trio_typing import TaskStatus


log = logging.getLogger("pigeon.delivery")

#: Relay refusals that clear by themselves (PROTOCOL.md section 21): a page refused for one of
#: these is deposited again after a short fixed wait, not after the unreachable device's backoff.
PASSING_REFUSALS: Final = frozenset({STORAGE_FULL, RATE_LIMITED})
#: Encoded contents kept for the other devices of a fan-out (PROTOCOL.md section 25.5): a
#: message to N devices is encoded and padded once, and only the ratchet encryption is per
#: device. Bounded in bytes (texts may be 64 KiB): a few full batches of ordinary texts.
ENCODED_CACHE_BYTES: Final = 8 * 1024 * 1024
#: Kinds a person wrote (texts and files, PROTOCOL.md section 26.4): the ones whose sending,
#: delivery and failure are announced as events.
USER_KINDS: Final = frozenset({"text", "file"})
#: Why a lane waits for a device we have no session with yet (its keys are being fetched).
NO_SESSION_YET: Final = "waiting for this device's keys (no session with it yet)"

__all__ = ["LaneStatus", "Outbound", "intro_body", "sync_body"]


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
        clock: Clock,
        intro_addrs: Callable[[], list[str]],
        depositor: Depositor | None = None,
        refresh_device: Callable[[bytes], Awaitable[bool]] | None = None,
        device_list_update: Callable[[bytes, int], DeviceListUpdate] | None = None,
        need_session: Callable[[bytes], None] | None = None,
        group_content: Callable[[OutboxRow], Content | None] | None = None,
        relays: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self.db = db
        self.sessions = sessions
        self.transport = transport
        self.bus = bus
        self.config = config
        self.clock = clock
        self.intro_addrs = intro_addrs
        #: Our relays as they are when an intro is encrypted (they may change, PROTOCOL.md
        #: section 28.3); by default the pinned ones of the config.
        self.relays: Callable[[], Sequence[str]] = relays or (lambda: config.pinned_relays)
        self.depositor = depositor
        self.refresh_device = refresh_device
        #: Builds the device-list content of a queued "device-list" row at encryption time
        #: (id, sent_at_ms): the newest list and hints then (PROTOCOL.md section 25.4).
        self.device_list_update = device_list_update
        #: Asks for a session with a device that has none (its keys are fetched, then its lane
        #: is kicked).
        self.need_session = need_session
        #: Builds the content of a queued group row at encryption time, None for other rows
        #: (PROTOCOL.md section 27.5).
        self.group_content = group_content
        self._encoded: dict[tuple[bytes, bool], bytes] = {}
        self._encoded_bytes = 0
        self.settings = Settings(
            ack_timeout_s=config.ack_timeout_s, retry_initial_s=config.retry_initial_s,
            retry_max_s=config.retry_max_s, fail_after_s=config.fail_after_s,
            max_batch=MAX_BATCH, max_in_flight=MAX_IN_FLIGHT, keepalive_s=config.keepalive_s,
            can_refresh=refresh_device is not None, can_deposit=depositor is not None)
        #: Source of every lane's backoff jitter.
        self.jitter = random.Random()
        self._lanes: dict[bytes, Lane] = {}
        #: Why the path to a device whose lane ended was down (status shows it until a stream
        #: to the device opens again).
        self._down: dict[bytes, str] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled: a lane for every device with queued rows, and the sweeper."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for device in self.db.outbox_devices():
                self.kick(device)
            nursery.start_soon(self._sweep_forever)
            task_status.started()
            await trio.sleep_forever()

    def kick(self, device: bytes) -> None:
        """There may be work for `device` (new message, it came online): wake or start its lane."""
        lane = self._lane(device)
        if lane is not None:
            lane.kick()

    def relays_changed(self, devices: Sequence[bytes]) -> None:
        """These devices receive at other relays now (PROTOCOL.md section 28.3): deposit what
        is unsettled again, at the new relays."""
        for device in devices:
            self.db.mark_unrelayed(device)
            lane = self._lane(device)
            if lane is not None:
                lane.machine.relays_changed(self.clock.monotonic())
                lane.kick()

    def _lane(self, device: bytes) -> Lane | None:
        """The lane of `device`, started if there is none (None before `run`)."""
        lane = self._lanes.get(device)
        if lane is None:
            if self._nursery is None:
                return None
            lane = self._lanes[device] = Lane(self, device)
            self._nursery.start_soon(self._run_lane, lane)
        return lane

    async def _run_lane(self, lane: Lane) -> None:
        failed = True
        try:
            await lane.run()
            failed = False
        except StorageError as exc:
            # Our disk (full, read-only): one line, no traceback.
            log.warning("delivery to %s paused: %s", lane.name, exc)
        except Exception:
            # A bug must not take the node down: the lane ends, with the traceback logged.
            log.exception("delivery lane for %s crashed", lane.name)
        finally:
            if self._lanes.get(lane.device) is lane:
                del self._lanes[lane.device]
                down = lane.machine.path_down
                if down is None:
                    self._down.pop(lane.device, None)
                else:
                    self._down[lane.device] = down
        if not failed:
            if lane.kicked:
                # A send kicked the lane after it found nothing left, while its task unwound
                # (the exit of its nursery is a checkpoint and it was still registered): the
                # new row gets a new lane now, not at the next sweep.
                self.kick(lane.device)
            return
        # A new lane starts shortly and reads what is queued from the database again.
        await trio.sleep(RESTART_AFTER_FAILURE_S)
        self.kick(lane.device)

    def status(self) -> dict[bytes, LaneStatus]:
        """Delivery status per device that has a lane, or whose last lane ended with its path
        down (then `path_down` says why, until a stream to it opens again)."""
        result = {device: LaneStatus("", False, 0, 0, None, down)
                  for device, down in self._down.items()}
        for device, lane in self._lanes.items():
            status = lane.status()
            if status.connected:
                self._down.pop(device, None)
            elif status.path_down is None and device in self._down:
                status = dataclasses.replace(status, path_down=self._down[device])
            result[device] = status
        return result

    async def _sweep_forever(self) -> None:
        """Housekeeping on a timer: fail messages past their age, and forget the ids of received
        messages older than SEEN_RETENTION_S (their senders stopped resending long ago)."""
        interval = min(60.0, max(0.5, self.config.fail_after_s / 10))
        while True:
            try:
                self.fail_expired()
                with self.db.transaction(durable=False):
                    pruned = self.db.prune_seen(
                        before_ms=self.clock.now_ms() - SEEN_RETENTION_S * 1000)
                if pruned:
                    self.db.truncate_wal()  # the forgotten ids leave the WAL too
            except StorageError as exc:
                # A full disk must not end the node: the sweep runs again next time.
                log.warning("housekeeping failed: %s", exc)
            except Exception:
                log.exception("housekeeping failed")  # a bug: logged, and tried again next time
            await trio.sleep(interval)

    def fail_expired(self) -> None:
        """Fail every queued message older than `Config.fail_after_s` (each device's machine
        decides for its rows; a device with rows but no lane gets one)."""
        for device in self.db.outbox_devices():
            self._lane(device)
        now_ms = self.clock.now_ms()
        for lane in list(self._lanes.values()):
            lane.apply(lane.machine.expire(now_ms))

    def record_delivered(self, device: bytes, ids: Sequence[bytes]) -> list[Event]:
        """`device` confirmed these messages (an ack frame, or a receipt that came through a
        relay): drop their outbox rows, stop repeating the PQXDH header in the sessions they
        used, and return the MessageDelivered events (for the messages that became delivered:
        the first confirmation by a device of the recipient's account, PROTOCOL.md section
        25.5) to publish once the caller's transaction (inside which this runs) is committed."""
        lane = self._lanes.get(device)
        if lane is not None:
            lane.settled(ids)
        delivered, bases = self.db.mark_delivered(device, ids, now_ms=self.clock.now_ms())
        known = self.db.device(device)
        owner = self.db.contact_by_id(known.contact_id) if known is not None else None
        if owner is not None and bases:
            record = self.sessions.record(owner.account, device)
            if any(s.pending is not None for s in [record.current, *record.archived] if s):
                for base in bases:
                    record.acknowledge(base)
                self.sessions.save(owner.account, device)
        events: list[Event] = []
        for message in delivered:
            if message.kind not in USER_KINDS:
                continue
            contact = self.db.contact_by_id(message.contact_id)
            if contact is not None:
                events.append(MessageDelivered(message_id=message.id.hex(), contact=contact.name))
        return events

    def _fail(self, message_rowid: int, message_id: bytes, reason: str) -> None:
        """Mark the message failed; its rows for every device leave the outbox."""
        message = self.db.message(message_id)
        self.db.mark_failed(message_rowid, reason, now_ms=self.clock.now_ms())
        for lane in self._lanes.values():
            lane.settled([message_id])
        if message is not None:
            contact = self.db.contact_by_id(message.contact_id)
            if message.kind in USER_KINDS and contact is not None:
                self.bus.publish(MessageFailed(message_id=message_id.hex(), contact=contact.name,
                                               reason=reason))
        log.info("message %s failed: %s", message_id.hex(), reason)


class Lane:
    """Delivery to one device: carries out its machine's actions."""

    def __init__(self, outbound: Outbound, device: bytes) -> None:
        self.out = outbound
        self.device = device
        # Built from the stored rows: payloads already encrypted are sent as they are.
        self.machine = OutboundMachine.resume(outbound.settings, self._read_rows(after_seq=0),
                                              jitter=outbound.jitter)
        self._wake = trio.Event()
        self._kicked = False
        self._stream: FrameStream | None = None
        self._reader: trio.CancelScope | None = None
        self._sending: trio.CancelScope | None = None

    @property
    def name(self) -> str:
        """How logs name the device."""
        return self.machine.peer_id or self.device.hex()[:16]

    def kick(self) -> None:
        """New rows may be queued, or the device came online."""
        self._kicked = True
        self._wake.set()

    @property
    def kicked(self) -> bool:
        """Kicked since the machine last read the queued rows."""
        return self._kicked

    def wake(self) -> None:
        """Something changed (an ack, a broken stream, rows settled): ask the machine again."""
        self._wake.set()

    def settled(self, ids: Sequence[bytes]) -> None:
        """These messages were settled outside the lane (delivered or failed)."""
        self.machine.forget(ids)
        self.wake()

    def status(self) -> LaneStatus:
        """The machine's status."""
        return self.machine.status()

    # --- main loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Carry out the machine's actions until it has nothing left to deliver."""
        async with trio.open_nursery() as nursery:  # holds the reader of the open stream
            while True:
                if self._kicked:
                    self._kicked = False
                    self.machine.add_rows(self._read_rows(after_seq=self.machine.last_seq))
                    self.machine.kicked(self.out.clock.monotonic())
                action = self.machine.next_action(self.out.clock.monotonic())
                if isinstance(action, Stop):
                    # The database has the last word: rows the machine let go of while they
                    # stayed stored (a commit that was rolled back) are found again here.
                    missed = self._read_rows(after_seq=0)
                    if not missed:
                        return
                    self.machine.add_rows(missed)
                    continue
                await self._carry_out(action, nursery)

    async def _carry_out(self, action: Action, nursery: trio.Nursery) -> None:
        if isinstance(action, Connect):
            await self._connect(nursery)
        elif isinstance(action, Write):
            await self._write(action)
        elif isinstance(action, Wait):
            with trio.move_on_at(action.until):
                await self._wake.wait()
            self._wake = trio.Event()
        elif isinstance(action, Ping):
            await self._ping()
        elif isinstance(action, CloseStream):
            if action.note is not None:
                self.apply([action.note])
            await self._close(reset=action.reset)
            if action.disconnect:
                await self._disconnect()
        elif isinstance(action, Refresh):
            self.machine.refreshed(self.out.clock.monotonic(), await self._refresh())
        elif isinstance(action, Deposit):
            await self._deposit(action)
        else:
            raise AssertionError(f"unexpected action {action!r}")

    def apply(self, effects: Sequence[Effect]) -> None:
        """Carry out what an event of the machine settled."""
        out = self.out
        for effect in effects:
            if isinstance(effect, Delivered):
                # Not synced to disk: losing this commit in a power cut only means a resend,
                # which the receiver recognises and acknowledges again.
                with out.db.transaction(durable=False):
                    events = out.record_delivered(self.device, effect.ids)
                for event in events:
                    out.bus.publish(event)
            elif isinstance(effect, Fail):
                message = out.db.message(effect.message_id)
                if message is not None and message.state not in ("delivered", "failed"):
                    out._fail(message.rowid, effect.message_id, effect.reason)
                elif message is not None and message.state == "delivered":
                    # Delivered to another device of the account: only this device's copy is
                    # given up (PROTOCOL.md section 25.5).
                    out.db.drop_outbox_row(message.rowid, self.device)
                    self.machine.forget([effect.message_id])
            elif isinstance(effect, NoteError):
                log.log(logging.DEBUG if effect.repeated else logging.INFO,
                        "delivery to %s: %s", self.name, effect.error)
                try:
                    out.db.set_outbox_error(self.device, effect.error)
                except StorageError as exc:  # only for `status`; the machine keeps the error
                    log.debug("cannot record the delivery error for %s: %s", self.name, exc)
            elif isinstance(effect, ClearError):
                try:
                    out.db.set_outbox_error(self.device, None)
                except StorageError as exc:
                    log.debug("cannot clear the delivery error for %s: %s", self.name, exc)

    def _read_rows(self, *, after_seq: int) -> list[OutRow]:
        """The device's outbox rows after `after_seq`, as the machine sees them."""
        rows: list[OutRow] = []
        while page := self.out.db.outbox_for(self.device, limit=MAX_BATCH, after_seq=after_seq):
            rows.extend(OutRow(seq=r.seq, message_id=r.message_id, created_at_ms=r.created_at_ms,
                               stored=r.payload is not None, relayed=r.state == "relayed",
                               receipt=r.kind == "receipt") for r in page)
            after_seq = page[-1].seq
        return rows

    # --- connecting -----------------------------------------------------------------------------

    async def _connect(self, nursery: trio.Nursery) -> None:
        out, machine = self.out, self.machine
        target = out.db.device(self.device)
        if target is None:
            machine.device_gone()  # the contact was removed
            return
        machine.dialing(target.peer_id, relays=bool(target.relays))
        if self._waiting_for_session(target.contact_id):
            self.apply(machine.connect_failed(out.clock.monotonic(), NO_SESSION_YET))
            return
        try:
            stream = await out.transport.open_stream(
                target.peer_id, target.addrs, MSG_PROTOCOL, timeout=out.config.connect_timeout_s)
        except TransportError as exc:
            self.apply(machine.connect_failed(out.clock.monotonic(), f"unreachable: {exc}"))
            return
        self._stream = stream
        self.apply(machine.connected(out.clock.monotonic()))
        self._reader = await nursery.start(self._read_replies, stream)

    def _own_cap(self, target: Device) -> bytes | None:
        """The capability for the public mailbox of `target` when it is one of our own devices
        (derived from the account key, `mailbox.own_cap`), else None."""
        depositor, contact = self.out.depositor, self.out.db.contact_by_id(target.contact_id)
        if depositor is None or contact is None or \
                contact.account != depositor.identity.public.to_bytes():
            return None
        return own_cap(depositor.identity, DeviceKey(target.device))

    def _waiting_for_session(self, contact_id: int) -> bool:
        """Whether we have no session at all with this device yet (a device that joined its
        account since): its keys are asked for, and the lane waits until it is kicked."""
        contact = self.out.db.contact_by_id(contact_id)
        if contact is None or self.out.sessions.record(contact.account, self.device).current:
            return False
        if self.out.need_session is not None:
            self.out.need_session(self.device)
        return True

    async def _refresh(self) -> bool:
        """Look the device up again (DHT): its addresses may be stale (it restarted on new
        ports, moved networks). True if they changed."""
        assert self.out.refresh_device is not None  # the machine refreshes only if it can
        try:
            return await self.out.refresh_device(self.device)
        except (RemoteError, StorageError) as exc:
            log.info("looking up %s again failed: %s", self.name, exc)
            return False

    async def _ping(self) -> None:
        """Keepalive: one ping over the stream's connection, within `ping_timeout_s`."""
        out, machine = self.out, self.machine
        try:
            await out.transport.ping(machine.peer_id, timeout=out.config.ping_timeout_s)
        except TransportError as exc:
            self.apply(machine.path_dead(out.clock.monotonic(), f"path down: {exc}"))
            return
        machine.pong(out.clock.monotonic())

    async def _disconnect(self) -> None:
        """The path is dead: close the device's connection, so that the next dial makes a new
        one instead of reusing the silent one. Bounded: on a dead path the close itself may not
        get through (the next dial then fails on its connect timeout and the rows go to the
        relays all the same)."""
        peer_id = self.machine.peer_id
        with trio.move_on_after(self.out.config.write_timeout_s):
            try:
                await self.out.transport.disconnect(peer_id)
            except (TransportError, DecodeError) as exc:
                log.info("closing the dead connection to %s failed: %s", self.name, exc)

    async def _close(self, *, reset: bool) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        stream, self._stream = self._stream, None
        if stream is None:
            return
        if reset:
            await stream.reset()
        else:
            await stream.aclose()

    # --- writing --------------------------------------------------------------------------------

    async def _write(self, action: Write) -> None:
        """Encrypt what needs it, write the rows in one batch and tell the machine."""
        out, machine, stream = self.out, self.machine, self._stream
        assert stream is not None
        timeout = out.config.write_timeout_s
        try:
            ready, rows, newly_sent = self._prepare(action.rows)
            # Announced as soon as "sent" is committed, before the write: an ack can arrive (and
            # MessageDelivered go out) while the write is still blocked, and a write that fails
            # leaves the rows "sent" in the database, so no later write would announce them.
            self._announce_sent(rows, newly_sent)
            if ready:
                # The reader cancels this when the stream breaks under a blocked write, and so
                # does the write deadline (the write then resets the stream: a half-written
                # batch is never left behind).
                with trio.CancelScope() as self._sending, \
                        trio.move_on_after(timeout) as deadline:
                    await stream.send([encode_frame(Msg(mid, payload))
                                       for _, mid, payload in ready])
                if deadline.cancelled_caught:
                    self.apply(machine.path_dead(out.clock.monotonic(),
                                                 f"path down: a write took over {timeout:g} s"))
                    self._announce_sent(rows, newly_sent)  # they are "sent" in the database
                    return
        except (RemoteError, StorageError) as exc:
            self.apply(machine.stream_broken(out.clock.monotonic(), str(exc)))
            return
        finally:
            self._sending = None
        machine.written(out.clock.monotonic(), [seq for seq, _, _ in ready])

    async def _deposit(self, action: Deposit) -> None:
        """Seal and deposit one page of rows no relay holds yet. Rows every relay refuses stay
        pending with the relays' reasons shown; the machine retries them later, in order."""
        out, machine = self.out, self.machine
        depositor = out.depositor
        assert depositor is not None  # the machine deposits only if it can
        target = out.db.device(self.device)
        held: list[int] = []
        error: str | None = None
        codes: set[str] = set()
        try:
            if target is None or not target.relays:  # its relays went away since the dial
                error = "deposit failed: the device has no relays"
            elif self._waiting_for_session(target.contact_id):
                error = NO_SESSION_YET
            else:
                jitter = out.config.receipt_jitter_s
                if jitter > 0 and all(row.receipt for row in action.rows):
                    # Receipts answer a message our relay just saw us acknowledge: a random
                    # wait keeps the two from being paired by timing (PROTOCOL.md section 21).
                    await trio.sleep(out.jitter.uniform(0, jitter))
                ready, rows, _ = self._prepare(action.rows, mark_sent=False)
                if ready:
                    copies, errors, codes = await depositor.deposit(
                        target.relays, DeviceKey(self.device),
                        [(mid, payload) for _, mid, payload in ready],
                        cap=target.cap or self._own_cap(target), box=target.box)
                    held = [seq for (seq, _, _), n in zip(ready, copies, strict=True) if n]
                    # MessageSent only for messages that were still pending: one written to a
                    # stream before (and then deposited) was announced already.
                    held_seqs = set(held)
                    was_pending = {r.message_rowid for r in rows if r.seq in held_seqs and
                                   (m := out.db.message(r.message_id)) and m.state == "pending"}
                    newly = set(out.db.mark_relayed(held, now_ms=out.clock.now_ms()))
                    self._announce_sent(rows, newly & was_pending)
                    error = "; ".join(errors) or None
        except (RemoteError, StorageError) as exc:
            error = f"deposit failed: {exc}"
        self.apply(machine.deposited(out.clock.monotonic(), held, error,
                                     passing=bool(codes & PASSING_REFUSALS)))

    def _prepare(self, rows: Sequence[OutRow], *, mark_sent: bool = True
                 ) -> tuple[list[tuple[int, bytes, bytes]], list[OutboxRow], set[int]]:
        """In one transaction: encrypt the rows that have no stored payload (with the ratchet
        state they advance) and mark all of them sent. Returns (seq, message id, payload) per row
        ready to go, the stored rows, and the rowids of messages that went from pending to sent.

        Only rows without a stored payload are encrypted (the machine's `to_encrypt`); the others
        go out with the stored bytes, so a resend, even after a crash, repeats the same bytes.
        Rows no longer in the database (settled meanwhile) are dropped and the machine forgets
        them. "sent" is recorded just before the write: if the write fails, the stream is reset
        and the rows are written again on the next one, like any unacknowledged row. Deposits
        mark rows relayed instead, once a relay holds them (`mark_sent=False`)."""
        out = self.out
        found = self._stored_rows(rows)
        gone = [row.message_id for row in rows if row.seq not in found]
        if gone:
            self.machine.forget(gone)
        stored = [found[row.seq] for row in rows if row.seq in found]
        if not stored:
            return [], [], set()
        todo = [r for r in stored if r.payload is None]
        payloads = {r.seq: r.payload for r in stored if r.payload is not None}
        account = stored[0].account
        record = out.sessions.record(account, self.device) if todo else None
        if record is not None and not record.can_encrypt:
            for row in todo:
                out._fail(row.message_rowid, row.message_id,
                          "no session with this device (add the contact again from an invite)")
            todo, record = [], None
        encrypted_rows = []
        try:
            with out.db.transaction():
                for row in todo:
                    assert record is not None
                    encrypted = record.encrypt(self._encoded(row))
                    encrypted_rows.append((row.seq, encrypted.message, encrypted.session_base_key))
                    payloads[row.seq] = encrypted.message
                if record is not None:
                    out.db.set_payloads(encrypted_rows)
                    out.sessions.save(account, self.device)
                ready = [(r.seq, r.message_id, p) for r in stored if (p := payloads.get(r.seq))]
                newly_sent = set(out.db.mark_sent([seq for seq, _, _ in ready],
                                                  now_ms=out.clock.now_ms())) if mark_sent else set()
        except BaseException:
            if record is not None:
                out.sessions.forget([(account, self.device)])
            raise
        self.machine.payloads_stored([seq for seq, _, _ in encrypted_rows])
        return ready, stored, newly_sent

    def _stored_rows(self, rows: Sequence[OutRow]) -> dict[int, OutboxRow]:
        """The stored rows (body, payload...) of these machine rows, by seq; rows no longer in
        the database are missing."""
        wanted = {row.seq for row in rows}
        found: dict[int, OutboxRow] = {}
        after, last = rows[0].seq - 1, rows[-1].seq
        while page := self.out.db.outbox_for(self.device, limit=len(rows), after_seq=after):
            found.update((r.seq, r) for r in page if r.seq in wanted)
            if len(page) < len(rows) or page[-1].seq >= last:
                break
            after = page[-1].seq
        return found

    def _announce_sent(self, rows: Sequence[OutboxRow], newly: set[int]) -> None:
        """MessageSent for the text messages among `rows` that just left "pending"."""
        if not newly or not rows:
            return
        contact = self.out.db.contact_by_account(rows[0].account)  # a lane serves one contact
        if contact is None:
            return
        for row in rows:
            if row.message_rowid in newly and row.kind in USER_KINDS:
                name = contact.name
                if row.transcript:  # a group's text names the group (PROTOCOL.md section 27)
                    group = self.out.db.group_by_id(row.conversation)
                    name = group[0].name if group is not None else name
                self.out.bus.publish(MessageSent(message_id=row.message_id.hex(),
                                                 contact=name))

    def _encoded(self, row: OutboxRow) -> bytes:
        """The padded content of a row. A text is encoded once for all devices it goes to (and
        once more as the transcript for our own devices); the rest per row."""
        if row.kind != "text":
            return encode_content(self._content(row))
        # By id (random, never reused) as well: a rowid may be reused after a contact and
        # its history were removed.
        key = (row.message_id, row.transcript)
        out = self.out
        encoded = out._encoded.get(key)
        if encoded is None:
            encoded = out._encoded[key] = encode_content(self._content(row))
            out._encoded_bytes += len(encoded)
            while out._encoded_bytes > ENCODED_CACHE_BYTES:  # the oldest go first
                out._encoded_bytes -= len(out._encoded.pop(next(iter(out._encoded))))
        return encoded

    def _content(self, row: OutboxRow) -> Content:
        """The content of a row; an intro gets our addresses and relays as they are at
        encryption time, a device-list update the newest list; a text to one of our own
        devices is its sent transcript (PROTOCOL.md section 25.5); a group's rows are built by
        the node's groups (section 27.5)."""
        if self.out.group_content is not None and (
                row.kind in ("group-ops", "sender-key") or (row.kind == "text" and row.transcript)):
            group = self.out.group_content(row)
            if group is not None:
                return group
        if row.kind == "text" and row.transcript:
            return Transcript(id=row.message_id, sent_at_ms=row.sent_at_ms, to=row.conversation,
                              body=row.body)
        if row.kind == "text":
            return Text(id=row.message_id, sent_at_ms=row.sent_at_ms, body=row.body)
        if row.kind == "file":
            attachment = self.out.db.attachment_of_row(row.message_rowid)
            if attachment is None:  # written with its message, in one transaction
                raise StorageError(f"file message {row.message_id.hex()} has no attachment")
            descriptor = Descriptor.from_bytes(attachment.descriptor)
            if row.transcript:  # to one of our own devices (PROTOCOL.md sections 25.5, 26.4)
                return Transcript(id=row.message_id, sent_at_ms=row.sent_at_ms,
                                  to=row.conversation, body=row.body, attachment=descriptor)
            return File(id=row.message_id, sent_at_ms=row.sent_at_ms, caption=row.body,
                        attachment=descriptor)
        if row.kind == "device-list":
            assert self.out.device_list_update is not None  # queued only by a node that has it
            return self.out.device_list_update(row.message_id, row.sent_at_ms)
        if row.kind == "receipt":
            return Receipt(id=row.message_id, sent_at_ms=row.sent_at_ms,
                           ids=tuple(bytes.fromhex(i) for i in json.loads(row.body)))
        if row.kind == "sync":
            sync = json.loads(row.body)
            return Sync(id=row.message_id, sent_at_ms=row.sent_at_ms, op=sync["op"],
                        account=bytes.fromhex(sync["ik"]), name=sync["name"],
                        devices=tuple((bytes.fromhex(d), tuple(a), tuple(r))
                                      for d, a, r in sync["devices"]),
                        read_id=bytes.fromhex(sync["mid"]) if "mid" in sync else None,
                        read_sent_at_ms=sync.get("mts"))
        intro = json.loads(row.body)
        token = bytes.fromhex(intro["token"]) if intro.get("token") else None
        binding = bytes.fromhex(intro["bind"]) if intro.get("bind") else None
        # Our capability for this contact, so its deposits at our relays are not a stranger's
        # (PROTOCOL.md section 21 "Deposit capabilities").
        depositor = self.out.depositor
        cap = box = None
        if depositor is not None:
            cap = contact_cap(depositor.device, row.account)
            box = mailbox_id(mailbox_key(depositor.device).public)
        # An intro's `ts` is taken with its addresses and relays, not when it was queued: one
        # that waited long (or is drained late from a relay) must not look newer than what
        # the contact learned since (PROTOCOL.md sections 11, 21 "Where a device is").
        return Intro(id=row.message_id,
                     sent_at_ms=self.out.db.next_location_stamp(self.out.clock.now_ms()),
                     name=intro["name"], addrs=tuple(self.out.intro_addrs()),
                     relays=tuple(self.out.relays())[:16], token=token, binding=binding,
                     cap=cap, box=box)

    # --- replies --------------------------------------------------------------------------------

    async def _read_replies(self, stream: FrameStream, *,
                            task_status: TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        """Acks and nacks for what we wrote, until the lane closes the stream. The stream ending
        or misbehaving breaks it (everything unacknowledged is written again on the next one)."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
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
                            self.apply(self.machine.nacked(frame.id, frame.code,
                                                           now=self.out.clock.monotonic()))
                        else:
                            raise DecodeError("unexpected message frame on an outgoing stream")
                    if acked:
                        self.apply(self.machine.acked(acked))
                    self.wake()
            except (RemoteError, StorageError) as exc:
                self.apply(self.machine.stream_broken(self.out.clock.monotonic(), str(exc)))
                if self._sending is not None:
                    self._sending.cancel()
                self.wake()


def sync_body(op: str, account: bytes, name: str,
              devices: Sequence[tuple[bytes, Sequence[str], Sequence[str]]] = (), *,
              read: tuple[bytes, int] | None = None) -> str:
    """What the outbox stores for a sync message (PROTOCOL.md section 25.6) until the lane
    encrypts it (`Lane._content`); `read`: the newest message read and its sender timestamp,
    for op "read"."""
    body: dict[str, object] = {
        "op": op, "ik": account.hex(), "name": name,
        "devices": [[d.hex(), list(a)[:16], list(r)[:16]] for d, a, r in devices]}
    if read is not None:
        body.update(mid=read[0].hex(), mts=read[1])
    return json.dumps(body)


def intro_body(name: str, token: bytes | None, binding: bytes | None = None) -> str:
    """What the outbox stores for an intro until the lane encrypts it (`Lane._content`):
    `binding` is our device's binding to our account (PROTOCOL.md section 4 "Binding")."""
    return json.dumps({"name": name, "token": token.hex() if token else None,
                       "bind": binding.hex() if binding else None})
