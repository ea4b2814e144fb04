"""Liveness: a direct path that goes silent is given up on, and what was not
acknowledged goes to the recipient's relays while the sender keeps dialing.

In-process tests (real libp2p hosts on loopback, a real relay, real SQLite) play the silent
receiver with a bare `Transport` holding Bob's device key: it takes the bytes and never answers
(no ack; for the keepalive test, no ping echo either). The timers are config knobs (tests'
FAST config: ack_timeout_s=2), not sleeps.

The acceptance tests (marked slow, root only) run real `pigeon` processes in network namespaces:
Alice and Bob are linked directly by a veth pair and each reaches the relay through its own link
to a hub (tests/netlab.py's TriangleLab). The direct link is cut (or Bob is frozen with SIGSTOP)
during a stream of 300 messages; what Alice sends meanwhile must reach Bob through the relay
within 15 s (for the frozen Bob: be held by the relay within 15 s), and after the heal every
message is there exactly once, in order. The cut lasts 20 s instead of the issue's 60 s:
detection takes at most ack_timeout_s (6 s) plus a failed dial, so 20 s is already well beyond
it, and beyond the 15 s bound (a message sent as the link went down cannot be delivered by the
heal instead of the relay), and shows the same property at a third of the cost;
`LIVENESS_CUT_S` sets it (60 reproduces the issue's number). Only the cut is paced in real time
(the daemons' timers run in their own processes); the waves before and after it follow each
other at once, and the end waits on conditions, not on the clock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from node import Node, TransportError
from node.device.datadir import DataDir
from node.net import MSG_PROTOCOL, FrameStream, Transport
from node.net.host import PING_PROTOCOL
from node.protocol.wire import Ack, Msg, Nack, decode_frame, encode_frame
from node.relay.config import RelayConfig
from node.relay.service import open_relay
from tests.clitools import (
    COMMAND_TIMEOUT_S,
    FAST_RETRIES_TOML,
    Daemon,
    pigeon,
    pigeon_json,
    stop_all,
    wait_until,
)
from tests.conftest import LOOPBACK, WAIT, befriend, open_node, raw_peer
from tests.netlab import CAN_MAKE_NAMESPACES, TriangleLab
from tests.relaytools import RelayProcess, relay_status

# --- in-process: a silent receiver -----------------------------------------------------------------


class SilentBob:
    """Bob's device key on a bare host that reads every frame and never acknowledges one."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.ids: list[bytes] = []
        transport.set_stream_handler(MSG_PROTOCOL, self._swallow)

    async def _swallow(self, stream: FrameStream) -> None:
        async for raw in stream:
            frame = decode_frame(raw)
            assert isinstance(frame, Msg)
            self.ids.append(frame.id)


async def _bob_goes_silent(tmp_path: Path, relays: tuple[str, ...]) -> tuple[Path, bytes]:
    """Alice adds Bob (who has `relays`) from his invite and they exchange nothing more; Bob's
    node stops. Returns Bob's data dir and device key."""
    async with open_node(tmp_path / "alice", "alice") as alice, \
            open_node(tmp_path / "bob", "bob", relays=relays) as bob:
        await befriend(bob, alice, "bob")
    _, device = DataDir(tmp_path / "bob").load_keys()
    return tmp_path / "bob", device.to_bytes()


def _point_alice_at(alice: Node, addrs: list[str]) -> None:
    """Alice's record of Bob's device gets `addrs` first (his relays stay as they are)."""
    contact = alice._db.contact_by_name("bob")
    assert contact is not None
    device = alice._db.devices(contact.id)[0]
    alice._db.put_device(contact.id, device.device, device.peer_id, [*addrs, *device.addrs],
                         seen_at_ms=device.seen_at_ms, now_ms=0)


def _bob_status(alice: Node) -> Any:
    return next(c for c in alice.status().contacts if c.name == "bob")


@pytest.mark.slow(seconds=4)
async def test_unacknowledged_messages_go_to_the_relay_when_acks_stop(tmp_path: Path) -> None:
    async with open_relay(RelayConfig(data_dir=tmp_path / "relay", listen=(LOOPBACK,),
                                      log_level="WARNING")) as relay:
        relays = (relay.addresses()[0],)
        bob_dir, bob_seed = await _bob_goes_silent(tmp_path, relays)
        async with open_node(tmp_path / "alice", "alice") as alice:
            async with raw_peer(bob_seed) as fake:
                silent = SilentBob(fake)
                # Alice keeps redialing after she gives up on a path, so whether she is connected
                # at any one moment is a race: record that she closed the silent connection.
                drops: list[str] = []
                fake.on_connection_change(
                    lambda peer, connected: None if connected else drops.append(peer))
                _point_alice_at(alice, fake.listen_addrs())
                sent = [await alice.send("bob", f"into the void {i}") for i in range(3)]
                # What status said while the messages went to the relay: the path down, and why.
                # (Once the node has redialed the silent peer, which accepts connections, a new
                # direct path may clear it again, so it is watched, not read once at the end.)
                said: set[str | None] = set()
                with trio.fail_after(WAIT):
                    while (status := _bob_status(alice)).relayed < 3:
                        said |= {status.path_down, status.last_error}
                        await trio.sleep(0.01)
                said |= {status.path_down, status.last_error}
                # written directly first (the path looked fine), then given up on
                assert {i.hex() for i in silent.ids} >= set(sent)
                assert "path down: no ack within 2 s" in said, said
                with trio.fail_after(WAIT):
                    while alice.peer_id not in drops:  # the silent connection was closed
                        await trio.sleep(0.01)
                assert relay.relay.status()["deposits"] >= 3

            # The real Bob comes back: the relay hands him everything, the direct path opens
            # again, and each message is his exactly once; Alice's status is clean again.
            async with open_node(bob_dir, "bob", relays=relays) as bob:
                with trio.fail_after(WAIT):
                    for message_id in sent:
                        assert await alice.wait_delivered(message_id, timeout=WAIT) \
                            == "delivered"
                assert [h.message_id for h in bob.history("alice")] == sent
                with trio.fail_after(WAIT):
                    again = await alice.send("bob", "and directly again")
                    assert await alice.wait_delivered(again, timeout=WAIT) == "delivered"
                    # Clean once an ack came back in time (on a loaded machine one may be late
                    # and mark the path down for a moment: the 2 s deadline is this test's).
                    while (status := _bob_status(alice)).path != "direct" or \
                            status.path_down is not None or status.last_error is not None:
                        await trio.sleep(0.05)


@pytest.mark.slow(seconds=2)
async def test_an_idle_path_whose_pings_go_unanswered_is_closed(tmp_path: Path) -> None:
    async with open_relay(RelayConfig(data_dir=tmp_path / "relay", listen=(LOOPBACK,),
                                      log_level="WARNING")) as relay:
        relays = (relay.addresses()[0],)
        _, bob_seed = await _bob_goes_silent(tmp_path, relays)
        async with open_node(tmp_path / "alice", "alice", keepalive_s=0.5, ping_timeout_s=0.5,
                             ack_timeout_s=30.0) as alice, raw_peer(bob_seed) as fake:
            ping_streams = 0

            async def acking(stream: FrameStream) -> None:
                async for raw in stream:
                    frame = decode_frame(raw)
                    assert isinstance(frame, Msg)
                    await stream.send([encode_frame(Ack((frame.id,)))])

            async def mute(stream: FrameStream) -> None:
                nonlocal ping_streams
                ping_streams += 1
                await trio.sleep_forever()  # takes the ping, never echoes it

            fake.set_stream_handler(MSG_PROTOCOL, acking)
            fake.set_stream_handler(PING_PROTOCOL, mute)
            _point_alice_at(alice, fake.listen_addrs())
            first = await alice.send("bob", "acknowledged")
            assert await alice.wait_delivered(first, timeout=WAIT) == "delivered"
            assert _bob_status(alice).path == "direct"
            with trio.fail_after(WAIT):
                while _bob_status(alice).path_down is None:
                    await trio.sleep(0.05)
            status = _bob_status(alice)
            assert status.path_down == "path down: no answer to a ping within 0.5 s"
            assert ping_streams >= 1
            with trio.fail_after(WAIT):
                while fake.is_connected(alice.peer_id):
                    await trio.sleep(0.05)


async def test_a_contacts_nack_cannot_fail_a_message_sent_to_someone_else(tmp_path: Path) -> None:
    # Bob answers Alice's message with a nack naming the id of the message
    # Alice sent to Carol (and one naming a message of his own not written to him yet).
    _, bob_seed = await _bob_goes_silent(tmp_path, ())
    async with open_node(tmp_path / "alice", "alice") as alice:
        async with open_node(tmp_path / "carol", "carol") as carol:
            await befriend(carol, alice, "carol")
        to_carol = bytes.fromhex(await alice.send("carol", "for Carol only"))
        async with raw_peer(bob_seed) as fake:
            forged: list[bytes] = []

            async def forging(stream: FrameStream) -> None:
                async for raw in stream:
                    frame = decode_frame(raw)
                    assert isinstance(frame, Msg)
                    forged.append(frame.id)
                    await stream.send([encode_frame(Nack(to_carol, "undecryptable")),
                                       encode_frame(Ack((frame.id,)))])

            fake.set_stream_handler(MSG_PROTOCOL, forging)
            _point_alice_at(alice, fake.listen_addrs())
            to_bob = await alice.send("bob", "hello Bob")
            assert await alice.wait_delivered(to_bob, timeout=WAIT) == "delivered"
            assert forged == [bytes.fromhex(to_bob)]
        carols = alice.history("carol")
        assert [(h.message_id, h.state) for h in carols] == [(to_carol.hex(), "pending")]
        assert alice._db.outbox_devices(), "Carol's message left the outbox"


async def test_ping_answers_over_a_live_connection_and_fails_without_one() -> None:
    async with raw_peer(os.urandom(32)) as a, raw_peer(os.urandom(32)) as b:
        with pytest.raises(TransportError, match="no connection"):
            await a.ping(b.peer_id, timeout=WAIT)
        await a.connect(b.peer_id, b.listen_addrs(), timeout=WAIT)
        with trio.fail_after(WAIT):
            for _ in range(3):
                await a.ping(b.peer_id, timeout=WAIT)
                await b.ping(a.peer_id, timeout=WAIT)


# --- acceptance: real processes in network namespaces ---------------------------------------------

#: Seconds the direct link stays cut (see the module docstring for why not 60).
CUT_S = float(os.environ.get("LIVENESS_CUT_S", "20"))
#: The issue's bound: messages sent during the cut reach the receiver (frozen: the relay) within
#: this many seconds.
FALLBACK_BOUND_S = 15.0
MESSAGES = 300
WAVES = 20  # `pigeon send --stdin` runs, a process each


@pytest.fixture
def triangle() -> Iterator[TriangleLab]:
    with TriangleLab() as lab:
        yield lab


class Arrivals:
    """When each text reached Bob (his MessageReceived events, stamped as they are read)."""

    def __init__(self, daemon: Daemon) -> None:
        self.at: dict[str, float] = {}
        self.order: list[str] = []
        self._lock = threading.Lock()
        self._daemon = daemon
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while self._daemon.process.poll() is None or not self._daemon.events.empty():
            try:
                event = self._daemon.events.get(timeout=0.2)
            except Exception:
                continue
            if event.get("type") == "MessageReceived":
                with self._lock:
                    self.order.append(event["text"])
                    self.at.setdefault(event["text"], time.monotonic())

    def count(self) -> int:
        with self._lock:
            return len(self.order)


def _relay_deposits(relay_dir: Path) -> int:
    return int(relay_status(relay_dir)["deposits"])


def _run_stream(tmp_path: Path, lab: TriangleLab, *, freeze: bool) -> None:
    """Alice streams MESSAGES to Bob in WAVES; the link is cut (or Bob frozen) for CUT_S in the
    middle. Asserts the fallback bound and exactly-once, in-order delivery after the heal."""
    relay = RelayProcess(tmp_path / "relay", *(a for s in ("a", "b") for a in (
        "--listen", f"/ip4/{lab.hub_ip[s]}/tcp/0")), netns=lab.ns["hub"])
    daemons: list[Daemon] = []
    try:
        # The relay starts while the two data directories are made (each a process of its own).
        inits = [subprocess.Popen([sys.executable, "-m", "node", "--data-dir",
                                   str(tmp_path / name), "init", "--name", name.capitalize()],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for name in ("alice", "bob")]
        for init in inits:
            _, err = init.communicate(timeout=COMMAND_TIMEOUT_S)
            assert init.returncode == 0, err
        relay.wait_ready()
        relay_for = {s: next(a for a in relay.addresses if lab.hub_ip[s] in a) for s in "ab"}
        for name in ("alice", "bob"):
            # The product's liveness timers as they ship; only retries are quick (clitools).
            (tmp_path / name / "config.toml").write_text(FAST_RETRIES_TOML)
        if not freeze:
            # No circuit reservations: with the link cut, only Bob's mailbox can carry Alice's
            # messages, so the test sees the dead path noticed and the deposits made (a circuit
            # either way, Alice to Bob's reservation or Bob to Alice's when he answers her,
            # would carry them without any deadline firing).
            for name in ("alice", "bob"):
                (tmp_path / name / "config.toml").write_text(
                    FAST_RETRIES_TOML + "relay_reservations = false\n")
        bob = Daemon(tmp_path / "bob", "--listen", f"/ip4/{lab.ns_ip['b']}/tcp/0",
                     "--listen", f"/ip4/{lab.direct_ip['b']}/tcp/0", "--relay", relay_for["b"],
                     netns=lab.ns["b"], wait=False)
        daemons.append(bob)
        alice = Daemon(tmp_path / "alice", "--listen", f"/ip4/{lab.ns_ip['a']}/tcp/0",
                       "--listen", f"/ip4/{lab.direct_ip['a']}/tcp/0", "--relay", relay_for["a"],
                       netns=lab.ns["a"], wait=False)
        daemons.append(alice)
        for daemon in daemons:
            daemon.wait_listening()
        invite = pigeon_json(tmp_path / "bob", "invite")["invite"]
        pigeon(tmp_path / "alice", "contact", "add", "bob", invite)
        assert bob.next_event("ContactAdded", timeout=WAIT)["contact"] == "Alice"
        arrivals = Arrivals(bob)
        per_wave = MESSAGES // WAVES
        texts = [f"m{i:03d}" for i in range(MESSAGES)]
        # The cut starts after the first quarter of the waves and lasts CUT_S, with a wave every
        # `gap` seconds; before and after it, the waves follow each other at once.
        gap = CUT_S / (WAVES // 2)
        cut_wave, heal_wave = WAVES // 4, WAVES // 4 + WAVES // 2
        sent_at: dict[str, float] = {}
        cut_at = heal_at = 0.0
        start = due = time.monotonic()
        for wave in range(WAVES):
            if wave == cut_wave:
                before = pigeon_json(tmp_path / "alice", "status")["contacts"][0]
                assert before["path"] == "direct", before
                cut_at = due = time.monotonic()
                if freeze:
                    os.kill(bob.process.pid, signal.SIGSTOP)
                else:
                    lab.cut()
            if wave == heal_wave:
                if not freeze:
                    # Bob is reached through his mailbox, never over the cut link, and status
                    # says why.
                    during_cut = pigeon_json(tmp_path / "alice", "status")["contacts"][0]
                    assert during_cut["path"] is None and during_cut["path_down"], during_cut
                    print(f"status during the cut: {during_cut['path_down']}")
                heal_at = time.monotonic()
                if freeze:
                    os.kill(bob.process.pid, signal.SIGCONT)
                else:
                    lab.heal()
            batch = texts[wave * per_wave:(wave + 1) * per_wave]
            # Stamped before the command starts: the earliest the daemon can have queued them,
            # so a latency measured from here is never flattered by the command's own run time.
            queued = time.monotonic()
            # `--wait 0`: the command returns once the daemon queued the batch, so the waves
            # keep their pace however slowly the messages go.
            pigeon(tmp_path / "alice", "send", "bob", "--stdin", "--wait", "0",
                   stdin="\n".join(batch) + "\n")
            now = time.monotonic()
            sent_at.update((t, queued) for t in batch)
            if freeze and wave == heal_wave - 1:
                # Bob cannot receive while frozen: the relay must hold what Alice sent in the
                # first part of the freeze within the bound.
                early = [t for t in texts[cut_wave * per_wave:heal_wave * per_wave]
                         if sent_at.get(t, now) <= now - FALLBACK_BOUND_S]
                if early:
                    assert _relay_deposits(tmp_path / "relay") >= len(early)
            if cut_wave <= wave < heal_wave:
                # The pace of the cut (real time: the daemons' timers run in their processes).
                due += gap
                time.sleep(max(0.0, due - time.monotonic()))
        during = texts[cut_wave * per_wave:heal_wave * per_wave]
        if not freeze:
            late = {t: round(arrivals.at[t] - sent_at[t], 1) if t in arrivals.at else None
                    for t in during
                    if t not in arrivals.at or arrivals.at[t] - sent_at[t] > FALLBACK_BOUND_S}
            # every message sent during the cut reached Bob through the relay within the bound
            assert not late, f"cut at {cut_at - start:.1f} s, heal at {heal_at - start:.1f} s: {late}"
            assert _relay_deposits(tmp_path / "relay") >= len(during)
            worst = max(arrivals.at[t] - sent_at[t] for t in during)
            print(f"cut {CUT_S:g} s: slowest message sent during the cut arrived after {worst:.1f} s")
        wait_until(lambda: arrivals.count() >= MESSAGES, timeout=120,
                   what=f"all {MESSAGES} messages at Bob")

        # A path again (direct, or a circuit through the relay until it is upgraded), status
        # says nothing is wrong any more, and nothing is left to arrive: Alice has nothing to
        # write or resend, and the relay holds no copy for Bob to fetch. Only then is the
        # order final (a duplicate, from a resend or a relay copy, would be in it).
        def settled() -> bool:
            status = pigeon_json(tmp_path / "alice", "status")["contacts"][0]
            return bool(status["path"] in ("direct", "relayed") and status["path_down"] is None
                        and status["last_error"] is None
                        and status["pending"] == status["sent"] == status["relayed"] == 0
                        and relay_status(tmp_path / "relay")["messages"] == 0)

        wait_until(settled, timeout=60, what="Alice's status to show the path back, no errors, "
                   "nothing left to send or fetch")
        assert arrivals.order == texts, "exactly once, in order"
    finally:
        for daemon in daemons:
            if daemon.process.poll() is None:
                os.kill(daemon.process.pid, signal.SIGCONT)
        stop_all(daemons)
        relay.kill()


@pytest.mark.slow(seconds=22)
@pytest.mark.skipif(not CAN_MAKE_NAMESPACES,
                    reason="building network namespaces needs root and iproute2")
def test_a_cut_link_falls_back_to_the_relay_and_heals_exactly_once(
        tmp_path: Path, triangle: TriangleLab) -> None:
    _run_stream(tmp_path, triangle, freeze=False)


@pytest.mark.slow(seconds=22)
@pytest.mark.skipif(not CAN_MAKE_NAMESPACES,
                    reason="building network namespaces needs root and iproute2")
def test_a_frozen_receiver_gets_everything_exactly_once_after_it_thaws(
        tmp_path: Path, triangle: TriangleLab) -> None:
    _run_stream(tmp_path, triangle, freeze=True)

