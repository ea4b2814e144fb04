"""Contacts by account id alone, through a 30-node DHT: a new node that knows one bootstrap
address and a contact's account id resolves the contact, connects and delivers; after the contact
restarts on new ports, the next message still arrives (the sender looks the device up again)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node import MessageReceived, Node
from tests.conftest import config, next_event
from tests.test_dht import network

pytestmark = pytest.mark.slow

SERVERS = 28  # plus the two nodes: a network of 30
WAIT = 30.0


async def _published(node: Node) -> None:
    """Until the node's records are in the DHT (its first publish ran)."""
    with trio.fail_after(WAIT):
        while node._directory is None or node._directory.published is None:
            await trio.sleep(0.05)


@pytest.mark.slow(seconds=21)
async def test_contact_by_account_id_and_re_resolution_in_a_30_node_dht(tmp_path: Path) -> None:
    async with network(SERVERS) as servers:
        boot = (servers[0].transport.listen_addrs()[0],)
        alice_config = config("Alice", bootstrap=boot)
        bob_config = config("Bob", bootstrap=boot)
        async with Node.open(tmp_path / "bob", bob_config, create=True) as bob:
            await _published(bob)
            async with Node.open(tmp_path / "alice", alice_config, create=True) as alice:
                await _published(alice)
                # Each knows only the other's account id (and the one bootstrap address).
                await bob.add_contact_by_id("alice", alice.account_id)
                added = await alice.add_contact_by_id("bob", bob.account_id)
                assert added.peer_ids == (bob.peer_id,)
                assert set(added.addrs) == set(bob.contact_addresses())
                with bob.events() as events:
                    await alice.send("bob", "found you by your account id")
                    with trio.fail_after(WAIT):
                        event = await next_event(events, MessageReceived)
                assert event.text == "found you by your account id"
                assert event.contact == "alice"
                old_addrs = set(alice.contact("bob").addrs)

                # Bob restarts on new ports (other listen addresses than before) and must not
                # reach Alice first: only a fresh lookup can tell her where he is now.
                await alice._disconnect_quietly(bob.peer_id)
        dead = ["/ip4/127.0.0.1/tcp/9"]
        moved = bob_config.replace(listen=("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/ws"))
        async with Node.open(tmp_path / "bob", moved) as bob:
            contact = bob._db.contact_by_name("alice")
            assert contact is not None
            device = bob._db.devices(contact.id)[0]
            bob._db.put_device(contact.id, device.device, device.peer_id, dead,
                               seen_at_ms=device.seen_at_ms, now_ms=0)
            await _published(bob)
            new_addrs = set(bob.contact_addresses())
            assert new_addrs.isdisjoint(old_addrs)
            async with Node.open(tmp_path / "alice", alice_config) as alice:
                with bob.events() as events:
                    await alice.send("bob", "you moved, I found you again")
                    with trio.fail_after(WAIT):
                        event = await next_event(events, MessageReceived)
                assert event.text == "you moved, I found you again"
                assert set(alice.contact("bob").addrs) == new_addrs
