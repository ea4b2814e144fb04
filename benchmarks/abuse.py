"""What strangers can make a node do, in one run.

1. CPU per first message, in this process, through the real inbound machine
   (`node.protocol.inbound.decide_batch`) over an in-memory view, `time.process_time`:
   a genuine first message (an invited introduction), a genuine ratchet message of a contact, a
   forged first message whose header claims MAX_SKIP skipped keys (refused), its replay, and, for
   comparison, what deriving the MAX_SKIP keys it claims would cost (what it cost before
   MAX_NEW_SESSION_SKIP). Goal: refused first message <= 3x a genuine first message.
2. A flood, on loopback: the victim is a real `pigeon run` process; a contact (a `Node` in this
   process) sends messages one at a time (send() -> MessageDelivered, i.e. the end-to-end ack)
   while this process also asks the victim's control socket for `status`; first unloaded, then
   while a stranger (a child process of this script, `--role flooder`) floods forged first
   messages at full speed from 3 connections. Goal: both latencies within 2x of unloaded (p50).
   The victim's CPU during the flood is read from /proc.
3. A contact's record after the amplification (MAX_ARCHIVED_SESSIONS + 1 sessions
   of MAX_SKIPPED_KEYS skipped keys each): its size, and the CPU to decrypt and serialize one more
   message (what every later message costs; it was ~6 MB and ~134 ms). Then per later message,
   "before" (the whole record rewritten, as the node stored it until skipped keys and archived
   sessions got their own rows) and "after" (the node's session store over a real SQLite file:
   copy, decrypt, save in one transaction), next to a normal contact's message through the same
   store: CPU (`time.process_time`) and bytes written (growth of the write-ahead log, with
   automatic checkpoints off). Goal: an amplified contact's message within 2x of a normal one.
4. Junk bytes an unknown sender can make a relay store per hour, measured: a relay with its
   default limits (in this process, real libp2p on loopback, a real SQLite file) holds
   JUNK_MAILBOXES registered mailboxes; a stranger deposits maximum-size junk into them, from a
   fresh peer id per batch, without a capability (PROTOCOL.md section 21), until the relay
   refuses everything or `--junk-seconds` pass. Meanwhile a contact deposits into one of those
   mailboxes with its capability: its deposit latency (p50) against the same unloaded, and
   whether any of its deposits was refused. Junk is kept up to 3 days, so what the relay holds
   when it starts refusing is what an hour of flooding leaves (owners that read and acknowledge
   junk make room for as much again). Goal: junk held <= the strangers' cap, no contact deposit
   refused, the contact's p50 during the flood within 2x unloaded.

Every loop is bounded in count and time; children are stopped by their pid. With `--json`
stdout holds exactly one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from benchmarks._report import emit, parse_args, percentile  # noqa: E402
from node import Config, MessageDelivered, Node, RelayRefused  # noqa: E402
from node.device.session_store import SessionStore  # noqa: E402
from node.device.storage import Database  # noqa: E402
from node.protocol import ratchet as ratchet_module  # noqa: E402
from node.protocol.content import Intro, Text, encode_content  # noqa: E402
from node.protocol.inbound import ContactRef, Incoming, StrangerGate, decide_batch  # noqa: E402
from node.protocol.invite import Invite  # noqa: E402
from node.protocol.kdf import kdf_ck  # noqa: E402
from node.protocol.keys import IdentityKeyPair  # noqa: E402
from node.protocol.limits import MAX_ARCHIVED_SESSIONS, MAX_SKIP, MAX_SKIPPED_KEYS  # noqa: E402
from node.protocol.prekeys import PreKeyStore  # noqa: E402
from node.protocol.records import PreKeyBundle  # noqa: E402
from node.protocol.session import SessionRecord  # noqa: E402
from node.relay import config as relay_config  # noqa: E402
from node.rpc import SocketClient  # noqa: E402
from node.testing import FIXED_NOW, Party, forge_first_message  # noqa: E402

log = logging.getLogger("benchmarks.abuse")

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
CPU_SAMPLES = 100  # first messages of each kind timed in part 1
LATENCY_SAMPLES = 20  # contact messages and control calls per phase in part 2
FLOOD_CONNECTIONS = 3
FLOOD_UNIQUE = 300  # distinct forgeries the flooder makes before it starts
FLOOD_BATCH = 64  # frames per write
PAUSE_S = 0.05  # between latency samples
NOW_MS = FIXED_NOW * 1000
TOKEN = b"T" * 16


# --- part 1: CPU per first message ------------------------------------------------------------------


class _View:
    """The victim's state in memory: a contact (Bob) and one invite."""

    def __init__(self, me: Party, bob: Party) -> None:
        self.identity = me.identity
        self._prekeys = me.prekeys
        self._bob = bob
        self.records = {(bob.identity.public.to_bytes(), bob.device.public.to_bytes()):
                        me.sessions[bob.name]}

    def contact_of_device(self, device: bytes) -> ContactRef | None:
        if device == self._bob.device.public.to_bytes():
            return ContactRef(self._bob.identity.public.to_bytes(), "bob")
        return None

    def contact_of_account(self, account: bytes) -> ContactRef | None:
        return None if account != self._bob.identity.public.to_bytes() else ContactRef(
            account, "bob")

    def seen_among(self, account: bytes, message_ids: Sequence[bytes]) -> set[bytes]:
        return set()

    def session(self, account: bytes, device: bytes) -> SessionRecord:
        return self.records.get((account, device)) or SessionRecord()

    def prekeys(self) -> PreKeyStore:
        return self._prekeys

    def invite_is_valid(self, token: bytes, *, now_ms: int) -> bool:
        return token == TOKEN

    def name_taken(self, name: str) -> bool:
        return False


def _cpu_per_item(view: _View, gate: StrangerGate, items: list[Incoming]) -> float:
    """Seconds of CPU per item, each decided in its own batch (as a stream delivers them)."""
    start = time.process_time()
    for item in items:
        decide_batch([item], view=view, now_ms=NOW_MS, max_name_chars=64, gate=gate)
    return (time.process_time() - start) / len(items)


def measure_cpu() -> dict[str, float]:
    me, bob = Party.create("victim"), Party.create("bob")
    bob.start_session(me)
    me.decrypt(bob, bob.encrypt(me, b"hi"))
    me.sessions["bob"] = me.sessions.pop(bob.name)
    view = _View(me, bob)
    gate = StrangerGate(per_s=1e9, burst=10**9, remember=10**6, now=0.0)
    bundle = PreKeyBundle.verify(me.bundle(one_time=False), now=FIXED_NOW)

    def stranger_item(message: bytes, mid: bytes) -> Incoming:
        device = IdentityKeyPair.generate().public.to_bytes()  # any 32 bytes: unknown device
        return Incoming(device, "stranger", mid, message)

    genuine_first = []
    for _ in range(CPU_SAMPLES):
        mid = os.urandom(16)
        identity = IdentityKeyPair.generate()
        record = SessionRecord()
        record.initiate(identity, bundle)
        content = Intro(id=mid, sent_at_ms=NOW_MS, name="newcomer", addrs=(), token=TOKEN)
        genuine_first.append(stranger_item(record.encrypt(encode_content(content)).message, mid))
    forged = [stranger_item(forge_first_message(bundle, message_id=m, counter=MAX_SKIP,
                                                token=os.urandom(16)), m)
              for m in (os.urandom(16) for _ in range(CPU_SAMPLES))]
    contact = []
    for _ in range(CPU_SAMPLES):
        mid = os.urandom(16)
        text = encode_content(Text(id=mid, sent_at_ms=NOW_MS, body="hello"))
        contact.append(Incoming(bob.device.public.to_bytes(), "bob", mid,
                                bob.encrypt(me, text)))
    figures = {
        "genuine_first_message_cpu_ms": _cpu_per_item(view, gate, genuine_first) * 1e3,
        "contact_message_cpu_ms": _cpu_per_item(view, gate, contact) * 1e3,
        "refused_first_message_cpu_ms": _cpu_per_item(view, gate, forged) * 1e3,
        "replayed_refused_first_message_cpu_ms": _cpu_per_item(view, gate, forged) * 1e3,
    }
    start = time.process_time()
    ratchet_module._skip(os.urandom(32), os.urandom(32), 0, MAX_SKIP)
    figures["max_skip_derivation_before_cpu_ms"] = (time.process_time() - start) * 1e3
    figures["refused_over_genuine_ratio"] = (
        figures["refused_first_message_cpu_ms"] / figures["genuine_first_message_cpu_ms"])
    return figures


# --- part 3: a contact's amplified record -------------------------------------------------------------


def _store_costs(store: SessionStore, db: Database, wal: Path, bob: Party, sender: Party,
                 messages: list[bytes]) -> tuple[float, float]:
    """CPU (ms) and WAL bytes per message through the node's session store, as the inbound
    shell does it: decrypt on a copy of the cached record, adopt it, save, commit."""
    account, device = sender.identity.public.to_bytes(), sender.device.public.to_bytes()
    store.record(account, device)  # loaded before timing, as a running node has it cached
    size, start = wal.stat().st_size, time.process_time()
    for message in messages:
        record = store.record(account, device).copy()
        record.decrypt(message, identity=bob.identity, remote_identity=sender.identity.public,
                       prekeys=store.prekeys)
        with db.transaction():
            store.adopt(account, device, record, store.prekeys)
            store.save(account, device)
    cpu_ms = (time.process_time() - start) / len(messages) * 1e3
    return cpu_ms, (wal.stat().st_size - size) / len(messages)


def measure_record() -> dict[str, float]:
    mallory, bob = Party.create("mallory"), Party.create("bob")
    for i in range(MAX_ARCHIVED_SESSIONS + 1):
        mallory.start_session(bob, one_time=False)
        bob.decrypt(mallory, mallory.encrypt(bob, b"open %d" % i))
        current = mallory.sessions[bob.name].current
        assert current is not None and current.ratchet.cks is not None
        ck = current.ratchet.cks
        for _ in range(MAX_SKIPPED_KEYS):
            ck, _ = kdf_ck(ck)
        current.ratchet.cks, current.ratchet.ns = ck, current.ratchet.ns + MAX_SKIPPED_KEYS
        bob.decrypt(mallory, mallory.encrypt(bob, b"far"))
    stored = bob.sessions[mallory.name].to_bytes()
    messages = [mallory.encrypt(bob, b"later %d" % i) for i in range(20)]
    record = SessionRecord.from_bytes(stored)
    start = time.process_time()
    for message in messages:  # what the node does per message: copy, decrypt, serialize
        record = record.copy()
        record.decrypt(message, identity=bob.identity, remote_identity=mallory.identity.public,
                       prekeys=bob.prekeys)
        stored = record.to_bytes()
    figures = {"amplified_record_bytes": float(len(stored)),
               "amplified_message_cpu_ms": (time.process_time() - start) / len(messages) * 1e3,
               "amplified_message_before_written_bytes": float(len(stored))}
    # The same, through the node's store over a real database.
    carol = Party.create("carol")
    carol.start_session(bob)
    with tempfile.TemporaryDirectory(prefix="pigeon-abuse-") as root:
        path = Path(root) / "pigeon.db"
        db = Database.open(path, durability="normal", create=True)
        try:
            db._conn.execute("PRAGMA wal_autocheckpoint=0")  # the WAL keeps every commit
            store = SessionStore(db, bob.identity, bob.device, now=FIXED_NOW)
            store.prekeys = bob.prekeys
            account, device = mallory.identity.public.to_bytes(), mallory.device.public.to_bytes()
            store.adopt(account, device, SessionRecord.from_bytes(stored), bob.prekeys)
            with db.transaction():
                store.save(account, device)
                store.save_prekeys()
            wal = path.with_name(path.name + "-wal")
            _store_costs(store, db, wal, bob, carol, [carol.encrypt(bob, b"hello")])
            normal = _store_costs(store, db, wal, bob, carol,
                                  [carol.encrypt(bob, b"normal %d" % i) for i in range(20)])
            amplified = _store_costs(store, db, wal, bob, mallory,
                                     [mallory.encrypt(bob, b"after %d" % i) for i in range(20)])
        finally:
            db.close()
    figures.update({
        "normal_message_store_cpu_ms": normal[0],
        "normal_message_written_bytes": normal[1],
        "amplified_message_store_cpu_ms": amplified[0],
        "amplified_message_written_bytes": amplified[1],
    })
    return figures


# --- part 2: a flood against a real daemon ----------------------------------------------------------


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _flooder(invite_text: str, peer_id: str, addrs: list[str], seconds: float) -> None:
    """Child process: FLOOD_CONNECTIONS raw hosts send forged first messages for `seconds`."""
    from node.net import MSG_PROTOCOL, Transport
    from node.protocol.wire import Msg, encode_frame

    invite = Invite.from_text(invite_text, now=int(time.time()))
    forged = [encode_frame(Msg(m, forge_first_message(invite.bundle, message_id=m,
                                                      counter=MAX_SKIP, token=os.urandom(16))))
              for m in (os.urandom(16) for _ in range(FLOOD_UNIQUE))]
    counts = {"frames_sent": 0, "replies": 0, "streams": 0}
    deadline = trio.current_time() + seconds
    print(json.dumps({"ready": True}), flush=True)

    async def connection(n: int) -> None:
        async with Transport.open(os.urandom(32), (LOOPBACK,)) as transport:
            i = n * 17
            while trio.current_time() < deadline:
                try:
                    stream = await transport.open_stream(peer_id, addrs, MSG_PROTOCOL,
                                                         timeout=5)
                except Exception:  # cut off: dial again (bounded by the deadline)
                    await trio.sleep(0.01)
                    continue
                counts["streams"] += 1
                try:
                    while trio.current_time() < deadline:
                        batch = [forged[(i + k) % len(forged)] for k in range(FLOOD_BATCH)]
                        i += FLOOD_BATCH
                        await stream.send(batch)
                        counts["frames_sent"] += len(batch)
                        with trio.move_on_after(1):
                            for _ in range(FLOOD_BATCH):
                                if await stream.receive() is None:
                                    break
                                counts["replies"] += 1
                except Exception:  # the victim reset the stream: open another
                    pass

    with trio.move_on_after(seconds + 10):
        async with trio.open_nursery() as nursery:
            for n in range(FLOOD_CONNECTIONS):
                nursery.start_soon(connection, n)
    print(json.dumps(counts), flush=True)


async def _latencies(contact: Node, control: SocketClient) -> tuple[list[float], list[float]]:
    message_ms: list[float] = []
    control_ms: list[float] = []
    with contact.events() as events:
        for i in range(LATENCY_SAMPLES):
            start = time.perf_counter()
            mid = await contact.send("victim", f"ping {i}")
            with trio.fail_after(60):
                async for event in events:
                    if isinstance(event, MessageDelivered) and event.message_id == mid:
                        break
            message_ms.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            with trio.fail_after(60):
                await control.call("status")
            control_ms.append((time.perf_counter() - start) * 1e3)
            await trio.sleep(PAUSE_S)
    return message_ms, control_ms


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


async def measure_flood(root: Path, flood_s: float) -> dict[str, Any]:
    victim_dir = root / "victim"
    init = _spawn(["-m", "node", "--data-dir", str(victim_dir), "init", "--name", "victim"])
    if init.wait(timeout=60) != 0:
        raise RuntimeError("pigeon init failed")
    victim = _spawn(["-m", "node", "--data-dir", str(victim_dir), "run", "--listen", LOOPBACK,
                     "--json", "--no-mdns"])
    flooder: subprocess.Popen[str] | None = None
    try:
        assert victim.stdout is not None
        hello = json.loads(await trio.to_thread.run_sync(victim.stdout.readline))
        control = await SocketClient.connect(victim_dir / "pigeon.sock")
        assert control is not None
        invite = (await control.call("invite"))["invite"]
        config = Config(listen=(LOOPBACK,), mdns=False)
        async with Node.open(root / "contact", config.replace(display_name="contact"),
                             create=True) as contact:
            contact.add_contact("victim", invite)
            await _latencies(contact, control)  # warm up: the session and the connection
            unloaded = await _latencies(contact, control)
            flooder = _spawn([str(Path(__file__).resolve()), "--role", "flooder", "--invite", invite,
                              "--peer", hello["peer_id"], "--addrs", json.dumps(hello["addresses"]),
                              "--seconds", str(flood_s)])
            assert flooder.stdout is not None
            await trio.to_thread.run_sync(flooder.stdout.readline)  # forgeries made
            cpu_before, start = _cpu_s(victim.pid), time.monotonic()
            loaded = await _latencies(contact, control)
            counts = json.loads(await trio.to_thread.run_sync(flooder.stdout.readline))
            victim_cpu = _cpu_s(victim.pid) - cpu_before
            elapsed = time.monotonic() - start
        await control.aclose()
    finally:
        if flooder is not None:
            _stop(flooder)
        _stop(victim)
    p50 = statistics.median
    return {
        "contact_message_unloaded_p50_ms": p50(unloaded[0]),
        "contact_message_flood_p50_ms": p50(loaded[0]),
        "contact_message_flood_p95_ms": percentile(loaded[0], 0.95),
        "control_unloaded_p50_ms": p50(unloaded[1]),
        "control_flood_p50_ms": p50(loaded[1]),
        "control_flood_p95_ms": percentile(loaded[1], 0.95),
        "flood_frames_sent": counts["frames_sent"],
        "flood_replies": counts["replies"],
        "flood_streams": counts["streams"],
        "victim_cpu_during_flood_percent": 100 * victim_cpu / max(elapsed, 1e-9),
    }


JUNK_MAILBOXES = 160  # 160 x the 2 MiB strangers' quota of a mailbox > the 256 MiB relay cap
JUNK_BATCH = 8  # maximum-size envelopes per batch, each batch from a fresh peer id
CONTACT_ENVELOPE_BYTES = 4096
FULL_BATCHES = 3  # batches refused entirely in a row: the relay takes no more junk


async def measure_relay_junk(root: Path, seconds: float) -> dict[str, Any]:
    from node.device.mailbox_client import DepositRequest, MailboxClient
    from node.net import Transport
    from node.protocol import mailbox as mb
    from node.protocol.keys import DeviceKeyPair
    from node.relay.service import open_relay

    config = relay_config.RelayConfig(data_dir=root / "relay", listen=(LOOPBACK,),
                                      circuit_relay=False, dht=False)
    cap = os.urandom(mb.CAP_BYTES)
    junk = os.urandom(config.max_envelope_bytes)
    async with open_relay(config) as relay:
        pid, addrs = relay.peer_id, relay.addresses()
        owners = [DeviceKeyPair.generate() for _ in range(JUNK_MAILBOXES)]
        boxes = [mb.mailbox_id(o.public) for o in owners]
        async with Transport.open(os.urandom(32), (LOOPBACK,)) as transport:
            for owner in owners:  # a stream is bound to one mailbox
                async with MailboxClient.connect(transport, pid, addrs) as client:
                    await client.authenticate(owner)
                    await client.set_caps([mb.cap_hash(cap)])

        async def contact(samples: list[float], refusals: list[str], stop: trio.Event) -> None:
            async with Transport.open(os.urandom(32), (LOOPBACK,)) as transport, \
                    MailboxClient.connect(transport, pid, addrs) as client:
                while len(samples) < LATENCY_SAMPLES or not stop.is_set():
                    start = time.perf_counter()
                    try:
                        await client.deposit(boxes[0], os.urandom(16),
                                             os.urandom(CONTACT_ENVELOPE_BYTES), cap=cap)
                    except RelayRefused as exc:
                        refusals.append(exc.code)
                    samples.append((time.perf_counter() - start) * 1e3)
                    await trio.sleep(PAUSE_S)

        unloaded: list[float] = []
        unloaded_refusals: list[str] = []
        done = trio.Event()
        done.set()
        await contact(unloaded, unloaded_refusals, done)

        sent = batches = full_in_a_row = 0
        codes: dict[str, int] = {}
        full_after_s: float | None = None
        loaded: list[float] = []
        loaded_refusals: list[str] = []
        flooding = trio.Event()
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(contact, loaded, loaded_refusals, flooding)
            while time.perf_counter() - start < seconds and full_in_a_row < FULL_BATCHES:
                batch = [DepositRequest(boxes[(batches * JUNK_BATCH + k) % len(boxes)],
                                        os.urandom(16), junk, ttl=30 * 24 * 3600)
                         for k in range(JUNK_BATCH)]
                async with Transport.open(os.urandom(32), (LOOPBACK,)) as transport, \
                        MailboxClient.connect(transport, pid, addrs, timeout=30) as client:
                    results = await client.deposit_many(batch)
                batches += 1
                sent += len(batch)
                for result in results:
                    if result is not None:
                        codes[result.code] = codes.get(result.code, 0) + 1
                if all(r is not None for r in results):
                    full_in_a_row += 1
                    if full_after_s is None:
                        full_after_s = time.perf_counter() - start
                else:
                    full_in_a_row = 0
            flooding.set()
        elapsed = time.perf_counter() - start
        status = relay.relay.status()
    stored = float(status["open_bytes"])
    per_hour = stored if full_in_a_row >= FULL_BATCHES else min(
        stored / elapsed * 3600, float(config.open_storage_max_bytes))
    return {
        "relay_junk_bytes_per_hour": per_hour,
        "relay_junk_stored_bytes": stored,
        "relay_junk_cap_bytes": float(config.open_storage_max_bytes),
        "relay_storage_bytes": float(config.storage_max_bytes),
        "relay_junk_sent_bytes": float(sent * len(junk)),
        "relay_junk_peer_ids": batches,
        "relay_junk_refused_mailbox_full": codes.get(mb.MAILBOX_FULL, 0),
        "relay_junk_refused_storage_full": codes.get(mb.STORAGE_FULL, 0),
        "relay_junk_full_after_s": full_after_s if full_after_s is not None else elapsed,
        "relay_contact_deposit_unloaded_p50_ms": statistics.median(unloaded),
        "relay_contact_deposit_flood_p50_ms": statistics.median(loaded),
        "relay_contact_deposit_flood_p95_ms": percentile(loaded, 0.95),
        "relay_contact_deposits_refused": len(unloaded_refusals) + len(loaded_refusals),
        "relay_contact_deposits": len(unloaded) + len(loaded),
    }


def _extra_args(parser: Any) -> None:
    parser.add_argument("--flood-seconds", type=float, default=20.0,
                        help="longest flood (default 20 s; it ends with the measurements)")
    parser.add_argument("--junk-seconds", type=float, default=120.0,
                        help="longest junk flood of the relay (default 120 s; it ends when the"
                             " relay refuses all junk)")
    parser.add_argument("--role", choices=("bench", "flooder"), default="bench",
                        help=argparse.SUPPRESS)
    parser.add_argument("--invite", help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--addrs", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=20.0, help=argparse.SUPPRESS)


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], extra=_extra_args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.role == "flooder":
        trio.run(_flooder, args.invite, args.peer, json.loads(args.addrs), args.seconds)
        return 0
    stdout_fd = os.dup(1)
    os.dup2(2, 1)  # only the report goes to stdout
    try:
        figures: dict[str, Any] = {}
        figures.update(measure_cpu())
        figures.update(measure_record())
        with tempfile.TemporaryDirectory(prefix="pigeon-abuse-") as root:
            figures.update(trio.run(measure_flood, Path(root), args.flood_seconds))
        with tempfile.TemporaryDirectory(prefix="pigeon-abuse-relay-") as root:
            figures.update(trio.run(measure_relay_junk, Path(root), args.junk_seconds))
    finally:
        sys.stdout.flush()
        os.dup2(stdout_fd, 1)
        os.close(stdout_fd)
    figures["goal_refused_at_most_3x_genuine"] = figures["refused_over_genuine_ratio"] <= 3
    figures["goal_amplified_within_2x_normal"] = (
        figures["amplified_message_written_bytes"] <= 2 * figures["normal_message_written_bytes"]
        and figures["amplified_message_store_cpu_ms"]
        <= 2 * figures["normal_message_store_cpu_ms"])
    figures["goal_flood_within_2x_unloaded"] = (
        figures["contact_message_flood_p50_ms"] <= 2 * figures["contact_message_unloaded_p50_ms"]
        and figures["control_flood_p50_ms"] <= 2 * figures["control_unloaded_p50_ms"])
    figures["goal_junk_capped_and_contacts_served"] = (
        figures["relay_junk_bytes_per_hour"] <= figures["relay_junk_cap_bytes"]
        and figures["relay_contact_deposits_refused"] == 0
        and figures["relay_contact_deposit_flood_p50_ms"]
        <= 2 * figures["relay_contact_deposit_unloaded_p50_ms"])
    f = figures
    rows: list[tuple[str, Any, str]] = [
        ("CPU: genuine first message (intro)", f["genuine_first_message_cpu_ms"], "ms"),
        ("CPU: contact's ratchet message", f["contact_message_cpu_ms"], "ms"),
        ("CPU: refused first message (N=MAX_SKIP)", f["refused_first_message_cpu_ms"], "ms"),
        ("CPU: its replay", f["replayed_refused_first_message_cpu_ms"] * 1e3, "us"),
        ("CPU: deriving MAX_SKIP keys (before)", f["max_skip_derivation_before_cpu_ms"], "ms"),
        ("refused / genuine first message", f["refused_over_genuine_ratio"], "x (goal <= 3)"),
        ("amplified record", f["amplified_record_bytes"] / 1024, "KiB"),
        ("CPU per message with it, whole record (before)", f["amplified_message_cpu_ms"], "ms"),
        ("  ... written per message (before)",
         f["amplified_message_before_written_bytes"] / 1024, "KiB"),
        ("CPU per message with it, node's store (after)", f["amplified_message_store_cpu_ms"],
         "ms"),
        ("  ... written per message (after)", f["amplified_message_written_bytes"] / 1024,
         "KiB (WAL)"),
        ("normal contact's message, node's store", f["normal_message_store_cpu_ms"], "ms"),
        ("  ... written per message", f["normal_message_written_bytes"] / 1024, "KiB (WAL)"),
        ("contact message p50, unloaded", f["contact_message_unloaded_p50_ms"], "ms"),
        ("contact message p50, 3-conn flood", f["contact_message_flood_p50_ms"], "ms"),
        ("contact message p95, 3-conn flood", f["contact_message_flood_p95_ms"], "ms"),
        ("control socket p50, unloaded", f["control_unloaded_p50_ms"], "ms"),
        ("control socket p50, 3-conn flood", f["control_flood_p50_ms"], "ms"),
        ("control socket p95, 3-conn flood", f["control_flood_p95_ms"], "ms"),
        ("flood: frames sent / replies", f"{f['flood_frames_sent']} / {f['flood_replies']}", ""),
        ("flood: streams opened", f["flood_streams"], ""),
        ("victim CPU during the flood", f["victim_cpu_during_flood_percent"], "% of a core"),
        ("junk bytes an unknown sender can make a relay store per hour",
         f["relay_junk_bytes_per_hour"] / 2**20,
         f"MiB (cap {f['relay_junk_cap_bytes'] / 2**20:g} of {f['relay_storage_bytes'] / 2**30:g}"
         " GiB)"),
        ("  ... junk sent / fresh peer ids", f"{f['relay_junk_sent_bytes'] / 2**20:,.0f} MiB / "
                                             f"{f['relay_junk_peer_ids']}", ""),
        ("  ... refused mailbox-full / storage-full",
         f"{f['relay_junk_refused_mailbox_full']} / {f['relay_junk_refused_storage_full']}", ""),
        ("  ... relay refused all junk after", f["relay_junk_full_after_s"], "s"),
        ("contact deposit p50, unloaded", f["relay_contact_deposit_unloaded_p50_ms"], "ms"),
        ("contact deposit p50, junk flood", f["relay_contact_deposit_flood_p50_ms"], "ms"),
        ("contact deposit p95, junk flood", f["relay_contact_deposit_flood_p95_ms"], "ms"),
        ("contact deposits refused",
         f"{f['relay_contact_deposits_refused']} of {f['relay_contact_deposits']}", ""),
        ("goals met", f"{f['goal_refused_at_most_3x_genuine']} (CPU), "
                      f"{f['goal_amplified_within_2x_normal']} (amplified record), "
                      f"{f['goal_flood_within_2x_unloaded']} (flood), "
                      f"{f['goal_junk_capped_and_contacts_served']} (relay junk)", ""),
    ]
    emit("Pigeon under abuse by strangers", rows, figures,
         args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
