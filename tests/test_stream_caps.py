"""Inbound stream caps of a protocol (`Transport.set_stream_handler(caps=...)`, as a device uses
them for /pigeon/msg and /pigeon/bundle): a stranger with many peer ids on one address cannot
take the slots that contacts and other strangers need. Real libp2p hosts on loopback; the
stranger dials from 127.0.0.2 (`dial_from`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress

import pytest
import trio

from node import Node
from node.device.config import MSG_STREAMS_PER_ADDRESS, MSG_STREAMS_PER_PEER
from node.errors import TransportError
from node.net import MSG_PROTOCOL, FrameStream, StreamCaps, Transport
from tests.relaytools import WAIT, dial_from, peer

CAPS = StreamCaps(per_peer=3, per_address=5, strangers=8, total=12)


async def served(client: Transport, target: Transport) -> bool:
    """Whether `target` answers a frame on a new stream from `client` (False: reset at once)."""
    try:
        with trio.fail_after(WAIT):
            stream = await client.open_stream(target.peer_id, target.listen_addrs(),
                                              MSG_PROTOCOL, timeout=WAIT)
            await stream.send([b"hello"])
            return await stream.receive() == b"hello"
    except TransportError:
        return False


@pytest.mark.slow(seconds=1)
async def test_a_stranger_on_one_address_cannot_take_every_stream_slot() -> None:
    async with AsyncExitStack() as stack:
        target = await stack.enter_async_context(peer())
        contact = await stack.enter_async_context(peer())
        members = {contact.peer_id}

        async def echo_and_hold(stream: FrameStream) -> None:
            async for frame in stream:  # held open until the peer closes it
                await stream.send([frame])

        target.set_stream_handler(MSG_PROTOCOL, echo_and_hold, caps=CAPS,
                                  is_member=lambda s: s.remote_peer_id in members)
        strangers = [dial_from(await stack.enter_async_context(peer()), "127.0.0.2")
                     for _ in range(4)]
        other = await stack.enter_async_context(peer())
        with trio.fail_after(60):
            # 4 peer ids x 4 attempts from one address: 3 per peer id, 5 for the address.
            answered = [[await served(s, target) for _ in range(4)] for s in strangers]
            assert answered == [[True, True, True, False], [True, True, False, False],
                                [False] * 4, [False] * 4]
            # Another stranger elsewhere, and a contact many times over, are still served.
            assert await served(other, target)
            assert [await served(contact, target) for _ in range(3)] == [True] * 3
            assert not await served(contact, target)  # a contact has a per-peer cap too


@pytest.mark.slow(seconds=1)
async def test_the_strangers_pool_and_the_total_are_shared() -> None:
    async with AsyncExitStack() as stack:
        target = await stack.enter_async_context(peer())
        caps = StreamCaps(per_peer=1, per_address=10, strangers=2, total=3)

        async def echo_and_hold(stream: FrameStream) -> None:
            async for frame in stream:
                await stream.send([frame])

        contact = await stack.enter_async_context(peer())
        target.set_stream_handler(MSG_PROTOCOL, echo_and_hold, caps=caps,
                                  is_member=lambda s: s.remote_peer_id == contact.peer_id)
        strangers = [await stack.enter_async_context(peer()) for _ in range(3)]
        late = await stack.enter_async_context(peer())
        with trio.fail_after(60):
            assert [await served(s, target) for s in strangers] == [True, True, False]
            assert await served(contact, target)  # the third slot of the total
            assert not await served(late, target)


@pytest.mark.slow(seconds=1)
async def test_a_nodes_contacts_get_through_a_strangers_idle_message_streams(
        node_pair: tuple[Node, Node], caplog: pytest.LogCaptureFixture) -> None:
    """The device's own caps (node/device/config.py): 3 stranger peer ids on one address open
    24 idle /pigeon/msg streams to Alice; 16 are kept, the rest reset, and Bob's message still
    arrives."""
    alice, bob = node_pair
    caplog.set_level(logging.INFO, logger="pigeon.transport")
    async with AsyncExitStack() as stack:
        strangers = [dial_from(await stack.enter_async_context(peer()), "127.0.0.2")
                     for _ in range(3)]
        attempts = len(strangers) * MSG_STREAMS_PER_PEER
        with trio.fail_after(60):
            for stranger in strangers:
                for _ in range(MSG_STREAMS_PER_PEER):
                    # A refused stream is reset at once, sometimes before it finished opening.
                    with suppress(TransportError):
                        await stack.enter_async_context(_closing(await stranger.open_stream(
                            alice.peer_id, alice.addresses(), MSG_PROTOCOL, timeout=WAIT)))
            message_id = await bob.send("alice", "past the idle streams")
            assert await bob.wait_delivered(message_id, timeout=WAIT) == "delivered"

            def refused() -> int:
                return sum("refusing a stream on /pigeon/msg/1.0.0" in r.getMessage()
                           for r in caplog.records)

            while refused() < attempts - MSG_STREAMS_PER_ADDRESS:  # bounded by fail_after
                await trio.sleep(0.05)
        assert refused() == attempts - MSG_STREAMS_PER_ADDRESS


@asynccontextmanager
async def _closing(stream: FrameStream) -> AsyncIterator[FrameStream]:
    try:
        yield stream
    finally:
        with trio.CancelScope(shield=True):
            await stream.reset()
