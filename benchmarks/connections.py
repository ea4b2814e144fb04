"""Connection budget: does a host keep accepting after thousands of short connections?

py-libp2p 0.8.1 returns an inbound connection's slot only when the host stops (docs/libp2p.md
L13) and its peerstore evicted the host's own key once it knew 1,000 peers (L14). This script
checks the workarounds in node/net/host.py the way an attacker would exercise them:

1. A target host runs in a process of its own (this script with `--role target`): `--kind
   device` is a `Transport` with a device's defaults; `--kind relay` has a relay's settings (HOP
   served, `max_connections` from node/relay/config.py). It answers each frame on
   MSG_PROTOCOL with the same frame.
2. This process opens `--connections` connections to it, each from a host with a fresh key
   (a new peer id every time), `--concurrency` at a time, each closed again at once.
3. Before and after, a genuine client (one fixed key) opens a stream and times a round trip.

Reported: connections per second, how many were refused, the genuine client's round trip
before and after, and the target's RSS before and after (from /proc). The goal: a
relay survives 20,000 such connections and a device 5,000 (refused 0, genuine client still
served). Every loop is bounded in count and the run by `--timeout`; the target is stopped by
its pid. With `--json` stdout holds exactly one JSON object.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._report import emit, parse_args

LISTEN = "/ip4/127.0.0.1/tcp/0"
CONNECT_TIMEOUT_S = 10.0
GOALS = {"device": 5_000, "relay": 20_000}


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _target(kind: str) -> None:
    from node.net import MSG_PROTOCOL, CircuitRelayLimits, FrameStream, Transport
    from node.relay.config import RelayConfig

    extra: dict[str, Any] = {}
    if kind == "relay":
        config = RelayConfig(data_dir=Path("/nonexistent"))
        extra = {"circuit_relay": CircuitRelayLimits.from_settings(config),
                 "max_connections": config.max_connections}
    async with Transport.open(os.urandom(32), [LISTEN], **extra) as transport:

        async def echo(stream: FrameStream) -> None:
            async for frame in stream:
                await stream.send([frame])

        transport.set_stream_handler(MSG_PROTOCOL, echo)
        print(transport.listen_addrs()[0], flush=True)
        await trio.sleep_forever()


async def _round_trip_ms(peer_id: str, addr: str) -> float | None:
    from node.errors import TransportError
    from node.net import MSG_PROTOCOL, Transport

    genuine_seed = bytes(range(32))
    async with Transport.open(genuine_seed, [LISTEN]) as client:
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                started = time.perf_counter()
                stream = await client.open_stream(peer_id, [addr], MSG_PROTOCOL,
                                                  timeout=CONNECT_TIMEOUT_S)
                await stream.send([b"ping"])
                if await stream.receive() != b"ping":
                    return None
                elapsed = (time.perf_counter() - started) * 1000
                await stream.aclose()
                return elapsed
        except (TransportError, trio.TooSlowError):
            return None


async def _attack(peer_id: str, addr: str, count: int, concurrency: int,
                  deadline: float) -> tuple[int, int]:
    """`count` connections from fresh keys; returns (made, refused)."""
    from node.errors import TransportError
    from node.net import Transport

    made = refused = 0
    todo = iter(range(count))

    async def worker() -> None:
        nonlocal made, refused
        for _ in todo:
            if time.monotonic() > deadline:
                return
            async with Transport.open(os.urandom(32), [LISTEN]) as client:
                try:
                    await client.connect(peer_id, [addr], timeout=CONNECT_TIMEOUT_S)
                    made += 1
                except TransportError:
                    refused += 1

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return made, refused


def main(argv: list[str] | None = None) -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--kind", choices=("device", "relay"), default="device")
        parser.add_argument("--connections", type=int, default=None,
                            help="default: the goal (device 5,000, relay 20,000)")
        parser.add_argument("--concurrency", type=int, default=8)
        parser.add_argument("--timeout", type=float, default=3600.0)
        parser.add_argument("--role", choices=("main", "target"), default="main",
                            help=argparse.SUPPRESS)

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    import logging
    logging.disable(logging.CRITICAL)  # libp2p logs every refused and closed connection
    if args.role == "target":
        trio.run(_target, args.kind)
        return
    from node.net import configure_libp2p_logging
    configure_libp2p_logging(logging.CRITICAL)
    count = args.connections or GOALS[args.kind]
    target = subprocess.Popen(
        [sys.executable, __file__, "--role", "target", "--kind", args.kind],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert target.stdout is not None
        addr = target.stdout.readline().strip()
        if not addr:
            raise SystemExit("the target did not start")
        peer_id = addr.rsplit("/", 1)[1]
        rss_before = _rss_kb(target.pid)
        before = trio.run(_round_trip_ms, peer_id, addr)
        started = time.monotonic()
        made, refused = trio.run(_attack, peer_id, addr, count, args.concurrency,
                                 started + args.timeout)
        elapsed = time.monotonic() - started
        after = trio.run(_round_trip_ms, peer_id, addr)
        rss_after = _rss_kb(target.pid)
        alive = target.poll() is None
    finally:
        target.send_signal(signal.SIGTERM)
        try:
            target.wait(timeout=10)
        except subprocess.TimeoutExpired:
            target.kill()
            target.wait()
    figures = {
        "kind": args.kind,
        "connections": made + refused,
        "connections_goal": GOALS[args.kind],
        "refused": refused,
        "connections_per_s": round((made + refused) / elapsed, 1) if elapsed else 0.0,
        "genuine_round_trip_before_ms": round(before, 1) if before is not None else None,
        "genuine_round_trip_after_ms": round(after, 1) if after is not None else None,
        "target_alive": alive,
        "target_rss_before_kb": rss_before,
        "target_rss_after_kb": rss_after,
    }
    rows = [
        ("target", args.kind, ""),
        ("connections from fresh peer ids", made + refused, f"(goal {GOALS[args.kind]:,})"),
        ("refused", refused, "(goal 0)"),
        ("rate", figures["connections_per_s"], "conn/s"),
        ("genuine round trip before", before if before is not None else "FAILED", "ms"),
        ("genuine round trip after", after if after is not None else "FAILED", "ms"),
        ("target still running", alive, ""),
        ("target RSS before", rss_before, "KB"),
        ("target RSS after", rss_after, "KB"),
    ]
    emit("Connection budget: short connections from fresh peer ids", rows, figures, args.json)


if __name__ == "__main__":
    main()
