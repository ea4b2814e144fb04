"""Linking a new device into the account (PROTOCOL.md section 25.2) and giving it the recent
history (section 25.3).

The new device has no account yet: `link_new_device` makes its device key, listens, shows a link
code (`on_code`) and waits for a device of the account to approve it. The approver
(`provision_device`, called by `Node.approve_link`) dials it at the code's addresses, sends the
provisioning payload sealed to the code's one-time key, gets back the new device's binding and
prekey bundle, adds it to the device list and sends the new list; the new device then writes the
account's keys, contacts and settings and is a full member. Both show the confirmation string.

History comes afterwards over `/pigeon/history/1.0.0` (`HistoryServer` on every device,
`HistoryPuller` on the new one): chunk by chunk, each committed with its cursor, so a transfer cut
by a crash of either side resumes where it stopped when the node runs again.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from node.clock import Clock, TrioClock
from node.device.config import Config
from node.device.datadir import DataDir
from node.device.storage import Database
from node.errors import DecodeError, DeviceError, NodeError, TransportError
from node.files import create_key_file
from node.net import FrameStream, Transport
from node.net.addresses import dialable
from node.protocol.devicelist import DeviceEntry, DeviceList
from node.protocol.history import (
    HISTORY_CHUNK_BYTES,
    HISTORY_CHUNK_ROWS,
    HISTORY_PROTOCOL,
    MAX_HISTORY_FRAME_BYTES,
    NOT_OWN_DEVICE,
    HistoryEnd,
    HistoryError,
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
from node.protocol.history import encode_error as encode_history_error
from node.protocol.keys import DeviceKeyPair, DHKeyPair, IdentityKeyPair
from node.protocol.linking import (
    CODE_USED,
    LINK_CODE_LIFETIME_S,
    LINK_PROTOCOL,
    MAX_LINK_FRAME_BYTES,
    LinkChannel,
    LinkCode,
    PayloadAssembler,
    Provisioning,
    chunk_payload,
    decode_error,
    decode_hello,
    describe_error,
    encode_error,
    encode_hello,
    link_addresses,
)
from node.protocol.prekeys import PreKeyStore
from node.protocol.records import PreKeyBundle

log = logging.getLogger("pigeon.link")

__all__ = ["HISTORY_META", "HistoryProgress", "HistoryPuller", "HistoryServer", "LinkResult",
           "link_new_device", "provision_device"]

#: Seconds the other side may take for each step of the link stream (one frame to arrive):
#: the new device writes the whole account in one of them.
LINK_STEP_TIMEOUT_S = 60.0
#: Where the new device keeps the state of its history transfer until it completes (JSON).
HISTORY_META = "history_transfer"
#: Seconds the history server waits for a request.
HISTORY_REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkResult:
    """A completed link, as each side reports it."""

    account_id: str
    peer_id: str  # the new device
    confirmation: str  # the string both devices show; the user compares them
    devices: int  # devices of the account now


# --- the approver -------------------------------------------------------------------------------


async def provision_device(transport: Transport, code: LinkCode, code_record: bytes,
                           payload: Provisioning, *,
                           add: Callable[[DeviceEntry, PreKeyBundle], bytes],
                           now: Callable[[], int], timeout: float,
                           on_confirmation: Callable[[str], None] | None = None) -> str:
    """Provision the device of `code` with `payload`; returns the confirmation string.

    `add(entry, bundle)` is called with the new device's verified-to-shape binding and bundle;
    it checks and commits them (the new device joins the list) and returns the new signed list,
    which goes back to the new device. DeviceError says why a link failed; before `add` ran,
    nothing changed on this side.
    """
    peer_id = code.device.peer_id()
    try:
        stream = await transport.open_stream(peer_id, code.addrs, LINK_PROTOCOL, timeout=timeout,
                                             max_frame_bytes=MAX_LINK_FRAME_BYTES)
    except TransportError as exc:
        raise DeviceError(f"the new device could not be reached at the link code's addresses"
                          f" ({exc}); is `pigeon link` still waiting there?") from exc
    ephemeral = DHKeyPair.generate()
    channel = LinkChannel.for_approver(ephemeral, code, code_record)
    committed = False
    try:
        await stream.send([encode_hello(code.nonce, ephemeral.public)])
        if on_confirmation is not None:
            on_confirmation(channel.confirmation)
        await stream.send([channel.seal(m) for m in chunk_payload(payload.to_bytes())])
        f = channel.open(await _receive(stream, "the new device's binding"), expect="bind")
        binding = f.bytes("bind", 64)
        bundle_bytes = f.bytes("bundle", max_size=MAX_LINK_FRAME_BYTES)
        f.done()
        try:
            bundle = PreKeyBundle.verify(bundle_bytes, now=now())
        except NodeError as exc:
            raise DeviceError(f"the new device sent an invalid prekey bundle ({exc})") from exc
        signed_list = add(DeviceEntry(code.device, binding), bundle)
        committed = True
        await stream.send([channel.seal({"t": "list", "list": signed_list})])
        channel.open(await _receive(stream, "the new device's confirmation"),
                     expect="done").done()
    except (TransportError, DecodeError, NodeError) as exc:
        if committed:
            raise DeviceError(
                f"the new device is in this account's device list now, but it did not confirm"
                f" that it saved the account ({exc}): if `pigeon link` there reports no"
                f" account, remove the device and link again") from exc
        if isinstance(exc, DeviceError):
            raise
        raise DeviceError(f"linking failed: {exc}") from exc
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
    return channel.confirmation


async def _receive(stream: FrameStream, what: str) -> bytes:
    with trio.move_on_after(LINK_STEP_TIMEOUT_S):
        frame = await stream.receive()
        if frame is None:
            raise DeviceError(f"the other device ended the link before sending {what}")
        code = decode_error(frame)
        if code is not None:
            raise DeviceError(describe_error(code))
        return frame
    raise DeviceError(f"the other device did not send {what} within {LINK_STEP_TIMEOUT_S:.0f} s")


# --- the new device -------------------------------------------------------------------------------


async def link_new_device(data_dir: Path | str, config: Config, *,
                          on_code: Callable[[str], None],
                          on_confirmation: Callable[[str], None] | None = None,
                          clock: Clock | None = None) -> LinkResult:
    """Make `data_dir` a new device of an account: create its device key, listen on
    `config.listen` (and hold a slot on `config.pinned_relays` for a relayed address), hand the link
    code to `on_code` and wait until a device of the account approves it (`pigeon device add`)
    or the code expires (LINK_CODE_LIFETIME_S). Then the account's keys, contacts, devices and
    settings are written, and the history transfer is noted to run when the node opens.

    DeviceError if the directory holds an account already, or nobody approved in time."""
    clock = clock or TrioClock()
    dd = DataDir(data_dir)
    if dd.is_initialized():
        raise DeviceError(f"{dd.path} holds an account already; link a new device into an empty"
                          " data directory (--data-dir)")
    dd.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    dd.lock()
    try:
        if dd.is_initialized():
            raise DeviceError(f"{dd.path} holds an account already")
        # A database or device key without the account key is what a link (or init) cut short
        # left: nothing in it is anyone's yet (the account key file is written last). A fresh
        # device key also keeps a device an approver added without hearing back from being
        # "already in this account" now.
        for leftover in ("pigeon.db", "pigeon.db-wal", "pigeon.db-shm", "device.key"):
            (dd.path / leftover).unlink(missing_ok=True)
        device = create_key_file(dd.device_file, "device", DeviceKeyPair)
        async with Transport.open(device.to_bytes(), config.listen, clock=clock) as transport:
            relayed: list[str] = []
            for relay in config.pinned_relays:
                try:
                    relayed += await transport.reserve(relay, timeout=config.connect_timeout_s)
                except TransportError as exc:
                    log.info("no reservation on relay %s for linking: %s", relay, exc)
            addrs = [a.rsplit("/p2p/", 1)[0]
                     for a in [*dialable(transport.listen_addrs()), *relayed]]
            ephemeral = DHKeyPair.generate()
            code = LinkCode(device=device.public, addrs=link_addresses(addrs),
                            ephemeral=ephemeral.public, nonce=os.urandom(16),
                            expires=clock.now_s() + LINK_CODE_LIFETIME_S)
            waiter = _NewDevice(dd=dd, device=device, config=config, clock=clock, code=code,
                                code_record=code.record(device), ephemeral=ephemeral,
                                bound=[a.rsplit("/p2p/", 1)[0] for a in transport.listen_addrs()],
                                on_confirmation=on_confirmation or (lambda _: None))
            transport.set_stream_handler(LINK_PROTOCOL, waiter.handle_stream,
                                         max_frame_bytes=MAX_LINK_FRAME_BYTES)
            on_code(code.to_text(device))
            with trio.move_on_after(LINK_CODE_LIFETIME_S):
                await waiter.finished.wait()
            transport.remove_stream_handler(LINK_PROTOCOL)
            if waiter.result is None:
                raise DeviceError(f"no device approved this link code within"
                                  f" {LINK_CODE_LIFETIME_S // 60} minutes; run `pigeon link`"
                                  " again for a new code")
            return waiter.result
    finally:
        dd.unlock()


class _NewDevice:
    """The new device's side of the link stream: one approval at a time, one success ever."""

    def __init__(self, *, dd: DataDir, device: DeviceKeyPair, config: Config, clock: Clock,
                 code: LinkCode, code_record: bytes, ephemeral: DHKeyPair, bound: list[str],
                 on_confirmation: Callable[[str], None]) -> None:
        self._dd = dd
        self._device = device
        self._config = config
        self._clock = clock
        self._code = code
        self._code_record = code_record
        self._ephemeral = ephemeral
        self._bound = bound
        self._on_confirmation = on_confirmation
        self._busy = False
        self.result: LinkResult | None = None
        self.finished = trio.Event()

    async def handle_stream(self, stream: FrameStream) -> None:
        if self.result is not None or self._busy:
            await stream.send([encode_error(CODE_USED)])
            return
        self._busy = True
        try:
            await self._provisioned(stream)
        except (NodeError, TransportError) as exc:
            log.warning("a link attempt from %s failed: %s", stream.remote_peer_id, exc)
        finally:
            self._busy = False

    async def _provisioned(self, stream: FrameStream) -> None:
        nonce, approver_epk = decode_hello(await _receive(stream, "its hello"))
        if nonce != self._code.nonce:
            await stream.send([encode_error(CODE_USED)])
            return
        channel = LinkChannel.for_new_device(self._ephemeral, approver_epk, self._code_record)
        self._on_confirmation(channel.confirmation)
        assembler = PayloadAssembler()
        data = None
        while data is None:
            data = assembler.add(channel.open(await _receive(stream, "the account's data"),
                                              expect="provision"))
        payload = Provisioning.from_bytes(data)
        now = self._clock.now_s()
        account = payload.identity.public
        current = DeviceList.verify(payload.device_list, now=now)
        if current.identity != account:
            raise DeviceError("the approving device sent a device list of another account")
        prekeys = PreKeyStore.create(now=now)
        bundle = prekeys.bundle(payload.identity, self._device, seq=now,
                                expires=now + 7 * 24 * 3600, one_time=False)
        entry = DeviceEntry.make(self._device, account)
        await stream.send([channel.seal({"t": "bind", "bind": entry.binding,
                                         "bundle": bundle.sign(payload.identity)})])
        f = channel.open(await _receive(stream, "the new device list"), expect="list")
        signed = f.bytes("list", max_size=MAX_LINK_FRAME_BYTES)
        f.done()
        new_list = DeviceList.verify(signed, now=now)
        if new_list.identity != account or self._device.public not in new_list \
                or new_list.seq <= current.seq:
            raise DeviceError("the approving device sent a device list without this device")
        self._write(payload, new_list, signed, prekeys, approver=stream.remote_peer_id)
        self.result = LinkResult(account_id=account.account_id(),
                                 peer_id=self._device.public.peer_id(),
                                 confirmation=channel.confirmation,
                                 devices=len(new_list.entries))
        try:
            await stream.send([channel.seal({"t": "done"})])
        except TransportError as exc:  # linked all the same; the approver has committed
            log.info("could not confirm the link to the approving device: %s", exc)
        finally:
            # Only now: the waiting task closes the transport, which would cut the reply.
            self.finished.set()

    def _write(self, payload: Provisioning, new_list: DeviceList, signed: bytes,
               prekeys: PreKeyStore, *, approver: str) -> None:
        """Everything of the account in one transaction, then the account key file: the
        directory counts as initialised only once that exists (DataDir.is_initialized)."""
        now_ms = self._clock.now_ms()
        account = payload.identity.public.to_bytes()
        db = Database.open(self._dd.database_file, create=True,
                           durability=self._config.durability)
        try:
            with db.transaction():
                db.save_prekeys(prekeys.to_bytes())
                if payload.display_name:
                    db.set_meta("display_name", payload.display_name)
                # The node listens where the link code said it does, so the approver's first
                # messages reach it (node.device.node `_open_transport` reads these).
                db.set_meta("listen_requested", json.dumps(list(self._config.listen)))
                db.set_meta("listen_bound", json.dumps(self._bound))
                own = db.own_contact(account, now_ms=now_ms)
                for d in payload.devices:
                    if d.device != self._device.public and d.device in new_list:
                        db.put_device(own.id, d.device.to_bytes(), d.device.peer_id(), d.addrs,
                                      relays=d.relays, seen_at_ms=0, now_ms=now_ms)
                db.put_device_list(account, new_list.seq, signed)
                for c in payload.contacts:
                    key = c.identity.to_bytes()
                    if key == account:
                        continue
                    contact = db.add_contact(c.name, key, now_ms=c.added_at_ms)
                    for d in c.devices:
                        # Unstamped (the payload says not when): the first intro or record
                        # replaces it (PROTOCOL.md section 21 "Where a device is").
                        db.put_device(contact.id, d.device.to_bytes(), d.device.peer_id(),
                                      d.addrs, relays=d.relays, seen_at_ms=0, now_ms=now_ms)
                    if c.device_list is not None:
                        try:
                            theirs = DeviceList.verify(c.device_list, now=now_ms // 1000)
                        except NodeError:
                            continue
                        if theirs.identity == c.identity:
                            db.put_device_list(key, theirs.seq, c.device_list)
                # Our list changed (we joined it): it goes to every device we know, the approver
                # included, whose session with us it started itself (section 25.4). Its hints
                # say where this device is, its relays too, which the approver cannot know.
                for target in [own, *db.contacts()]:
                    devices = db.device_keys(target.id)
                    if devices:
                        db.insert_outgoing(contact=target, devices=devices, now_ms=now_ms,
                                           messages=[(os.urandom(16), "device-list", "",
                                                      now_ms)])
                db.set_meta(HISTORY_META, json.dumps(
                    {"peer": approver, "after": 0, "until": 0, "total": 0, "received": 0}))
        finally:
            db.close()
        # The approver's relays, unless this device has its own or chooses them (section 28.2).
        if payload.relays and not self._config.pinned_relays and not self._config.relay_choice:
            config_toml = self._dd.path / "config.toml"
            if not config_toml.exists():
                config_toml.write_text("relays = [" + ", ".join(
                    json.dumps(r) for r in payload.relays) + "]\n")
        create_key_file(self._dd.identity_file, "identity", IdentityKeyPair, payload.identity)


# --- history transfer -----------------------------------------------------------------------------


class HistoryServer:
    """Answers `/pigeon/history/1.0.0` for the account's other devices (section 25.3): the
    messages with contacts of the last `link_history_days`, at most `link_history_max`."""

    def __init__(self, *, db: Database, own_contact_id: int, config: Config,
                 clock: Clock) -> None:
        self._db = db
        self._own = own_contact_id
        self._config = config
        self._clock = clock

    async def handle_stream(self, stream: FrameStream) -> None:
        frame = None
        with trio.move_on_after(HISTORY_REQUEST_TIMEOUT_S):
            frame = await stream.receive()
        if frame is None:
            raise DecodeError("history request: none arrived")
        after, until = decode_request(frame)
        device = self._db.device_by_peer_id(stream.remote_peer_id)
        if device is None or device.contact_id != self._own:
            await stream.send([encode_history_error(NOT_OWN_DEVICE)])
            return
        since = self._clock.now_ms() - self._config.link_history_days * 86_400_000
        if until == 0:
            after, until, total = self._db.history_range(since_ms=since,
                                                         cap=self._config.link_history_max)
        else:
            total = self._db.history_count(after=after, until=until, since_ms=since)
        await stream.send([encode_range(after, until, total)])
        while True:
            rows = self._db.history_chunk(
                after=after, until=until, since_ms=since,
                limit=min(HISTORY_CHUNK_ROWS, self._config.link_history_chunk))
            if not rows:
                break
            chunk: list[HistoryRow] = []
            size = 0
            for rowid, account, m in rows:
                chunk.append(HistoryRow(account=account, direction=m.direction,
                                        message_id=m.id, body=m.body, sent_at_ms=m.sent_at_ms,
                                        received_at_ms=m.received_at_ms, state=m.state))
                after = rowid
                size += len(m.body.encode("utf-8"))
                if size >= HISTORY_CHUNK_BYTES:
                    break
            await stream.send([encode_rows(after, chunk)])
        await stream.send([encode_end()])


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryProgress:
    """Where the history transfer of a linked device stands."""

    received: int  # messages committed, repeats of a resumed chunk included
    total: int  # messages in the transfer (0 until the other device said)
    done: bool


class HistoryPuller:
    """The new device's side: pulls the history from the device that approved it, chunk by
    chunk, each committed with its cursor; retries with backoff until the transfer ends."""

    def __init__(self, *, db: Database, transport: Transport, config: Config,
                 clock: Clock) -> None:
        self._db = db
        self._transport = transport
        self._config = config
        self._clock = clock
        raw = db.get_meta(HISTORY_META)
        self._state: dict[str, int | str] | None = json.loads(raw) if raw else None
        self.finished = trio.Event()
        self._changed = trio.Event()
        if self._state is None:
            self.finished.set()
        self.error: str | None = None
        self._final = HistoryProgress(received=0, total=0, done=True)

    @property
    def pending(self) -> bool:
        """Whether a transfer is still to complete."""
        return self._state is not None

    def progress(self) -> HistoryProgress:
        """Where the transfer stands now."""
        if self._state is None:
            return self._final
        return HistoryProgress(received=int(self._state["received"]),
                               total=int(self._state["total"]), done=False)

    async def wait_changed(self) -> None:
        """Until the next chunk is committed or the transfer ends."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self) -> None:
        attempts = 0
        while self._state is not None:
            try:
                await self._pull()
                attempts = 0
            except (NodeError, TransportError) as exc:
                attempts += 1
                self.error = str(exc)
                log.info("history transfer interrupted: %s", exc)
                delay = min(self._config.retry_max_s,
                            self._config.retry_initial_s * 2 ** min(attempts, 30))
                await trio.sleep(delay * random.uniform(0.5, 1.0))

    async def _pull(self) -> None:
        state = self._state
        assert state is not None
        peer = str(state["peer"])
        known = self._db.device_by_peer_id(peer)
        stream = await self._transport.open_stream(
            peer, known.addrs if known else (), HISTORY_PROTOCOL,
            timeout=self._config.connect_timeout_s, max_frame_bytes=MAX_HISTORY_FRAME_BYTES)
        contacts: dict[bytes, int | None] = {}
        try:
            await stream.send([encode_request(int(state["after"]), int(state["until"]))])
            while True:
                reply = decode_reply(await _receive(stream, "history"))
                if isinstance(reply, HistoryError):
                    if reply.code == NOT_OWN_DEVICE:
                        self._finish(f"the device {peer} no longer counts this one as its"
                                     " account's; the history transfer stops")
                        return
                    raise DeviceError(f"the other device refused the history ({reply.code})")
                if isinstance(reply, HistoryRange):
                    if int(state["until"]) == 0:
                        state.update(after=reply.after, until=reply.until, total=reply.total)
                    else:
                        state["total"] = int(state["received"]) + reply.total
                    with self._db.transaction():
                        self._db.set_meta(HISTORY_META, json.dumps(state))
                    self._notify()
                elif isinstance(reply, HistoryRows):
                    if not int(state["after"]) < reply.last <= int(state["until"]):
                        raise DecodeError("history chunk outside the transfer")
                    self._commit(state, reply, contacts)
                elif isinstance(reply, HistoryEnd):
                    self._finish(None)
                    return
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _commit(self, state: dict[str, int | str], chunk: HistoryRows,
                contacts: dict[bytes, int | None]) -> None:
        rows = []
        for row in chunk.rows:
            if row.account not in contacts:
                contact = self._db.contact_by_account(row.account)
                contacts[row.account] = contact.id if contact is not None and \
                    not self._db.is_own(contact) else None
            contact_id = contacts[row.account]
            if contact_id is not None:
                rows.append((contact_id, row.message_id, row.direction, row.body,
                             row.sent_at_ms, row.received_at_ms, row.state))
        state["after"] = chunk.last
        state["received"] = int(state["received"]) + len(chunk.rows)
        with self._db.transaction():
            self._db.insert_history(rows, now_ms=self._clock.now_ms())
            self._db.set_meta(HISTORY_META, json.dumps(state))
        self._notify()

    def _finish(self, error: str | None) -> None:
        with self._db.transaction():
            self._db.set_meta(HISTORY_META, None)
        if self._state is not None:
            self._final = HistoryProgress(received=int(self._state["received"]),
                                          total=int(self._state["total"]), done=True)
        self._state = None
        self.error = error
        self.finished.set()
        self._notify()

