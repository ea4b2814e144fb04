"""What a Yamux stream costs on loopback, with libp2p's window updates and with Pigeon's.

Two `node.net.Transport`s in this process (TCP, Noise, Yamux on 127.0.0.1), one connection:

1. request and reply: `--requests` times, a new stream, a 200-byte frame, the same frame back,
   the stream closed: CPU time of this process (both ends) per exchange, and Yamux window-update
   frames written per exchange;
2. one way: `--mib` MiB in 256 KiB frames on one stream: CPU time per MiB, and window updates.

Each is measured twice in the same run, over the same connection: with the rule libp2p 0.8.1
ships (a window update after every read that returned data) and with the one Pigeon installs
(`node/net/yamux_credit.py`: once half the window is read, as go-yamux does; docs/libp2p.md
L92), which comes out as a ratio. The raw baseline is libp2p's own rule.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from libp2p.stream_muxer.yamux import yamux

from benchmarks._report import emit, parse_args

# Captured before node.net installs its rule (on the first Transport.open).
LIBP2P_RULE = yamux.YamuxStream._auto_tune_and_send_window_update

from node.net import FrameStream, Transport  # noqa: E402
from node.net.yamux_credit import use_half_window_updates  # noqa: E402
from tests.yamuxtools import count_window_updates  # noqa: E402

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
PROTOCOL = "/pigeon-bench/streams/1"
TIMEOUT_S = 60.0  # one phase; a hang aborts the run
FRAME = 256 * 1024


async def measure(requests: int, mib: int) -> dict[str, dict[str, float]]:
    updates = count_window_updates()
    async with Transport.open(os.urandom(32), (LOOPBACK,), max_frame_bytes=2 * FRAME) as a, \
            Transport.open(os.urandom(32), (LOOPBACK,), max_frame_bytes=2 * FRAME) as b:
        bulk = [os.urandom(FRAME)] * (mib * 4)  # made before any clock starts
        received, all_arrived = [0], [trio.Event()]

        async def serve(stream: FrameStream) -> None:
            async for frame in stream:
                if len(frame) < FRAME:
                    await stream.send([frame])
                    continue
                received[0] += len(frame)
                if received[0] == mib * 2**20:
                    all_arrived[0].set()

        a.set_stream_handler(PROTOCOL, serve)
        addrs = a.listen_addrs()

        async def exchange() -> None:
            stream = await b.open_stream(a.peer_id, addrs, PROTOCOL, timeout=TIMEOUT_S)
            await stream.send([b"r" * 200])
            assert await stream.receive() == b"r" * 200
            await stream.aclose()

        async def one_way() -> None:
            stream = await b.open_stream(a.peer_id, addrs, PROTOCOL, timeout=TIMEOUT_S,
                                         max_frame_bytes=2 * FRAME)
            received[0], all_arrived[0] = 0, trio.Event()
            await stream.send(bulk)
            await all_arrived[0].wait()
            await stream.aclose()

        async def timed(count: int, step: Callable[[], Coroutine[Any, Any, None]]
                        ) -> tuple[float, int]:
            before = time.process_time()
            updates.clear()
            with trio.fail_after(TIMEOUT_S):
                for _ in range(count):
                    await step()
            return time.process_time() - before, len(updates)

        for _ in range(20):  # warm up the connection and the code paths
            await exchange()
        out: dict[str, dict[str, float]] = {}
        for rule in ("libp2p", "pigeon"):
            if rule == "libp2p":
                yamux.YamuxStream._auto_tune_and_send_window_update = LIBP2P_RULE  # type: ignore[method-assign]
            else:
                assert use_half_window_updates()
            cpu, sent = await timed(requests, exchange)
            bulk_cpu, bulk_sent = await timed(1, one_way)
            out[rule] = {"exchange_cpu_ms": cpu / requests * 1000,
                         "exchange_window_updates": sent / requests,
                         "bulk_cpu_ms_per_mib": bulk_cpu / mib * 1000,
                         "bulk_window_updates_per_mib": bulk_sent / mib}
        return out


def main() -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--requests", type=int, default=500,
                            help="request/reply exchanges per rule (default %(default)s)")
        parser.add_argument("--mib", type=int, default=64,
                            help="MiB sent one way per rule (default %(default)s)")

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    if args.requests < 1 or args.mib < 1:
        raise SystemExit("--requests and --mib must be at least 1")
    result = trio.run(measure, args.requests, args.mib)
    figures: dict[str, object] = {"requests": args.requests, "mib": args.mib}
    rows: list[tuple[str, object, str]] = []
    for rule, values in result.items():
        for name, value in values.items():
            figures[f"{rule}_{name}"] = round(value, 3)
        rows += [(f"{rule}: request and reply, CPU", values["exchange_cpu_ms"], "ms each"),
                 (f"{rule}: request and reply, window updates",
                  values["exchange_window_updates"], "frames each"),
                 (f"{rule}: one way, CPU", values["bulk_cpu_ms_per_mib"], "ms per MiB"),
                 (f"{rule}: one way, window updates", values["bulk_window_updates_per_mib"],
                  "frames per MiB")]
    for what, name in (("request and reply", "exchange_cpu_ms"), ("one way", "bulk_cpu_ms_per_mib")):
        ratio = result["pigeon"][name] / result["libp2p"][name]
        figures[f"{name.split('_')[0]}_cpu_ratio"] = round(ratio, 2)
        rows.append((f"pigeon / libp2p, {what}, CPU", ratio, "x"))
    emit(f"Yamux streams on loopback: libp2p's window updates and Pigeon's "
         f"({args.requests} exchanges, {args.mib} MiB each)", rows, figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
