"""A stranger cannot take a relay's stream or reservation slots from its users: real relay
service, real libp2p hosts on loopback. The attacker's hosts dial from 127.0.0.2
(`dial_from`), so the relay sees two machines: the attacker's and everyone else's."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage

from node.net import CIRCUIT_HOP_PROTOCOL, FrameStream, Transport
from node.protocol.keys import DeviceKeyPair
from node.relay.service import RelayService
from tests.relaytools import (
    CAP,
    WAIT,
    box_of,
    client,
    dial_from,
    peer,
    raw_stream,
    register,
    running_relay,
)

ATTACKER_IP = "127.0.0.2"
STATUS_OK, RESOURCE_LIMIT_EXCEEDED = 100, 201


@asynccontextmanager
async def attackers(count: int) -> AsyncIterator[list[Transport]]:
    """`count` hosts with fresh peer ids, all dialing from ATTACKER_IP. They close side by side:
    a host with connections takes ~0.2 s to close (docs/libp2p.md L10), so 65 closed in turn
    took 13 s of the 22 s of the test that holds them."""
    done = trio.Event()

    async def hold(task_status: trio.TaskStatus[Transport]) -> None:
        async with peer() as host:
            task_status.started(dial_from(host, ATTACKER_IP))
            await done.wait()

    async with trio.open_nursery() as nursery:
        try:
            yield [await nursery.start(hold) for _ in range(count)]
        finally:
            done.set()


async def hold_streams(hosts: list[Transport], relay: RelayService, per_host: int
                       ) -> list[FrameStream]:
    """Open `per_host` idle mailbox streams from each host; return those the relay kept
    (a refused stream is reset before or right after its challenge)."""
    held: list[FrameStream] = []
    for host in hosts:
        for _ in range(per_host):
            try:
                stream, _ = await raw_stream(host, relay.peer_id, relay.addresses())
            except (AssertionError, Exception):
                continue
            held.append(stream)
    return held


async def genuine_round(relay: RelayService) -> None:
    """A depositor with a fresh peer id deposits; the mailbox's device fetches it."""
    bob = DeviceKeyPair.generate()
    register(relay, bob.public)  # a mailbox exists once its device registered it (section 21)
    message_id = os.urandom(16)
    async with peer() as alice_t, client(alice_t, relay.peer_id, relay.addresses()) as alice:
        await alice.deposit(box_of(bob.public), message_id, b"through the siege", cap=CAP)
    async with peer(bob.to_bytes()) as bob_t, \
            client(bob_t, relay.peer_id, relay.addresses()) as inbox:
        await inbox.authenticate(bob)
        items, _ = await inbox.fetch()
        assert [i.id for i in items] == [message_id]


@pytest.mark.slow(seconds=3)
async def test_idle_streams_from_one_address_leave_room_for_genuine_clients(tmp_path: Path
                                                                            ) -> None:
    # Room for 100 streams in all; the attacker, 10 peer ids on one address, asks for 100.
    async with running_relay(tmp_path / "relay", max_streams=100) as relay, \
            attackers(10) as hosts:
        with trio.fail_after(60):
            held = await hold_streams(hosts, relay, per_host=10)
        with trio.fail_after(WAIT * 2):
            await genuine_round(relay)
        status = relay.relay.status()
        caps = relay.relay.config
        assert len(held) == status["streams"] == status["unauthenticated_streams"]
        assert len(held) == caps.max_unauthenticated_streams_per_address < caps.max_streams
        assert relay.relay.m_resets.value("peer-stream-limit") > 0  # 10 > 8 per peer id


@pytest.mark.slow(seconds=3)
async def test_many_peer_ids_on_one_address_share_its_cap(tmp_path: Path) -> None:
    async with running_relay(tmp_path / "relay",
                             max_unauthenticated_streams_per_address=6) as relay, \
            attackers(10) as hosts:
        with trio.fail_after(60):
            held = await hold_streams(hosts, relay, per_host=1)
        assert len(held) == 6
        assert relay.relay.m_resets.value("address-stream-limit") == 4
        with trio.fail_after(WAIT * 2):
            await genuine_round(relay)
        # The address's slots come back as its streams end.
        for stream in held[:2]:
            await stream.aclose()
        with trio.fail_after(WAIT):
            while relay.relay.status()["unauthenticated_streams"] > 4:
                await trio.sleep(0.05)
        more = await hold_streams(hosts[:2], relay, per_host=1)
        assert len(more) == 2


async def test_a_strangers_silent_stream_goes_quickly_a_users_stays(tmp_path: Path) -> None:
    bob = DeviceKeyPair.generate()
    async with running_relay(tmp_path / "relay", unauthenticated_idle_timeout_s=0.3,
                             idle_timeout_s=60) as relay, \
            attackers(1) as hosts, peer(bob.to_bytes()) as bob_t, \
            client(bob_t, relay.peer_id, relay.addresses()) as inbox:
        await inbox.authenticate(bob)  # a user: its streams are not strangers'
        user_stream, _ = await raw_stream(bob_t, relay.peer_id, relay.addresses())
        # Opened after the user's silent stream: when the relay closes it, the user's has
        # been silent longer than the strangers' timeout, and must still stand.
        silent, _ = await raw_stream(hosts[0], relay.peer_id, relay.addresses())
        with trio.fail_after(WAIT):
            assert await silent.receive() is None  # closed after 0.3 s of silence
        status = relay.relay.status()
        assert (status["streams"], status["unauthenticated_streams"]) == (2, 0)
        items, _ = await inbox.fetch()
        assert items == []
        assert relay.relay.status()["streams"] == 2
        await user_stream.aclose()


async def reserve(host: Transport, relay: RelayService) -> int:
    """One raw RESERVE; the relay's status code."""
    stream = await host.open_stream(relay.peer_id, relay.addresses(), CIRCUIT_HOP_PROTOCOL,
                                    timeout=WAIT)
    try:
        # HOP messages are varint-delimited protobufs: the same framing as FrameStream's.
        await stream.send([HopMessage(type=HopMessage.RESERVE).SerializeToString()])
        with trio.fail_after(WAIT):
            raw = await stream.receive()
        assert raw is not None
        return int(HopMessage.FromString(raw).status)
    finally:
        await stream.reset()


@pytest.mark.slow(seconds=19)
async def test_throwaway_keys_cannot_take_the_reservations(tmp_path: Path) -> None:
    """130 throwaway keys reserve (go-libp2p's and libp2p's default was 128 slots for all): the
    relay still reserves for a stranger elsewhere and for its own user."""
    bob = DeviceKeyPair.generate()
    async with running_relay(tmp_path / "relay", circuit_relay=True) as relay:
        statuses: list[int] = []

        async def reserve_and_leave() -> None:
            async with peer() as gone:
                statuses.append(await reserve(dial_from(gone, ATTACKER_IP), relay))

        async def reserve_all(hosts: list[Transport]) -> None:
            for host in hosts:
                statuses.append(await reserve(host, relay))

        with trio.fail_after(120):
            # Half reserve and leave (their slots must come back), half stay connected; a few
            # at a time (docs/libp2p.md L15).
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(lambda: _repeat(13, reserve_and_leave))
            async with attackers(65) as hosts:
                async with trio.open_nursery() as nursery:
                    for i in range(5):
                        nursery.start_soon(reserve_all, hosts[i::5])
                async with peer() as stranger:
                    assert await reserve(stranger, relay) == STATUS_OK
                async with peer(bob.to_bytes()) as bob_t, \
                        client(bob_t, relay.peer_id, relay.addresses()) as inbox:
                    await inbox.authenticate(bob)
                    assert await reserve(bob_t, relay) == STATUS_OK
                caps = relay.relay.config
                assert relay.transport.hop_reservations() == \
                    caps.circuit_max_reservations_per_address
                assert statuses.count(STATUS_OK) == 65 + caps.circuit_max_reservations_per_address


@pytest.mark.slow(seconds=2)
async def test_the_relays_users_reserve_ahead_of_strangers(tmp_path: Path) -> None:
    bob = DeviceKeyPair.generate()
    async with running_relay(tmp_path / "relay", circuit_relay=True, circuit_max_reservations=4,
                             circuit_max_stranger_reservations=3,
                             circuit_max_reservations_per_address=8) as relay, \
            attackers(4) as hosts, peer(bob.to_bytes()) as bob_t:
        with trio.fail_after(60):
            assert [await reserve(h, relay) for h in hosts] == [STATUS_OK] * 3 + \
                [RESOURCE_LIMIT_EXCEEDED]  # the strangers' pool holds 3
            async with client(bob_t, relay.peer_id, relay.addresses()) as inbox:
                await inbox.authenticate(bob)
                assert await reserve(bob_t, relay) == STATUS_OK  # the 4th slot
                users = []
                async with AsyncExitStack() as stack:
                    for _ in range(2):  # all slots taken: users evict strangers
                        user = DeviceKeyPair.generate()
                        t = await stack.enter_async_context(peer(user.to_bytes()))
                        mailbox = await stack.enter_async_context(
                            client(t, relay.peer_id, relay.addresses()))
                        await mailbox.authenticate(user)
                        assert await reserve(t, relay) == STATUS_OK
                        users.append(t)
                    assert relay.transport.hop_reservations() == 4
                    # The evicted strangers' were the oldest: the first attacker reserves anew
                    # only into a free strangers' slot, and there is none while users hold 3.
                    assert await reserve(hosts[0], relay) == RESOURCE_LIMIT_EXCEEDED


async def test_relayed_connections_are_capped_per_source(tmp_path: Path) -> None:
    async with running_relay(tmp_path / "relay", circuit_relay=True,
                             circuit_max_circuits_per_peer=2) as relay, \
            peer() as destination, attackers(1) as hosts:
        await destination.reserve(relay.addresses()[0], timeout=WAIT)
        source = hosts[0]
        circuits: list[int] = []
        opened: list[FrameStream] = []
        with trio.fail_after(60):
            for _ in range(3):
                stream = await source.open_stream(relay.peer_id, relay.addresses(),
                                                  CIRCUIT_HOP_PROTOCOL, timeout=WAIT)
                connect = HopMessage(type=HopMessage.CONNECT)
                connect.peer.id = destination_peer_bytes(destination)
                await stream.send([connect.SerializeToString()])
                raw = await stream.receive()
                assert raw is not None
                circuits.append(int(HopMessage.FromString(raw).status))
                opened.append(stream)
        assert circuits == [STATUS_OK, STATUS_OK, RESOURCE_LIMIT_EXCEEDED]
        for stream in opened:
            await stream.reset()


async def _repeat(times: int, work: Callable[[], Awaitable[None]]) -> None:
    for _ in range(times):
        await work()


def destination_peer_bytes(transport: Transport) -> bytes:
    from libp2p.peer.id import ID

    return bytes(ID.from_base58(transport.peer_id).to_bytes())
