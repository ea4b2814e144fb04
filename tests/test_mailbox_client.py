"""MailboxClient against scripted relays (real libp2p streams, a handler playing the relay):
replies matched by rid, bounded waits, strict decoding, bounded push buffer."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio

from node.device.mailbox_client import DepositRequest, MailboxClient
from node.errors import DecodeError, RelayRefused, TransportError
from node.net import FrameStream, Transport
from node.protocol import mailbox as mb
from node.protocol.keys import DeviceKeyPair
from tests.relaytools import LOOPBACK, WAIT

BOX = os.urandom(32)
Script = Callable[[FrameStream], Awaitable[None]]


@asynccontextmanager
async def scripted_relay(script: Script) -> AsyncIterator[tuple[Transport, Transport]]:
    """A host whose mailbox handler runs `script`, and a client host."""
    async with Transport.open(os.urandom(32), (LOOPBACK,)) as relay, \
            Transport.open(os.urandom(32), (LOOPBACK,)) as client:
        relay.set_stream_handler(mb.MAILBOX_PROTOCOL, script,
                                 max_frame_bytes=mb.MAX_MAILBOX_FRAME_BYTES)
        yield relay, client


async def challenge(stream: FrameStream) -> None:
    await stream.send([mb.encode_frame(mb.Challenge(nonce=os.urandom(32)))])


async def requests(stream: FrameStream) -> AsyncIterator[mb.Request]:
    async for raw in stream:
        yield mb.decode_request(raw)


def connect(client: Transport, relay: Transport, **kwargs: float
            ) -> AbstractAsyncContextManager[MailboxClient]:
    return MailboxClient.connect(client, relay.peer_id, relay.listen_addrs(), timeout=WAIT,
                                 **kwargs)  # type: ignore[arg-type]


async def test_replies_are_matched_by_rid_whatever_their_order() -> None:
    async def script(stream: FrameStream) -> None:
        await challenge(stream)
        held: list[mb.Request] = []
        async for request in requests(stream):
            held.append(request)
            if len(held) == 3:  # answer in reverse order, one refused
                await stream.send([
                    mb.encode_frame(mb.Ok(rid=held[2].rid)),
                    mb.encode_frame(mb.ErrorReply(rid=held[1].rid, code="mailbox-full", msg="x")),
                    mb.encode_frame(mb.Ok(rid=held[0].rid)),
                ])

    async with scripted_relay(script) as (relay, client), connect(client, relay) as mailbox:
        with trio.fail_after(WAIT):
            results = await mailbox.deposit_many(
                [DepositRequest(BOX, os.urandom(16), b"e") for _ in range(3)])
    assert [None if r is None else r.code for r in results] == [None, "mailbox-full", None]


async def test_a_silent_relay_times_out_and_late_replies_are_ignored() -> None:
    async def script(stream: FrameStream) -> None:
        await challenge(stream)
        late: list[int] = []
        async for request in requests(stream):
            late.append(request.rid)
            if len(late) == 2:  # the first reply comes after its timeout, then the second
                await stream.send([mb.encode_frame(mb.Ok(rid=rid)) for rid in late])

    async with scripted_relay(script) as (relay, client), \
            connect(client, relay, reply_timeout=0.2) as mailbox:
        with trio.fail_after(WAIT), pytest.raises(TransportError, match="no reply"):
            await mailbox.deposit(BOX, os.urandom(16), b"first")
        with trio.fail_after(WAIT):
            await mailbox.deposit(BOX, os.urandom(16), b"second")  # works; the stray ok is dropped
        assert mailbox._waiting == {}


async def test_no_challenge_within_the_timeout_is_a_transport_error() -> None:
    async def script(stream: FrameStream) -> None:
        await trio.sleep_forever()

    async with scripted_relay(script) as (relay, client):
        with trio.fail_after(WAIT), pytest.raises(TransportError, match="no challenge"):
            async with connect(client, relay, reply_timeout=0.2):
                pass


@pytest.mark.parametrize("bad", [
    b"\xffnot cbor",
    mb.encode_frame(mb.Challenge(nonce=bytes(32))),  # a second challenge
    mb.encode_frame(mb.Deposit(rid=1, box=BOX, id=bytes(16), env=b"e", ttl=0)),  # a request
], ids=["not-cbor", "second-challenge", "a-request"])  # stable ids: BOX is random (xdist)
async def test_a_malformed_relay_frame_fails_the_waiters_and_resets(bad: bytes) -> None:
    async def script(stream: FrameStream) -> None:
        await challenge(stream)
        async for _ in requests(stream):
            await stream.send([bad])

    async with scripted_relay(script) as (relay, client), connect(client, relay) as mailbox:
        with trio.fail_after(WAIT), pytest.raises(DecodeError):
            await mailbox.deposit(BOX, os.urandom(16), b"e")
        with pytest.raises(DecodeError):  # the client stays broken, it does not hang
            await mailbox.fetch()


async def test_the_push_buffer_is_bounded() -> None:
    async def script(stream: FrameStream) -> None:
        await challenge(stream)
        async for request in requests(stream):
            items = tuple(mb.Item(seq=i + 1, id=os.urandom(16), env=b"e", exp=0) for i in range(10))
            await stream.send([mb.encode_frame(mb.Ok(rid=request.rid)),
                               mb.encode_frame(mb.Push(items=items))])
            await stream.aclose()
            return

    async with scripted_relay(script) as (relay, client), \
            connect(client, relay, push_buffer=4) as mailbox:
        await mailbox.subscribe()
        got = []
        with trio.fail_after(WAIT), pytest.raises(TransportError):
            async for item in mailbox.pushes():  # 4 buffered, then the end of the stream
                got.append(item.seq)
        assert got == [1, 2, 3, 4] and mailbox.dropped_pushes == 6


async def test_refusals_raise_relay_refused_with_the_code() -> None:
    async def script(stream: FrameStream) -> None:
        await challenge(stream)
        async for request in requests(stream):
            await stream.send([mb.encode_frame(mb.ErrorReply(rid=request.rid,
                                                             code="unauthorized", msg="no"))])

    async with scripted_relay(script) as (relay, client), connect(client, relay) as mailbox:
        with trio.fail_after(WAIT):
            for call in (mailbox.authenticate(DeviceKeyPair.generate()), mailbox.fetch(),
                         mailbox.ack([os.urandom(16)] * 1500), mailbox.subscribe()):
                with pytest.raises(RelayRefused) as info:
                    await call
                assert info.value.code == "unauthorized"
