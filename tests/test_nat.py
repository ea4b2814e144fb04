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
from tests.netlab import root_namespace_lock
from tests.relaytools import RelayProcess

CAN_MAKE_NAMESPACES = os.geteuid() == 0 and shutil.which("ip") is not None
CAN_NAT = CAN_MAKE_NAMESPACES and shutil.which("nft") is not None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _in(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *args], check=True, capture_output=True,
                   timeout=10)


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
    with root_namespace_lock(), Lab() as lab:
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


class NatLab:
    """An "internet" namespace with the relay in it, and for each device a router namespace
    doing source NAT (nftables masquerade) in front of a device namespace:

        da (10.202.1.2) -- ra [masquerade as 10.201.1.2] -- inet (10.201.1.1 | 10.201.2.1)
        db (10.202.2.2) -- rb [masquerade as 10.201.2.2] --/

    The internet forwards between the routers' public addresses; nothing routes to the private
    ones, so a device is reachable only through a NAT mapping it opened itself. Linux
    masquerade keeps the source port when it can (an endpoint-independent mapping), and the
    router drops unsolicited packets (address- and port-dependent filtering). Every address
    lives in namespaces this lab creates and deletes."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:5]
        self.ns = {n: f"pgn{n}-{tag}" for n in ("inet", "ra", "rb", "da", "db")}
        self.tag = tag
        self.public = {"a": "10.201.1.2", "b": "10.201.2.2"}
        self.inet_ip = {"a": "10.201.1.1", "b": "10.201.2.1"}
        self.private = {"a": "10.202.1.2", "b": "10.202.2.2"}
        self.gateway = {"a": "10.202.1.1", "b": "10.202.2.1"}

    def _link(self, left: str, left_ip: str, right: str, right_ip: str, name: str) -> None:
        a, b = f"{name}l{self.tag}", f"{name}r{self.tag}"
        _ip("link", "add", a, "netns", self.ns[left], "type", "veth", "peer", "name", b,
            "netns", self.ns[right])
        _ip("-n", self.ns[left], "addr", "add", f"{left_ip}/24", "dev", a)
        _ip("-n", self.ns[right], "addr", "add", f"{right_ip}/24", "dev", b)
        _ip("-n", self.ns[left], "link", "set", a, "up")
        _ip("-n", self.ns[right], "link", "set", b, "up")

    def __enter__(self) -> NatLab:
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _in(self.ns["inet"], "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for side in ("a", "b"):
            router, device = self.ns[f"r{side}"], f"d{side}"
            self._link("inet", self.inet_ip[side], f"r{side}", self.public[side], f"p{side}")
            self._link(f"r{side}", self.gateway[side], device, self.private[side], f"q{side}")
            _ip("-n", router, "route", "add", "default", "via", self.inet_ip[side])
            _ip("-n", self.ns[device], "route", "add", "default", "via", self.gateway[side])
            _in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            public_if = f"p{side}r{self.tag}"
            _in(router, "nft", f"add table ip nat; add chain ip nat post {{ type nat hook "
                f"postrouting priority 100 ; }}; add rule ip nat post oifname {public_if} "
                "masquerade")
            # Like a home router, drop what arrives unasked instead of answering it with a
            # reset from the router's own stack: a hole-punch SYN that comes before ours must
            # not kill the attempt.
            _in(router, "nft", "add table ip filter; add chain ip filter input { type filter "
                "hook input priority 0 ; policy accept ; }; add rule ip filter input iifname "
                f"{public_if} ct state established,related accept; add rule ip filter input "
                f"iifname {public_if} drop")
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.ns.values():  # deleting a namespace deletes its links
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def prefix(self, ns: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns[ns])


@pytest.mark.skipif(not CAN_NAT, reason="source NAT namespaces need root, iproute2 and nftables "
                                        "(apt-get install nftables)")
@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_devices_behind_source_nats_meet_through_the_relay_and_go_direct(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str) -> None:
    listen = {"tcp": "tcp/0", "quic": "udp/0/quic-v1"}[transport]
    with NatLab() as lab:
        # The relay runs in the internet namespace (RelayProcess starts `sys.executable`).
        wrapper = tmp_path / "python-in-inet"
        wrapper.write_text(f"#!/bin/sh\nexec {' '.join(lab.prefix('inet'))} {sys.executable} "
                           '"$@"\n')
        wrapper.chmod(0o755)
        with monkeypatch.context() as patch:
            patch.setattr(sys, "executable", str(wrapper))
            relay = RelayProcess(tmp_path / "relay", *(a for s in ("a", "b") for a in (
                "--listen", f"/ip4/{lab.inet_ip[s]}/{listen}")))
        daemons: list[Daemon] = []
        try:
            relay.wait_ready()
            side = {s: next(a for a in relay.addresses if lab.inet_ip[s] in a) for s in "ab"}
            pigeon(tmp_path / "alice", "init", "--name", "Alice")
            pigeon(tmp_path / "bob", "init", "--name", "Bob")
            bob = Daemon(tmp_path / "bob", "--listen", f"/ip4/{lab.private['b']}/{listen}",
                         "--relay", side["b"], prefix=lab.prefix("db"))
            daemons.append(bob)
            wait_until(lambda: any("/p2p-circuit" in a for a in
                                   pigeon_json(tmp_path / "bob", "id")["addresses"]),
                       timeout=3 * WAIT, what="Bob's reservation")
            invite = pigeon_json(tmp_path / "bob", "invite")["invite"]
            alice = Daemon(tmp_path / "alice", "--listen", f"/ip4/{lab.private['a']}/{listen}",
                           "--relay", side["a"], prefix=lab.prefix("da"))
            daemons.append(alice)
            pigeon(tmp_path / "alice", "contact", "add", "bob", invite)
            assert bob.next_event("ContactAdded", timeout=WAIT)["contact"] == "Alice"
            sent = pigeon_json(tmp_path / "alice", "send", "bob", "hello", "--wait", "15")
            assert sent["state"] == "delivered"

            def path() -> str | None:
                contacts = pigeon_json(tmp_path / "alice", "status")["contacts"]
                return contacts[0]["path"] if contacts else None

            # Bob's private address is unreachable; the relay brought them together, and the
            # hole punch (DCUtR) through both NATs makes the connection direct.
            try:
                # TCP goes direct ~0.5 s after the relayed dial; QUIC cannot yet (below), so
                # it is not given the long wait a loaded machine may need for TCP.
                wait_until(lambda: path() == "direct",
                           timeout=6 * WAIT if transport == "tcp" else WAIT, interval=1.0,
                           what="a direct path through both NATs")
            except AssertionError:
                if transport == "quic":
                    pytest.xfail("py-libp2p 0.8.1 dials QUIC from a fresh UDP socket, not the "
                                 "listener's, so no hole punch reaches the mapped listen port "
                                 "(docs/libp2p.md L54)")
                raise
            pigeon_json(tmp_path / "alice", "send", "bob", "direct now", "--wait", "15")
            bob.wait_received(2, timeout=WAIT)
        finally:
            for daemon in daemons:
                daemon.stop()
            relay.kill()
