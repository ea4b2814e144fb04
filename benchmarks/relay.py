"""Relay mailbox service: throughput, drain time, push latency and memory per subscribed client.

The script starts `pigeon relay` in a process of its own (loopback TCP, a fresh data directory,
the default durability: synchronous=FULL, one fsync per committed batch) and measures, in one run:

1. deposit throughput: one client pipelines `--deposits` deposits of 1 KiB envelopes
   (`MailboxClient.deposit_many`: 128 frames per write) into 64 mailboxes; deposits / (first
   write -> last "ok"). The relay's per-peer deposit rate limit (500/s by default) is raised for
   this run: the figure is the relay's capacity, not the limit.
2. drain: 10,000 messages queued for one device; the device then connects, authenticates and
   fetches pages and acks them until the mailbox is empty (timed from the dial). Goal < 10 s.
3. push latency: a device subscribed to its mailbox; another client deposits one message at a
   time (`--latency-samples`, 5 ms apart); latency = deposit call -> push received (same process,
   same clock, so it includes the relay's commit and fsync). Goal: p50 < 10 ms.
4. memory: the relay's RSS before and with `--clients` idle subscribed clients. The clients run
   in `--client-procs` other processes (this script with `--role clients`): each one a
   Transport with its own key, dialed a few at a time (docs/libp2p.md L15), authenticated and
   subscribed. rss_per_client_kb = (RSS with clients - RSS before) / clients. Goal < 1024 KB.
5. churn: with the clients still subscribed, `--churn` connections from fresh peer ids (a new
   host each), each opening a mailbox stream, reading its challenge and leaving: what an
   attacker with throwaway keys does. They run in `--churn-procs` processes (this script with
   `--role churn`, `CHURN_CONCURRENCY` at a time each) for at most `--churn-seconds`; each
   connection counts as made, refused (the target reset or refused it), timed out (no stream
   within CHURN_CONNECT_TIMEOUT_S; CHURN_GUARD_S bounds the whole connection) or an error.
   The relay's CPU per connection is reported over the whole churn and over its first and
   last CHURN_BLOCK connections: growth between them means state left behind per connection.
   Before and after, a genuine client (a new depositor and the mailbox's device, each on a
   new connection) times `--genuine-samples` deposits and fetches, and one deposit is made for
   each of the first PROBES_PER_CLIENT_PROC subscribed clients of every clients process, which
   must be pushed to it; after, the relay must still hold every subscription. Goal: a relay
   holds 5,000 clients and survives 20,000 such connections. `--scale-only` skips phases 1-3.

`--target device` measures a device instead (phases 1-4 do not apply): a `Node` in a process
of its own (`--role device`), a contact `Node` in this process timing send -> delivered before
and after `--churn` connections from fresh peer ids that each open a /pigeon/msg stream and
leave (counted and timed as above). Goal: a device survives 5,000. A device admits 16 streams
from strangers on one address at once (node/device/config.py), so more than one churn process
against it finds some refused: that cap at work, not a failure.

Every loop is bounded in count, the whole run by `--timeout` seconds; the relay, the device and
the clients processes are always stopped (SIGTERM or stdin closed, then SIGKILL) by their pids.
The relay's CPU figures are its own CPU seconds (/proc/PID/stat), which hold on a loaded machine
where wall times do not. `--profile-relay FILE` runs the relay under cProfile (its stats are
written when it stops).
The file-descriptor limit is raised to its hard limit (each client holds a listener and a
connection). With `--json` stdout holds exactly one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._report import emit, parse_args, percentile

LISTEN = "/ip4/127.0.0.1/tcp/0"
ENVELOPE_BYTES = 1024
DRAIN_MESSAGES = 10_000
DEPOSIT_BOXES = 64
LATENCY_PAUSE_S = 0.005
SETTLE_S = 2.0  # idle time before reading the RSS with clients connected
IDLE_WINDOW_S = 10.0  # the relay's CPU use with its clients held and idle, over this long
PHASE_TIMEOUT_S = 120.0
#: Dials in progress at once from all clients processes together: every client dials from
#: 127.0.0.1, and a host lets one address have at most HANDSHAKES_PER_ADDRESS (16) handshakes
#: in progress (docs/libp2p.md L87); clients of a real relay come from many addresses.
CLIENT_DIALS_AT_ONCE = 16
CLIENT_DIAL_ATTEMPTS = 5
#: Subscribed clients per clients process that report their pushes (checked before and after
#: the churn).
PROBES_PER_CLIENT_PROC = 10
GOAL_DRAIN_S = 10.0
GOAL_PUSH_P50_MS = 10.0
GOAL_RSS_PER_CLIENT_KB = 1024.0
GOAL_CHURN = {"relay": 20_000, "device": 5_000}
#: Closing a host takes ~0.2 s of waiting (not CPU), so more churn hosts than handshakes run at once
#: (per churn process).
CHURN_CONCURRENCY = 16
CHURN_CONNECT_TIMEOUT_S = 10.0
#: A churn worker whose connection was refused waits this long before its next one.
CHURN_REFUSED_PAUSE_S = 0.5
#: A hang guard around one churn connection, the host's start and close included.
CHURN_GUARD_S = 60.0
#: How often each churn process reports its counts, and the driver samples the target's CPU.
CHURN_REPORT_S = 5.0
#: The target's CPU per connection is compared over the first and the last this many.
CHURN_BLOCK = 1_000

#: The relay under test, with its abuse defences lifted (rates, quotas, mailbox registration and
#: the strangers' quotas, PROTOCOL.md section 21): the deposit phase fills mailboxes before their
#: clients connect and without capabilities, and what is measured is capacity, not the limits.
RELAY_CONFIG = """\
deposit_rate_per_s = 1000000000.0
deposit_burst = 1000000000
mailbox_max_messages = 1000000
mailbox_max_bytes = 4294967296
max_frames_per_s = 1000000000.0
circuit_relay = false
require_registration = false
open_mailbox_max_messages = 1000000
open_mailbox_max_bytes = 4294967296
open_storage_max_bytes = 4294967296
"""


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process used so far: independent of other load."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def _quiet_logs() -> None:
    import logging

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    from node.net import configure_libp2p_logging

    configure_libp2p_logging(logging.CRITICAL)


# --- processes -------------------------------------------------------------------------------------


class Child:
    """A child process with JSON lines on stdout; stopped by its pid, always."""

    def __init__(self, args: list[str], stderr_path: Path, *, stdin: bool = False) -> None:
        self.stderr = open(stderr_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self.stderr,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True)
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.process.pid

    async def line(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        stdout = self.process.stdout
        with trio.fail_after(timeout):
            text = await trio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
        if not text:
            raise RuntimeError(f"child {self.pid} exited; stderr:\n{self.tail()}")
        value: dict[str, Any] = json.loads(text)
        return value

    def tail(self) -> str:
        self.stderr.flush()
        return self.stderr_path.read_text()[-3000:]

    def stop(self, timeout: float = 20.0) -> float:
        """SIGTERM (or close stdin), wait, SIGKILL if needed; returns the seconds it took."""
        start = time.perf_counter()
        if self.process.poll() is None:
            if self.process.stdin is not None:
                self.process.stdin.close()
            else:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.stderr.close()
        return time.perf_counter() - start


# --- the clients process ---------------------------------------------------------------------------


async def clients_role(relay_peer: str, relay_addr: str, count: int, dials_at_once: int
                       ) -> None:
    """Open `count` subscribed clients, report progress on stdout, hold them until stdin ends.

    The first PROBES_PER_CLIENT_PROC clients to subscribe are probes: the last progress line
    names their mailboxes ("probe_boxes", hex), and each item the relay pushes to one of them
    is reported as a line {"pushed": <mailbox hex>}, so the driver can check that subscribed
    clients are still served."""
    from node.device.mailbox_client import MailboxClient
    from node.errors import TransportError
    from node.net import Transport
    from node.protocol.keys import DeviceKeyPair
    from node.protocol.mailbox import mailbox_id

    ready = 0
    failed = 0
    probe_boxes: list[str] = []
    stop = trio.Event()
    dial_slots = trio.Semaphore(dials_at_once)
    all_done = trio.Event()

    def report(**values: Any) -> None:
        print(json.dumps(values), flush=True)

    async def one_client() -> None:
        nonlocal ready, failed
        device = DeviceKeyPair.generate()
        for attempt in range(CLIENT_DIAL_ATTEMPTS):
            try:
                # A few hosts started and dialed at a time (docs/libp2p.md L15): starting all
                # of them at once starves the handshakes and identify of the ones dialing.
                await dial_slots.acquire()
                holding = True
                try:
                    async with Transport.open(device.to_bytes(), (LISTEN,)) as transport, \
                            MailboxClient.connect(transport, relay_peer, [relay_addr],
                                                  timeout=20, reply_timeout=20) as client:
                        await client.authenticate(device)
                        await client.subscribe()
                        dial_slots.release()
                        holding = False
                        ready += 1
                        if len(probe_boxes) < PROBES_PER_CLIENT_PROC:
                            probe_boxes.append(mailbox_id(device.public).hex())
                            await report_pushes(client, probe_boxes[-1])
                        if ready + failed == count:
                            all_done.set()
                        await stop.wait()
                        return
                finally:
                    if holding:
                        dial_slots.release()
            except Exception as exc:
                print(f"client attempt {attempt + 1} failed: {exc!r}", file=sys.stderr, flush=True)
                if attempt == CLIENT_DIAL_ATTEMPTS - 1:
                    failed += 1
                    if ready + failed == count:
                        all_done.set()
                    return
                await trio.sleep(0.2 * (attempt + 1))

    async def report_pushes(client: MailboxClient, box: str) -> None:
        async def follow() -> None:
            try:
                async for _ in client.pushes():
                    report(pushed=box)
            except TransportError as exc:
                print(f"probe {box[:8]}: subscription ended: {exc!r}", file=sys.stderr,
                      flush=True)

        nursery.start_soon(follow)

    async def progress() -> None:
        while not all_done.is_set():
            with trio.move_on_after(2.0):
                await all_done.wait()
            done = all_done.is_set()
            report(ready=ready, failed=failed, done=done, **({"probe_boxes": probe_boxes}
                                                            if done else {}))

    async def wait_for_stdin_end() -> None:
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        while await stdin.receive_some(1024):
            pass
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_stdin_end)
        nursery.start_soon(progress)
        for _ in range(count):
            nursery.start_soon(one_client)
        await stop.wait()
        nursery.cancel_scope.deadline = trio.current_time() + 15  # bounded exit


# --- churn: connections from fresh peer ids ----------------------------------------------------------


CHURN_OUTCOMES = ("made", "refused", "timed_out", "errors")


async def churn_role(peer_id: str, addrs: list[str], protocol: str, count: int,
                     seconds: float) -> None:
    """`count` connections, each from a new host (a fresh peer id), `CHURN_CONCURRENCY` at a
    time: open a stream on `protocol`, read one frame if the target sends one first (the
    mailbox challenge), leave. Stops early after `seconds`. Prints its counts as a JSON line
    every `CHURN_REPORT_S` and once more, with "done", at the end: made (stream opened),
    refused (the target or the connection failed it: TransportError), timed_out (no stream
    within CHURN_CONNECT_TIMEOUT_S, or the whole connection past CHURN_GUARD_S) and errors
    (anything else, the first one's repr kept)."""
    from node.errors import TransportError
    from node.net import Transport
    from node.protocol.mailbox import MAILBOX_PROTOCOL, MAX_MAILBOX_FRAME_BYTES

    counts = dict.fromkeys(CHURN_OUTCOMES, 0)
    first_error: list[str] = []
    todo = iter(range(count))
    deadline = trio.current_time() + seconds

    def report(done: bool) -> None:
        print(json.dumps({**counts, "done": done, "first_error": first_error[:1]}), flush=True)

    async def one_connection() -> str:
        async with Transport.open(os.urandom(32), [LISTEN]) as host:
            try:
                with trio.fail_after(CHURN_CONNECT_TIMEOUT_S):
                    stream = await host.open_stream(
                        peer_id, addrs, protocol, timeout=CHURN_CONNECT_TIMEOUT_S,
                        max_frame_bytes=MAX_MAILBOX_FRAME_BYTES)
                    if protocol == MAILBOX_PROTOCOL and await stream.receive() is None:
                        raise TransportError("no challenge")
                    await stream.aclose()
                return "made"
            except TransportError:
                return "refused"
            except trio.TooSlowError:
                return "timed_out"

    async def worker() -> None:
        for _ in todo:
            if trio.current_time() > deadline:
                return
            outcome = "timed_out"
            # A hang guard around the whole connection, the host's start and close included:
            # one stuck host must not stop this worker for the rest of the run.
            with trio.move_on_after(CHURN_GUARD_S):
                try:
                    outcome = await one_connection()
                except Exception as exc:  # counted and shown, the churn goes on
                    outcome = "errors"
                    if not first_error:
                        first_error.append(repr(exc)[:300])
            counts[outcome] += 1
            if outcome == "refused":
                # A refusal costs the target a closed socket and this process a whole host:
                # a pause keeps the churn from starving the target of the CPU they share.
                await trio.sleep(CHURN_REFUSED_PAUSE_S)

    async def progress() -> None:
        while True:
            await trio.sleep(CHURN_REPORT_S)
            report(done=False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(progress)
        async with trio.open_nursery() as workers:
            for _ in range(CHURN_CONCURRENCY):
                workers.start_soon(worker)
        nursery.cancel_scope.cancel()
    report(done=True)


async def churn(peer_id: str, addrs: list[str], protocol: str, count: int, seconds: float,
                *, target_pid: int, procs: int, work: Path) -> dict[str, Any]:
    """Run the churn in `procs` processes (this script with `--role churn`), `count` connections
    split between them, and sample the target's CPU seconds against the connections counted so
    far. Returns the summed counts, the time taken, the target's CPU per connection over the
    whole churn and over its first and last CHURN_BLOCK connections (growth there means state
    left behind per connection), and the samples themselves."""
    procs = max(1, min(procs, count))
    shares = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
    children = [Child([sys.executable, str(Path(__file__).resolve()), "--role", "churn",
                       "--target-peer", peer_id, "--target-addr", addrs[0],
                       "--churn-protocol", protocol, "--churn", str(share),
                       "--churn-seconds", str(seconds)], work / f"churn{i}.stderr")
                for i, share in enumerate(shares)]
    latest: list[dict[str, Any]] = [dict.fromkeys(CHURN_OUTCOMES, 0) for _ in children]
    samples: list[tuple[float, int, float]] = []  # (seconds since start, connections, CPU s)
    start = time.monotonic()
    cpu_start = _cpu_s(target_pid)

    def total() -> int:
        return sum(line[k] for line in latest for k in CHURN_OUTCOMES)

    def sample() -> None:
        samples.append((time.monotonic() - start, total(), _cpu_s(target_pid) - cpu_start))

    async def follow(i: int, child: Child) -> None:
        for _ in range(1_000_000):  # a line every CHURN_REPORT_S; bounded by the run's timeout
            latest[i] = await child.line(timeout=seconds + 4 * CHURN_GUARD_S)
            if latest[i]["done"]:
                return

    async def sampler() -> None:
        while True:
            await trio.sleep(CHURN_REPORT_S)
            sample()
            elapsed, connections, cpu = samples[-1]
            outcomes = " / ".join(str(sum(line[k] for line in latest)) for k in CHURN_OUTCOMES)
            print(f"churn: {connections} connections (made / refused / timed out / errors: "
                  f"{outcomes}), {connections / max(elapsed, 1e-9):.1f}/s, target CPU "
                  f"{cpu * 1000 / max(1, connections):.1f} ms per connection so far",
                  file=sys.stderr, flush=True)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler)
            async with trio.open_nursery() as followers:
                for i, child in enumerate(children):
                    followers.start_soon(follow, i, child)
            nursery.cancel_scope.cancel()
    finally:
        for child in children:
            child.stop()
    sample()
    result: dict[str, Any] = {k: sum(line[k] for line in latest) for k in CHURN_OUTCOMES}
    errors = [e for line in latest for e in line.get("first_error", [])]
    result["first_error"] = errors[0] if errors else ""
    elapsed, connections, cpu = samples[-1]
    result |= {"connections": connections, "seconds": elapsed,
               "per_s": connections / max(elapsed, 1e-9),
               "target_cpu_ms_per_connection": cpu * 1000 / max(1, connections),
               "samples": [list(s) for s in samples]}
    first, last = _block_cpu_ms(samples, CHURN_BLOCK)
    result["target_cpu_ms_per_connection_first_block"] = first
    result["target_cpu_ms_per_connection_last_block"] = last
    return result


def _churn_figures(target: str, result: dict[str, Any]) -> dict[str, Any]:
    """churn()'s result as figures (units in key names), the target's CPU under its name."""
    return {
        "churn_connections": result["connections"],
        "churn_made": result["made"],
        "churn_refused": result["refused"],
        "churn_timed_out": result["timed_out"],
        "churn_errors": result["errors"],
        "churn_failed": result["refused"] + result["timed_out"] + result["errors"],
        "churn_first_error": result["first_error"],
        "churn_s": result["seconds"],
        "churn_per_s": result["per_s"],
        f"{target}_cpu_ms_per_churn_connection": result["target_cpu_ms_per_connection"],
        f"{target}_cpu_ms_per_churn_connection_first_{CHURN_BLOCK}":
            result["target_cpu_ms_per_connection_first_block"],
        f"{target}_cpu_ms_per_churn_connection_last_{CHURN_BLOCK}":
            result["target_cpu_ms_per_connection_last_block"],
        "churn_samples_s_connections_cpu_s": result["samples"],
    }


def _churn_rows(target: str, goal: int, figures: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """The churn's lines of the table, the same for a relay and a device."""
    return [
        ("connections from fresh peer ids", figures["churn_connections"],
         f"goal {goal:,}, none failed"),
        ("  made / refused / timed out / errors",
         f"{figures['churn_made']} / {figures['churn_refused']} / "
         f"{figures['churn_timed_out']} / {figures['churn_errors']}", ""),
        ("churn rate", figures["churn_per_s"], "conn/s"),
        (f"{target} CPU per churn connection", figures[f"{target}_cpu_ms_per_churn_connection"],
         "ms"),
        (f"  first {CHURN_BLOCK:,} / last {CHURN_BLOCK:,}",
         f"{figures[f'{target}_cpu_ms_per_churn_connection_first_{CHURN_BLOCK}']:.1f} / "
         f"{figures[f'{target}_cpu_ms_per_churn_connection_last_{CHURN_BLOCK}']:.1f}", "ms"),
    ]


def _block_cpu_ms(samples: list[tuple[float, int, float]], block: int) -> tuple[float, float]:
    """The target's CPU ms per connection over the first and the last `block` connections,
    from (time, connections, CPU seconds) samples taken every few seconds (so each span holds
    at least `block` connections, a few more at the sample boundaries)."""
    points = [(0.0, 0, 0.0), *samples]
    end = points[-1]
    first_end = next((p for p in points if p[1] >= block), end)
    last_start = next((p for p in reversed(points) if p[1] <= end[1] - block), points[0])

    def per_connection(a: tuple[float, int, float], b: tuple[float, int, float]) -> float:
        return (b[2] - a[2]) * 1000 / max(1, b[1] - a[1])

    return per_connection(points[0], first_end), per_connection(last_start, end)


async def genuine_relay_round(peer: str, addrs: list[str], samples: int) -> dict[str, float]:
    """A new depositor and the mailbox's device, each on a new connection: connect time, and
    the median deposit and fetch round trips over `samples`."""
    from node.device.mailbox_client import MailboxClient
    from node.net import Transport
    from node.protocol.keys import DeviceKeyPair
    from node.protocol.mailbox import mailbox_id

    device = DeviceKeyPair.generate()
    box = mailbox_id(device.public)
    envelope = os.urandom(ENVELOPE_BYTES)
    deposits: list[float] = []
    fetches: list[float] = []
    with trio.fail_after(PHASE_TIMEOUT_S):
        start = time.perf_counter()
        async with Transport.open(os.urandom(32), (LISTEN,)) as sender_t, \
                MailboxClient.connect(sender_t, peer, addrs, timeout=20,
                                      reply_timeout=20) as sender, \
                Transport.open(device.to_bytes(), (LISTEN,)) as device_t, \
                MailboxClient.connect(device_t, peer, addrs, timeout=20,
                                      reply_timeout=20) as inbox:
            await inbox.authenticate(device)
            connect_ms = (time.perf_counter() - start) * 1000
            after = 0
            for _ in range(samples):
                message_id = os.urandom(16)
                t0 = time.perf_counter()
                await sender.deposit(box, message_id, envelope)
                t1 = time.perf_counter()
                items, _ = await inbox.fetch(after=after)
                t2 = time.perf_counter()
                if [i.id for i in items] != [message_id]:
                    raise RuntimeError("the genuine client did not get its message back")
                after = items[-1].seq
                await inbox.ack([message_id])
                deposits.append((t1 - t0) * 1000)
                fetches.append((t2 - t1) * 1000)
    return {"connect_ms": connect_ms, "deposit_p50_ms": statistics.median(deposits),
            "fetch_p50_ms": statistics.median(fetches)}


async def probe_subscribed(peer: str, addrs: list[str],
                           probes: list[tuple[Child, list[str]]]) -> int:
    """Deposit one message into each probe client's mailbox (clients subscribed since phase 4)
    and count the pushes their processes report within PHASE_TIMEOUT_S."""
    from node.device.mailbox_client import DepositRequest, MailboxClient
    from node.net import Transport

    async with Transport.open(os.urandom(32), (LISTEN,)) as sender_t, \
            MailboxClient.connect(sender_t, peer, addrs, timeout=20,
                                  reply_timeout=PHASE_TIMEOUT_S) as sender:
        refused = [r for r in await sender.deposit_many(
            [DepositRequest(bytes.fromhex(box), os.urandom(16), os.urandom(ENVELOPE_BYTES))
             for _, boxes in probes for box in boxes]) if r is not None]
        if refused:
            raise RuntimeError(f"{len(refused)} probe deposits refused: {refused[0]}")
    pushed = 0

    async def collect(child: Child, boxes: list[str]) -> None:
        nonlocal pushed
        waiting = set(boxes)
        while waiting:
            # The outer bound ends the wait; this one only must not fire first.
            line = await child.line(timeout=2 * PHASE_TIMEOUT_S)
            if line.get("pushed") in waiting:
                waiting.discard(line["pushed"])
                pushed += 1

    # Every clients process at once: one whose probe is never pushed must not keep the
    # others' pushes from being counted.
    with trio.move_on_after(PHASE_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for child, boxes in probes:
                nursery.start_soon(collect, child, boxes)
    return pushed


async def device_role() -> None:
    """A device Node in this process: print its peer id, addresses and an invite, run until
    stdin ends."""
    from node import Config, Node

    with tempfile.TemporaryDirectory(prefix="pigeon-device-bench-") as tmp:
        config = Config(listen=(LISTEN,), mdns=False, display_name="target")
        async with Node.open(Path(tmp) / "device", config, create=True) as node:
            print(json.dumps({"peer_id": node.peer_id, "addresses": node.addresses(),
                              "invite": node.invite()}), flush=True)
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            while await stdin.receive_some(1024):
                pass


async def measure_device(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from node import Config, Node
    from node.net import MSG_PROTOCOL

    figures: dict[str, Any] = {}
    device = Child([sys.executable, str(Path(__file__).resolve()), "--role", "device"],
                   work / "device.stderr", stdin=True)
    try:
        hello = await device.line(timeout=60)
        config = Config(listen=(LISTEN,), mdns=False, display_name="contact")
        async with Node.open(work / "contact", config, create=True) as contact:
            contact.add_contact("target", hello["invite"])

            async def delivery_ms() -> float:
                samples: list[float] = []
                with trio.fail_after(PHASE_TIMEOUT_S):
                    for i in range(args.genuine_samples):
                        start = time.perf_counter()
                        message_id = await contact.send("target", f"sample {i}")
                        if await contact.wait_delivered(message_id, timeout=30) != "delivered":
                            raise RuntimeError("a genuine message was not delivered")
                        samples.append((time.perf_counter() - start) * 1000)
                return statistics.median(samples)

            figures["genuine_before_delivery_p50_ms"] = await delivery_ms()
            figures["rss_before_mb"] = _rss_kb(device.pid) / 1024
            figures |= _churn_figures("device", await churn(
                hello["peer_id"], hello["addresses"], MSG_PROTOCOL, args.churn,
                args.churn_seconds, target_pid=device.pid, procs=args.churn_procs, work=work))
            figures["genuine_after_delivery_p50_ms"] = await delivery_ms()
            figures["rss_after_mb"] = _rss_kb(device.pid) / 1024
            figures["target_alive"] = device.process.poll() is None
    finally:
        device.stop()
    return figures


# --- measurements ----------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from node.device.mailbox_client import DepositRequest, MailboxClient
    from node.net import Transport
    from node.protocol.keys import DeviceKeyPair
    from node.protocol.mailbox import mailbox_id
    from node.rpc import SocketClient

    config = work / "relay.toml"
    config.write_text(RELAY_CONFIG)
    profile = ["-m", "cProfile", "-o", args.profile_relay] if args.profile_relay else []
    relay = Child([sys.executable, *profile, "-m", "node", "relay", "--data-dir", str(work / "relay"),
                   "--listen", LISTEN, "--config", str(config), "--json", "--log-level", "WARNING"],
                  work / "relay.stderr")
    children: list[Child] = [relay]
    figures: dict[str, Any] = {}
    try:
        hello = await relay.line(timeout=60)
        peer, addrs = hello["peer_id"], hello["addresses"]

        async def status() -> dict[str, Any]:
            control = await SocketClient.connect(work / "relay" / "relay.sock")
            assert control is not None
            try:
                result: dict[str, Any] = await control.call("status")
                return result
            finally:
                await control.aclose()

        if not args.scale_only:  # phases 1-3
            envelope = os.urandom(ENVELOPE_BYTES)
            async with Transport.open(os.urandom(32), (LISTEN,)) as sender_t, \
                    MailboxClient.connect(sender_t, peer, addrs, timeout=20,
                                          reply_timeout=PHASE_TIMEOUT_S) as sender:
                # 1. deposit throughput
                boxes = [os.urandom(32) for _ in range(DEPOSIT_BOXES)]
                warmup = [DepositRequest(boxes[i % DEPOSIT_BOXES], os.urandom(16), envelope)
                          for i in range(500)]
                await sender.deposit_many(warmup)
                batch = [DepositRequest(boxes[i % DEPOSIT_BOXES], os.urandom(16), envelope)
                         for i in range(args.deposits)]
                start = time.perf_counter()
                with trio.fail_after(PHASE_TIMEOUT_S):
                    results = await sender.deposit_many(batch)
                elapsed = time.perf_counter() - start
                refusals = [r for r in results if r is not None]
                if refusals:
                    raise RuntimeError(f"{len(refusals)} deposits refused: {refusals[0]}")
                figures["deposits_per_s"] = args.deposits / elapsed

                # 2. drain 10,000 after reconnect
                device = DeviceKeyPair.generate()
                box = mailbox_id(device.public)
                await sender.deposit_many([DepositRequest(box, os.urandom(16), envelope)
                                           for _ in range(DRAIN_MESSAGES)])
                drained = 0
                start = time.perf_counter()
                with trio.fail_after(PHASE_TIMEOUT_S):
                    async with Transport.open(device.to_bytes(), (LISTEN,)) as device_t, \
                            MailboxClient.connect(device_t, peer, addrs, timeout=20,
                                                  reply_timeout=PHASE_TIMEOUT_S) as inbox:
                        await inbox.authenticate(device)
                        more, after = True, 0
                        for _ in range(DRAIN_MESSAGES):  # bounded: at least one item per page
                            items, more = await inbox.fetch(after=after)
                            if items:
                                await inbox.ack([item.id for item in items])
                                drained += len(items)
                                after = items[-1].seq
                            if not more:
                                break
                figures["drain_10k_s"] = time.perf_counter() - start
                if drained != DRAIN_MESSAGES:
                    raise RuntimeError(f"drained {drained} of {DRAIN_MESSAGES}")

                # 3. push latency over a subscription
                device = DeviceKeyPair.generate()
                box = mailbox_id(device.public)
                sent_at: dict[bytes, float] = {}
                latencies: list[float] = []
                async with Transport.open(device.to_bytes(), (LISTEN,)) as device_t, \
                        MailboxClient.connect(device_t, peer, addrs, timeout=20,
                                              reply_timeout=PHASE_TIMEOUT_S) as inbox:
                    await inbox.authenticate(device)
                    await inbox.subscribe()
                    all_pushed = trio.Event()

                    async def receive() -> None:
                        async for item in inbox.pushes():
                            latencies.append((time.perf_counter() - sent_at[item.id]) * 1000)
                            if len(latencies) == args.latency_samples:
                                all_pushed.set()
                                return

                    with trio.fail_after(PHASE_TIMEOUT_S):
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(receive)
                            for _ in range(args.latency_samples):
                                message_id = os.urandom(16)
                                sent_at[message_id] = time.perf_counter()
                                await sender.deposit(box, message_id, envelope)
                                await trio.sleep(LATENCY_PAUSE_S)
                            await all_pushed.wait()
                figures["push_p50_ms"] = statistics.median(latencies)
                figures["push_p99_ms"] = percentile(latencies, 0.99)

        # 4. memory with idle subscribed clients (from other processes)
        await trio.sleep(args.settle_s)
        before_kb = _rss_kb(relay.pid)
        procs = max(1, min(args.client_procs, args.clients))
        shares = [args.clients // procs + (1 if i < args.clients % procs else 0)
                  for i in range(procs)]
        clients = [Child([sys.executable, str(Path(__file__).resolve()), "--role", "clients",
                          "--relay-peer", peer, "--relay-addr", addrs[0],
                          "--clients", str(share),
                          "--dials-at-once", str(max(1, CLIENT_DIALS_AT_ONCE // procs))],
                         work / f"clients{i}.stderr", stdin=True)
                   for i, share in enumerate(shares)]
        children.extend(clients)
        start = time.perf_counter()
        cpu_start = _cpu_s(relay.pid)
        ready = failed = 0
        probes: list[tuple[Child, list[str]]] = []
        with trio.fail_after(args.timeout):
            for child in clients:
                for _ in range(100_000):  # progress lines come every 2 s at most
                    progress = await child.line(timeout=PHASE_TIMEOUT_S)
                    print(f"clients: {progress}", file=sys.stderr, flush=True)
                    if progress.get("done"):
                        break
                ready += progress["ready"]
                failed += progress["failed"]
                probes.append((child, progress["probe_boxes"]))
        figures["clients_setup_s"] = time.perf_counter() - start
        figures["relay_cpu_ms_per_client_setup"] = (
            (_cpu_s(relay.pid) - cpu_start) * 1000 / max(1, args.clients))
        figures["clients_subscribed"] = ready
        figures["clients_failed"] = failed
        await trio.sleep(args.settle_s)
        cpu_start = _cpu_s(relay.pid)
        await trio.sleep(args.idle_window_s)
        figures["relay_idle_cpu_pct_with_clients"] = (
            (_cpu_s(relay.pid) - cpu_start) * 100 / args.idle_window_s)
        figures["relay_subscriptions"] = (await status())["subscriptions"]
        with_kb = _rss_kb(relay.pid)
        figures["rss_before_mb"] = before_kb / 1024
        figures["rss_with_clients_mb"] = with_kb / 1024
        figures["rss_per_client_kb"] = (with_kb - before_kb) / max(1, ready)

        # 5. churn from fresh peer ids while the clients stay subscribed
        from node.protocol.mailbox import MAILBOX_PROTOCOL

        before = await genuine_relay_round(peer, addrs, args.genuine_samples)
        figures |= {f"genuine_before_{k}": v for k, v in before.items()}
        figures["subscribed_probes"] = sum(len(boxes) for _, boxes in probes)
        figures["subscribed_probes_pushed_before_churn"] = await probe_subscribed(
            peer, addrs, probes)
        await trio.sleep(args.settle_s)
        figures["rss_before_churn_mb"] = _rss_kb(relay.pid) / 1024
        figures["fds_before_churn"] = _open_fds(relay.pid)
        figures |= _churn_figures("relay", await churn(
            peer, addrs, MAILBOX_PROTOCOL, args.churn, args.churn_seconds,
            target_pid=relay.pid, procs=args.churn_procs, work=work))
        genuine_after = await genuine_relay_round(peer, addrs, args.genuine_samples)
        figures |= {f"genuine_after_{k}": v for k, v in genuine_after.items()}
        figures["subscribed_probes_pushed_after_churn"] = await probe_subscribed(
            peer, addrs, probes)
        after_status = await status()
        figures["relay_subscriptions_after_churn"] = after_status["subscriptions"]
        figures["relay_alive_after_churn"] = relay.process.poll() is None
        await trio.sleep(args.settle_s)
        figures["rss_after_churn_mb"] = _rss_kb(relay.pid) / 1024
        figures["fds_after_churn"] = _open_fds(relay.pid)
        figures["relay_shutdown_s"] = await trio.to_thread.run_sync(relay.stop)
        figures["relay_exit_code"] = relay.process.returncode
    finally:
        for child in reversed(children):
            child.stop()
    return figures


def main() -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--deposits", type=int, default=20_000)
        parser.add_argument("--latency-samples", type=int, default=300)
        parser.add_argument("--clients", type=int, default=500)
        parser.add_argument("--client-procs", type=int, default=4,
                            help="processes the subscribed clients are spread over")
        parser.add_argument("--churn", type=int, default=None,
                            help="connections from fresh peer ids (default: the goal, relay "
                                 "20,000, device 5,000)")
        parser.add_argument("--churn-seconds", type=float, default=3000.0,
                            help="stop the churn after this long (the count made is reported)")
        parser.add_argument("--churn-procs", type=int, default=1,
                            help="processes the churn is spread over (each "
                                 f"{CHURN_CONCURRENCY} connections at a time)")
        parser.add_argument("--genuine-samples", type=int, default=20)
        parser.add_argument("--settle-s", type=float, default=SETTLE_S,
                            help="idle time before each memory reading")
        parser.add_argument("--idle-window-s", type=float, default=IDLE_WINDOW_S,
                            help="how long the relay's idle CPU with its clients is measured")
        parser.add_argument("--target", choices=["relay", "device"], default="relay")
        parser.add_argument("--scale-only", action="store_true",
                            help="relay: skip phases 1-3 (throughput, drain, push latency); "
                                 "clients and churn only")
        parser.add_argument("--profile-relay", metavar="FILE",
                            help="run the relay under cProfile and write its stats to FILE")
        parser.add_argument("--timeout", type=float, default=3600.0,
                            help="bound of the whole run, in seconds")
        parser.add_argument("--role", choices=["driver", "clients", "device", "churn"], default="driver",
                            help=argparse.SUPPRESS)
        parser.add_argument("--relay-peer", help=argparse.SUPPRESS)
        parser.add_argument("--relay-addr", help=argparse.SUPPRESS)
        parser.add_argument("--dials-at-once", type=int, default=CLIENT_DIALS_AT_ONCE,
                            help=argparse.SUPPRESS)
        parser.add_argument("--target-peer", help=argparse.SUPPRESS)
        parser.add_argument("--target-addr", help=argparse.SUPPRESS)
        parser.add_argument("--churn-protocol", help=argparse.SUPPRESS)

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    _quiet_logs()
    fd_limit = _raise_fd_limit()
    if args.role == "clients":
        trio.run(clients_role, args.relay_peer, args.relay_addr, args.clients,
                 args.dials_at_once)
        return 0
    if args.role == "device":
        trio.run(device_role)
        return 0
    if args.role == "churn":
        trio.run(churn_role, args.target_peer, [args.target_addr], args.churn_protocol,
                 args.churn, args.churn_seconds)
        return 0
    if args.churn is None:
        args.churn = GOAL_CHURN[args.target]

    async def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="pigeon-relay-bench-") as tmp:
            with trio.fail_after(args.timeout):
                if args.target == "device":
                    return await measure_device(args, Path(tmp))
                return await measure(args, Path(tmp))

    try:
        figures = trio.run(run)
    except BaseExceptionGroup as group:
        # libp2p nests its nurseries deeper than a traceback prints (docs/libp2p.md L17):
        # name the exceptions at the leaves.
        print(f"failed: {_leaf_exceptions(group)}", file=sys.stderr, flush=True)
        raise
    figures["fd_limit"] = fd_limit
    if args.target == "device":
        return _report_device(args, figures)
    figures["rss_per_client_goal_ok"] = figures["rss_per_client_kb"] < GOAL_RSS_PER_CLIENT_KB
    rows: list[tuple[str, Any, str]] = []
    if not args.scale_only:
        figures |= {
            "deposit_envelope_bytes": ENVELOPE_BYTES,
            "drain_goal_ok": figures["drain_10k_s"] < GOAL_DRAIN_S,
            "push_p50_goal_ok": figures["push_p50_ms"] < GOAL_PUSH_P50_MS,
        }
        rows += [
            ("deposits/s (1 KiB, pipelined, one client)", figures["deposits_per_s"], "/s"),
            ("drain 10,000 after reconnect (dial..empty)", figures["drain_10k_s"],
             f"s   goal < {GOAL_DRAIN_S:g}: {'ok' if figures['drain_goal_ok'] else 'MISSED'}"),
            ("push latency p50", figures["push_p50_ms"],
             f"ms  goal < {GOAL_PUSH_P50_MS:g}: "
             f"{'ok' if figures['push_p50_goal_ok'] else 'MISSED'}"),
            ("push latency p99", figures["push_p99_ms"], "ms"),
        ]
    rows += [
        ("subscribed clients (failed)",
         f"{figures['clients_subscribed']} ({figures['clients_failed']})", ""),
        ("subscriptions the relay reports", figures["relay_subscriptions"], ""),
        ("clients setup time", figures["clients_setup_s"], "s"),
        ("relay CPU per client set up", figures["relay_cpu_ms_per_client_setup"], "ms"),
        ("relay CPU with the clients idle", figures["relay_idle_cpu_pct_with_clients"], "%"),
        ("relay RSS before clients", figures["rss_before_mb"], "MB"),
        ("relay RSS with clients", figures["rss_with_clients_mb"], "MB"),
        ("RSS per idle subscribed client", figures["rss_per_client_kb"],
         f"KB  goal < {GOAL_RSS_PER_CLIENT_KB:g}: "
         f"{'ok' if figures['rss_per_client_goal_ok'] else 'MISSED'}"),
        ("genuine deposit p50 before churn (new conn)", figures["genuine_before_deposit_p50_ms"],
         "ms"),
        ("genuine fetch p50 before churn", figures["genuine_before_fetch_p50_ms"], "ms"),
        ("subscribed clients pushed a deposit, before churn",
         f"{figures['subscribed_probes_pushed_before_churn']} of {figures['subscribed_probes']}",
         ""),
        *_churn_rows("relay", GOAL_CHURN["relay"], figures),
        ("subscribed clients pushed a deposit, after churn",
         f"{figures['subscribed_probes_pushed_after_churn']} of {figures['subscribed_probes']}",
         ""),
        ("genuine deposit p50 after churn (new conn)", figures["genuine_after_deposit_p50_ms"],
         "ms"),
        ("genuine fetch p50 after churn", figures["genuine_after_fetch_p50_ms"], "ms"),
        ("subscriptions after churn", figures["relay_subscriptions_after_churn"], ""),
        ("relay RSS before churn", figures["rss_before_churn_mb"], "MB"),
        ("relay RSS after churn", figures["rss_after_churn_mb"], "MB"),
        ("relay open fds before / after churn",
         f"{figures['fds_before_churn']} / {figures['fds_after_churn']}", ""),
        ("relay shutdown on SIGTERM with clients", figures["relay_shutdown_s"], "s"),
    ]
    emit("Pigeon relay (separate process, loopback TCP, synchronous=FULL)", rows, figures,
         args.json)
    return 0


def _leaf_exceptions(error: BaseException) -> list[str]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for sub in error.exceptions for leaf in _leaf_exceptions(sub)]
    return [repr(error)]


def _report_device(args: argparse.Namespace, figures: dict[str, Any]) -> int:
    figures["target"] = "device"
    rows = [
        ("genuine send -> delivered p50 before", figures["genuine_before_delivery_p50_ms"], "ms"),
        *_churn_rows("device", GOAL_CHURN["device"], figures),
        ("genuine send -> delivered p50 after", figures["genuine_after_delivery_p50_ms"], "ms"),
        ("device still running", figures["target_alive"], ""),
        ("device RSS before", figures["rss_before_mb"], "MB"),
        ("device RSS after", figures["rss_after_mb"], "MB"),
    ]
    emit("Pigeon device (separate process, loopback TCP): connections from fresh peer ids",
         rows, figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
