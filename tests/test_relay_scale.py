"""What a connection costs a relay that holds many: real relay service, real libp2p hosts on
127.0.0.1. A relay meant to hold thousands of subscribed clients and to take tens of thousands
of connections from throwaway peer ids must not pay per new connection for the ones it holds
(docs/libp2p.md L78, L79), and must come back to where it was once a churn of connections is
over: no task, descriptor, connection, session or peer entry left behind. A device (a real
`Node`) must come back too, its stream slots included. The figures at scale are measured by
benchmarks/relay.py (`--target device` for a device)."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.tools.anyio_service.trio_tasks import FunctionTask
from multiaddr import Multiaddr

from node import Node
from node.device.config import MSG_STRANGER_STREAMS
from node.errors import TransportError
from node.net import MSG_PROTOCOL, FrameStream, Transport
from node.relay.service import RelayService
from tests.relaytools import WAIT, peer, raw_stream, running_relay

HELD = 20
CHURN = 120
CHURN_AT_ONCE = 8
#: The clients held here are idle strangers (no mailbox authenticated): kept for the whole test.
SETTINGS = {"unauthenticated_idle_timeout_s": 600.0, "max_unauthenticated_streams_per_address": 256}


def _task_count() -> int:
    """Every trio task of the run (the test's, the relay's and libp2p's)."""
    count, todo = 0, [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        count += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _service_tasks(transport: Transport) -> int:
    """Tasks that libp2p's service manager runs for the swarm (two per connection, at least)."""
    manager: Any = transport._host.get_network().manager  # type: ignore[attr-defined]
    return sum(1 for _ in FunctionTask.iterate_tasks(*manager._root_tasks))


@asynccontextmanager
async def held_clients(relay: RelayService, count: int
                       ) -> AsyncIterator[list[tuple[Transport, FrameStream]]]:
    """`count` hosts with fresh peer ids, each holding one mailbox stream to the relay."""
    async with AsyncExitStack() as stack:
        held = []
        for _ in range(count):
            host = await stack.enter_async_context(peer())
            stream, _nonce = await raw_stream(host, relay.peer_id, relay.addresses())
            held.append((host, stream))
        yield held


async def churn(relay: RelayService, count: int) -> None:
    """`count` connections from fresh peer ids, a few at a time: each opens a mailbox stream,
    reads its challenge and leaves (what a client with throwaway keys does)."""
    slots = trio.Semaphore(CHURN_AT_ONCE)

    async def one() -> None:
        async with slots, peer() as host:
            stream, _nonce = await raw_stream(host, relay.peer_id, relay.addresses())
            await stream.aclose()

    with trio.fail_after(WAIT + count):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)


async def wait_until_alone(relay: RelayService, others: Iterable[str] = ()) -> None:
    """Until the relay holds no connection but to `others` and no mailbox stream."""
    keep = set(others)
    with trio.fail_after(WAIT):
        while (set(relay.transport.connected_peers()) - keep
               or len(relay.relay._sessions) > len(keep)):
            await trio.sleep(0.05)


@pytest.mark.slow(seconds=10)
async def test_a_new_connection_does_not_walk_every_task_the_relay_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # py-libp2p's service manager found the parent of each task it started by walking every task
    # it ran, two per connection held: a relay holding n clients paid O(n) for each new one, and
    # at 5,000 clients it was CPU-bound on the walk (docs/libp2p.md L78).
    walked = 0
    iterate = FunctionTask.iterate_tasks.__func__  # type: ignore[attr-defined]

    def counting(cls: type[FunctionTask], *tasks: Any) -> Any:
        nonlocal walked
        whole = bool(tasks) and set(tasks) == set(manager._root_tasks)
        for task in iterate(cls, *tasks):
            walked += whole  # a walk over the relay's tasks, from the top
            yield task

    async with running_relay(tmp_path / "relay", **SETTINGS) as relay, \
            held_clients(relay, HELD) as first:
        manager: Any = relay.transport._host.get_network().manager  # type: ignore[attr-defined]
        assert _service_tasks(relay.transport) >= 2 * HELD
        monkeypatch.setattr(FunctionTask, "iterate_tasks", classmethod(counting))
        async with held_clients(relay, HELD) as second:
            assert len(relay.relay._sessions) == len(first) + len(second)
            assert walked == 0


async def test_libp2ps_tasks_keep_their_parents_with_the_index() -> None:
    # The lookup replaces the walk; a task started from inside a manager task is still its child
    # (it is cancelled with it), and one started from elsewhere is still a root task.
    async with peer() as host:
        manager: Any = host._host.get_network().manager  # type: ignore[attr-defined]
        started = trio.Event()
        release = trio.Event()

        async def inner() -> None:
            started.set()
            await release.wait()

        async def outer() -> None:
            manager.run_task(inner, name="inner")
            await release.wait()

        manager.run_task(outer, name="outer")
        with trio.fail_after(WAIT):
            await started.wait()
        tasks = {t.name: t for t in FunctionTask.iterate_tasks(*manager._root_tasks)}
        assert tasks["inner"].parent is tasks["outer"]
        assert tasks["outer"] in manager._root_tasks
        release.set()
        with trio.fail_after(WAIT):
            await tasks["outer"].wait_done()
        assert tasks["outer"] not in manager._root_tasks


@pytest.mark.slow(seconds=7)
async def test_churn_from_fresh_peer_ids_leaves_the_relay_as_it_was(tmp_path: Path) -> None:
    # What benchmarks/relay.py does 20,000 times to a relay holding its clients, at a test's
    # scale: every count must come back to where it was, or 20,000 cycles would add up.
    async with running_relay(tmp_path / "relay", **SETTINGS) as relay, \
            held_clients(relay, 4) as held:
        store: Any = relay.transport._host.get_peerstore()
        store.max_peers = 40  # the cap on disconnected peers' entries comes due within the test
        await churn(relay, 10)  # the first connections warm the caches libp2p keeps anyway
        holders = [host.peer_id for host, _ in held]
        await wait_until_alone(relay, holders)
        before = (_task_count(), _open_fds(), _service_tasks(relay.transport))

        await churn(relay, CHURN)
        await wait_until_alone(relay, holders)

        # A closed connection's socket and tasks go a moment after the peer counts as gone.
        def counts() -> tuple[int, int, int]:
            return _task_count(), _open_fds(), _service_tasks(relay.transport)

        with trio.move_on_after(WAIT):
            while any(now > then for now, then in zip(counts(), before, strict=True)):
                await trio.sleep(0.05)
        assert all(now <= then for now, then in zip(counts(), before, strict=True)), \
            (counts(), before)
        swarm: Any = relay.transport._host.get_network()
        assert set(swarm.connections) == {ID.from_base58(p) for p in holders}
        assert len(relay.relay._buckets) <= len(holders)
        assert relay.relay._members <= set(holders)
        assert relay.relay._stranger_slots.held == len(holders)  # the held idle streams
        assert len(relay.transport._host._identified_peers) <= len(holders)  # type: ignore[attr-defined]
        # The cap applies when an address is added: peers still connected then (churn ones
        # included, CHURN_AT_ONCE at most) were spared, and stay until the next addition.
        assert len(store.peer_data_map) <= store.max_peers + len(holders) + 1 + CHURN_AT_ONCE
        assert len(relay.relay._sessions) == len(holders)  # still holding its clients
        async with held_clients(relay, 1):  # and still taking new ones
            pass


@pytest.mark.slow(seconds=4)
async def test_the_peerstore_cap_counts_disconnected_peers_only(tmp_path: Path) -> None:
    # A relay holds more clients than the peerstore's cap. Every address added made the store
    # evict down to the cap, and as connected peers are kept, every disconnected peer went: the
    # address of a DHT server met a moment ago included, and each addition paid a pass over the
    # whole store (docs/libp2p.md L79).
    async with running_relay(tmp_path / "relay", **SETTINGS) as relay, \
            held_clients(relay, HELD) as held:
        store: Any = relay.transport._host.get_peerstore()
        store.max_peers = HELD // 2
        with trio.fail_after(WAIT):  # identify brings every client's entry
            while sum(1 for h, _ in held if ID.from_base58(h.peer_id) in store.peer_data_map
                      ) < HELD:
                await trio.sleep(0.05)
        known = []
        for i in range(store.max_peers):
            pair = create_new_key_pair(random.randbytes(32))
            pid = ID.from_pubkey(pair.public_key)
            store.add_pubkey(pid, pair.public_key)
            store.add_addrs(pid, [Multiaddr(f"/ip4/10.0.0.{i + 1}/tcp/4001")], 3600)
            known.append(pid)
        assert all(pid in store.peer_data_map for pid in known)
        assert all(ID.from_base58(h.peer_id) in store.peer_data_map for h, _ in held)
        # Past the cap, the disconnected entries are evicted again, address-less ones first.
        for _ in range(store.max_peers):
            pair = create_new_key_pair(random.randbytes(32))
            store.add_pubkey(ID.from_pubkey(pair.public_key), pair.public_key)
        pair = create_new_key_pair(random.randbytes(32))
        newest = ID.from_pubkey(pair.public_key)
        store.add_addrs(newest, [Multiaddr("/ip4/10.0.1.1/tcp/4001")], 3600)
        others = [p for p in store.peer_data_map
                  if p not in relay.transport._host.get_network().connections  # type: ignore[attr-defined]
                  and p != relay.transport._host.get_id()]
        assert len(others) <= store.max_peers
        assert newest in store.peer_data_map
        # Down to 90% of the cap in one pass: the address-less entries, then the oldest.
        assert [pid in store.peer_data_map for pid in known] == [False] * 2 + [True] * (len(known) - 2)
        assert all(ID.from_base58(h.peer_id) in store.peer_data_map for h, _ in held)


async def test_a_connection_does_not_list_the_machines_interfaces_again(
        monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock) -> None:
    """libp2p asks for the advertised addresses twice per identify, so once per connection
    (docs/libp2p.md L90): listing the interfaces there cost every connection ~2 ms of CPU."""
    from node.net import addresses, host

    listed: list[int] = []
    real = addresses.ifaddr.get_adapters

    def counting() -> Any:
        listed.append(1)
        return real()

    monkeypatch.setattr(addresses.ifaddr, "get_adapters", counting)
    # Bound to one address: nothing to list.
    assert addresses.dialable(["/ip4/127.0.0.1/tcp/4001"]) == ["/ip4/127.0.0.1/tcp/4001"]
    assert listed == []
    # Bound to every interface: listed once, then reused while the answer is fresh.
    advertised = host._Advertised()
    everywhere = [Multiaddr("/ip4/0.0.0.0/tcp/4001")]
    first = advertised(everywhere)
    assert first and all("0.0.0.0" not in str(a) for a in first)
    for _ in range(50):
        assert advertised(everywhere) == first
    assert len(listed) == 1
    # Other candidates (a listener added) are not answered from the old list.
    advertised([*everywhere, Multiaddr("/ip4/127.0.0.1/tcp/4002")])
    assert len(listed) == 2
    # An interface that comes or goes is seen once the answer is older than REUSE_SECONDS.
    await trio.sleep(host._Advertised.REUSE_SECONDS)
    advertised([*everywhere, Multiaddr("/ip4/127.0.0.1/tcp/4002")])
    assert len(listed) == 3


@pytest.mark.slow(seconds=7)
async def test_churn_from_fresh_peer_ids_leaves_a_device_as_it_was(
        node_pair: tuple[Node, Node], caplog: pytest.LogCaptureFixture) -> None:
    # What `benchmarks/relay.py --target device` does 5,000 times to a device: connections from
    # fresh peer ids, each opening a /pigeon/msg stream and leaving. More of them than the
    # strangers' stream slots (node/device/config.py), so a slot kept by a stream that ended
    # would refuse the last ones; and every count must come back to where it was.
    alice, bob = node_pair
    caplog.set_level(logging.INFO, logger="pigeon.transport")
    transport: Any = alice._transport
    store: Any = transport._host.get_peerstore()
    store.max_peers = 40  # the cap on disconnected peers' entries comes due within the test
    opened = 0

    async def device_churn(count: int) -> None:
        nonlocal opened
        slots = trio.Semaphore(CHURN_AT_ONCE)

        async def one() -> None:
            nonlocal opened
            async with slots, peer() as host:
                with suppress(TransportError):  # counted below, from the device's side
                    stream = await host.open_stream(alice.peer_id, alice.addresses(),
                                                    MSG_PROTOCOL, timeout=WAIT)
                    opened += 1
                    await stream.aclose()

        with trio.fail_after(WAIT + count):
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(one)

    async def wait_until_alone() -> None:
        with trio.fail_after(WAIT):
            while set(transport.connected_peers()) - {bob.peer_id}:
                await trio.sleep(0.05)

    def counts() -> tuple[int, int, int]:
        return _task_count(), _open_fds(), _service_tasks(transport)

    await device_churn(10)  # the first connections warm the caches libp2p keeps anyway
    await wait_until_alone()
    before = counts()
    churn_count = MSG_STRANGER_STREAMS + CHURN // 4
    await device_churn(churn_count)
    await wait_until_alone()
    # A refused stream is reset, often after it opened: the device's log counts every refusal.
    assert not [r for r in caplog.records if "refusing a stream" in r.getMessage()]
    assert opened > MSG_STRANGER_STREAMS
    with trio.move_on_after(WAIT):
        while any(now > then for now, then in zip(counts(), before, strict=True)):
            await trio.sleep(0.05)
    assert all(now <= then for now, then in zip(counts(), before, strict=True)), \
        (counts(), before)
    assert len(transport._host._identified_peers) <= 1  # Bob's, if he is still connected
    assert len(store.peer_data_map) <= store.max_peers + 2 + CHURN_AT_ONCE
    # And a contact is still served.
    message_id = await bob.send("alice", "after the churn")
    assert await bob.wait_delivered(message_id, timeout=WAIT) == "delivered"


@pytest.mark.slow(seconds=7)
def test_the_churn_benchmark_counts_every_connection_and_probes_its_clients() -> None:
    # benchmarks/relay.py at a test's scale: its churn processes account for every connection
    # (made, refused, timed out or an error), and the subscribed clients it probes are pushed
    # a deposit before and after the churn. The figures at scale are the benchmark's job.
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "relay.py"), "--json", "--scale-only",
         "--clients", "6", "--client-procs", "2", "--churn", "30", "--churn-procs", "2",
         "--genuine-samples", "2", "--settle-s", "0.2", "--idle-window-s", "1",
         "--timeout", "600"],
        cwd=root, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)  # exactly one JSON value: anything else fails here
    outcomes = [figures[f"churn_{k}"] for k in ("made", "refused", "timed_out", "errors")]
    assert sum(outcomes) == figures["churn_connections"] == 30
    assert figures["churn_made"] > 0
    assert figures["clients_subscribed"] == 6 and figures["subscribed_probes"] == 6
    assert figures["subscribed_probes_pushed_before_churn"] == 6
    assert figures["subscribed_probes_pushed_after_churn"] == 6
    assert figures["relay_subscriptions_after_churn"] == 6
    assert figures["relay_alive_after_churn"] is True
    samples = figures["churn_samples_s_connections_cpu_s"]
    assert samples and samples[-1][1] == 30
    assert figures["relay_cpu_ms_per_churn_connection_first_1000"] > 0
