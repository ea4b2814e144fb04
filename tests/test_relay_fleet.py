"""A fleet of relays (PROTOCOL.md section 28): relays announce themselves in the DHT's relay
directory, devices with `relays = "auto"` find them, pick two, move off one that is full or
gone, and tell their contacts and their own devices. Real relays and nodes on 127.0.0.1 in one
process, real SQLite, real libp2p DHT.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from node.clock import SystemClock
from node.device.relay_fleet import find_relays
from node.errors import RelayRefused
from node.net import Transport
from node.net.dht import open_pigeon_dht
from node.protocol import mailbox as mb
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.protocol.relayrecord import RELAY_RECORD_LIFETIME_S, RelayLimits, RelayRecord
from node.relay.service import RelayService
from node.testing import FIXED_NOW
from tests.conftest import LOOPBACK
from tests.relaytools import register_at, running_relay

pytestmark = pytest.mark.slow(seconds=20)

#: Bound on a whole phase (relays announcing, a device choosing): DHT RPCs cost ~20 ms of CPU
#: each in one process (docs/libp2p.md L38).
PHASE = 30.0

#: Relays re-announce within a second of a load change in these tests (60 s by default).
FAST_ANNOUNCE = {"announce_min_interval_s": 0.5}


@asynccontextmanager
async def relays(tmp_path: Path, count: int, **changes: Any) -> AsyncIterator[list[RelayService]]:
    """`count` relays; each joins the DHT through the first."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            running_relay(tmp_path / "relay0", **FAST_ANNOUNCE, **changes))
        out = [first]
        for i in range(1, count):
            out.append(await stack.enter_async_context(running_relay(
                tmp_path / f"relay{i}", bootstrap=tuple(first.addresses()), **FAST_ANNOUNCE,
                **changes)))
        yield out


async def wait_listed(transport: Transport, dht: Any, count: int) -> list[Any]:
    open_transport = lambda: Transport.open(os.urandom(32), (LOOPBACK,))  # noqa: E731
    with trio.fail_after(PHASE):
        while True:
            found = await find_relays(dht, open_transport, SystemClock(), timeout=5.0)
            if len(found) >= count:
                return found
            await trio.sleep(0.2)


async def test_relays_announce_themselves_and_a_device_finds_them_with_rtt_and_load(
        tmp_path: Path) -> None:
    async with relays(tmp_path, 3, operator="example.org", max_mailboxes=50) as fleet, \
            Transport.open(os.urandom(32), (LOOPBACK,)) as transport, \
            open_pigeon_dht(transport, server=False, bootstrap=fleet[0].addresses(),
                            clock=SystemClock()) as dht:
        # one mailbox registered at relay 1: its load goes from 0 to 1 in its next record
        await register_at(fleet[1].peer_id, fleet[1].addresses(), DeviceKeyPair.generate())
        with trio.fail_after(PHASE):
            while True:
                found = {f.record.peer_id: f for f in await wait_listed(transport, dht, 3)}
                if found[fleet[1].peer_id].record.load == 1:
                    break
                await trio.sleep(0.2)
        assert set(found) == {r.peer_id for r in fleet}
        for relay in fleet:
            f = found[relay.peer_id]
            assert f.rtt_ms is not None and 0 < f.rtt_ms < 5000
            assert (f.record.capacity, f.record.operator) == (50, "example.org")
            assert f.record.limits.messages == relay.relay.config.mailbox_max_messages
            # the addresses are the relay's own, dialable as its peer id
            assert set(f.record.dial_addresses()) <= set(relay.addresses())
        assert found[fleet[0].peer_id].record.load == 0
        assert fleet[1].announcer is not None and fleet[1].announcer.announced >= 2


async def test_relays_refuse_forged_relay_records(tmp_path: Path) -> None:
    async with relays(tmp_path, 1) as fleet, \
            Transport.open(os.urandom(32), (LOOPBACK,)) as transport, \
            open_pigeon_dht(transport, server=False, bootstrap=fleet[0].addresses(),
                            clock=SystemClock()) as dht:
        relay = fleet[0]
        with trio.fail_after(PHASE):
            while relay.announcer is None or relay.announcer.announced < 1:
                await trio.sleep(0.05)
        victim = IdentityKeyPair.from_bytes(relay.relay.key.to_bytes())
        liar = IdentityKeyPair.generate()
        now = SystemClock().now_s()
        fake = RelayRecord(relay=liar.public, addrs=("/ip4/203.0.113.9/tcp/1",), capacity=10**6,
                           load=0, limits=RelayLimits(messages=1, bytes=1, ttl_s=1,
                                                      envelope_bytes=1),
                           version="x", operator="", seq=now * 1000,
                           expires=now + RELAY_RECORD_LIFETIME_S)
        # signed by the liar but stored under the real relay's key: refused
        victim_key = RelayRecord(relay=victim.public, addrs=fake.addrs, capacity=1, load=0,
                                 limits=fake.limits, version="x", operator="", seq=1,
                                 expires=now + 60).key
        assert not await dht.put_at(relay.peer_id, victim_key, fake.sign(liar), timeout=5.0)
        # expired, under its own key: refused too
        old = RelayRecord(relay=liar.public, addrs=fake.addrs, capacity=1, load=0,
                          limits=fake.limits, version="x", operator="", seq=FIXED_NOW * 1000,
                          expires=FIXED_NOW + 60)
        assert not await dht.put_at(relay.peer_id, old.key, old.sign(liar), timeout=5.0)
        # and a reader finds neither: the relay's own record, and nothing under the liar's key
        got = await dht.get(victim_key, timeout=5.0)
        assert got is not None and RelayRecord.verify(got, now).relay == victim.public
        assert await dht.get(old.key, timeout=5.0) is None


async def test_a_relay_at_capacity_refuses_a_new_mailbox_relay_full(tmp_path: Path) -> None:
    async with running_relay(tmp_path / "relay", max_mailboxes=1) as relay:
        first = DeviceKeyPair.generate()
        await register_at(relay.peer_id, relay.addresses(), first)
        with pytest.raises(RelayRefused) as info:
            await register_at(relay.peer_id, relay.addresses(), DeviceKeyPair.generate())
        assert info.value.code == mb.RELAY_FULL
        await register_at(relay.peer_id, relay.addresses(), first)  # the one it holds still works
        assert relay.relay.status()["rejects"]["relay_full"] == 1
        assert relay.relay.status()["mailboxes_moved"]["in"] == 1
