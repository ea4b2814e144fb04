"""Discovery: how long a DHT lookup takes as the network grows, and how fast mDNS finds peers.

1. DHT resolve. For each size in `--sizes` (default 10, 30, 60): that many Pigeon DHT servers
   (`node.net.Dht` over `Transport`, TCP on 127.0.0.1), every one bootstrapped from node 0's
   address only, started BATCH at a time; then `--records` account records are published from
   random nodes, and `--resolves` lookups run one after another, each by a random node that did
   not publish the key, with `Dht.get` (a fresh network lookup: the getter's local copy is
   dropped first). Reported per size: p50 / p90 time of a resolve, KAD messages the getter sent
   per resolve (one stream per request, `Dht.rpc_count`), the process CPU time per resolve, the
   put time, the startup time (until every node finished its first routing-table refresh), the
   routing-table sizes and the shutdown time.

   All hosts share ONE process, hence one trio scheduler and one core: every DHT RPC costs ~20 ms
   of CPU in py-libp2p (docs/libp2p.md L38), and the background work of N hosts
   competes with the lookup being timed. The larger sizes are therefore pessimistic: with one
   node per process a lookup costs about what the smallest network shows, plus network latency.

2. mDNS (if `node/net/mdns.py` exists): three `MdnsDiscovery` instances pinned to 127.0.0.1
   (never a real interface), opened together; the time from opening to the moment every one has
   found the two others.

Every loop is bounded in count and the whole run by `--timeout` seconds (then the script aborts
with an error and a non-zero exit status). Loopback only; no public bootstrap list exists.
With `--json` stdout holds exactly one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._report import emit, parse_args, percentile
from node.net import Dht, Transport, configure_libp2p_logging
from node.protocol.binding import sign_binding
from node.protocol.directory import NAMESPACES, RECORD_LIFETIME_S, AccountRecord, select, validate
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair

LISTEN = ("/ip4/127.0.0.1/tcp/0",)
BATCH = 10  # nodes started at a time (each one's startup refresh is CPU-bound)
STARTUP_TIMEOUT_S = 240.0  # one network of the largest size, until every node refreshed once
STEP_TIMEOUT_S = 60.0  # one put or one get
MDNS_TIMEOUT_S = 30.0
MDNS_INSTANCES = 3
NOTE = ("all DHT hosts run in one process (one core, one scheduler): the larger sizes include "
        "every other host's background work and are pessimistic")


def _now() -> int:
    return int(time.time())


@dataclass
class _Node:
    transport: Transport
    dht: Dht


@asynccontextmanager
async def _network(size: int) -> AsyncIterator[tuple[list[_Node], float]]:
    """`size` DHT servers; yields them and the startup time (s). Each host is owned by a task of
    its own (entered and left there, docs/libp2p.md L4)."""
    nodes: list[_Node | None] = [None] * size
    stop = trio.Event()

    async def run(i: int, bootstrap: list[str], ready: trio.Event) -> None:
        async with Transport.open(os.urandom(32), LISTEN) as transport, \
                Dht.open(transport, server=True, bootstrap=bootstrap,
                         validator=lambda k, v: validate(k, v, _now()),
                         selector=lambda k, vs: select(k, vs, _now()),
                         namespaces=NAMESPACES) as dht:
            nodes[i] = _Node(transport, dht)
            ready.set()
            await stop.wait()

    async with trio.open_nursery() as nursery:
        try:
            started = time.perf_counter()
            with trio.fail_after(STARTUP_TIMEOUT_S):
                first = trio.Event()
                nursery.start_soon(run, 0, [], first)
                await first.wait()
                boot = nodes[0].transport.listen_addrs()  # type: ignore[union-attr]
                for start in range(1, size, BATCH):
                    events = []
                    for i in range(start, min(size, start + BATCH)):
                        events.append(trio.Event())
                        nursery.start_soon(run, i, boot, events[-1])
                    for ev in events:
                        await ev.wait()
                ready = [n for n in nodes if n is not None]
                for n in ready:
                    await n.dht.wait_refreshed()
            yield ready, time.perf_counter() - started
        finally:
            stop.set()


async def measure_dht(size: int, records: int, resolves: int, rng: random.Random) -> dict[str, Any]:
    async with _network(size) as (nodes, startup_s):
        tables = sorted(n.dht.routing_table_size() for n in nodes)
        published: list[tuple[str, bytes, int]] = []  # key, value, publisher index
        put_ms: list[float] = []
        for r in range(records):
            identity = IdentityKeyPair(os.urandom(32))
            device = DeviceKeyPair(os.urandom(32))
            record = AccountRecord(identity=identity.public, devices=(device.public,),
                                   bindings=(sign_binding(device, identity.public),),
                                   seq=_now() * 1000 + r, expires=_now() + RECORD_LIFETIME_S)
            value = record.sign(identity)
            publisher = rng.randrange(size)
            t = time.perf_counter()
            with trio.fail_after(STEP_TIMEOUT_S):
                await nodes[publisher].dht.put(record.key, value)
            put_ms.append((time.perf_counter() - t) * 1000)
            published.append((record.key, value, publisher))

        resolve_ms: list[float] = []
        messages: list[int] = []
        cpu_ms: list[float] = []
        misses = 0
        for _ in range(resolves):
            key, value, publisher = rng.choice(published)
            getter = rng.choice([i for i in range(size) if i != publisher])
            dht = nodes[getter].dht
            rpcs, cpu, t = dht.rpc_count(), time.process_time(), time.perf_counter()
            with trio.fail_after(STEP_TIMEOUT_S):
                got = await dht.get(key)
            resolve_ms.append((time.perf_counter() - t) * 1000)
            cpu_ms.append((time.process_time() - cpu) * 1000)
            messages.append(dht.rpc_count() - rpcs)
            misses += got != value
        closing = time.perf_counter()
    return {
        "startup_s": startup_s,
        "rt_min": tables[0],
        "rt_median": statistics.median(tables),
        "put_p50_ms": percentile(put_ms, 0.5),
        "resolve_p50_ms": percentile(resolve_ms, 0.5),
        "resolve_p90_ms": percentile(resolve_ms, 0.9),
        "kad_msgs_per_resolve": statistics.fmean(messages),
        "cpu_ms_per_resolve": statistics.fmean(cpu_ms),
        "misses": misses,
        "shutdown_s": time.perf_counter() - closing,
    }


async def measure_mdns() -> float | None:
    """Seconds from opening MDNS_INSTANCES pinned instances until each found all the others;
    None when node/net/mdns.py is not there."""
    if importlib.util.find_spec("node.net.mdns") is None:
        return None
    from node.net.mdns import MdnsDiscovery

    devices = [DeviceKeyPair(os.urandom(32)).public.peer_id() for _ in range(MDNS_INSTANCES)]
    done = [trio.Event() for _ in devices]
    stop = trio.Event()
    found_at: list[float] = [0.0] * len(devices)

    async def run(i: int, started: float) -> None:
        others = set(devices) - {devices[i]}
        addrs = [f"/ip4/127.0.0.1/tcp/{40000 + i}"]
        async with MdnsDiscovery.open(devices[i], addrs, interfaces=["127.0.0.1"]) as mdns:
            async for peer in mdns.found():
                others.discard(peer.peer_id)
                if not others:
                    found_at[i] = time.perf_counter() - started
                    done[i].set()
                    break
            await stop.wait()

    with trio.fail_after(MDNS_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            started = time.perf_counter()
            for i in range(len(devices)):
                nursery.start_soon(run, i, started)
            for ev in done:
                await ev.wait()
            stop.set()
    return max(found_at)


def main() -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--sizes", default="10,30,60",
                            help="comma-separated DHT network sizes (default 10,30,60)")
        parser.add_argument("--records", type=int, default=10, help="records published per size")
        parser.add_argument("--resolves", type=int, default=30, help="lookups timed per size")
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--timeout", type=float, default=900.0,
                            help="bound of the whole run, in seconds")

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 2 or args.records < 1 or args.resolves < 1:
        print("error: sizes must be >= 2, records and resolves >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)
    configure_libp2p_logging(logging.CRITICAL)
    rng = random.Random(args.seed)

    async def run() -> dict[str, Any]:
        out: dict[str, Any] = {"dht": {}}
        with trio.fail_after(args.timeout):
            out["mdns"] = await measure_mdns()
            for size in sizes:
                out["dht"][size] = await measure_dht(size, args.records, args.resolves, rng)
        return out

    try:
        results = trio.run(run)
    except trio.TooSlowError:
        print(f"error: the benchmark did not finish within --timeout {args.timeout:g} s",
              file=sys.stderr)
        return 3

    dht: dict[int, dict[str, Any]] = results["dht"]

    def by_size(name: str, digits: int = 1) -> dict[str, float]:
        return {str(n): round(float(r[name]), digits) if digits else round(r[name])
                for n, r in dht.items()}

    figures: dict[str, Any] = {
        "mdns_discovery_s": None if results["mdns"] is None else round(results["mdns"], 3),
        "dht_resolve_p50_ms": by_size("resolve_p50_ms"),
        "dht_resolve_p90_ms": by_size("resolve_p90_ms"),
        "dht_kad_msgs_per_resolve": by_size("kad_msgs_per_resolve"),
        "dht_cpu_ms_per_resolve": by_size("cpu_ms_per_resolve"),
        "dht_put_p50_ms": by_size("put_p50_ms"),
        "dht_startup_s": by_size("startup_s"),
        "dht_routing_table_min": by_size("rt_min", 0),
        "dht_routing_table_median": by_size("rt_median", 0),
        "dht_resolve_misses": by_size("misses", 0),
        "dht_shutdown_s": by_size("shutdown_s"),
        "dht_resolves_per_size": args.resolves,
        "note": NOTE,
    }
    mdns = figures["mdns_discovery_s"]
    rows: list[tuple[str, Any, str]] = [
        (f"mDNS: {MDNS_INSTANCES} instances on 127.0.0.1 all found each other",
         "n/a (no node/net/mdns.py)" if mdns is None else mdns * 1000, "" if mdns is None else "ms"),
    ]
    for n, r in dht.items():
        rows += [
            (f"DHT {n} nodes: resolve p50 / p90",
             f"{r['resolve_p50_ms']:,.0f} / {r['resolve_p90_ms']:,.0f}", "ms"),
            (f"DHT {n} nodes: KAD messages sent per resolve", r["kad_msgs_per_resolve"], ""),
            (f"DHT {n} nodes: process CPU per resolve", r["cpu_ms_per_resolve"], "ms"),
            (f"DHT {n} nodes: put p50", r["put_p50_ms"], "ms"),
            (f"DHT {n} nodes: startup (all refreshed once)", r["startup_s"], "s"),
            (f"DHT {n} nodes: routing table min / median",
             f"{r['rt_min']} / {r['rt_median']:g}", ""),
            (f"DHT {n} nodes: resolves that missed", r["misses"], f"of {args.resolves}"),
            (f"DHT {n} nodes: shutdown", r["shutdown_s"], "s"),
        ]
    emit("Discovery (loopback; DHT hosts all in one process)", rows, figures, args.json)
    if not args.json:
        print(f"note: {NOTE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
