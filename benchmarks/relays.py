"""A fleet of relays: figures of the parts that concern more than one mailbox stream. Each part
is a function of its own returning (table rows, JSON figures); `main` runs them in turn.

Wake-ups (PROTOCOL.md section 29), `wakeup_latency`: `pigeon relay` in a process of its own
(loopback TCP, a fresh data directory, `push_allow = ["127.0.0.1/32"]`), the stand-in push
distributor of examples/push_distributor.py in this process. `--samples` mailboxes each register
a push URL (auth, then wake); then, one at a time, a depositor leaves one message in each
mailbox, nobody being subscribed, and the relay POSTs a wake-up. Latency = deposit call -> the
distributor has the POST (same process, same clock: it includes the relay's commit and fsync,
resolving the URL's host, encrypting the payload and the HTTP request). The baseline is a raw
POST of a body of the same size from this process to the same distributor (httpx over trio).
Goal: p50 < 100 ms.

Every loop is bounded in count, every wait in time, the whole run by `--timeout` seconds; the
relay process is always stopped by its pid. With `--json` stdout holds exactly one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._report import emit, parse_args, percentile
from benchmarks.relay import LISTEN, Child

GOAL_WAKEUP_P50_MS = 100.0
#: Seconds any one wake-up may take before the run is called failed.
WAKEUP_TIMEOUT_S = 10.0
RELAY_CONFIG = 'push_allow = ["127.0.0.1/32"]\n'

Rows = list[tuple[str, Any, str]]


async def wakeup_latency(samples: int, work: Path) -> tuple[Rows, dict[str, Any]]:
    """Deposit -> wake-up POST latency, against a raw POST (see the module docstring)."""
    import httpx

    from node.device.mailbox_client import MailboxClient
    from node.net import Transport
    from node.protocol.keys import DeviceKeyPair
    from node.protocol.mailbox import mailbox_id
    from node.protocol.wakeup import WAKEUP_PLAINTEXT, PushKeys, encrypt
    from tests.pushtools import Distributor

    work.mkdir(parents=True, exist_ok=True)
    config = work / "relay.toml"
    config.write_text(RELAY_CONFIG)
    relay = Child([sys.executable, "-m", "node", "relay", "--data-dir", str(work / "relay"),
                   "--listen", LISTEN, "--config", str(config), "--json", "--log-level",
                   "WARNING"], work / "relay.stderr")
    distributor = Distributor()
    keys = PushKeys.generate()
    try:
        with distributor.running():
            hello = await relay.line(timeout=60)
            peer, addrs = hello["peer_id"], hello["addresses"]
            devices = [DeviceKeyPair.generate() for _ in range(samples)]
            latencies_ms: list[float] = []
            ok_to_post_ms: list[float] = []
            async with Transport.open(os.urandom(32), (LISTEN,)) as transport:
                for i, device in enumerate(devices):
                    async with MailboxClient.connect(transport, peer, addrs) as owner:
                        await owner.authenticate(device)
                        await owner.set_wake(distributor.url(f"/up/{i}"), keys.p256dh, keys.auth)
            async with Transport.open(os.urandom(32), (LISTEN,)) as transport, \
                    MailboxClient.connect(transport, peer, addrs) as depositor:
                for i, device in enumerate(devices):
                    start = time.monotonic()
                    await depositor.deposit(mailbox_id(device.public), os.urandom(16),
                                            b"sealed envelope", ttl=3600)
                    ok = time.monotonic()
                    post = await trio.to_thread.run_sync(distributor.wait_post, WAKEUP_TIMEOUT_S)
                    if post.path != f"/up/{i}" or keys.decrypt(post.body) != WAKEUP_PLAINTEXT:
                        raise RuntimeError(f"unexpected wake-up {post.path}")
                    latencies_ms.append((post.at - start) * 1000)
                    ok_to_post_ms.append((post.at - ok) * 1000)
            # The baseline: the same POST, made by this process directly.
            body = encrypt(WAKEUP_PLAINTEXT, keys.p256dh, keys.auth)
            raw_ms: list[float] = []
            async with httpx.AsyncClient(trust_env=False) as client:
                for _ in range(samples):
                    start = time.monotonic()
                    response = await client.post(distributor.url("/raw"), content=body)
                    if response.status_code != 201:
                        raise RuntimeError(f"raw POST answered {response.status_code}")
                    post = await trio.to_thread.run_sync(distributor.wait_post, WAKEUP_TIMEOUT_S)
                    raw_ms.append((post.at - start) * 1000)
    finally:
        relay.stop()
    p50, p99 = percentile(latencies_ms, 0.5), percentile(latencies_ms, 0.99)
    raw_p50 = percentile(raw_ms, 0.5)
    figures = {
        "wakeup_samples": samples,
        "wakeup_latency_p50_ms": round(p50, 2),
        "wakeup_latency_p99_ms": round(p99, 2),
        "wakeup_ok_to_post_p50_ms": round(percentile(ok_to_post_ms, 0.5), 2),
        "raw_post_p50_ms": round(raw_p50, 2),
        "wakeup_vs_raw_post_p50_ratio": round(p50 / raw_p50, 1) if raw_p50 else None,
        "wakeup_goal_p50_ms": GOAL_WAKEUP_P50_MS,
        "wakeup_goal_met": p50 < GOAL_WAKEUP_P50_MS,
    }
    rows: Rows = [
        ("wake-ups (one mailbox each)", samples, ""),
        ("deposit -> POST p50", p50, "ms"),
        ("deposit -> POST p99", p99, "ms"),
        ("deposit ok -> POST p50", percentile(ok_to_post_ms, 0.5), "ms"),
        ("raw POST p50 (baseline)", raw_p50, "ms"),
        ("p50 vs raw POST", f"{figures['wakeup_vs_raw_post_p50_ratio']}x", ""),
        (f"goal p50 < {GOAL_WAKEUP_P50_MS:g} ms", "met" if figures["wakeup_goal_met"]
         else "NOT met", ""),
    ]
    return rows, figures


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=200, help="wake-ups measured")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound of the whole run (s)")


async def _run(args: argparse.Namespace) -> tuple[Rows, dict[str, Any]]:
    rows: Rows = []
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as root, trio.fail_after(args.timeout):
        for part in (wakeup_latency,):
            part_rows, part_figures = await part(args.samples, Path(root) / part.__name__)
            rows += part_rows
            figures |= part_figures
    return rows, figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv, extra=_options)
    rows, figures = trio.run(_run, args)
    emit("Relays: wake-ups", rows, figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
