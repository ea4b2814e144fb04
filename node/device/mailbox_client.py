"""Client side of the relay mailbox protocol `/pigeon/mailbox/1.0.0` (PROTOCOL.md "Relay mailbox").

    async with MailboxClient.connect(transport, relay_peer_id, relay_addrs) as relay:
        await relay.deposit(mailbox_id(recipient), deposit_id, envelope, cap=cap)
        await relay.authenticate(my_device)          # registers my mailbox; then: mine only
        await relay.set_caps([cap_hash(c) for c in my_contacts_caps])
        await relay.subscribe()                      # subscribe first, then fetch the backlog
        items, more = await relay.fetch(after=0, limit=256)
        await relay.ack([item.id for item in items])
        async for item in relay.pushes(): ...

One stream per client. One reader task reads every frame the relay sends and hands each reply
to the request that waits for its rid, and each pushed item to the push buffer, so requests can
be pipelined from any number of tasks (`deposit_many` writes a whole batch in one write and then
awaits every reply). Everything read is bounded: frames by MAX_MAILBOX_FRAME_BYTES (checked on the
length prefix), decoding is strict, every reply is awaited at most `reply_timeout` seconds, and
pushed items wait in a buffer of at most `push_buffer` items (beyond it they are dropped and
counted in `dropped_pushes`: they stay in the mailbox until acked, so a fetch finds them).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, TypeVar

import trio

from node.errors import DecodeError, LimitExceeded, RelayRefused, RemoteError, TransportError
from node.net import FrameStream, Transport
from node.protocol.keys import DeviceKey, DeviceKeyPair
from node.protocol.mailbox import (
    MAILBOX_PROTOCOL,
    MAX_ITEMS_PER_FRAME,
    MAX_MAILBOX_FRAME_BYTES,
    Ack,
    Auth,
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
    Item,
    Items,
    Ok,
    Push,
    Reply,
    Request,
    Subscribe,
    Wake,
    decode_reply,
    encode_frame,
    mailbox_id,
    sign_auth,
    split_ids,
)

__all__ = ["DEFAULT_TTL_S", "DepositRequest", "Item", "MailboxClient", "mailbox_id"]

log = logging.getLogger("pigeon.mailbox")

#: TTL a deposit asks for by default: 0 means "the relay's default" (14 days on Pigeon relays).
DEFAULT_TTL_S: Final = 0

#: Seconds to wait for the relay's challenge, and for each reply.
DEFAULT_REPLY_TIMEOUT_S: Final = 30.0

#: Pushed items held until the application takes them.
DEFAULT_PUSH_BUFFER: Final = 4096

#: Deposits written per stream write by `deposit_many` (and at most about DEPOSIT_BATCH_BYTES):
#: one write per batch is what makes pipelining fast (docs/libp2p.md L18); the relay
#: commits what it reads together.
DEPOSIT_BATCH: Final = 128
DEPOSIT_BATCH_BYTES: Final = 1024 * 1024

_READ_BATCH: Final = 256


@dataclass(frozen=True, slots=True)
class DepositRequest:
    """One deposit for `deposit_many`: `box` is `mailbox_id(recipient device key)`."""

    box: bytes
    message_id: bytes
    envelope: bytes
    ttl: int = DEFAULT_TTL_S
    #: The deposit capability the mailbox's device gave us (None: deposit as a stranger).
    cap: bytes | None = None


class _Pending:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: Reply | None = None


class MailboxClient:
    """A mailbox stream to one relay. Use `connect` (opens the stream) or `over` (an open one)."""

    def __init__(self, stream: FrameStream, nonce: bytes, *, reply_timeout: float,
                 push_buffer: int) -> None:
        self._stream = stream
        self.nonce = nonce
        #: The relay's Ed25519 key, as authenticated by the transport handshake.
        self.relay_key = DeviceKey(stream.remote_public_key)
        self.reply_timeout = reply_timeout
        self._next_rid = 0
        self._waiting: dict[int, _Pending] = {}
        self._push_send, self._push_receive = trio.open_memory_channel[Item](push_buffer)
        self._broken: RemoteError | None = None
        self.dropped_pushes = 0
        self.authenticated_box: bytes | None = None

    # --- opening ----------------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(cls, transport: Transport, relay_peer_id: str, addrs: Sequence[str], *,
                      timeout: float = 10.0, reply_timeout: float = DEFAULT_REPLY_TIMEOUT_S,
                      push_buffer: int = DEFAULT_PUSH_BUFFER) -> AsyncIterator[MailboxClient]:
        """Open a mailbox stream to the relay (TransportError if it cannot be reached)."""
        stream = await transport.open_stream(relay_peer_id, addrs, MAILBOX_PROTOCOL,
                                             timeout=timeout, max_frame_bytes=MAX_MAILBOX_FRAME_BYTES)
        async with cls.over(stream, reply_timeout=reply_timeout, push_buffer=push_buffer) as client:
            yield client

    @classmethod
    @asynccontextmanager
    async def over(cls, stream: FrameStream, *, reply_timeout: float = DEFAULT_REPLY_TIMEOUT_S,
                   push_buffer: int = DEFAULT_PUSH_BUFFER) -> AsyncIterator[MailboxClient]:
        """Use an open mailbox stream: read the challenge, run the reader for the block, then
        close the stream (reset it if the block raised)."""
        body_error: BaseException | None = None
        try:
            with trio.move_on_after(reply_timeout) as cs:
                raw = await stream.receive()
            if cs.cancelled_caught:
                raise TransportError(f"the relay sent no challenge within {reply_timeout}s")
            if raw is None:
                raise TransportError("the relay closed the stream before its challenge")
            first = decode_reply(raw)
            if not isinstance(first, Challenge):
                raise DecodeError(f"expected the relay's challenge, got {type(first).__name__}")
            client = cls(stream, first.nonce, reply_timeout=reply_timeout, push_buffer=push_buffer)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                try:
                    yield client
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps the block's exception; give the caller its own back.
            if body_error is None or group.split(lambda e: e is body_error)[1] is not None:
                raise
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.reset()
            raise
        finally:
            with trio.CancelScope(shield=True):
                if body_error is None:
                    await stream.aclose()
                else:
                    await stream.reset()
        if body_error is not None:
            raise body_error

    # --- requests ---------------------------------------------------------------------------------

    def _rid(self) -> int:
        self._next_rid += 1
        return self._next_rid

    async def _send(self, requests: Sequence[Request]) -> list[_Pending]:
        if self._broken is not None:
            raise self._broken
        pendings = []
        for request in requests:
            pending = _Pending()
            self._waiting[request.rid] = pending
            pendings.append(pending)
        try:
            await self._stream.send([encode_frame(r) for r in requests])
        except BaseException:
            for request in requests:
                self._waiting.pop(request.rid, None)
            raise
        return pendings

    async def _wait(self, rid: int, pending: _Pending, deadline: float) -> Reply:
        try:
            with trio.move_on_at(deadline):
                await pending.event.wait()
            if pending.reply is None:
                if self._broken is not None:
                    raise self._broken
                raise TransportError(f"no reply from the relay within {self.reply_timeout}s")
            return pending.reply
        finally:
            self._waiting.pop(rid, None)

    async def _call(self, request: Request) -> Reply:
        (pending,) = await self._send([request])
        reply = await self._wait(request.rid, pending, trio.current_time() + self.reply_timeout)
        if isinstance(reply, ErrorReply):
            raise RelayRefused(reply.code, reply.msg)
        return reply

    async def deposit(self, box: bytes, message_id: bytes, envelope: bytes,
                      ttl: int = DEFAULT_TTL_S, *, cap: bytes | None = None) -> None:
        """Leave a sealed envelope in mailbox `box`, presenting the deposit capability `cap` if
        given. Returns once the relay has it on disk; RelayRefused(code) if it refused
        (PROTOCOL.md error codes). Depositing the same (box, message_id) again is harmless."""
        reply = await self._call(Deposit(rid=self._rid(), box=box, id=message_id, env=envelope,
                                         ttl=ttl, cap=cap))
        _expect(reply, Ok)

    async def deposit_many(self, deposits: Sequence[DepositRequest]) -> list[RelayRefused | None]:
        """Pipeline many deposits: written in batches (DEPOSIT_BATCH frames or DEPOSIT_BATCH_BYTES
        to a write), replies awaited together.
        Returns, in order, None for each deposit the relay holds and RelayRefused for each it
        refused. TransportError if the stream breaks (then any of them may or may not be held:
        deposit them again, duplicates are harmless)."""
        requests = [Deposit(rid=self._rid(), box=d.box, id=d.message_id, env=d.envelope,
                            ttl=d.ttl, cap=d.cap) for d in deposits]
        pendings: list[_Pending] = []
        batch: list[Request] = []
        size = 0
        for request in requests:
            batch.append(request)
            size += len(request.env)
            if len(batch) >= DEPOSIT_BATCH or size >= DEPOSIT_BATCH_BYTES:
                pendings += await self._send(batch)
                batch, size = [], 0
        if batch:
            pendings += await self._send(batch)
        deadline = trio.current_time() + self.reply_timeout
        results: list[RelayRefused | None] = []
        for request, pending in zip(requests, pendings, strict=True):
            reply = await self._wait(request.rid, pending, deadline)
            if isinstance(reply, ErrorReply):
                results.append(RelayRefused(reply.code, reply.msg))
            else:
                _expect(reply, Ok)
                results.append(None)
            # Every reply within one reply_timeout of the last one: a long batch stays bounded
            # by progress, not by its total size.
            deadline = trio.current_time() + self.reply_timeout
        return results

    async def authenticate(self, device: DeviceKeyPair) -> bytes:
        """Prove to the relay that this stream belongs to `device`'s mailbox; returns its id.
        RelayRefused("unauthorized") if the relay does not accept the signature."""
        signature = sign_auth(device, self.relay_key, self.nonce)
        reply = await self._call(Auth(rid=self._rid(), dev=device.public.to_bytes(), sig=signature))
        _expect(reply, Ok)
        self.authenticated_box = mailbox_id(device.public)
        return self.authenticated_box

    async def set_caps(self, hashes: Sequence[bytes]) -> None:
        """Replace the deposit capabilities registered for the authenticated mailbox by these
        hashes (`node.protocol.mailbox.cap_hash` of each). RelayRefused("unknown-request") from
        a relay that predates capabilities."""
        _expect(await self._call(Caps(rid=self._rid(), set=tuple(hashes))), Ok)

    async def set_wake(self, url: str | None, key: bytes | None = None,
                       auth: bytes | None = None) -> None:
        """Register the push endpoint of the authenticated mailbox (PROTOCOL.md section 29):
        `url` and the device's Web Push keys (`key`: p256dh, `auth`); `url` None removes it.
        RelayRefused("wake-refused") if the relay will not POST there, ("unknown-request") from
        a relay that predates wake-ups."""
        _expect(await self._call(Wake(rid=self._rid(), url=url, key=key, auth=auth)), Ok)

    async def fetch(self, after: int = 0, limit: int = MAX_ITEMS_PER_FRAME
                    ) -> tuple[list[Item], bool]:
        """Messages of the authenticated mailbox with seq > `after`, oldest first (at most
        `limit`, and at most one frame's worth), and whether more follow."""
        reply = await self._call(Fetch(rid=self._rid(), after=after, limit=limit))
        items = _expect(reply, Items)
        return list(items.items), items.more

    async def ack(self, ids: Sequence[bytes]) -> None:
        """Delete messages from the authenticated mailbox (after storing them durably)."""
        requests = [Ack(rid=self._rid(), ids=chunk) for chunk in split_ids(ids)]
        if not requests:
            return
        pendings = await self._send(requests)
        deadline = trio.current_time() + self.reply_timeout
        for request, pending in zip(requests, pendings, strict=True):
            reply = await self._wait(request.rid, pending, deadline)
            if isinstance(reply, ErrorReply):
                raise RelayRefused(reply.code, reply.msg)
            _expect(reply, Ok)

    async def subscribe(self) -> None:
        """Ask the relay to push every message deposited from now on into the authenticated
        mailbox (read them with `pushes()`). Subscribe first, then fetch the backlog: a message
        deposited in between may then arrive both ways (receivers de-duplicate by id)."""
        _expect(await self._call(Subscribe(rid=self._rid())), Ok)

    # --- blobs (PROTOCOL.md section 26.6) ---------------------------------------------------------

    async def blob_put(self, box: bytes, blob_hash: bytes, size: int, off: int, data: bytes, *,
                       ttl: int = DEFAULT_TTL_S, cap: bytes | None = None) -> int:
        """Upload `data` at byte `off` of the blob (`size` bytes in all) for mailbox `box`;
        returns how many bytes the relay now holds from the start (empty `data`: only asks).
        RelayRefused(code) if it refuses."""
        reply = await self._call(BlobPut(rid=self._rid(), box=box, hash=blob_hash, size=size,
                                         off=off, data=data, ttl=ttl, cap=cap))
        return _expect(reply, BlobHave).have

    async def blob_put_many(self, box: bytes, blob_hash: bytes, size: int, off: int,
                            pieces: Sequence[bytes], *, ttl: int = DEFAULT_TTL_S,
                            cap: bytes | None = None) -> int:
        """`blob_put` of consecutive pieces from `off`, pipelined in one write; returns the
        bytes held after the last one."""
        requests: list[Request] = []
        for piece in pieces:
            requests.append(BlobPut(rid=self._rid(), box=box, hash=blob_hash, size=size,
                                    off=off, data=piece, ttl=ttl, cap=cap))
            off += len(piece)
        pendings = await self._send(requests)
        have = 0
        deadline = trio.current_time() + self.reply_timeout
        for request, pending in zip(requests, pendings, strict=True):
            reply = await self._wait(request.rid, pending, deadline)
            if isinstance(reply, ErrorReply):
                raise RelayRefused(reply.code, reply.msg)
            have = _expect(reply, BlobHave).have
            deadline = trio.current_time() + self.reply_timeout
        return have

    async def blob_read(self, blob_hash: bytes, off: int, length: int) -> bytes:
        """Bytes of a complete blob held for the authenticated mailbox (at most
        MAX_BLOB_PIECE_BYTES). RelayRefused("unknown-blob") if it has none."""
        reply = await self._call(BlobRead(rid=self._rid(), hash=blob_hash, off=off, len=length))
        data = _expect(reply, BlobData)
        if data.off != off or len(data.data) > length:
            raise DecodeError("the relay answered another range than the one asked for")
        return data.data

    async def blob_delete(self, blob_hash: bytes) -> None:
        """Tell the relay that the authenticated mailbox's device has the blob."""
        _expect(await self._call(BlobDelete(rid=self._rid(), hash=blob_hash)), Ok)

    async def pushes(self) -> AsyncIterator[Item]:
        """Pushed items as they arrive, until the stream ends (TransportError if it broke)."""
        async for item in self._push_receive:
            yield item
        if self._broken is not None:
            raise self._broken

    # --- the reader -------------------------------------------------------------------------------

    async def _reader(self) -> None:
        try:
            while True:
                frames = await self._stream.receive_batch(_READ_BATCH)
                if not frames:
                    raise TransportError("the relay closed the stream")
                for raw in frames:
                    self._dispatch(decode_reply(raw))
        except (RemoteError, LimitExceeded) as exc:
            self._broken = exc if isinstance(exc, RemoteError) else TransportError(str(exc))
            if isinstance(exc, DecodeError):
                log.info("relay %s sent a malformed frame: %s", self._stream.remote_peer_id, exc)
                with trio.CancelScope(shield=True):
                    await self._stream.reset()
        finally:
            self._push_send.close()
            for pending in self._waiting.values():
                pending.event.set()  # reply stays None: the waiter raises self._broken

    def _dispatch(self, reply: Reply) -> None:
        if isinstance(reply, Push):
            for item in reply.items:
                try:
                    self._push_send.send_nowait(item)
                except trio.WouldBlock:
                    self.dropped_pushes += 1
            return
        if isinstance(reply, Challenge):
            raise DecodeError("a second challenge on the stream")
        pending = self._waiting.pop(reply.rid, None)
        if pending is None:
            return  # a reply after its request timed out or was cancelled: nobody waits for it
        pending.reply = reply
        pending.event.set()


_R = TypeVar("_R", bound=Reply)


def _expect(reply: Reply, kind: type[_R]) -> _R:
    if not isinstance(reply, kind):
        raise DecodeError(f"the relay answered with {type(reply).__name__}, not {kind.__name__}")
    return reply
