"""Tests for node.net.mdns: the TXT codec (pure), and real zeroconf PINNED TO 127.0.0.1.

Network rule: every Zeroconf here binds interfaces=["127.0.0.1"] only (never a real interface);
`test_nothing_leaves_loopback` checks it with a passive sniffer. Every wait sits under
trio.fail_after; nothing sleeps to synchronise. Results from peers other than the ones a test
started are ignored, so tests of other modules announcing on loopback at the same time do not
disturb these.

Run as a script (`python -m tests.test_mdns child ...`), this module is the child process of
`test_three_processes_find_each_other`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from node.errors import ConfigError, DecodeError, LimitExceeded
from node.net import mdns
from node.net.mdns import (
    MAX_ADDRESSES,
    MAX_TXT_BYTES,
    SERVICE_TYPE,
    MdnsDiscovery,
    MdnsPeer,
    encode_txt,
    peer_from_txt,
)
from node.protocol.keys import DeviceKey, DeviceKeyPair

LO = ["127.0.0.1"]
WAIT = 10  # seconds: generous for a loaded CI machine; discovery takes 1-250 ms here
#: Longest acceptable trio-loop stall while mDNS opens, discovers, closes. What it catches is
#: zeroconf work on the trio thread (a blocking register stalls ~1.7 s); on a loaded 2-core
#: machine the process alone is descheduled for over 100 ms at times, which is not a stall.
STALL_LIMIT_S = 0.5
RSA_PEER_ID = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # valid libp2p id, not Ed25519
SECP_PEER_ID = "16Uiu2HAmLhLvBoYaoZfaMUKuibM6ac163GwKY74c5kiSLg5KvLpY"  # secp256k1 key


def new_peer_id() -> str:
    return DeviceKey(DeviceKeyPair.generate().public.to_bytes()).peer_id()


def txt(*strings: bytes) -> bytes:
    return b"".join(bytes([len(s)]) + s for s in strings)


# --- TXT codec (pure) ----------------------------------------------------------------------------


def test_txt_round_trip_keeps_every_address() -> None:
    pid = new_peer_id()
    addrs = ["/ip4/192.168.1.5/tcp/4001", "/ip4/192.168.1.5/udp/4001/quic-v1",
             "/ip6/fe80::1/tcp/4002/ws"]
    rdata, kept = encode_txt(pid, addrs)
    assert kept == tuple(addrs)
    assert rdata.count(b"dnsaddr=") == 3  # repeated key, written raw
    assert peer_from_txt(rdata) == MdnsPeer(pid, tuple(addrs))


def test_encode_leaves_out_what_a_receiver_would_skip() -> None:
    pid = new_peer_id()
    relay = f"/ip4/1.2.3.4/tcp/1/p2p/{new_peer_id()}/p2p-circuit"
    given = [f"/ip4/10.0.0.2/tcp/1/p2p/{pid}", relay, "/ip4/0.0.0.0/tcp/2", "/unix/tmp/x",
             "nonsense", "/ip4/10.0.0.2/tcp/01"]
    _, kept = encode_txt(pid, given)
    assert kept == ("/ip4/10.0.0.2/tcp/1",)  # /p2p/<self> stripped, duplicate after canonicalising
    many = [f"/ip4/10.0.0.2/tcp/{port}" for port in range(1, 40)]
    rdata, kept = encode_txt(pid, many)
    assert kept == tuple(many[:MAX_ADDRESSES]) and len(rdata) <= MAX_TXT_BYTES


def test_parse_reads_py_libp2p_numbered_keys_and_ignores_other_keys() -> None:
    pid = new_peer_id()
    rdata = txt(f"dnsaddr=/ip4/10.0.0.1/tcp/1/p2p/{pid}".encode(),
                f"DNSADDR2=/ip4/10.0.0.1/tcp/2/p2p/{pid}".encode(),
                b"id=whatever", b"flag", f"dnsaddrx=/ip4/10.0.0.1/tcp/3/p2p/{pid}".encode())
    assert peer_from_txt(rdata) == MdnsPeer(pid, ("/ip4/10.0.0.1/tcp/1", "/ip4/10.0.0.1/tcp/2"))


def test_parse_skips_bad_addresses_but_keeps_good_ones() -> None:
    pid = new_peer_id()
    rdata = txt(f"dnsaddr=/ip4/999.0.0.1/tcp/1/p2p/{pid}".encode(),  # does not parse
                f"dnsaddr=/ip4/10.0.0.1/tcp/99999/p2p/{pid}".encode(),  # port out of range
                f"dnsaddr=/ip4/1.2.3.4/tcp/1/p2p/{new_peer_id()}/p2p-circuit/p2p/{pid}".encode(),
                f"dnsaddr=/dns4/example.com/tcp/1/p2p/{pid}".encode(),  # not an IP
                f"dnsaddr=/ip4/0.0.0.0/tcp/1/p2p/{pid}".encode(),
                b"dnsaddr=/ip4/10.0.0.1/tcp/1",  # no peer id
                "dnsaddr=/ip4/10.0.0.1/tcp/1/p2p/\u00e9".encode(),  # not ASCII
                f"dnsaddr=/ip4/10.0.0.9/tcp/9/p2p/{pid}".encode())
    assert peer_from_txt(rdata) == MdnsPeer(pid, ("/ip4/10.0.0.9/tcp/9",))


@pytest.mark.parametrize("rdata, error", [
    (txt(*[b"x" * 255] * 17), LimitExceeded),  # over MAX_TXT_BYTES
    (txt(*[f"dnsaddr=/ip4/10.0.0.1/tcp/{i}/p2p/{SECP_PEER_ID}".encode() for i in range(17)]),
     LimitExceeded),  # over MAX_ADDRESSES (checked before anything else in the strings)
    (b"\x40dnsaddr=/ip4/10.0.0.1/tcp/1", DecodeError),  # length byte past the end
    (txt(f"dnsaddr=/ip4/10.0.0.1/tcp/1/p2p/{RSA_PEER_ID}".encode()), DecodeError),
    (txt(f"dnsaddr=/ip4/10.0.0.1/tcp/1/p2p/{SECP_PEER_ID}".encode()), DecodeError),
    (txt(b"dnsaddr=/ip4/10.0.0.1/tcp/1/p2p/12D3KooWnotbase58l0"), DecodeError),
    (txt(f"dnsaddr=/ip4/10.0.0.1/tcp/1/p2p/{new_peer_id()}".encode(),
         f"dnsaddr=/ip4/10.0.0.2/tcp/1/p2p/{new_peer_id()}".encode()), DecodeError),  # 2 peers
    (txt(f"dnsaddr=/ip4/999.0.0.1/tcp/1/p2p/{new_peer_id()}".encode()), DecodeError),  # no addr
    (txt(b"id=x"), DecodeError),
    (b"", DecodeError),
], ids=["oversized", "too-many-addresses", "truncated", "rsa-peer", "secp-peer", "bad-base58",
        "two-peers", "no-usable-address", "no-dnsaddr", "empty"])  # stable ids across workers
def test_parse_refuses_bad_records(rdata: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        peer_from_txt(rdata)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=600),
    st.lists(st.one_of(
        st.binary(max_size=255),
        st.builds(lambda v: b"dnsaddr=" + v, st.binary(max_size=240)),
        st.builds(lambda a, p: f"dnsaddr={a}/p2p/{p}".encode(),
                  st.sampled_from(["/ip4/10.0.0.1/tcp/1", "/ip6/::1/udp/2/quic-v1", "/ip4/1.2.3.4",
                                   "/ip6/fe80::1%eth0/tcp/1", "/ip4/1.1.1.1/tcp/1/tls/ws", ""]),
                  st.text(alphabet="123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz",
                          max_size=60))),
        max_size=20).map(lambda strings: txt(*strings)),
))
def test_parse_raises_only_its_own_errors(rdata: bytes) -> None:
    try:
        peer = peer_from_txt(rdata)
    except (DecodeError, LimitExceeded):
        return
    assert 1 <= len(peer.addresses) <= MAX_ADDRESSES


def test_open_refuses_bad_arguments_before_touching_the_network() -> None:
    pid = new_peer_id()
    kwargs: dict[str, Any]
    for kwargs in ({"interfaces": []}, {"interfaces": "127.0.0.1"}, {"interfaces": ["::1"]},
                   {"interfaces": ["203.0.113.7"]}):  # not an address of this machine
        with pytest.raises(ConfigError):
            MdnsDiscovery(pid, [], announce=True, **kwargs)
    with pytest.raises(ConfigError):
        MdnsDiscovery(RSA_PEER_ID, [], interfaces=LO, announce=True)


async def test_delivery_is_deduplicated_bounded_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trio-side hand-over, driven directly (no zeroconf): a full buffer drops and counts,
    a repeat is not delivered twice, a goodbye makes the next announcement count again."""
    monkeypatch.setattr(mdns, "FOUND_BUFFER", 1)
    disc = MdnsDiscovery(new_peer_id(), [], interfaces=LO, announce=False)
    a = MdnsPeer(new_peer_id(), ("/ip4/10.0.0.1/tcp/1",))
    b = MdnsPeer(new_peer_id(), ("/ip4/10.0.0.2/tcp/1",))
    disc._deliver("a", a)
    disc._deliver("b", b)  # buffer full
    assert (disc.stats.found, disc.stats.dropped) == (1, 1)
    assert disc._receive.receive_nowait() == a
    disc._deliver("a", a)  # same record again: nothing new
    disc._forget("a")  # goodbye
    disc._deliver("a", a)  # back: delivered again
    assert disc._receive.receive_nowait() == a and disc.stats.found == 2


# --- real zeroconf on loopback -------------------------------------------------------------------


class StallMeter:
    """Longest gap between wake-ups of a task sleeping 5 ms at a time: how long the trio loop
    was blocked (zeroconf work must stay in other threads)."""

    def __init__(self) -> None:
        self.max_stall_s = 0.0

    async def run(self) -> None:
        last = time.perf_counter()
        while True:
            await trio.sleep(0.005)
            now = time.perf_counter()
            self.max_stall_s = max(self.max_stall_s, now - last - 0.005)
            last = now


@asynccontextmanager
async def instances(n: int, **kwargs: Any) -> AsyncIterator[list[MdnsDiscovery]]:
    """n discoveries on loopback, each announcing one address of its own; opened one after the
    other, closed all at once."""
    stop = trio.Event()

    async def hold(i: int, task_status: trio.TaskStatus[MdnsDiscovery]) -> None:
        async with MdnsDiscovery.open(new_peer_id(), [f"/ip4/127.0.0.1/tcp/{41000 + i}"],
                                      interfaces=LO, **kwargs) as disc:
            task_status.started(disc)
            await stop.wait()

    async with trio.open_nursery() as nursery:
        try:
            yield [await nursery.start(hold, i) for i in range(n)]
        finally:
            stop.set()


async def wait_for(disc: MdnsDiscovery, expected: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Read `disc.found()` until every expected peer id was delivered with exactly the expected
    addresses; returns seconds to each. Fails on our own id; ignores unknown peers (other tests
    may announce on loopback too)."""
    t0 = trio.current_time()
    at: dict[str, float] = {}
    latest: dict[str, tuple[str, ...]] = {}
    own = disc.peer_id
    async for peer in disc.found():
        assert peer.peer_id != own
        if peer.peer_id in expected:
            latest[peer.peer_id] = peer.addresses
            at.setdefault(peer.peer_id, trio.current_time() - t0)
            if latest == expected:
                return at
    raise AssertionError("found() ended early")


def others(discs: Sequence[MdnsDiscovery], me: MdnsDiscovery) -> dict[str, tuple[str, ...]]:
    return {d.peer_id: d.addresses for d in discs if d is not me}


def non_trio_threads() -> set[threading.Thread]:
    """Live threads, minus trio's idle worker-thread cache (kept ~10 s for reuse, by design)."""
    return {t for t in threading.enumerate() if not t.name.startswith("Trio thread")}


async def test_three_instances_find_each_other_with_exact_addresses() -> None:
    with trio.fail_after(WAIT):
        async with instances(3) as discs:
            times = [await wait_for(d, others(discs, d)) for d in discs]
    print("in-process discovery times (ms):", [sorted(round(s * 1000) for s in t.values())
                                                for t in times])


async def test_loop_never_stalls_and_no_threads_are_left() -> None:
    before = non_trio_threads()
    meter = StallMeter()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(meter.run)
        with trio.fail_after(WAIT):
            async with instances(3) as discs:
                opened = trio.current_time()
                async with trio.open_nursery() as waits:
                    for d in discs:
                        waits.start_soon(wait_for, d, others(discs, d))
                found = trio.current_time()
            closed = trio.current_time()
        nursery.cancel_scope.cancel()
    print(f"open {1000 * (opened - t0):.0f} ms, all found +{1000 * (found - opened):.0f} ms, close "
          f"{1000 * (closed - found):.0f} ms, longest loop stall {1000 * meter.max_stall_s:.1f} ms")
    assert meter.max_stall_s < STALL_LIMIT_S
    assert closed - found < mdns.CLOSE_TIMEOUT_S
    leftover = non_trio_threads() - before
    assert not leftover, f"threads still alive after close: {leftover}"


async def test_browse_only_is_not_found() -> None:
    with trio.fail_after(WAIT):
        async with instances(1) as (announced,), \
                MdnsDiscovery.open(new_peer_id(), ["/ip4/127.0.0.1/tcp/41100"], interfaces=LO,
                                   announce=False) as silent:
            await wait_for(silent, {announced.peer_id: announced.addresses})  # it browses
            assert silent._zc is not None and not silent._zc.registry.async_get_service_infos()
            # A third instance that starts after `silent` is up: by the time `announced` sees
            # it, it would have seen `silent`'s announcement too, had there been one.
            async with instances(1) as (late,):
                got = []
                async for peer in announced.found():
                    got.append(peer.peer_id)
                    if peer.peer_id == late.peer_id:
                        break
            assert silent.peer_id not in got


@pytest.mark.slow(seconds=1)
async def test_update_addresses_reaches_the_others() -> None:
    with trio.fail_after(WAIT):
        async with instances(2) as (a, b):
            await wait_for(b, {a.peer_id: a.addresses})
            new = ("/ip4/127.0.0.1/tcp/42001", "/ip4/127.0.0.1/udp/42001/quic-v1")
            await a.update_addresses([*new, "/ip4/127.0.0.1/tcp/42002/p2p-circuit"])
            assert a.addresses == new
            await wait_for(b, {a.peer_id: new})


@pytest.mark.slow(seconds=1)
async def test_update_right_after_open_registers_once(caplog: pytest.LogCaptureFixture) -> None:
    """update_addresses before the background registration ran: one registration, no warning."""
    with trio.fail_after(WAIT):
        async with instances(1) as (watcher,), \
                MdnsDiscovery.open(new_peer_id(), ["/ip4/127.0.0.1/tcp/42005"], interfaces=LO) as a:
            await a.update_addresses(["/ip4/127.0.0.1/tcp/42004"])  # takes the lock first
            # trio's Lock is fair: the background registration, queued since open, runs before
            # this second update does.
            await a.update_addresses(["/ip4/127.0.0.1/tcp/42006"])
            await wait_for(watcher, {a.peer_id: ("/ip4/127.0.0.1/tcp/42006",)})
    assert not [r for r in caplog.records if r.name == "pigeon.mdns" and r.levelname == "WARNING"]


@pytest.mark.slow(seconds=1)
async def test_txt_missing_from_the_cache_is_queried() -> None:
    """The slow path: a service whose TXT record is not cached is resolved with a QM query on
    zeroconf's loop (normally the TXT arrives with the PTR answer, so this path is rare)."""
    with trio.fail_after(WAIT):
        async with instances(2) as (watcher, peer):
            await wait_for(watcher, {peer.peer_id: peer.addresses})
            assert watcher._zc is not None
            assert await trio.to_thread.run_sync(drop_cached_txt, watcher._zc, peer.instance_name) == 1
            watcher._delivered.clear()  # so that the same result is delivered again
            before = watcher.stats.queried
            await trio.to_thread.run_sync(watcher._on_service, watcher._zc, SERVICE_TYPE,
                                          peer.instance_name)  # as the browser thread would
            await wait_for(watcher, {peer.peer_id: peer.addresses})
            # At least our call queried; on a busy machine the browser thread may also report
            # the service (an update) while its TXT is still missing, and query too.
            assert watcher.stats.queried > before


def drop_cached_txt(zc: Zeroconf, name: str) -> int:
    async def drop() -> int:  # the cache belongs to zeroconf's loop thread
        records = zc.cache.async_all_by_details(name, 16, 1)  # TXT, IN
        zc.cache.async_remove_records(records)
        return len(records)

    assert zc.loop is not None
    return asyncio.run_coroutine_threadsafe(drop(), zc.loop).result(timeout=WAIT)


async def test_nothing_to_announce_until_addresses_are_given() -> None:
    """With no dialable address the device is not announced (only browses); the first
    update_addresses registers it."""
    with trio.fail_after(WAIT):
        async with instances(1) as (watcher,), \
                MdnsDiscovery.open(new_peer_id(), ["/ip4/0.0.0.0/tcp/1"], interfaces=LO) as late:
            assert late.addresses == ()
            await wait_for(late, {watcher.peer_id: watcher.addresses})
            assert late._zc is not None and not late._zc.registry.async_get_service_infos()
            await late.update_addresses(["/ip4/127.0.0.1/tcp/42003"])
            await wait_for(watcher, {late.peer_id: ("/ip4/127.0.0.1/tcp/42003",)})
            await late.update_addresses([])  # nothing dialable any more: record withdrawn
            assert not late._zc.registry.async_get_service_infos()


async def test_malformed_services_are_ignored_and_discovery_goes_on() -> None:
    """Services registered with raw zeroconf (on loopback) with junk TXT records: none is
    delivered, each is counted as rejected, nothing raises, and a good peer is still found.
    A well-formed record carrying the watcher's own peer id (under another name) is not
    delivered either."""
    pid, own = new_peer_id(), new_peer_id()
    junk = {
        "oversized": txt(*[b"k=" + b"x" * 250] * 17),
        "badaddr": txt(f"dnsaddr=/ip4/300.1.1.1/tcp/1/p2p/{pid}".encode()),
        "rsa": txt(f"dnsaddr=/ip4/127.0.0.1/tcp/1/p2p/{RSA_PEER_ID}".encode()),
        "toomany": txt(*[f"dnsaddr=/ip4/127.0.0.1/tcp/{i}/p2p/{pid}".encode() for i in range(20)]),
        "twopeers": txt(f"dnsaddr=/ip4/127.0.0.1/tcp/1/p2p/{pid}".encode(),
                        f"dnsaddr=/ip4/127.0.0.1/tcp/2/p2p/{new_peer_id()}".encode()),
        "truncated": b"\x50dnsaddr=",
        "empty": b"",
    }
    infos = [ServiceInfo(SERVICE_TYPE, f"junk{name}{os.getpid()}.{SERVICE_TYPE}", port=1,
                         properties=rdata, server=f"junk{name}.local.",
                         parsed_addresses=["127.0.0.1"]) for name, rdata in junk.items()]
    impostor = ServiceInfo(SERVICE_TYPE, f"impostor{os.getpid()}.{SERVICE_TYPE}", port=1,
                           properties=encode_txt(own, ["/ip4/127.0.0.1/tcp/1"])[0],
                           server="impostor.local.", parsed_addresses=["127.0.0.1"])
    with trio.fail_after(WAIT):
        async with MdnsDiscovery.open(own, [], interfaces=LO) as watcher:
            raw = await trio.to_thread.run_sync(
                lambda: Zeroconf(interfaces=LO, ip_version=IPVersion.V4Only))
            try:
                await trio.to_thread.run_sync(register_all, raw, [*infos, impostor])  # announced
                async with instances(1) as (good,):
                    async for peer in watcher.found():
                        assert peer.peer_id not in (pid, own), f"delivered: {peer}"
                        if peer.peer_id == good.peer_id:
                            assert peer.addresses == good.addresses
                            break
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(raw.close)
    assert watcher.stats.rejected >= len(junk)


def register_all(zc: Zeroconf, infos: list[ServiceInfo]) -> None:
    """Register services on a raw Zeroconf at once; return when their announcements are out."""

    async def register() -> None:
        announcing = [await zc.async_register_service(i, cooperating_responders=True) for i in infos]
        await asyncio.gather(*announcing)

    assert zc.loop is not None
    asyncio.run_coroutine_threadsafe(register(), zc.loop).result(timeout=WAIT)


async def test_nothing_leaves_loopback() -> None:
    """Every socket zeroconf opened sends on 127.0.0.1 only; and a passive sniffer on every other
    interface sees no mDNS frame while three instances open, discover each other and close."""
    sniffers = []
    for _, name in socket.if_nameindex():
        if name != "lo" and interface_is_up(name):
            with suppress(OSError):  # not root: the socket check below still runs
                sniffers.append(Sniffer(name))
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for s in sniffers:
                nursery.start_soon(trio.to_thread.run_sync, s.run)
            try:
                async with instances(3) as discs:
                    for d in discs:
                        assert d._zc is not None
                        for sender in d._zc.engine.senders:
                            mcast_if = sender.sock.getsockopt(socket.IPPROTO_IP,
                                                              socket.IP_MULTICAST_IF, 4)
                            assert socket.inet_ntoa(mcast_if) == "127.0.0.1"
                    for d in discs:
                        await wait_for(d, others(discs, d))
            finally:
                for s in sniffers:
                    s.stop.set()
    for s in sniffers:
        assert s.mdns_frames == 0, f"{s.mdns_frames} mDNS frames seen on {s.ifname}"
    print(f"sniffed {[(s.ifname, s.frames, s.mdns_frames) for s in sniffers]} (frames, mDNS)")


def interface_is_up(ifname: str) -> bool:
    try:
        return bool(int(Path(f"/sys/class/net/{ifname}/flags").read_text(), 16) & 1)  # IFF_UP
    except (OSError, ValueError):
        return False


class Sniffer:
    """Receive-only AF_PACKET socket on one interface, counting UDP frames to port 5353
    (docs/libp2p.md L51). Needs root; never transmits."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.05)
        self.stop = threading.Event()
        self.frames = self.mdns_frames = 0

    def run(self) -> None:
        deadline = time.monotonic() + WAIT  # bounded even if stop is never set
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    frame = self.sock.recv(65535)
                except TimeoutError:
                    continue
                self.frames += 1
                self.mdns_frames += is_mdns(frame)
        finally:
            self.sock.close()


def is_mdns(frame: bytes) -> bool:
    if len(frame) < 58:
        return False
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == 0x0800 and frame[23] == 17:  # IPv4 / UDP
        ihl = (frame[14] & 0x0F) * 4
        return struct.unpack("!H", frame[14 + ihl + 2 : 14 + ihl + 4])[0] == 5353
    if ethertype == 0x86DD and frame[20] == 17:  # IPv6 / UDP (no extension headers)
        return struct.unpack("!H", frame[56:58])[0] == 5353
    return False


@pytest.mark.slow(seconds=1)
async def test_all_interfaces_inside_a_private_network_namespace() -> None:
    """interfaces=None (what a device uses) binds every interface: run it only inside a fresh
    network namespace holding nothing but loopback (`unshare -n`, root only), where nothing can
    leave the machine. The child refuses to start if it sees any other interface."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip to create a private network namespace")
    root = Path(__file__).resolve().parent.parent
    script = f"ip link set lo up && exec {shlex.quote(sys.executable)} -m tests.test_mdns netns-child"
    with trio.fail_after(WAIT + 5):
        done = await trio.run_process(["unshare", "-n", "sh", "-c", script], cwd=root,
                                      capture_stdout=True, check=False)
    assert done.returncode == 0 and b"OK" in done.stdout, done.stdout


# --- several processes ---------------------------------------------------------------------------

CHILD_DEADLINE_S = 20  # a child exits by itself after this, whatever happens


@pytest.mark.slow
async def test_three_processes_find_each_other() -> None:
    ids = [new_peer_id() for _ in range(3)]
    addrs = [f"/ip4/127.0.0.1/tcp/{43000 + i}" for i in range(3)]
    root = Path(__file__).resolve().parent.parent
    procs: list[trio.Process] = []
    reports: dict[int, dict] = {}
    try:
        for i in range(3):
            expected = {ids[j]: [addrs[j]] for j in range(3) if j != i}
            procs.append(await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.test_mdns", "child", ids[i], addrs[i],
                 json.dumps(expected)],
                cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE))

        async def read_report(i: int, proc: trio.Process) -> None:
            assert proc.stdout is not None
            buffer = b""
            while b"\n" not in buffer:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"child {i} exited without a report"
                buffer += chunk
            reports[i] = json.loads(buffer.split(b"\n")[0])

        with trio.fail_after(WAIT + 5):  # + the children's imports (~1 s each, libp2p included)
            async with trio.open_nursery() as nursery:
                for i, proc in enumerate(procs):
                    nursery.start_soon(read_report, i, proc)
            for proc in procs:  # every child found both others: let them go (goodbyes)
                assert proc.stdin is not None
                await proc.stdin.aclose()
            for proc in procs:
                assert await proc.wait() == 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()  # by its pid; only processes this test started
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await proc.wait()
    for i in range(3):
        assert reports[i]["found"] == {ids[j]: [addrs[j]] for j in range(3) if j != i}
    print("per-process discovery ms (from open):", [reports[i]["ms"] for i in range(3)],
          "stall ms:", [reports[i]["stall_ms"] for i in range(3)])


async def _child(peer_id: str, address: str, expected: dict[str, list[str]]) -> None:
    meter = StallMeter()
    with trio.fail_after(CHILD_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(meter.run)
            t0 = trio.current_time()
            async with MdnsDiscovery.open(peer_id, [address], interfaces=LO) as disc:
                found: dict[str, list[str]] = {}
                ms: list[int] = []
                async for peer in disc.found():
                    if peer.peer_id in expected:
                        found[peer.peer_id] = list(peer.addresses)
                        ms.append(round(1000 * (trio.current_time() - t0)))
                        if found == expected:
                            break
                print(json.dumps({"found": found, "ms": ms,
                                  "stall_ms": round(1000 * meter.max_stall_s, 1)}), flush=True)
                # Stay announced until the parent has every report (closes our stdin).
                await trio.to_thread.run_sync(  # type: ignore[call-arg]  # stub predates it
                    sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()


async def _netns_child() -> None:
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:  # not the private namespace: never bind every interface here
        sys.exit(f"refusing: interfaces {names} besides lo")
    with trio.fail_after(WAIT):
        async with MdnsDiscovery.open(new_peer_id(), ["/ip4/127.0.0.1/tcp/1"]) as a, \
                MdnsDiscovery.open(new_peer_id(), ["/ip4/127.0.0.1/tcp/2"]) as b:
            await wait_for(a, {b.peer_id: b.addresses})
            await wait_for(b, {a.peer_id: a.addresses})
    print("OK", flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    trio.run(_child, sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
elif __name__ == "__main__" and sys.argv[1:2] == ["netns-child"]:
    trio.run(_netns_child)
