"""Device claims at the device level (PROTOCOL.md section 4 "Binding", section 14): an invite
that names someone else's device key is refused with a clear reason, and a victim who met a
claim first can still add the real owner, whose device and connections are then the owner's.

Real nodes on 127.0.0.1, real SQLite files, real crypto; the claimer needs no node, only keys
and the victim's public peer id.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest
import trio

from node import ContactAdded, ContactError, ContactOnline, InviteError, Node
from node.protocol.binding import sign_binding, verify_binding
from node.protocol.directory import account_key, device_key
from node.protocol.invite import Invite
from node.protocol.keys import DeviceKey, DeviceKeyPair, IdentityKey, IdentityKeyPair
from node.protocol.prekeys import PreKeyStore
from node.protocol.records import MAX_SEQ, sign_record
from node.testing import Party
from tests.conftest import WAIT, config, next_event, open_node, wait_registered
from tests.test_dht import hijack, network
from tests.test_dht_contacts import WAIT as DHT_WAIT
from tests.test_dht_contacts import _published
from tests.test_relay_delivery import relay


def claim_invite(claimed: DeviceKey, addrs: list[str], *, bind: str = "own") -> str:
    """A long invite of a fresh account (the claimer's) naming the device key `claimed`, with the
    claimer's own prekeys. `bind`: "own" (the claimer's own device's binding), "none", or
    "theirs" (a binding of another device to another account, copied)."""
    now = int(time.time())
    identity, device = IdentityKeyPair.generate(), DeviceKeyPair.generate()
    bundle = PreKeyStore.create(now=now, one_time=0).bundle(
        identity, device, seq=now, expires=now + 3600, one_time=False).body()
    bundle["dev"] = claimed.to_bytes()
    if bind == "none":
        del bundle["bind"]
    elif bind == "theirs":
        other = IdentityKeyPair.generate()
        bundle["bind"] = PreKeyStore.create(now=now, one_time=0).bundle(
            other, DeviceKeyPair.generate(), seq=now, expires=now + 3600,
            one_time=False).binding
    record = sign_record(identity, {
        "kind": "invite", "seq": now, "exp": now + 3600, "name": "bob",
        "dev": claimed.to_bytes(), "addrs": [a.rsplit("/p2p/", 1)[0] for a in addrs],
        "relays": [], "bundle": sign_record(identity, bundle), "token": os.urandom(16)})
    return "pigeon:" + base64.urlsafe_b64encode(record).decode("ascii").rstrip("=")


async def test_an_invite_claiming_someone_elses_device_is_refused_and_the_owner_added(
        tmp_path: Path) -> None:
    async with open_node(tmp_path / "alice", "alice") as alice, \
            open_node(tmp_path / "bob", "bob") as bob:
        bob_device = DeviceKey.from_peer_id(bob.peer_id)
        for bind in ("own", "none", "theirs"):
            forged = claim_invite(bob_device, bob.addresses(), bind=bind)
            try:
                alice.add_contact("claimer", forged)
            except InviteError as exc:
                assert "not genuine" in str(exc) and "bind" in str(exc), (bind, str(exc))
            else:
                raise AssertionError(f"a claim with binding {bind!r} was accepted")
            # add_contact_from_invite takes the same path for a long invite.
            try:
                await alice.add_contact_from_invite("claimer", forged)
            except InviteError:
                pass
            else:
                raise AssertionError("a claim was accepted by add_contact_from_invite")
        assert alice.contacts() == []

        # The real owner is added, and the conversation works.
        info = alice.add_contact("bob", bob.invite())
        assert info.peer_ids == (bob.peer_id,)
        with trio.fail_after(WAIT):
            message_id = await alice.send("bob", "hello, the real you")
            assert await alice.wait_delivered(message_id, timeout=WAIT) == "delivered"


async def test_a_device_a_claimer_holds_from_before_bindings_goes_to_its_proven_owner(
        tmp_path: Path) -> None:
    """A data dir written before bindings may hold a claimer's contact with the victim's device
    (nothing proved it then). Adding the real owner moves the device to them: the owner's
    connections are attributed to the owner, and messages reach them."""
    async with open_node(tmp_path / "alice", "alice") as alice, \
            open_node(tmp_path / "bob", "bob") as bob:
        bob_key = DeviceKey.from_peer_id(bob.peer_id).to_bytes()
        db = alice._db  # the state an old version left behind: no binding on record
        with db.transaction():
            claimer = db.add_contact("claimer", IdentityKeyPair.generate().public.to_bytes(),
                                     now_ms=1)
            db.put_device(claimer.id, bob_key, bob.peer_id, ["/ip4/127.0.0.1/tcp/9"],
                          seen_at_ms=0, now_ms=1)
        assert alice.contact("claimer").peer_ids == (bob.peer_id,)

        with alice.events() as events:
            info = alice.add_contact("bob", bob.invite())
            assert info.peer_ids == (bob.peer_id,)
            assert alice.contact("claimer").peer_ids == ()
            with trio.fail_after(WAIT):
                message_id = await alice.send("bob", "hello")
                assert await alice.wait_delivered(message_id, timeout=WAIT) == "delivered"
                online = await next_event(events, ContactOnline)
        assert online.contact == "bob" and online.peer_id == bob.peer_id


async def test_a_device_proven_for_one_contact_is_not_given_to_another(tmp_path: Path) -> None:
    """A device key that bound itself to two accounts (its holder's choice) stays with the
    contact it was first proven for: the second add is refused, the first keeps working."""
    async with open_node(tmp_path / "alice", "alice") as alice, \
            open_node(tmp_path / "bob", "bob") as bob:
        alice.add_contact("bob", bob.invite())
        now = int(time.time())
        second = IdentityKeyPair.generate()
        bundle = PreKeyStore.create(now=now, one_time=0).bundle(
            second, bob._device, seq=now, expires=now + 3600, one_time=False)
        invite = Invite(identity=second.public, device=bundle.device, name="bob2", addrs=(),
                        relays=(), bundle=bundle, token=os.urandom(16), seq=now,
                        expires=now + 3600).to_text(second)
        try:
            alice.add_contact("bob2", invite)
        except ContactError as exc:
            assert "belongs to your contact 'bob'" in str(exc)
        else:
            raise AssertionError("a proven device was given to a second contact")
        assert [c.name for c in alice.contacts()] == ["bob"]
        assert alice.contact("bob").peer_ids == (bob.peer_id,)
        with trio.fail_after(WAIT):
            message_id = await alice.send("bob", "still you")
            assert await alice.wait_delivered(message_id, timeout=WAIT) == "delivered"


@pytest.mark.slow(seconds=4)
async def test_dht_hijack_of_a_device_gains_nothing_and_the_owner_is_found(tmp_path: Path) -> None:
    """The attack rerun through the DHT: Mallory, running a DHT server that stores anything,
    sends every server a device record for Bob's device signed by her identity key with seq
    2**63-1, and an account record listing Bob's device for her account. Every honest server
    refuses both; Alice still finds and reaches Bob by his account id, and finds nothing for
    Mallory's."""
    mallory = Party.create("mallory")
    async with network(9, rogues=[8]) as servers:
        honest, rogue = servers[:8], servers[8]
        boot = (servers[0].transport.listen_addrs()[0],)
        async with Node.open(tmp_path / "bob", config("Bob", bootstrap=boot), create=True) as bob:
            await _published(bob)
            bob_device = DeviceKey.from_peer_id(bob.peer_id)
            bob_ik = IdentityKey.from_account_id(bob.account_id)
            forged = hijack(mallory, bob_device, seq=MAX_SEQ)
            claim = sign_record(mallory.identity, {
                "kind": "account", "seq": MAX_SEQ // 2**20, "exp": int(time.time()) + 3600,
                "devices": [bob_device.to_bytes()],
                "binds": [sign_binding(mallory.device, mallory.identity.public)]})
            puts = [(device_key(bob_ik, bob_device), forged),
                    (device_key(mallory.identity.public, bob_device), forged),
                    (account_key(mallory.identity.public), claim)]
            with trio.fail_after(WAIT):
                for key, value in puts:
                    for server in honest:
                        assert not await rogue.dht.put_at(server.peer_id, key, value)
                    await rogue.dht.put(key, value)
            async with Node.open(tmp_path / "alice", config("Alice", bootstrap=boot),
                                 create=True) as alice:
                await _published(alice)
                with trio.fail_after(DHT_WAIT):
                    # By account id, both sides add each other (PROTOCOL.md section 14).
                    await bob.add_contact_by_id("alice", alice.account_id)
                    added = await alice.add_contact_by_id("bob", bob.account_id)
                assert added.peer_ids == (bob.peer_id,)
                with trio.fail_after(DHT_WAIT):
                    message_id = await alice.send("bob", "found the real you")
                    assert await alice.wait_delivered(message_id, timeout=DHT_WAIT) == \
                        "delivered"
                with trio.fail_after(DHT_WAIT):
                    try:
                        await alice.add_contact_by_id("mallory",
                                                      mallory.identity.public.account_id())
                    except ContactError as exc:
                        assert "not found" in str(exc)
                    else:
                        raise AssertionError("Mallory's claim of Bob's device was used")
                assert [c.name for c in alice.contacts()] == ["bob"]



@pytest.mark.slow(seconds=1)
async def test_an_intro_through_the_mailbox_carries_the_devices_binding(tmp_path: Path) -> None:
    """Alice adds Bob from his invite while he is offline: her intro waits, sealed, at his relay.
    Out of the mailbox its device is only claimed, so Bob accepts it because it carries her
    device's binding (PROTOCOL.md sections 11 and 14), and stores her device as proven."""
    async with relay(tmp_path / "relay") as service:
        relays = (service.addresses()[0],)
        async with open_node(tmp_path / "bob", "bob", relays=relays) as bob:
            invite = bob.invite(addresses=False)
            await wait_registered(bob)  # the invite's capability at his relay (section 21)
        async with open_node(tmp_path / "alice", "alice") as alice:
            alice.add_contact("bob", invite)
            (intro,) = alice._db.outbox_devices()
            with trio.fail_after(WAIT * 2):
                while service.relay.status()["messages"] < 1:
                    await trio.sleep(0.05)
            alice_device = DeviceKey.from_peer_id(alice.peer_id)
            alice_ik = IdentityKey.from_account_id(alice.account_id)
        assert intro == DeviceKey.from_peer_id(bob.peer_id).to_bytes()
        async with open_node(tmp_path / "bob", "bob", relays=relays) as bob:
            with bob.events() as events, trio.fail_after(WAIT * 2):
                while not bob.contacts():
                    await next_event(events, ContactAdded)
            (contact,) = bob.contacts()
            assert contact.account_id == alice.account_id
            assert contact.peer_ids == (alice.peer_id,)
            binding = bob._db.device_binding(alice_device.to_bytes())
        assert binding is not None
        verify_binding(alice_device, alice_ik, binding)
