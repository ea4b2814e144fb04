"""Fan-out to a multi-device account (PROTOCOL.md section 25.5), on loopback, in two processes.

The script is the sender S (one `Node`); for each account size N in 1, 2, 4 and 8 it starts
itself again as the receiver (`--role receivers --devices N`), a process running N nodes of one
account R: R1 takes S's invite, then R2..RN are added to R's device list the way linking will
add them (tests/devicetools.py `provision`, the stand-in for `pigeon link`), and S learns them
from R's device-list update and starts a session with each. The child is stopped by its pid at
the end of its size, always. Then, with 1 KiB texts:

- throughput: `--messages` texts queued with `send_many()` (BULK_CHUNK per call), until every
  device of R acknowledged every one (S's outbox is empty): texts per second, and S's CPU time
  (this process only: the receivers run in the child) per text;
- latency: LATENCY_MESSAGES texts one at a time, from `send()` to MessageDelivered (the first of
  R's devices committed it) and to the last device's acknowledgment.

Goal: sending to 8 devices costs S at most 8x the CPU of sending to one (the content is encoded
once per message; only the ratchet encryption and the delivery are per device). Every loop is
bounded in count and the run by `--timeout` seconds. `--json` prints one JSON object.

Linking (PROTOCOL.md sections 25.2 and 25.3), in this process:

`link_time`: Alice's first device A1 has Bob as a contact and `--history` messages with him (the
contact is made through a real invite and session; the history rows are then written straight
into A1's database, in one transaction, so the set-up does not dominate the run). A new device
runs `link_new_device` (as `pigeon link` does) and A1 approves its code (`Node.approve_link`, as
`pigeon device add`); then the new device opens its node and pulls the history. Figures:

- link: from the code shown until the new device is a member (keys, contacts, device list
  written; the provisioning stream of section 25.2);
- history: from the new device's node opening until every message is committed there, and the
  rate in messages per second;
- total: both;
- baseline: copying the same rows between two SQLite databases in this process with the same
  statements (read a chunk, insert it with its cursor, commit), i.e. the transfer without the
  network, the frames and the second process's work; the ratio is history / baseline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._report import emit, parse_args, percentile

log = logging.getLogger("bench.devices")

SIZES = (1, 2, 4, 8)
MESSAGE_BYTES = 1024
LISTEN = ("/ip4/127.0.0.1/tcp/0",)
BULK_CHUNK = 256
WARMUP_MESSAGES = 10
LATENCY_MESSAGES = 50
LATENCY_PAUSE_S = 0.01
STEP_TIMEOUT_S = 120.0  # one wait: the child ready, sessions started, a burst acknowledged
GOAL_CPU_RATIO_8 = 8.0
HISTORY_MESSAGES = 10_000
HISTORY_MESSAGE_BYTES = 200


def _text(i: int) -> str:
    head = f"fan{i:07d} "
    return head + "x" * (MESSAGE_BYTES - len(head))


def _config(name: str) -> Any:
    from node import Config

    return Config(listen=LISTEN, display_name=name, mdns=False, durability="normal")


# --- the receivers' process -----------------------------------------------------------------------


async def _receivers(devices: int, data: Path) -> None:
    """N nodes of account R. Protocol on stdin/stdout, one JSON object a line: we print
    {"invite"}, wait for S's intro (ContactAdded), add the other devices, print {"ready"}, then
    run until stdin closes."""
    from node import ContactAdded, Node
    from tests.devicetools import provision

    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            Node.open(data / "r1", _config("r"), create=True))
        with first.events() as events:
            print(json.dumps({"invite": first.invite()}), flush=True)
            with trio.fail_after(STEP_TIMEOUT_S):
                async for event in events:
                    if isinstance(event, ContactAdded):
                        break
        for n in range(2, devices + 1):
            peer_id = provision(first, data / f"r{n}", "r")
            node = await stack.enter_async_context(
                Node.open(data / f"r{n}", _config("r")))
            row = first._db.device_by_peer_id(peer_id)
            assert row is not None
            first._db.put_device(row.contact_id, row.device, peer_id, node.contact_addresses(),
                                 seen_at_ms=row.seen_at_ms, now_ms=first._clock.now_ms())
        print(json.dumps({"ready": devices}), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        while await stdin.receive_some(1024):
            pass


# --- the sender ---------------------------------------------------------------------------------------


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise RuntimeError("the receivers' process ended early")
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        yield json.loads(line)


async def _wait(check: Any, what: str) -> None:
    with trio.fail_after(STEP_TIMEOUT_S):
        while not check():
            await trio.sleep(0.005)
    log.debug("%s", what)


async def fan_out(devices: int, messages: int, work: Path) -> dict[str, float]:
    """Throughput, S's CPU and latency of sending to an account of `devices` devices."""
    from node import MessageDelivered, Node

    proc = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--role", "receivers", "--devices", str(devices),
         "--data", str(work / f"r{devices}")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        lines = _lines(proc.stdout)
        async with Node.open(work / f"s{devices}", _config("s"), create=True) as sender:
            hello = await lines.__anext__()
            sender.add_contact("r", hello["invite"])
            await lines.__anext__()  # ready
            db, sessions = sender._db, sender._sessions
            row = db.contact_by_name("r")
            assert row is not None

            def sessions_up() -> bool:
                keys = db.device_keys(row.id)
                return len(keys) == devices and all(
                    sessions.record(row.account, k).current is not None for k in keys)

            await _wait(sessions_up, "sessions")
            await sender.send_many("r", [_text(i) for i in range(WARMUP_MESSAGES)])
            await _wait(lambda: not db.outbox_devices(), "warm-up acknowledged")
            # Throughput and S's CPU: queued in bulk, until every device acknowledged all.
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for start in range(0, messages, BULK_CHUNK):
                await sender.send_many("r", [_text(i) for i in range(
                    start, min(messages, start + BULK_CHUNK))])
            await _wait(lambda: not db.outbox_devices(), "burst acknowledged")
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            # Latency, one at a time: to the first commit, and to the last device's ack.
            first_ms, all_ms = [], []
            with sender.events() as events:
                for i in range(LATENCY_MESSAGES):
                    t0 = time.perf_counter()
                    message_id = await sender.send("r", _text(i))
                    with trio.fail_after(STEP_TIMEOUT_S):
                        async for event in events:
                            if isinstance(event, MessageDelivered) and \
                                    event.message_id == message_id:
                                break
                    first_ms.append((time.perf_counter() - t0) * 1000)
                    await _wait(lambda: not db.outbox_devices(), "all acks")
                    all_ms.append((time.perf_counter() - t0) * 1000)
                    await trio.sleep(LATENCY_PAUSE_S)
        return {"msgs_per_s": messages / wall, "copies_per_s": messages * devices / wall,
                "sender_cpu_us_per_msg": cpu / messages * 1e6,
                "delivered_p50_ms": percentile(first_ms, 0.5),
                "delivered_p99_ms": percentile(first_ms, 0.99),
                "all_devices_p50_ms": percentile(all_ms, 0.5),
                "all_devices_p99_ms": percentile(all_ms, 0.99)}
    finally:
        with trio.CancelScope(shield=True):
            await _stop(proc)


async def _stop(proc: trio.Process) -> None:
    """Stop the receivers by their pid: EOF on stdin first, then SIGTERM, then SIGKILL."""
    if proc.stdin is not None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await proc.stdin.aclose()
    with trio.move_on_after(10):
        await proc.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        with trio.move_on_after(5):
            await proc.wait()


# --- linking with history ------------------------------------------------------------------------


def _fill_history(node: Any, contact: str, count: int) -> None:
    """`count` messages with `contact` in `node`'s history, half each way, in one transaction."""
    db = node._db  # the benchmark's set-up writes rows directly (see the module docstring)
    bob = db.contact_by_name(contact)
    now = node._clock.now_ms()
    incoming = [(os.urandom(16), "text", f"in {i:06d} ".ljust(HISTORY_MESSAGE_BYTES, "x"), now - count + i)
                for i in range(0, count, 2)]
    with db.transaction():
        db.insert_incoming(contact=bob, messages=incoming, received_at_ms=now)
        outgoing = [(os.urandom(16), "text", f"out {i:06d} ".ljust(HISTORY_MESSAGE_BYTES, "x"),
                     now - count + i) for i in range(1, count, 2)]
        rowids = db.insert_outgoing(contact=bob, messages=outgoing, devices=[], now_ms=now)
        db._many("UPDATE messages SET state='delivered' WHERE rowid=?", [(r,) for r in rowids])


def _baseline(source: Path, target: Path, count: int) -> float:
    """Seconds to copy the history rows between two databases with the transfer's statements."""
    from node.device.storage import Database
    from node.protocol.history import HISTORY_CHUNK_ROWS

    src = Database.open(source, durability="normal")
    dst = Database.open(target, durability="normal", create=True)
    try:
        contact = dst.add_contact("bob", src.contacts()[0].account, now_ms=0)
        started = time.perf_counter()
        after, until, total = src.history_range(since_ms=0, cap=count)
        while True:
            rows = src.history_chunk(after=after, until=until, since_ms=0,
                                     limit=HISTORY_CHUNK_ROWS)
            if not rows:
                break
            after = rows[-1][0]
            with dst.transaction():
                dst.insert_history([(contact.id, m.id, m.direction, m.body, m.sent_at_ms,
                                     m.received_at_ms, m.state) for _, _, m in rows], now_ms=0)
                dst.set_meta("cursor", after)
        elapsed = time.perf_counter() - started
        assert total == count
        return elapsed
    finally:
        src.close()
        dst.close()


async def link_time(base: Path, *, messages: int, timeout: float) -> dict[str, float]:
    """Link a new device to an account whose first device has `messages` of history (module
    docstring); returns the figures."""
    from node import Node
    from node.device.linking import link_new_device

    figures: dict[str, float] = {}
    with trio.fail_after(timeout):
        async with Node.open(base / "a1", _config("alice"), create=True) as a1, \
                Node.open(base / "bob", _config("bob"), create=True) as bob:
            with a1.events() as events:
                bob.add_contact("alice", a1.invite())
                async for event in events:
                    if type(event).__name__ == "ContactAdded":
                        break
            name = a1.contacts()[0].name
            _fill_history(a1, name, messages)
            codes, received = trio.open_memory_channel[str](1)
            done: list[float] = []

            async def new_device() -> None:
                await link_new_device(base / "a2", _config(""), on_code=codes.send_nowait)
                done.append(time.perf_counter())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(new_device)
                code = await received.receive()
                started = time.perf_counter()
                await a1.approve_link(code)
            figures["link_s"] = done[0] - started
            opened = time.perf_counter()
            async with Node.open(base / "a2", _config("")) as a2:
                progress = await a2.wait_history_transfer()
                figures["history_s"] = time.perf_counter() - opened
                assert progress.done and progress.received == messages, progress
                assert len(a2.history(name, limit=messages + 10)) == messages
    figures["total_s"] = figures["link_s"] + figures["history_s"]
    figures["history_messages_per_s"] = messages / figures["history_s"]
    figures["baseline_copy_s"] = _baseline(base / "a1" / "pigeon.db", base / "copy.db", messages)
    figures["history_vs_baseline_ratio"] = figures["history_s"] / figures["baseline_copy_s"]
    return figures


def fan_out_report(results: dict[int, dict[str, float]]) -> tuple[list[tuple[str, Any, str]],
                                                                  dict[str, Any]]:
    """Table rows and JSON figures of the fan-out part."""
    rows: list[tuple[str, Any, str]] = []
    figures: dict[str, Any] = {}
    base_cpu = results[SIZES[0]]["sender_cpu_us_per_msg"]
    for n, r in results.items():
        ratio = r["sender_cpu_us_per_msg"] / base_cpu
        rows += [(f"{n} device(s): throughput", r["msgs_per_s"], "texts/s"),
                 (f"{n} device(s): copies delivered", r["copies_per_s"], "copies/s"),
                 (f"{n} device(s): sender CPU per text", r["sender_cpu_us_per_msg"], "us"),
                 (f"{n} device(s): sender CPU vs 1 device", f"{ratio:.2f}x", ""),
                 (f"{n} device(s): delivered p50 / p99",
                  f"{r['delivered_p50_ms']:.1f} / {r['delivered_p99_ms']:.1f}", "ms"),
                 (f"{n} device(s): all devices acked p50 / p99",
                  f"{r['all_devices_p50_ms']:.1f} / {r['all_devices_p99_ms']:.1f}", "ms")]
        for key, value in r.items():
            figures[f"devices_{n}_{key}"] = round(value, 3)
        figures[f"devices_{n}_sender_cpu_ratio_vs_1"] = round(ratio, 3)
    worst = results[SIZES[-1]]["sender_cpu_us_per_msg"] / base_cpu
    figures["goal_sender_cpu_ratio_8_devices_max"] = GOAL_CPU_RATIO_8
    figures["goal_met"] = worst <= GOAL_CPU_RATIO_8
    rows.append((f"goal: {SIZES[-1]} devices <= {GOAL_CPU_RATIO_8:g}x the CPU of 1",
                 "met" if figures["goal_met"] else "NOT met", ""))
    return rows, figures


async def _main(messages: int, timeout: float) -> dict[int, dict[str, float]]:
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-devices-") as tmp, \
            trio.fail_after(timeout):
        for n in SIZES:
            results[n] = await fan_out(n, messages, Path(tmp))
            log.info("%d devices: %.0f texts/s", n, results[n]["msgs_per_s"])
    return results


def main() -> int:
    def extra(parser: Any) -> None:
        parser.add_argument("--messages", type=int, default=1000,
                            help="texts in the throughput burst (default %(default)s)")
        parser.add_argument("--history", type=int, default=HISTORY_MESSAGES,
                            help="messages of history for the link part (default %(default)s)")
        parser.add_argument("--timeout", type=float, default=900.0,
                            help="bound of the whole run, seconds (default %(default)s)")
        parser.add_argument("--role", default="sender", choices=("sender", "receivers"),
                            help=argparse_hidden())
        parser.add_argument("--devices", type=int, default=1, help=argparse_hidden())
        parser.add_argument("--data", default="", help=argparse_hidden())

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from node.net import configure_libp2p_logging

    configure_libp2p_logging(logging.CRITICAL)
    if args.role == "receivers":
        trio.run(_receivers, args.devices, Path(args.data))
        return 0
    if not 1 <= args.messages <= 100_000:
        print("devices.py: --messages must be within 1..100000", file=sys.stderr)
        return 2
    results = trio.run(_main, args.messages, args.timeout)
    rows, figures = fan_out_report(results)
    figures["message_bytes"] = MESSAGE_BYTES
    figures["messages"] = args.messages
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-link-") as tmp:
        link = trio.run(lambda: link_time(Path(tmp), messages=args.history,
                                          timeout=args.timeout))
    rows += [
        ("link (code shown to member)", link["link_s"] * 1000, "ms"),
        (f"link: history of {args.history:,} messages", link["history_s"] * 1000, "ms"),
        ("link: total", link["total_s"] * 1000, "ms"),
        ("link: history rate", link["history_messages_per_s"], "messages/s"),
        ("link: baseline SQLite to SQLite copy", link["baseline_copy_s"] * 1000, "ms"),
        ("link: history / baseline", link["history_vs_baseline_ratio"], "x"),
    ]
    figures.update({"link_" + k if not k.startswith("link_") else k: v for k, v in link.items()})
    figures["link_history_messages"] = args.history
    emit("Multi-device: fan-out to an account of 1, 2, 4 and 8 devices (sender CPU: this process"
         " only), and linking a device with its history", rows, figures, args.json)
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
