"""Direct node-to-node messaging on loopback, in two processes, against its two floors.

The script is the sender; it starts itself again as the receiver (`--role receiver`), talks to it
over the child's stdin/stdout (one JSON object per line), and stops it by its pid at the end,
always. Three measurements, all with 1 KiB messages and the same varint length framing:

1. raw trio TCP: one frame per `send_all`, one-way; the receiver acks once, at the end, with the
   count it got (the sender stops the clock on that ack).
2. raw libp2p (`node.net.Transport`: TCP, Noise, Yamux): one frame per `FrameStream.send`,
   one-way, the receiver acks once at the end with its count. The baseline Pigeon is held to.
3. Pigeon: two `Node`s (Config defaults except the listen address, fresh data dirs), the sender
   adds the receiver from its invite, then
   - latency: messages one at a time (each sent after the previous was delivered, plus a pause),
     from the `send()` call to the receiver's MessageReceived event (the receiver stamps it with
     `time.time_ns`; same machine clock) and to the sender's MessageDelivered event;
   - throughput: `--messages` messages queued with `send_many()` (BULK_CHUNK per call, one commit
     per call: the bulk API), messages / (first call -> last MessageDelivered on the sender);
   - and, for comparison, SEQUENTIAL_MESSAGES single `send()` calls awaited in a row (one commit
     per message, as a chat-like caller does).
   With the default durability ("full": fsync per commit), then again on fresh nodes with
   durability="normal" (an extra line, skipped if the time budget is short).

Goals: Pigeon throughput >= 1.5x raw libp2p one-frame-per-message; p50 event latency < 5 ms.
Every loop is bounded in count, and the whole run by `--timeout` seconds (then it aborts with an
error and a non-zero exit status). With `--json` stdout holds exactly one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._report import emit, parse_args, percentile

log = logging.getLogger("bench.direct")

MESSAGE_BYTES = 1024
LISTEN = ("/ip4/127.0.0.1/tcp/0",)
BENCH_PROTOCOL = "/pigeon-bench/count/1.0.0"
WARMUP_FRAMES = 200  # raw baselines: sent (and acked) before the clock starts
BASELINE_RUNS = 3  # raw baselines: bursts of --messages each; the median is reported
WARMUP_MESSAGES = 20  # Pigeon: opens the stream and the session before anything is timed
LATENCY_MESSAGES = 200
BULK_CHUNK = 256  # messages per send_many() call in the bulk phase
SEQUENTIAL_MESSAGES = 3_000  # messages of the one-send()-per-message phase
LATENCY_PAUSE_S = 0.01
PHASE_TIMEOUT_S = 120.0  # one request/reply with the receiver, one wait for deliveries
GOAL_RATIO = 1.5
GOAL_EVENT_P50_MS = 5.0


def _text(tag: str, i: int) -> str:
    head = f"{tag}{i:07d} "
    return head + "x" * (MESSAGE_BYTES - len(head))


def _setup_logging(role: str) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {role} %(name)s %(levelname)s %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    from node.net import configure_libp2p_logging

    configure_libp2p_logging(logging.ERROR)


# --- JSON lines over a pipe ----------------------------------------------------------------------


class Lines:
    """One JSON object per line over a pair of trio byte streams."""

    def __init__(self, receive: trio.abc.ReceiveStream, send: trio.abc.SendStream) -> None:
        self._receive = receive
        self._send = send
        self._buf = bytearray()

    async def read(self) -> dict[str, Any] | None:
        """The next object, or None at end of stream."""
        while (nl := self._buf.find(b"\n")) < 0:
            chunk = await self._receive.receive_some(65536)
            if not chunk:
                return None
            self._buf += chunk
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        return json.loads(line)

    async def write(self, obj: dict[str, Any]) -> None:
        await self._send.send_all(json.dumps(obj).encode() + b"\n")

    async def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        await self.write(obj)
        with trio.fail_after(PHASE_TIMEOUT_S):
            reply = await self.read()
        if reply is None:
            raise RuntimeError(f"receiver process exited during {obj.get('cmd')!r}")
        if "error" in reply:
            raise RuntimeError(f"receiver failed during {obj.get('cmd')!r}: {reply['error']}")
        return reply


# --- receiver side ---------------------------------------------------------------------------------


class SenderGone(Exception):
    """The sender closed our stdin: it finished, failed or was stopped."""


async def _serve_until_stop(ctl: Lines, reply: dict[str, Any],
                            on_command: Callable[[dict[str, Any]], Any] | None = None) -> None:
    """Send the phase's setup `reply`, then answer commands until "stop"."""
    await ctl.write(reply)
    while True:
        cmd = await ctl.read()
        if cmd is None:
            raise SenderGone
        if cmd["cmd"] == "stop":
            return
        if on_command is None:
            await ctl.write({"error": f"unknown command {cmd['cmd']!r}"})
        else:
            await ctl.write(await on_command(cmd))


async def receiver_tcp(ctl: Lines) -> None:
    from node.net import FrameDecoder, encode_frames

    async def serve(stream: trio.SocketStream) -> None:
        decoder, count = FrameDecoder(), 0
        while data := await stream.receive_some(65536):
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                if frame:
                    count += 1
                else:  # end marker: ack with the count
                    await stream.send_all(encode_frames([str(count).encode()]))
                    count = 0

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        await _serve_until_stop(ctl, {"port": port})
        nursery.cancel_scope.cancel()


async def receiver_libp2p(ctl: Lines) -> None:
    from node.net import FrameStream, Transport

    async def count_frames(stream: FrameStream) -> None:
        count = 0
        while (frame := await stream.receive()) is not None:
            if frame:
                count += 1
            else:
                await stream.send([str(count).encode()])
                count = 0

    async with Transport.open(os.urandom(32), list(LISTEN)) as transport:
        transport.set_stream_handler(BENCH_PROTOCOL, count_frames)
        await _serve_until_stop(ctl, {"peer_id": transport.peer_id,
                                      "addrs": transport.listen_addrs()})


async def receiver_pigeon(ctl: Lines, durability: str) -> None:
    from node import Config, EventsDropped, MessageReceived, Node

    received = {"count": 0, "dropped": 0}
    latency_ns: dict[str, int] = {}
    changed = [trio.Event()]

    async def record(events: Any) -> None:
        async for event in events:
            now = time.time_ns()
            if isinstance(event, MessageReceived):
                received["count"] += 1
                if event.text.startswith("L"):
                    latency_ns[event.message_id] = now
                changed[0].set()
            elif isinstance(event, EventsDropped):
                received["dropped"] += event.count

    async def on_command(cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["cmd"] != "stats":
            return {"error": f"unknown command {cmd['cmd']!r}"}
        with trio.move_on_after(10):  # MessageReceived follows the ack: give it a moment
            while received["count"] < cmd.get("expect", 0):
                changed[0] = trio.Event()
                await changed[0].wait()
        return {"received": received["count"], "dropped": received["dropped"],
                "latency_ns": latency_ns, "cpu_s": time.process_time()}

    config = Config(listen=LISTEN, durability=durability, mdns=False)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-recv-") as data_dir:
        async with Node.open(data_dir, config, create=True) as node, trio.open_nursery() as nursery:
            events = node.events()
            nursery.start_soon(record, events)
            await _serve_until_stop(ctl, {"invite": node.invite(), "durability": durability},
                                    on_command)
            events.close()
            nursery.cancel_scope.cancel()


async def run_receiver(timeout: float, profile_dir: str | None) -> None:
    # Our protocol goes to the original stdout; anything else printed goes to stderr.
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    ctl = Lines(trio.lowlevel.FdStream(os.dup(0)), trio.lowlevel.FdStream(proto_fd))
    with trio.fail_after(timeout):
        await ctl.write({"ready": True})
        while (cmd := await ctl.read()) is not None:
            try:
                if cmd["cmd"] == "tcp":
                    await receiver_tcp(ctl)
                elif cmd["cmd"] == "libp2p":
                    await receiver_libp2p(ctl)
                elif cmd["cmd"] == "pigeon":
                    with _profiled(profile_dir, f"receiver-{cmd['durability']}"):
                        await receiver_pigeon(ctl, cmd["durability"])
                elif cmd["cmd"] == "quit":
                    await ctl.write({"bye": True})
                    return
                else:
                    await ctl.write({"error": f"unknown command {cmd['cmd']!r}"})
                    continue
            except Exception as exc:
                if all(isinstance(leaf, SenderGone) for leaf in _leaves(exc)):
                    log.info("receiver: the sender went away during %s; exiting", cmd["cmd"])
                    return
                log.exception("receiver phase %s failed", cmd["cmd"])
                await ctl.write({"error": f"{type(exc).__name__}: {exc}"})
                continue
            await ctl.write({"stopped": cmd["cmd"]})


# --- sender side ---------------------------------------------------------------------------------


async def _timed_bursts(burst: Callable[[int], Awaitable[None]], messages: int) -> list[float]:
    """Messages per second of BASELINE_RUNS bursts of `messages`, after an untimed warm-up burst
    of WARMUP_FRAMES: the same measurement for every raw baseline."""
    await burst(WARMUP_FRAMES)
    rates = []
    for _ in range(BASELINE_RUNS):
        start = time.perf_counter()
        await burst(messages)
        rates.append(messages / (time.perf_counter() - start))
    return rates


async def sender_tcp(ctl: Lines, messages: int) -> list[float]:
    from node.net import FrameDecoder, encode_frames

    info = await ctl.request({"cmd": "tcp"})
    stream = await trio.open_tcp_stream("127.0.0.1", info["port"])
    decoder = FrameDecoder()
    payload = os.urandom(MESSAGE_BYTES)

    async def burst(count: int) -> None:
        for _ in range(count):
            await stream.send_all(encode_frames([payload]))
        await stream.send_all(encode_frames([b""]))
        while (frame := decoder.next_frame()) is None:
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("receiver closed the TCP connection")
            decoder.feed(data)
        if int(frame) != count:
            raise RuntimeError(f"TCP receiver counted {int(frame)} of {count}")

    try:
        with trio.fail_after(PHASE_TIMEOUT_S):
            rates = await _timed_bursts(burst, messages)
    finally:
        await stream.aclose()
        await ctl.request({"cmd": "stop"})
    return rates


async def sender_libp2p(ctl: Lines, messages: int) -> list[float]:
    from node.net import Transport

    info = await ctl.request({"cmd": "libp2p"})
    payload = os.urandom(MESSAGE_BYTES)
    try:
        async with Transport.open(os.urandom(32), list(LISTEN)) as transport:
            with trio.fail_after(PHASE_TIMEOUT_S):
                stream = await transport.open_stream(info["peer_id"], info["addrs"],
                                                     BENCH_PROTOCOL, timeout=10)

                async def burst(count: int) -> None:
                    for _ in range(count):
                        await stream.send([payload])
                    await stream.send([b""])
                    got = await stream.receive()
                    if got is None or int(got) != count:
                        raise RuntimeError(f"libp2p receiver counted {got!r} of {count}")

                rates = await _timed_bursts(burst, messages)
                await stream.aclose()
    finally:
        await ctl.request({"cmd": "stop"})
    return rates


class DeliveryTracker:
    """Stamps every MessageDelivered on the sender with time.time_ns()."""

    def __init__(self) -> None:
        self.delivered_ns: dict[str, int] = {}
        self.dropped = 0
        self.failed: list[str] = []
        self._changed = trio.Event()

    async def run(self, events: Any) -> None:
        from node import EventsDropped, MessageDelivered, MessageFailed

        async for event in events:
            now = time.time_ns()
            if isinstance(event, MessageDelivered):
                self.delivered_ns[event.message_id] = now
                self._changed.set()
            elif isinstance(event, MessageFailed):
                self.failed.append(f"{event.message_id}: {event.reason}")
                self._changed.set()
            elif isinstance(event, EventsDropped):
                self.dropped += event.count
                self._changed.set()

    async def wait_all(self, ids: list[str], node: Any) -> None:
        """Until every id is delivered (bounded by the caller's cancel scope). Cost is linear in
        the number of events, not ids x events, so waiting does not distort the measurement."""
        missing = {i for i in ids if i not in self.delivered_ns}
        while missing:
            if self.failed:
                raise RuntimeError(f"message failed: {self.failed[0]}")
            if self.dropped:
                raise RuntimeError(f"{self.dropped} sender events dropped: timings unusable")
            self._changed = trio.Event()
            await self._changed.wait()
            missing -= self.delivered_ns.keys() & missing


async def sender_pigeon(ctl: Lines, messages: int, durability: str, *,
                        latency_samples: int, profile_dir: str | None) -> dict[str, Any]:
    from node import Config, Node

    result: dict[str, Any] = {"durability": durability}
    config = Config(listen=LISTEN, durability=durability, mdns=False)  # type: ignore[arg-type]
    info = await ctl.request({"cmd": "pigeon", "durability": durability})
    try:
        with tempfile.TemporaryDirectory(prefix="pigeon-bench-send-") as data_dir:
            async with Node.open(data_dir, config, create=True) as node, \
                    trio.open_nursery() as nursery:
                tracker = DeliveryTracker()
                events = node.events()
                nursery.start_soon(tracker.run, events)
                node.add_contact("receiver", info["invite"])

                # Warm-up: stream, session and intro settle before anything is timed.
                with trio.fail_after(PHASE_TIMEOUT_S):
                    for i in range(WARMUP_MESSAGES):
                        await tracker.wait_all([await node.send("receiver", _text("W", i))], node)

                # Latency: one at a time on an idle system.
                sent_ns: dict[str, int] = {}
                with trio.fail_after(PHASE_TIMEOUT_S):
                    for i in range(latency_samples):
                        text = _text("L", i)
                        t0 = time.time_ns()
                        mid = await node.send("receiver", text)
                        sent_ns[mid] = t0
                        await tracker.wait_all([mid], node)
                        await trio.sleep(LATENCY_PAUSE_S)
                stats = await ctl.request({"cmd": "stats",
                                           "expect": WARMUP_MESSAGES + latency_samples})
                receiver_cpu_before = stats["cpu_s"]
                if latency_samples:
                    recv_ns = stats["latency_ns"]
                    if len(recv_ns) != latency_samples:
                        raise RuntimeError(f"receiver saw {len(recv_ns)} of {latency_samples}"
                                           " latency messages")
                    event_ms = [(recv_ns[m] - t0) / 1e6 for m, t0 in sent_ns.items()]
                    delivered_ms = [(tracker.delivered_ns[m] - t0) / 1e6 for m, t0 in sent_ns.items()]
                    result.update(
                        latency_event_p50_ms=percentile(event_ms, 0.5),
                        latency_event_p99_ms=percentile(event_ms, 0.99),
                        latency_delivered_p50_ms=percentile(delivered_ms, 0.5),
                        latency_delivered_p99_ms=percentile(delivered_ms, 0.99),
                        latency_samples=latency_samples,
                    )

                # Throughput: the bulk API, BULK_CHUNK messages per send_many() call (one commit
                # each), as an application sending many messages would use it.
                ids: list[str] = []
                texts = [_text("B", i) for i in range(messages)]
                with trio.fail_after(PHASE_TIMEOUT_S * 2):
                    cpu_before = time.process_time()
                    first_ns = time.time_ns()
                    with _profiled(profile_dir, f"sender-{durability}"):
                        for start in range(0, messages, BULK_CHUNK):
                            ids.extend(await node.send_many("receiver",
                                                            texts[start:start + BULK_CHUNK]))
                        queued_ns = time.time_ns()
                        await tracker.wait_all(ids, node)
                cpu_s = time.process_time() - cpu_before
                last_ns = max(tracker.delivered_ns[m] for m in ids)
                elapsed_s = (last_ns - first_ns) / 1e9
                stats = await ctl.request({"cmd": "stats", "expect": WARMUP_MESSAGES
                                           + latency_samples + messages})
                result.update(
                    msgs_per_s=messages / elapsed_s,
                    bulk_seconds=elapsed_s,
                    send_calls_per_s=messages / ((queued_ns - first_ns) / 1e9),
                    sender_cpu_us_per_msg=cpu_s / messages * 1e6,
                    receiver_cpu_us_per_msg=(stats["cpu_s"] - receiver_cpu_before) / messages * 1e6,
                )

                # One send() per message, awaited in a row: what a chat-like caller gets.
                sequential = min(messages, SEQUENTIAL_MESSAGES)
                seq_ids: list[str] = []
                with trio.fail_after(PHASE_TIMEOUT_S * 2):
                    first_ns = time.time_ns()
                    for i in range(sequential):
                        seq_ids.append(await node.send("receiver", _text("S", i)))
                    await tracker.wait_all(seq_ids, node)
                last_ns = max(tracker.delivered_ns[m] for m in seq_ids)
                result["sequential_msgs_per_s"] = sequential / ((last_ns - first_ns) / 1e9)
                messages += sequential
                stats = await ctl.request({"cmd": "stats", "expect": WARMUP_MESSAGES
                                           + latency_samples + messages})
                expected = WARMUP_MESSAGES + latency_samples + messages
                if stats["received"] != expected or stats["dropped"]:
                    raise RuntimeError(f"receiver saw {stats['received']} of {expected} messages"
                                       f" ({stats['dropped']} events dropped)")
                events.close()
                nursery.cancel_scope.cancel()
    finally:
        await ctl.request({"cmd": "stop"})
    return result


async def run_sender(args: Any) -> dict[str, Any]:
    started = time.monotonic()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "receiver",
           "--timeout", str(args.timeout + 20)]
    if args.profile:
        cmd += ["--profile", args.profile]
    proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    _watchdog(args.timeout + 30, proc.pid)
    figures: dict[str, Any] = {"messages": args.messages, "receiver_pid": proc.pid,
                               "load_average_1m_at_start": os.getloadavg()[0]}
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ctl = Lines(proc.stdout, proc.stdin)
        with trio.fail_after(args.timeout):
            with trio.fail_after(PHASE_TIMEOUT_S):
                if await ctl.read() is None:
                    raise RuntimeError("receiver process did not start")
            log.info("receiver pid %d ready; raw trio TCP", proc.pid)
            runs = await sender_tcp(ctl, args.messages)
            figures["trio_runs_msgs_per_s"] = [round(r) for r in runs]
            figures["trio_msgs_per_s"] = statistics.median(runs)
            log.info("trio TCP %.0f msg/s; raw libp2p", figures["trio_msgs_per_s"])
            runs = await sender_libp2p(ctl, args.messages)
            figures["libp2p_runs_msgs_per_s"] = [round(r) for r in runs]
            figures["libp2p_msgs_per_s"] = statistics.median(runs)
            log.info("libp2p %.0f msg/s; Pigeon (durability full)", figures["libp2p_msgs_per_s"])
            full = await sender_pigeon(ctl, args.messages, "full", latency_samples=args.latency,
                                       profile_dir=args.profile)
            figures["durability"] = "full"
            figures["pigeon_msgs_per_s"] = full["msgs_per_s"]
            figures["pigeon_send_calls_per_s"] = full["send_calls_per_s"]
            figures["pigeon_sequential_msgs_per_s"] = full["sequential_msgs_per_s"]
            figures["pigeon_sender_cpu_us_per_msg"] = full["sender_cpu_us_per_msg"]
            figures["pigeon_receiver_cpu_us_per_msg"] = full["receiver_cpu_us_per_msg"]
            for key in ("latency_event_p50_ms", "latency_event_p99_ms", "latency_delivered_p50_ms",
                        "latency_delivered_p99_ms", "latency_samples"):
                figures[key] = full[key]
            log.info("Pigeon %.0f msg/s", full["msgs_per_s"])
            spent = time.monotonic() - started
            if not args.skip_normal and spent < args.timeout * 0.45:
                normal = await sender_pigeon(ctl, args.messages, "normal",
                                             latency_samples=args.latency,
                                             profile_dir=args.profile)
                figures["pigeon_normal_msgs_per_s"] = normal["msgs_per_s"]
                figures["pigeon_normal_send_calls_per_s"] = normal["send_calls_per_s"]
                figures["pigeon_normal_sequential_msgs_per_s"] = normal["sequential_msgs_per_s"]
                figures["pigeon_normal_sender_cpu_us_per_msg"] = normal["sender_cpu_us_per_msg"]
                figures["pigeon_normal_receiver_cpu_us_per_msg"] = normal["receiver_cpu_us_per_msg"]
                figures["latency_normal_event_p50_ms"] = normal["latency_event_p50_ms"]
                figures["latency_normal_event_p99_ms"] = normal["latency_event_p99_ms"]
                figures["latency_normal_delivered_p50_ms"] = normal["latency_delivered_p50_ms"]
                figures["latency_normal_delivered_p99_ms"] = normal["latency_delivered_p99_ms"]
                log.info("Pigeon normal %.0f msg/s", normal["msgs_per_s"])
            else:
                log.info("skipping the durability=normal pass (%.0f s spent)", spent)
            await ctl.request({"cmd": "quit"})
    finally:
        with trio.CancelScope(shield=True):
            await _stop_process(proc)
    figures["seconds"] = round(time.monotonic() - started, 1)
    return figures


async def _stop_process(proc: trio.Process) -> None:
    """Stop the receiver by its pid: it should have quit (or quits on EOF); else SIGTERM, then
    SIGKILL."""
    if proc.stdin is not None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await proc.stdin.aclose()
    with trio.move_on_after(3):
        await proc.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            break
        log.warning("receiver pid %d still running: sending %s", proc.pid, sig.name)
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            break
        with trio.move_on_after(3):
            await proc.wait()
    if proc.stdout is not None:
        await proc.stdout.aclose()


@contextlib.contextmanager
def _profiled(profile_dir: str | None, name: str) -> Iterator[None]:
    """cProfile the block into DIR/NAME.prof when profiling was asked for."""
    if not profile_dir:
        yield
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(Path(profile_dir) / f"{name}.prof"))


def _watchdog(seconds: float, child_pid: int) -> None:
    """Last resort if the trio loop itself is stuck: kill the child (by pid) and exit."""

    def fire() -> None:
        print(f"direct.py: hard time bound of {seconds:g} s exceeded; aborting", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or the exception itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _report(figures: dict[str, Any], as_json: bool) -> None:
    pigeon, libp2p = figures["pigeon_msgs_per_s"], figures["libp2p_msgs_per_s"]
    ratio = pigeon / libp2p
    figures["ratio_vs_libp2p"] = ratio
    figures["ratio_trio_vs_libp2p"] = figures["trio_msgs_per_s"] / libp2p
    figures["goal_ratio_vs_libp2p"] = GOAL_RATIO
    figures["goal_latency_event_p50_ms"] = GOAL_EVENT_P50_MS
    figures["goal_throughput_met"] = ratio >= GOAL_RATIO
    figures["goal_latency_met"] = figures["latency_event_p50_ms"] < GOAL_EVENT_P50_MS
    figures["goals_met"] = figures["goal_throughput_met"] and figures["goal_latency_met"]
    figures["trio_ack"] = figures["libp2p_ack"] = "once, at the end of the burst"
    figures["message_bytes"] = MESSAGE_BYTES
    for key, value in figures.items():
        if isinstance(value, float):
            figures[key] = round(value, 3 if key.endswith("_ms") or "ratio" in key else 1)
    rows: list[tuple[str, Any, str]] = [
        ("raw trio TCP, 1 frame/write, ack at end", float(figures["trio_msgs_per_s"]),
         f"msg/s (median of {BASELINE_RUNS})"),
        ("raw libp2p TCP+Noise+Yamux, 1 frame/write", float(libp2p),
         f"msg/s (median of {BASELINE_RUNS})"),
        (f"Pigeon bulk, durability={figures['durability']}", float(pigeon),
         f"msg/s (send_many, {BULK_CHUNK} per call)"),
        ("  queueing alone", float(figures["pigeon_send_calls_per_s"]), "msg/s"),
        ("  one send() per message, in a row", float(figures["pigeon_sequential_msgs_per_s"]),
         f"msg/s ({SEQUENTIAL_MESSAGES:,} messages)"),
        ("  CPU per message: sender / receiver",
         f"{figures['pigeon_sender_cpu_us_per_msg']:.0f} / "
         f"{figures['pigeon_receiver_cpu_us_per_msg']:.0f}", "us"),
        ("  ratio to raw libp2p", f"{ratio:.2f}", f"x (goal >= {GOAL_RATIO})"),
        ("  send -> MessageReceived p50", f"{figures['latency_event_p50_ms']:.2f}",
         f"ms (goal < {GOAL_EVENT_P50_MS:g})"),
        ("  send -> MessageReceived p99", f"{figures['latency_event_p99_ms']:.2f}", "ms"),
        ("  send -> MessageDelivered p50", f"{figures['latency_delivered_p50_ms']:.2f}", "ms"),
        ("  send -> MessageDelivered p99", f"{figures['latency_delivered_p99_ms']:.2f}", "ms"),
    ]
    if "pigeon_normal_msgs_per_s" in figures:
        rows += [
            ("Pigeon bulk, durability=normal", float(figures["pigeon_normal_msgs_per_s"]),
             f"msg/s (send_many, {BULK_CHUNK} per call)"),
            ("  one send() per message, in a row",
             float(figures["pigeon_normal_sequential_msgs_per_s"]), "msg/s"),
            ("  CPU per message: sender / receiver",
             f"{figures['pigeon_normal_sender_cpu_us_per_msg']:.0f} / "
             f"{figures['pigeon_normal_receiver_cpu_us_per_msg']:.0f}", "us"),
            ("  send -> MessageReceived p50 / p99",
             f"{figures['latency_normal_event_p50_ms']:.2f} / "
             f"{figures['latency_normal_event_p99_ms']:.2f}", "ms"),
            ("  send -> MessageDelivered p50 / p99",
             f"{figures['latency_normal_delivered_p50_ms']:.2f} / "
             f"{figures['latency_normal_delivered_p99_ms']:.2f}", "ms"),
        ]
    rows += [
        ("messages per measurement", figures["messages"], f"x {MESSAGE_BYTES} B"),
        ("latency samples (one at a time)", figures["latency_samples"], ""),
        ("wall time", figures["seconds"], "s"),
        ("load average (1 min) at start", figures["load_average_1m_at_start"], ""),
        ("goals met", str(figures["goals_met"]), ""),
    ]
    emit("Pigeon direct messaging on loopback (sender and receiver in two processes)", rows,
         figures, as_json)


def _extra_args(parser: Any) -> None:
    parser.add_argument("--messages", type=int, default=10_000,
                        help="messages per throughput measurement (default 10,000)")
    parser.add_argument("--latency", type=int, default=LATENCY_MESSAGES,
                        help=f"one-at-a-time latency samples (default {LATENCY_MESSAGES})")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="abort the whole run after this many seconds (default 300)")
    parser.add_argument("--skip-normal", action="store_true",
                        help="skip the extra durability=normal pass")
    parser.add_argument("--profile", metavar="DIR",
                        help="write cProfile stats of the Pigeon phases to DIR (sender: the bulk"
                        " sends; receiver: the whole phase); slows the run down")
    parser.add_argument("--role", choices=("sender", "receiver"), default="sender",
                        help=argparse.SUPPRESS)


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], extra=_extra_args)
    _setup_logging(args.role)
    if args.role == "receiver":
        try:
            trio.run(run_receiver, args.timeout, args.profile)
        except trio.TooSlowError:
            log.error("receiver: over its time bound of %g s", args.timeout)
            return 3
        return 0
    if args.messages < 1 or args.latency < 1:
        print("direct.py: --messages and --latency must be at least 1", file=sys.stderr)
        return 2
    # Only the report goes to stdout: anything a library prints meanwhile goes to stderr.
    stdout_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        figures = trio.run(run_sender, args)
    except Exception as exc:
        for leaf in _leaves(exc):
            if isinstance(leaf, trio.TooSlowError):
                log.error("benchmark aborted: over its time bound (%g s overall, %g s per phase)",
                          args.timeout, PHASE_TIMEOUT_S)
            else:
                log.error("benchmark failed: %s: %s", type(leaf).__name__, leaf,
                          exc_info=not isinstance(leaf, RuntimeError))
        return 1
    finally:
        sys.stdout.flush()
        os.dup2(stdout_fd, 1)
        os.close(stdout_fd)
    _report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
