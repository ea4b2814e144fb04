"""NAT traversal: a device that nobody can dial directly is reached through its circuit relay v2
reservation.

The real test builds its own network namespaces (as root): Alice in one, Bob in another, the
relay in between on the host, and no route between Alice and Bob (the host does not forward), so
Bob is as unreachable as behind a NAT. Nothing leaves the namespaces and links the test creates.
A second test runs anywhere (no root): Alice knows only Bob's relayed address.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from node import MessageReceived
from node.relay.config import RelayConfig
from node.relay.service import open_relay
from tests.clitools import Daemon, pigeon, pigeon_json, wait_until
from tests.conftest import LOOPBACK, WAIT, befriend, next_event, open_node
from tests.relaytools import RelayProcess

CAN_MAKE_NAMESPACES = os.geteuid() == 0 and shutil.which("ip") is not None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Lab:
    """Two namespaces, each linked by a veth pair to the host; no forwarding between them."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = {"a": f"pgn-a-{tag}", "b": f"pgn-b-{tag}"}
        self.links = {"a": f"pga{tag}", "b": f"pgb{tag}"}
        self.host_ip = {"a": "10.197.1.1", "b": "10.197.2.1"}
        self.ns_ip = {"a": "10.197.1.2", "b": "10.197.2.2"}

    def __enter__(self) -> Lab:
        for side in ("a", "b"):
            ns, link = self.ns[side], self.links[side]
            _ip("netns", "add", ns)
            _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}x")
            _ip("link", "set", f"{link}x", "netns", ns)
            _ip("addr", "add", f"{self.host_ip[side]}/24", "dev", link)
            _ip("link", "set", link, "up")
            _ip("-n", ns, "addr", "add", f"{self.ns_ip[side]}/24", "dev", f"{link}x")
            _ip("-n", ns, "link", "set", f"{link}x", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for side in ("a", "b"):
            subprocess.run(["ip", "link", "del", self.links[side]], capture_output=True)
            subprocess.run(["ip", "netns", "del", self.ns[side]], capture_output=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@pytest.mark.skipif(not CAN_MAKE_NAMESPACES,
                    reason="building network namespaces needs root and iproute2")
def test_device_behind_a_nat_is_reached_through_its_relay_reservation(
        tmp_path: Path, lab: Lab) -> None:
    # Each namespace has a route to its own link only: Bob's address is unreachable from Alice's
    # side whatever the host forwards, and the relay on the host is reachable from both. Every
    # party is a process of its own (the relay too: a blocked test thread must not stall it).
    relay = RelayProcess(tmp_path / "relay", *(a for s in ("a", "b") for a in (
        "--listen", f"/ip4/{lab.host_ip[s]}/tcp/0")))
    daemons: list[Daemon] = []
    try:
        relay.wait_ready()
        bob_side = next(a for a in relay.addresses if lab.host_ip["b"] in a)
        pigeon(tmp_path / "alice", "init", "--name", "Alice")
        pigeon(tmp_path / "bob", "init", "--name", "Bob")
        bob = Daemon(tmp_path / "bob", "--listen", f"/ip4/{lab.ns_ip['b']}/tcp/0",
                     "--relay", bob_side, prefix=("ip", "netns", "exec", lab.ns["b"]))
        daemons.append(bob)
        # Bob's invite carries his direct address (unreachable from Alice's namespace) and,
        # once his reservation is up, his relayed addresses.
        # Each poll is a `pigeon id` process (~1.2 s of CPU, most of it importing libp2p): a
        # loaded 2-core machine fits only a couple in WAIT.
        wait_until(lambda: any("/p2p-circuit" in a for a in
                               pigeon_json(tmp_path / "bob", "id")["addresses"]),
                   timeout=3 * WAIT, what="Bob's reservation")
        invite = pigeon_json(tmp_path / "bob", "invite")["invite"]
        alice = Daemon(tmp_path / "alice", "--listen", f"/ip4/{lab.ns_ip['a']}/tcp/0",
                       prefix=("ip", "netns", "exec", lab.ns["a"]))
        daemons.append(alice)
        pigeon(tmp_path / "alice", "contact", "add", "bob", invite)
        assert bob.next_event("ContactAdded", timeout=WAIT)["contact"] == "Alice"
        sent = pigeon_json(tmp_path / "alice", "send", "bob", "through the relay", "--wait", "15")
        assert sent["state"] == "delivered"
        assert bob.next_event("MessageReceived", timeout=WAIT)["text"] == "through the relay"
        status = pigeon_json(tmp_path / "alice", "status")
        assert [c["path"] for c in status["contacts"]] == ["relayed"]
        figures = json.loads(subprocess.run(
            [sys.executable, "-m", "node", "relay", "status", "--data-dir", str(tmp_path / "relay"),
             "--json"], capture_output=True, text=True, timeout=30, check=True).stdout)
        assert figures["deposits"] == 0  # the circuit carried it, not the mailbox
    finally:
        for daemon in daemons:
            daemon.stop()
        relay.kill()


async def test_only_the_relayed_address_is_enough(tmp_path: Path) -> None:
    async with open_relay(RelayConfig(data_dir=tmp_path / "relay", listen=(LOOPBACK,),
                                      log_level="WARNING")) as relay:
        relays = (relay.addresses()[0],)
        async with open_node(tmp_path / "alice", "alice") as alice, \
                open_node(tmp_path / "bob", "bob", relays=relays) as bob:
            with trio.fail_after(WAIT):
                while not any("/p2p-circuit" in a for a in bob.contact_addresses()):
                    await trio.sleep(0.05)
            await befriend(bob, alice, "bob")
            await alice._disconnect_quietly(bob.peer_id)
            # Alice forgets every direct address of Bob's: only the circuit is left to her.
            contact = alice._db.contact_by_name("bob")
            assert contact is not None
            device = alice._db.devices(contact.id)[0]
            circuit = [a for a in bob.contact_addresses() if "/p2p-circuit" in a]
            alice._db.put_device(contact.id, device.device, device.peer_id, circuit, now_ms=0)
            with bob.events() as events:
                await alice.send("bob", "via the circuit")
                with trio.fail_after(WAIT):
                    event = await next_event(events, MessageReceived)
            assert event.text == "via the circuit"
            message_id = event.message_id
            assert await alice.wait_delivered(message_id, timeout=WAIT) == "delivered"
            assert relay.relay.status()["deposits"] == 0
