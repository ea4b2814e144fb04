"""Liveness: how long a sender takes to give up on a silent direct path, with the shipped timers.

Measured in one process on loopback, with real libp2p hosts, a real relay and real SQLite: Alice
and Bob become contacts (Bob has a mailbox on the relay), then Bob's device key moves to a bare
host that takes every frame and never answers (a partitioned or frozen receiver, as far as
Alice can tell; its libp2p ping is muted too). Figures:

- fallback: from `send` until the relay holds the message (Alice's status counts it relayed):
  the ack deadline (`Config.ack_timeout_s`) plus closing the connection and one deposit;
- idle detection: on an idle connection whose pings go unanswered, from the last ack until
  Alice's status says why the path is down (`keepalive_s` plus `ping_timeout_s` at most).

Goal: messages sent into a dead path reach the relay well within 15 s; a dead path is
noticed within ~5-10 s. Baseline: the configured timers themselves (the ratio shows the cost of
acting on them).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import emit, parse_args
from node import Config, Node
from node.device.datadir import DataDir
from node.net import MSG_PROTOCOL, FrameStream, Transport
from node.net.host import PING_PROTOCOL
from node.protocol.wire import Ack, Msg, decode_frame, encode_frame
from node.relay.config import RelayConfig
from node.relay.service import open_relay

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
GOAL_FALLBACK_S = 15.0
TIMEOUT_S = 60.0  # one measurement; a hang aborts the run


def _config(name: str, relays: tuple[str, ...] = ()) -> Config:
    # The shipped liveness timers; only the network and the disk are made cheap.
    return Config(listen=(LOOPBACK,), mdns=False, durability="normal", display_name=name,
                  relays=relays)


def _bob(alice: Node) -> object:
    return next(c for c in alice.status().contacts if c.name == "bob")


async def _measure(base: Path) -> dict[str, float]:
    figures: dict[str, float] = {}
    async with open_relay(RelayConfig(data_dir=base / "relay", listen=(LOOPBACK,),
                                      log_level="WARNING")) as relay:
        relays = (relay.addresses()[0],)
        async with Node.open(base / "alice", _config("alice"), create=True) as alice, \
                Node.open(base / "bob", _config("bob", relays), create=True) as bob:
            alice.add_contact("bob", bob.invite())
            with trio.fail_after(TIMEOUT_S):
                first = await alice.send("bob", "hello")
                await alice.wait_delivered(first, timeout=TIMEOUT_S)
        _, device = DataDir(base / "bob").load_keys()
        async with Node.open(base / "alice", _config("alice")) as alice, \
                Transport.open(device.to_bytes(), (LOOPBACK,)) as fake:
            acking = True

            async def handler(stream: FrameStream) -> None:
                async for raw in stream:
                    frame = decode_frame(raw)
                    if isinstance(frame, Msg) and acking:
                        await stream.send([encode_frame(Ack((frame.id,)))])

            async def mute(stream: FrameStream) -> None:
                await trio.sleep_forever()

            fake.set_stream_handler(MSG_PROTOCOL, handler)
            contact = alice._db.contact_by_name("bob")
            assert contact is not None
            record = alice._db.devices(contact.id)[0]
            alice._db.put_device(contact.id, record.device, record.peer_id,
                                 [*fake.listen_addrs(), *record.addrs],
                                 seen_at_ms=record.seen_at_ms, now_ms=0)
            with trio.fail_after(TIMEOUT_S):
                # idle detection: one acknowledged message, then pings go unanswered
                fake.set_stream_handler(PING_PROTOCOL, mute)
                message = await alice.send("bob", "acknowledged")
                await alice.wait_delivered(message, timeout=TIMEOUT_S)
                acked_at = trio.current_time()
                while _bob(alice).path_down is None:  # type: ignore[attr-defined]
                    await trio.sleep(0.01)
                figures["idle_detection_s"] = trio.current_time() - acked_at
                # fallback: nothing is acknowledged any more
                acking = False
                sent_at = trio.current_time()
                await alice.send("bob", "into the void")
                while _bob(alice).relayed < 1:  # type: ignore[attr-defined]
                    await trio.sleep(0.01)
                figures["fallback_s"] = trio.current_time() - sent_at
    shipped = Config()
    figures["ack_timeout_s"] = shipped.ack_timeout_s
    figures["idle_bound_s"] = shipped.keepalive_s + shipped.ping_timeout_s
    return figures


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    logging.getLogger("pigeon").setLevel(logging.ERROR)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        figures = trio.run(_measure, Path(tmp))
    figures["fallback_ratio_to_ack_timeout"] = figures["fallback_s"] / figures["ack_timeout_s"]
    figures["idle_detection_ratio_to_bound"] = figures["idle_detection_s"] / figures["idle_bound_s"]
    figures["goal_fallback_s"] = GOAL_FALLBACK_S
    figures["run_s"] = time.monotonic() - started
    emit("Liveness: giving up on a silent direct path (loopback, shipped timers)", [
        ("send -> held by the relay", figures["fallback_s"], "s"),
        ("  ack deadline (baseline)", figures["ack_timeout_s"], "s"),
        ("  ratio", round(figures["fallback_ratio_to_ack_timeout"], 2), "x"),
        ("  goal", GOAL_FALLBACK_S, "s at most"),
        ("idle: last ack -> path down", figures["idle_detection_s"], "s"),
        ("  keepalive + ping timeout (bound)", figures["idle_bound_s"], "s"),
    ], figures, args.json)


if __name__ == "__main__":
    main()
