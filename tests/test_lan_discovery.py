"""LAN discovery through the real command: three `pigeon run` processes with mDNS pinned to
127.0.0.1 and no addresses exchanged (invites without addresses) find the ones that are contacts
and deliver; the one that is nobody's contact is announced on the LAN but never dialed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from node.net.mdns import MdnsDiscovery
from tests.clitools import Daemon, pigeon, pigeon_json

PINNED = ("--mdns-interface", "127.0.0.1")


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


async def _announced(peer_ids: set[str], timeout: float) -> set[str]:
    """Peer ids heard on 127.0.0.1 by a browse-only mDNS listener within `timeout`."""
    heard: set[str] = set()
    async with MdnsDiscovery.open("12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X", [],
                                  interfaces=["127.0.0.1"], announce=False) as mdns:
        with trio.move_on_after(timeout):
            async for peer in mdns.found():
                heard.add(peer.peer_id)
                if peer_ids <= heard:
                    break
    return heard


@pytest.mark.slow(seconds=2)
async def test_three_daemons_find_their_contacts_on_the_lan(tmp_path: Path,
                                                            daemons: list[Daemon]) -> None:
    dirs = {name: tmp_path / name for name in ("alice", "bob", "carol")}
    for name, data_dir in dirs.items():
        pigeon(data_dir, "init", "--name", name.capitalize())
    alice = Daemon(dirs["alice"], *PINNED)
    daemons.append(alice)
    invite = pigeon_json(dirs["alice"], "invite", "--no-addresses")["invite"]
    # Bob adds Alice knowing no address of hers: his intro can only go out once mDNS finds her.
    pigeon(dirs["bob"], "contact", "add", "alice", invite)
    bob = Daemon(dirs["bob"], *PINNED)
    carol = Daemon(dirs["carol"], *PINNED)
    daemons += [bob, carol]
    assert alice.next_event("ContactAdded", timeout=15)["contact"] == "Bob"

    started = time.monotonic()
    sent = pigeon_json(dirs["bob"], "send", "alice", "found you on the LAN", "--wait", "10")
    assert sent["state"] == "delivered"
    assert alice.next_event("MessageReceived", timeout=10)["text"] == "found you on the LAN"
    assert time.monotonic() - started < 10

    # Carol is on the LAN (heard by a listener of our own), yet nobody dialed her.
    carol_id = carol.hello["peer_id"]
    assert carol_id in await _announced({carol_id}, timeout=10)
    assert pigeon_json(dirs["carol"], "status")["connected_peers"] == 0
    alice_peers = {c["name"] for c in pigeon_json(dirs["alice"], "contact", "list")}
    assert alice_peers == {"Bob"}
