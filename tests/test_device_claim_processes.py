"""The device-claim attack rerun with real `pigeon` processes (PROTOCOL.md section 4 "Binding",
section 14): a claimer's invite naming Bob's device is refused by Carol's daemon with a clear
reason; Carol then adds the real Bob, whose daemon keeps serving its genuine contact Alice too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.protocol.keys import DeviceKey
from tests.clitools import Daemon, pigeon, pigeon_json
from tests.test_device_binding import claim_invite

pytestmark = pytest.mark.slow


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[dict[str, Daemon]]:
    running: dict[str, Daemon] = {}
    try:
        for name in ("Alice", "Bob", "Carol"):
            pigeon(tmp_path / name.lower(), "init", "--name", name)
            running[name] = Daemon(tmp_path / name.lower())
        yield running
    finally:
        for daemon in running.values():
            daemon.stop()


def test_an_invite_claiming_bobs_device_gains_nothing(daemons: dict[str, Daemon]) -> None:
    alice, bob, carol = daemons["Alice"], daemons["Bob"], daemons["Carol"]
    # Bob's genuine contact, before the attack.
    pigeon_json(alice.data_dir, "contact", "add", "bob", pigeon_json(bob.data_dir, "invite")["invite"])
    assert bob.next_event("ContactAdded", timeout=30)["contact"] == "Alice"

    # The claimer knows Bob's peer id and addresses (anyone who ever connected to him does).
    forged = claim_invite(DeviceKey.from_peer_id(bob.hello["peer_id"]), bob.hello["addresses"])
    refused = pigeon(carol.data_dir, "contact", "add", "bob", forged, "--json", check=False)
    assert refused.returncode != 0
    error = json.loads(refused.stdout)
    assert "not genuine" in json.dumps(error) and "bind" in json.dumps(error)
    assert pigeon_json(carol.data_dir, "contact", "list") == []

    # The real Bob is added, and both his contacts reach him.
    added = pigeon_json(carol.data_dir, "contact", "add", "bob",
                        pigeon_json(bob.data_dir, "invite")["invite"])
    assert added["peer_ids"] == [bob.hello["peer_id"]]
    assert bob.next_event("ContactAdded", timeout=30)["contact"] == "Carol"
    for sender, text in ((carol, "from carol"), (alice, "from alice")):
        sent = pigeon_json(sender.data_dir, "send", "bob", text, "--wait", "20")
        assert sent["state"] == "delivered"
    bob.wait_received(2, timeout=30)
    assert sorted(e["text"] for e in bob.received) == ["from alice", "from carol"]
