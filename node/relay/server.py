"""The mailbox protocol server (PROTOCOL.md "Relay mailbox"): one `Relay.handle_stream` task per
`/pigeon/mailbox/1.0.0` stream, over a RelayStore.

Per stream: the relay sends a fresh challenge; then it reads requests in batches (every frame
already buffered behind the first, as node/device/inbound.py does), commits the deposits of a batch in
one transaction, and only then answers them. Subscribed streams get `push` frames from a task of
their own, which reads the committed messages past its cursor whenever a commit touches its
mailbox: nothing is pushed that is not on disk, and a slow reader only delays its own pushes.

Depositors' peer ids are held in memory only while they are connected (the per-peer deposit rate,
the stream caps) and are never stored or logged.

Stream caps: a peer id costs nothing, so one stranger could open every stream slot from
throwaway ids. Every stream takes a slot under `max_streams` and `max_streams_per_peer`; a
stream that has not authenticated a mailbox, from a peer that has not authenticated one on its
connection either, also takes a stranger slot (`max_unauthenticated_streams` in all,
`max_unauthenticated_streams_per_address` per address, node/protocol/slots.py) and is closed
after `unauthenticated_idle_timeout_s` of silence. Authenticating gives the stranger slot back:
the relay's own users are never counted with strangers.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Final

import trio

from node.clock import Clock, TrioClock
from node.errors import DecodeError, LimitExceeded, StorageError, TransportError
from node.net import FrameStream, Transport
from node.protocol.keys import DeviceKeyPair
from node.protocol.mailbox import (
    BAD_BLOB,
    BAD_TTL,
    ERROR_CODES,
    ITEMS_BUDGET_BYTES,
    MAILBOX_FULL,
    MAILBOX_PROTOCOL,
    MAX_ITEMS_PER_FRAME,
    NONCE_BYTES,
    RATE_LIMITED,
    RELAY_FULL,
    STORAGE_FULL,
    TOO_LARGE,
    UNAUTHORIZED,
    UNKNOWN_BLOB,
    UNKNOWN_MAILBOX,
    UNKNOWN_REQUEST,
    Ack,
    Auth,
    AuthFailed,
    BlobData,
    BlobDelete,
    BlobHave,
    BlobPut,
    BlobRead,
    Caps,
    Challenge,
    Deposit,
    ErrorReply,
    Fetch,
    Items,
    MalformedRequest,
    Ok,
    Push,
    Request,
    Subscribe,
    Wake,
    decode_request,
    encode_frame,
    verify_auth,
)
from node.protocol.ratelimit import TokenBucket
from node.protocol.slots import ADDRESS_LIMIT, PEER_LIMIT, SlotCaps, Slots, address_key
from node.relay.blobs import RelayBlobs
from node.relay.config import RelayConfig
from node.relay.log import box_tag, event, scrub
from node.relay.metrics import Registry
from node.relay.push import WAKE_REQUEST_BURST, WAKE_REQUEST_RATE_PER_S, Waker
from node.relay.store import DUPLICATE, STORED, PendingDeposit, RelayStore

__all__ = ["MAX_BATCH", "Relay"]

log = logging.getLogger("pigeon.relay")

#: Most frames handled as one batch (one transaction for its deposits, one write of replies).
MAX_BATCH: Final = 256


class _Session:
    """One mailbox stream."""

    __slots__ = ("address", "box", "deposits", "evicted", "frames", "nonce", "nursery", "peer",
                 "receive_scope", "scope", "stranger", "stream", "subscription", "wake_bucket",
                 "wakes")

    def __init__(self, stream: FrameStream, nonce: bytes, deposits: TokenBucket,
                 frames: TokenBucket, address: str) -> None:
        self.stream = stream
        self.peer = stream.remote_peer_id
        self.address = address  # the key the per-address caps count under
        self.stranger = False  # holds a slot of the strangers' pool
        self.nonce = nonce
        self.deposits = deposits  # shared by every stream of the same peer
        self.frames = frames  # this stream's flood guard
        self.box: bytes | None = None  # the authenticated mailbox
        self.subscription: _Subscription | None = None
        self.nursery: trio.Nursery | None = None
        self.scope: trio.CancelScope | None = None
        self.receive_scope: trio.CancelScope | None = None
        self.evicted = False
        # `wake` requests of the batch being processed: answered after it, since registering
        # resolves the push URL's host (PROTOCOL.md section 29), which may block.
        self.wakes: list[Wake] = []
        self.wake_bucket: TokenBucket | None = None  # made at the stream's first `wake`


class _Subscription:
    __slots__ = ("box", "cursor", "session", "wakeup")

    def __init__(self, session: _Session, box: bytes, cursor: int) -> None:
        self.session, self.box, self.cursor = session, box, cursor
        self.wakeup = trio.Event()


class _StreamEnded(Exception):
    """Internal: the stream must be reset for `reason` (logged, never sent)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason, self.detail = reason, detail
        super().__init__(reason)


class Relay:
    """The mailbox protocol over a store: one `handle_stream` task per stream."""

    def __init__(self, *, store: RelayStore, config: RelayConfig, key: DeviceKeyPair,
                 transport: Transport | None = None, clock: Clock | None = None,
                 blobs: RelayBlobs | None = None) -> None:
        self.store, self.config, self.key = store, config, key
        # Attachments' blobs (PROTOCOL.md section 26.6); None: blob requests are unknown here.
        self.blobs = blobs
        # Rate limits and uptime read clock.monotonic(), TTLs clock.now_s() (PROTOCOL.md
        # "Relay mailbox": expiries are Unix seconds). Idle timeouts and the purge interval are
        # trio timers: with the default TrioClock they run on the same clock.
        self.clock: Clock = clock or TrioClock()
        self.relay_key = key.public
        self.transport = transport
        self.started = self.clock.monotonic()
        self.closing = False
        self._sessions: set[_Session] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._subscriptions: dict[bytes, list[_Subscription]] = {}
        # Held in memory while a peer is connected, for its deposit rate; never stored or logged.
        self._buckets: dict[str, TokenBucket] = {}
        # Peers that authenticated a mailbox on their current connection (the relay's users):
        # in memory only while connected, like the buckets.
        self._members: set[str] = set()
        self._slots = Slots(SlotCaps(per_peer=config.max_streams_per_peer,
                                     per_address=config.max_streams, total=config.max_streams))
        self._stranger_slots = Slots(SlotCaps(
            per_peer=config.max_streams_per_peer,
            per_address=config.max_unauthenticated_streams_per_address,
            total=config.max_unauthenticated_streams))
        self._register_metrics()
        #: Push registrations and wake-ups (PROTOCOL.md section 29); its `run` task is started
        #: by the relay service.
        self.waker = Waker(store=store, config=config, clock=self.clock, registry=self.registry)

    # --- metrics ----------------------------------------------------------------------------------

    def _register_metrics(self) -> None:
        r = self.registry = Registry()
        totals = self.store.totals
        r.gauge("pigeon_relay_connected_peers", "Peers connected to the relay (any protocol).",
                lambda: len(self.transport.connected_peers()) if self.transport else 0)
        r.gauge("pigeon_relay_streams", "Open mailbox streams.", lambda: len(self._sessions))
        r.gauge("pigeon_relay_unauthenticated_streams",
                "Open mailbox streams of peers that have not authenticated a mailbox.",
                lambda: self._stranger_slots.held)
        r.gauge("pigeon_relay_subscriptions", "Mailbox streams subscribed to pushes.",
                lambda: sum(len(v) for v in self._subscriptions.values()))
        r.gauge("pigeon_relay_mailboxes", "Mailboxes holding at least one message.",
                lambda: totals.mailboxes)
        r.gauge("pigeon_relay_stored_messages", "Messages stored.", lambda: totals.messages)
        r.gauge("pigeon_relay_stored_bytes", "Envelope bytes stored.", lambda: totals.bytes)
        r.gauge("pigeon_relay_open_stored_bytes",
                "Envelope bytes stored from deposits without a capability (strangers').",
                lambda: totals.open_bytes)
        r.gauge("pigeon_relay_registered_mailboxes", "Mailboxes registered by their device.",
                lambda: totals.registered)
        self.m_deposits = r.counter("pigeon_relay_deposits_total", "Deposits stored.")
        self.m_duplicates = r.counter("pigeon_relay_duplicate_deposits_total",
                                      "Deposits of a message the mailbox already held (ok, not stored).")
        self.m_fetches = r.counter("pigeon_relay_fetches_total", "Fetch requests answered.")
        self.m_fetched = r.counter("pigeon_relay_fetched_messages_total", "Messages served by fetch.")
        self.m_pushes = r.counter("pigeon_relay_pushes_total", "Messages pushed to subscribers.")
        self.m_acked = r.counter("pigeon_relay_acked_messages_total", "Messages deleted by an ack.")
        self.m_expired = r.counter("pigeon_relay_expired_messages_total",
                                   "Messages deleted unread at their expiry.")
        self.m_rejects = r.counter("pigeon_relay_rejects_total", "Requests refused, by reason.",
                                   label="reason", label_values=sorted(ERROR_CODES))
        self.m_moved = r.counter("pigeon_relay_mailboxes_moved_total",
                                 "Mailboxes that came to this relay (registered for the first "
                                 "time) or left it (their registration lapsed), by direction.",
                                 label="direction", label_values=("in", "out"))
        self.m_resets = r.counter("pigeon_relay_stream_resets_total",
                                  "Mailbox streams reset by the relay, by reason.", label="reason",
                                  label_values=("malformed-frame", "flooding", "stream-limit",
                                                "peer-stream-limit", "address-stream-limit",
                                                "replaced", "shutdown", "internal-error"))

    def status(self) -> dict[str, Any]:
        """The figures `pigeon relay status` prints (the same as the metrics endpoint)."""
        totals = self.store.totals
        return {
            "peer_id": self.relay_key.peer_id(),
            "uptime_s": round(self.clock.monotonic() - self.started, 3),
            "addresses": self.transport.listen_addrs() if self.transport else [],
            "connected_peers": len(self.transport.connected_peers()) if self.transport else 0,
            "streams": len(self._sessions),
            "unauthenticated_streams": self._stranger_slots.held,
            "subscriptions": sum(len(v) for v in self._subscriptions.values()),
            "mailboxes": totals.mailboxes,
            "messages": totals.messages,
            "bytes": totals.bytes,
            "open_messages": totals.open_messages,
            "open_bytes": totals.open_bytes,
            "registered_mailboxes": totals.registered,
            # mailboxes that came here (first registration) and left (lapsed): moves between
            # relays, PROTOCOL.md section 28.3
            "mailboxes_moved": {k: int(v) for k, v in sorted(self.m_moved.values().items())},
            "deposits": int(self.m_deposits.value()),
            "duplicate_deposits": int(self.m_duplicates.value()),
            "fetches": int(self.m_fetches.value()),
            "pushes": int(self.m_pushes.value()),
            "acked": int(self.m_acked.value()),
            "expired": int(self.m_expired.value()),
            # Wake-ups (PROTOCOL.md section 29): accepted by push services, and given up.
            "wakeups_sent": int(self.waker.m_sent.value()),
            "wakeups_failed": int(sum(self.waker.m_failed.values().values())),
            # JSON keys are snake_case everywhere (README.md "JSON output"); the reason codes
            # keep their wire spelling in metrics labels.
            "rejects": {k.replace("-", "_"): int(v)
                        for k, v in sorted(self.m_rejects.values().items())},
            # None, or why the store failed last (until a commit succeeds again)
            "storage_error": _storage_problem(self.store.health.problem),
            # Attachments' blobs held for offline devices (PROTOCOL.md section 26.6).
            "blob_bytes": self.blobs.total_bytes() if self.blobs is not None else 0,
        }

    # --- connections ----------------------------------------------------------------------------

    def on_connection_change(self, peer_id: str, connected: bool) -> None:
        """Hooked into the transport's connection events: forget a peer that left."""
        if not connected:
            self._buckets.pop(peer_id, None)
            self._members.discard(peer_id)

    def is_member(self, peer_id: str) -> bool:
        """Whether `peer_id` authenticated a mailbox on its current connection: one of this
        relay's users (they get circuit relay reservations ahead of strangers)."""
        return peer_id in self._members

    def _deposit_bucket(self, peer_id: str) -> TokenBucket:
        bucket = self._buckets.get(peer_id)
        if bucket is None:
            bucket = self._buckets[peer_id] = TokenBucket(
                self.config.deposit_rate_per_s, self.config.deposit_burst,
                now=self.clock.monotonic())
        return bucket

    # --- streams ----------------------------------------------------------------------------------

    async def handle_stream(self, stream: FrameStream) -> None:
        """Serve one mailbox stream until it ends. Never raises: a protocol violation resets the
        stream here, with a logged reason that names neither the peer nor its address (the
        transport's own handler wrapper would log the stream, peer id included)."""
        if self.closing:
            await self._reset(stream, "shutdown")
            return
        peer, address = stream.remote_peer_id, address_key(stream.remote_addr)
        refused = self._slots.refusal(peer, address)
        stranger = peer not in self._members
        if refused is None and stranger:
            refused = self._stranger_slots.acquire(peer, address)
        if refused is not None:
            await self._reset(stream, _LIMIT_REASONS.get(refused, "stream-limit"),
                              "strangers' pool" if stranger else "")
            return
        self._slots.acquire(peer, address)
        session = _Session(
            stream, os.urandom(NONCE_BYTES), self._deposit_bucket(peer),
            TokenBucket(self.config.max_frames_per_s, 2 * self.config.max_frames_per_s,
                        now=self.clock.monotonic()), address)
        session.stranger = stranger
        self._sessions.add(session)
        if self._idle.is_set():
            self._idle = trio.Event()
        ended: _StreamEnded | None = None
        try:
            with trio.CancelScope() as session.scope:
                try:
                    await stream.send([encode_frame(Challenge(nonce=session.nonce))])
                    async with trio.open_nursery() as nursery:
                        session.nursery = nursery
                        ended = await self._serve(session)
                        nursery.cancel_scope.cancel()
                except TransportError as exc:
                    event(logging.DEBUG, "stream.lost", detail=scrub(str(exc)))
            if session.evicted:
                ended = _StreamEnded("replaced", "a newer subscription to the same mailbox")
            if ended is not None:
                await self._reset(stream, ended.reason, ended.detail)
        except Exception:
            # A bug of ours: log it (without the stream's repr, which names the peer) and keep
            # serving everyone else.
            log.exception("mailbox stream failed", extra={"pigeon_fields": {}})
            await self._reset(stream, "internal-error")
        finally:
            self._unsubscribe(session)
            self._sessions.discard(session)
            self._slots.release(session.peer, session.address)
            self._leave_strangers(session)
            if not self._sessions:
                self._idle.set()

    def _leave_strangers(self, s: _Session) -> None:
        if s.stranger:
            s.stranger = False
            self._stranger_slots.release(s.peer, s.address)

    async def _reset(self, stream: FrameStream, reason: str, detail: str = "") -> None:
        self.m_resets.inc(1, reason)
        event(logging.INFO, "stream.reset", reason=reason, detail=scrub(detail))
        with trio.CancelScope(shield=True):
            await stream.reset()

    async def _serve(self, s: _Session) -> _StreamEnded | None:
        """Requests until a clean end or shutdown (None) or a violation (_StreamEnded). A broken
        stream is not a violation: it is logged at debug level and ends the session."""
        try:
            while not self.closing:
                frames: list[bytes] = []
                with trio.CancelScope() as s.receive_scope:
                    if s.subscription is None:  # a subscribed stream is idle by design
                        # A stranger's silent stream holds a slot of the small strangers' pool:
                        # it goes quickly.
                        idle = self.config.idle_timeout_s
                        if s.stranger:
                            idle = min(idle, self.config.unauthenticated_idle_timeout_s)
                        s.receive_scope.deadline = trio.current_time() + idle
                    try:
                        frames = await s.stream.receive_batch(MAX_BATCH)
                    except (DecodeError, LimitExceeded) as exc:  # FrameTooLarge is one
                        return _StreamEnded("malformed-frame", str(exc))
                s.receive_scope = None
                if not frames or self.closing:
                    # The client closed its side, the relay is stopping, or the stream was idle
                    # past idle_timeout_s: close it (not a violation).
                    return None
                if not s.frames.take(len(frames), now=self.clock.monotonic()):
                    return _StreamEnded("flooding",
                                        f"more than {self.config.max_frames_per_s:g} frames/s")
                replies, fatal = self._process(s, frames)
                if replies:
                    await s.stream.send(replies)
                if s.wakes:
                    await s.stream.send([await self._register_wake(s, w) for w in s.wakes])
                    s.wakes.clear()
                if fatal is not None:
                    return fatal
        except TransportError as exc:
            event(logging.DEBUG, "stream.lost", detail=scrub(str(exc)))
        return None

    def _process(self, s: _Session, frames: list[bytes]) -> tuple[list[bytes], _StreamEnded | None]:
        """One batch, synchronously: deposits are committed together (in runs between other
        requests, so a fetch sees the deposits before it), and every reply is built after the
        commit it depends on."""
        replies: list[bytes | None] = []
        pending: list[tuple[int, Deposit]] = []
        fatal: _StreamEnded | None = None
        now = self.clock.now_s()
        for raw in frames:
            try:
                request: Request = decode_request(raw)
            except MalformedRequest as exc:
                self.m_rejects.inc(1, exc.code)
                replies.append(encode_frame(ErrorReply(rid=exc.rid, code=exc.code,
                                                       msg=_short(str(exc)))))
                continue
            except (DecodeError, LimitExceeded) as exc:
                # Not answerable: the good requests before it are answered, then the reset.
                fatal = _StreamEnded("malformed-frame", str(exc))
                break
            if isinstance(request, Deposit):
                code = self._admit(s, request)
                if code is not None:
                    self.m_rejects.inc(1, code)
                    replies.append(encode_frame(ErrorReply(rid=request.rid, code=code,
                                                           msg=_refusal_text(code, self.config))))
                    continue
                replies.append(None)
                pending.append((len(replies) - 1, request))
                continue
            self._commit(pending, replies, now)
            replies.append(self._answer(s, request, now))
        self._commit(pending, replies, now)
        return [r for r in replies if r is not None], fatal

    def _admit(self, s: _Session, d: Deposit) -> str | None:
        if not s.deposits.take(1, now=self.clock.monotonic()):
            return RATE_LIMITED
        if len(d.env) > self.config.max_envelope_bytes:
            return TOO_LARGE
        if d.ttl > self.config.max_ttl_s:
            return BAD_TTL
        return None

    def _commit(self, pending: list[tuple[int, Deposit]], replies: list[bytes | None],
                now: int) -> None:
        if not pending:
            return
        batch = [PendingDeposit(d.box, d.id, d.env, now + (d.ttl or self.config.default_ttl_s),
                                d.cap) for _, d in pending]
        try:
            outcome = self.store.deposit(batch, now=now)
            results = outcome.results
        except StorageError as exc:
            log.error("deposit batch failed", extra={"pigeon_fields": {
                "deposits": len(batch), "reason": exc.reason, "error": str(exc)}})
            results = [STORAGE_FULL] * len(batch)
            outcome = None
        for (index, d), result in zip(pending, results, strict=True):
            if result in (STORED, DUPLICATE):
                replies[index] = encode_frame(Ok(rid=d.rid))
            else:
                self.m_rejects.inc(1, result)
                replies[index] = encode_frame(ErrorReply(rid=d.rid, code=result,
                                                         msg=_refusal_text(result, self.config)))
        pending.clear()
        if outcome is None:
            return
        stored = outcome.stored
        self.m_deposits.inc(stored)
        self.m_expired.inc(outcome.expired)
        self.m_duplicates.inc(sum(1 for r in results if r == DUPLICATE))
        event(logging.DEBUG, "deposit.batch", deposits=len(batch), stored=stored,
               mailboxes=sorted(box_tag(b) for b in outcome.boxes))
        for box in outcome.boxes:
            subscriptions = self._subscriptions.get(box, ())
            for subscription in subscriptions:
                subscription.wakeup.set()
            if not subscriptions:
                # Nobody is listening: wake the device if it registered a push endpoint
                # (PROTOCOL.md section 29).
                self.waker.deposited(box)

    def _answer(self, s: _Session, request: Request, now: int) -> bytes | None:
        rid = request.rid
        if isinstance(request, BlobPut | BlobRead | BlobDelete):
            return self._answer_blob(s, request, now)
        if isinstance(request, Auth):
            try:
                box = verify_auth(request.dev, request.sig, self.relay_key, s.nonce)
            except AuthFailed:
                return self._refuse(rid, UNAUTHORIZED, "signature does not verify for this "
                                    "relay and this stream's challenge")
            if s.box is not None and s.box != box:
                return self._refuse(rid, UNAUTHORIZED, "this stream is bound to another mailbox")
            # Authenticating registers the mailbox (or renews it): deposits are taken only for
            # mailboxes a device registered (PROTOCOL.md section 21 "Registration").
            try:
                known = self.store.is_registered(box)
                if not self.store.register(box, now=now, max_mailboxes=self.config.max_mailboxes):
                    # At capacity: a new mailbox is refused with a code the client moves on
                    # from (PROTOCOL.md section 28.2); mailboxes it holds keep working.
                    return self._refuse(rid, RELAY_FULL, "the relay serves as many mailboxes "
                                        "as it may (its capacity); use another relay")
                if not known:
                    self.m_moved.inc(1, "in")
            except StorageError as exc:
                return self._storage_failed(rid, request, exc)
            s.box = box
            self._members.add(s.peer)
            self._leave_strangers(s)
            event(logging.DEBUG, "mailbox.auth", mailbox=box_tag(box))
            return encode_frame(Ok(rid=rid))
        if s.box is None:
            return self._refuse(rid, UNAUTHORIZED, "authenticate first")
        try:
            if isinstance(request, Caps):
                self.store.set_caps(s.box, request.set)
                event(logging.DEBUG, "mailbox.caps", mailbox=box_tag(s.box), caps=len(request.set))
                return encode_frame(Ok(rid=rid))
            if isinstance(request, Fetch):
                items, more = self.store.fetch(s.box, after=request.after,
                                               limit=min(request.limit, MAX_ITEMS_PER_FRAME),
                                               budget=ITEMS_BUDGET_BYTES, now=now)
                self.m_fetches.inc()
                self.m_fetched.inc(len(items))
                return encode_frame(Items(rid=rid, items=tuple(items), more=more))
            if isinstance(request, Ack):
                self.m_acked.inc(self.store.ack(s.box, request.ids))
                return encode_frame(Ok(rid=rid))
            if isinstance(request, Wake):
                if s.wake_bucket is None:
                    s.wake_bucket = TokenBucket(WAKE_REQUEST_RATE_PER_S, WAKE_REQUEST_BURST,
                                                now=self.clock.monotonic())
                if not s.wake_bucket.take(1, now=self.clock.monotonic()):
                    return self._refuse(rid, RATE_LIMITED, "too many wake requests on this "
                                        "stream; a device registers once per connection")
                s.wakes.append(request)  # answered after the batch (_register_wake)
                return None
        except StorageError as exc:
            return self._storage_failed(rid, request, exc)
        assert isinstance(request, Subscribe)
        if s.subscription is None:
            self._subscribe(s, s.box)
        return encode_frame(Ok(rid=rid))

    async def _register_wake(self, s: _Session, request: Wake) -> bytes:
        """Answer one `wake` of the stream's mailbox (PROTOCOL.md section 29)."""
        assert s.box is not None  # _answer refuses `wake` on a stream without a mailbox
        try:
            refused = await self.waker.register(s.box, request)
        except StorageError as exc:
            return self._storage_failed(request.rid, request, exc)
        if refused is not None:
            return self._refuse(request.rid, *refused)
        return encode_frame(Ok(rid=request.rid))

    def _answer_blob(self, s: _Session, request: BlobPut | BlobRead | BlobDelete,
                     now: int) -> bytes:
        """The blob store's requests (PROTOCOL.md section 26.6): uploads from anyone holding
        one of the mailbox's capabilities; reads and deletes by its device (a bound stream)."""
        rid = request.rid
        if self.blobs is None:
            return self._refuse(rid, UNKNOWN_REQUEST, "this relay keeps no blobs")
        try:
            if isinstance(request, BlobPut):
                result = self.blobs.put(request, registered=self.store.is_registered(request.box),
                                        caps=self.store.caps_of(request.box), now=now)
                if isinstance(result, str):
                    return self._refuse(rid, result, _blob_refusal_text(result))
                return encode_frame(BlobHave(rid=rid, have=result))
            if s.box is None:
                return self._refuse(rid, UNAUTHORIZED, "authenticate first")
            if isinstance(request, BlobRead):
                data = self.blobs.read(s.box, request.hash, request.off, request.len)
                if isinstance(data, str):
                    return self._refuse(rid, data, _blob_refusal_text(data))
                return encode_frame(BlobData(rid=rid, off=request.off, data=data))
            self.blobs.delete(s.box, request.hash)
            return encode_frame(Ok(rid=rid))
        except OSError as exc:
            log.error("blob request failed", extra={"pigeon_fields": {"error": str(exc)}})
            return self._refuse(rid, STORAGE_FULL, "the relay cannot use its storage; retry later")

    def _storage_failed(self, rid: int, request: Request, exc: StorageError) -> bytes:
        """The store could not read or write (disk full, read-only, ...): refuse this one
        request with a code the client understands (PROTOCOL.md section 21 "Errors"): it retries
        later, and the messages stay held meanwhile."""
        log.error("request failed", extra={"pigeon_fields": {
            "request": type(request).__name__.lower(), "reason": exc.reason, "error": str(exc)}})
        return self._refuse(rid, STORAGE_FULL, _short(f"the relay cannot use its storage"
                                                      f" ({exc.reason}); retry later"))

    def _refuse(self, rid: int, code: str, text: str) -> bytes:
        self.m_rejects.inc(1, code)
        return encode_frame(ErrorReply(rid=rid, code=code, msg=text))

    # --- subscriptions ----------------------------------------------------------------------------

    def _subscribe(self, s: _Session, box: bytes) -> None:
        subscribers = self._subscriptions.setdefault(box, [])
        while len(subscribers) >= self.config.max_subscribers_per_box:
            oldest = subscribers.pop(0)
            oldest.session.subscription = None
            oldest.session.evicted = True
            if oldest.session.scope is not None:
                oldest.session.scope.cancel()
        # Everything committed from now on is pushed; what is already there, the client
        # fetches (PROTOCOL.md: subscribe first, then fetch).
        subscription = _Subscription(s, box, self.store.last_seq)
        subscribers.append(subscription)
        s.subscription = subscription
        assert s.nursery is not None
        s.nursery.start_soon(self._pusher, s, subscription)
        event(logging.DEBUG, "mailbox.subscribe", mailbox=box_tag(box))

    def _unsubscribe(self, s: _Session) -> None:
        subscription = s.subscription
        if subscription is None:
            return
        s.subscription = None
        subscribers = self._subscriptions.get(subscription.box)
        if subscribers and subscription in subscribers:
            subscribers.remove(subscription)
            if not subscribers:
                del self._subscriptions[subscription.box]

    async def _pusher(self, s: _Session, sub: _Subscription) -> None:
        try:
            while True:
                await sub.wakeup.wait()
                sub.wakeup = trio.Event()
                while True:
                    items, more = self.store.fetch(sub.box, after=sub.cursor,
                                                   limit=MAX_ITEMS_PER_FRAME,
                                                   budget=ITEMS_BUDGET_BYTES, now=self.clock.now_s())
                    if not items:
                        break
                    sub.cursor = items[-1].seq
                    await s.stream.send([encode_frame(Push(items=tuple(items)))])
                    self.m_pushes.inc(len(items))
                    if not more:
                        break
        except TransportError as exc:
            event(logging.DEBUG, "stream.lost", detail=scrub(str(exc)))
            if s.scope is not None:
                s.scope.cancel()
        except StorageError as exc:
            # The mailbox cannot be read now: end the subscription (the client reconnects and
            # fetches; nothing is lost, the messages stay held).
            log.error("push failed", extra={"pigeon_fields": {"reason": exc.reason,
                                                               "error": str(exc)}})
            if s.scope is not None:
                s.scope.cancel()

    # --- background work --------------------------------------------------------------------------

    async def purge_once(self) -> int:
        """Delete every expired message (in chunks, yielding to other tasks between them)."""
        total = 0
        while True:
            deleted = self.store.purge_expired(now=self.clock.now_s())
            total += deleted
            if deleted == 0:
                break
            await trio.sleep(0)
        if total:
            self.m_expired.inc(total)
            event(logging.INFO, "purge", expired=total)
        return total

    def wake_waiting(self) -> int:
        """Make a wake-up due for every mailbox with a push endpoint, messages waiting and no
        subscriber: wake-ups due when the relay stopped were in memory only (PROTOCOL.md
        section 29 "When"). Returns how many mailboxes it looked at."""
        try:
            boxes = self.store.waiting_wakes(self.config.push_max_pending)
        except StorageError as exc:
            log.error("wake-ups after a start: %s", exc)
            return 0
        for box in boxes:
            if not self._subscriptions.get(box):
                self.waker.deposited(box)
        if boxes:
            event(logging.INFO, "push.restart", mailboxes=len(boxes))
        return len(boxes)

    async def purge_loop(self) -> None:
        while True:
            try:
                await self.purge_once()
                lapsed = self.store.drop_lapsed(
                    before=self.clock.now_s() - self.config.registration_ttl_s)
                if lapsed:
                    self.m_moved.inc(lapsed, "out")
                    event(logging.INFO, "registrations.lapsed", mailboxes=lapsed)
                if self.blobs is not None:
                    self.blobs.purge(now=self.clock.now_s())
            except (StorageError, OSError) as exc:
                log.error("purge failed", extra={"pigeon_fields": {"error": str(exc)}})
            # Acked and expired envelopes leave the WAL too, once per interval (not per ack).
            self.store.checkpoint_if_deleted()
            self._forget_gone_peers()
            await trio.sleep(self.config.purge_interval_s)

    def _forget_gone_peers(self) -> None:
        """Drop the rate buckets of peers no longer connected (the disconnect callback does it
        too; this catches a peer that left before its stream's handler ran)."""
        if self.transport is None:
            return
        for peer_id in [p for p in self._buckets if not self.transport.is_connected(p)]:
            del self._buckets[peer_id]
        self._members = {p for p in self._members if self.transport.is_connected(p)}

    async def shutdown(self) -> None:
        """Stop taking streams; let each stream finish the batch it is committing and answering
        (bounded by `shutdown_grace_s`); streams idle in a read end at once."""
        self.closing = True
        if self.transport is not None:
            self.transport.remove_stream_handler(MAILBOX_PROTOCOL)
        for session in list(self._sessions):
            if session.receive_scope is not None:
                session.receive_scope.cancel()
        with trio.move_on_after(self.config.shutdown_grace_s):
            await self._idle.wait()


#: Stream reset reasons (metrics labels) for the cap that refused a stream.
_LIMIT_REASONS = {PEER_LIMIT: "peer-stream-limit", ADDRESS_LIMIT: "address-stream-limit"}


def _storage_problem(problem: StorageError | None) -> dict[str, str] | None:
    return None if problem is None else {"reason": problem.reason, "error": str(problem)}


def _short(text: str) -> str:
    encoded = text.encode()[:200]
    return encoded.decode(errors="ignore")


def _blob_refusal_text(code: str) -> str:
    """What a blob refusal says to people (PROTOCOL.md section 26.6)."""
    return {
        UNKNOWN_MAILBOX: "no device registered this mailbox here",
        UNAUTHORIZED: "uploading a blob needs a capability of the mailbox",
        BAD_TTL: "ttl above this relay's maximum for blobs",
        TOO_LARGE: "the blob is larger than this relay keeps",
        MAILBOX_FULL: "the mailbox holds as many blob bytes as this relay allows",
        STORAGE_FULL: "the relay's blob storage is full",
        UNKNOWN_BLOB: "no such blob for this mailbox (or not complete yet)",
        BAD_BLOB: "the blob's bytes do not match its hash; upload it again",
    }.get(code, code)


def _refusal_text(code: str, config: RelayConfig) -> str:
    return {
        TOO_LARGE: f"envelopes above {config.max_envelope_bytes} bytes are refused",
        BAD_TTL: f"ttl above {config.max_ttl_s} s",
        RATE_LIMITED: f"more than {config.deposit_rate_per_s:g} deposits/s "
                      f"(burst {config.deposit_burst})",
        "mailbox-full": f"the mailbox holds {config.mailbox_max_messages} messages or "
                        f"{config.mailbox_max_bytes} bytes from its contacts, or "
                        f"{config.open_mailbox_max_messages} or "
                        f"{config.open_mailbox_max_bytes} bytes deposited without a capability",
        STORAGE_FULL: "the relay's storage is full (or its share for deposits without a "
                      "capability)",
        UNKNOWN_MAILBOX: "no device registered this mailbox here; nothing was stored",
    }.get(code, "")
