"""The public `Node` API end to end: real nodes on 127.0.0.1, real SQLite files, real crypto.

Each test states one behaviour a user or an embedding program relies on. Network waits sit
under trio.fail_after; nothing sleeps to synchronise (the one sleep waits for a wall clock
expiry, which no event announces).
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from node import (
    Config,
    ContactAdded,
    ContactError,
    ContactOffline,
    ContactOnline,
    Event,
    EventsDropped,
    InvalidMessage,
    InviteError,
    MessageDelivered,
    MessageFailed,
    MessageReceived,
    MessageSent,
    Node,
    NotRunning,
)
from node.clock import TrioClock
from node.device.config import MAX_TEXT_BYTES
from node.device.eventbus import EventBus, Subscription
from node.protocol.content import Intro, Text, encode_content
from node.protocol.invite import Invite
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.protocol.prekeys import PreKeyStore
from node.protocol.session import SessionRecord
from node.protocol.wire import Msg, Nack, encode_frame
from tests.conftest import (
    WAIT,
    befriend,
    next_event,
    open_node,
    raw_peer,
    raw_stream,
    replies,
)

# --- contacts and invites ------------------------------------------------------------------------


def _bare(addrs: Sequence[str]) -> list[str]:
    """Multiaddrs without a /p2p/<peer id> suffix (invites and intros may leave it out: they
    carry the device key anyway)."""
    return [a.split("/p2p/", 1)[0] for a in addrs]


async def test_invite_makes_both_sides_contacts(two_nodes: tuple[Node, Node]) -> None:
    alice, bob = two_nodes
    invite = alice.invite()
    assert invite.startswith("pigeon:") and "\n" not in invite
    with alice.events() as events:
        info = bob.add_contact("ally", invite)
        # the joiner's side is complete at once, from the invite alone
        assert info.name == "ally"
        assert info.account_id == alice.account_id
        assert info.peer_ids == (alice.peer_id,)
        assert _bare(info.addrs) == _bare(alice.addresses())
        with trio.fail_after(WAIT):
            added = await next_event(events, ContactAdded)
    # the inviter learns of the joiner through the introduction, named after its display name
    assert added == ContactAdded(contact="bob", account_id=bob.account_id)
    (bob_at_alice,) = alice.contacts()
    assert bob_at_alice.name == "bob"
    assert bob_at_alice.account_id == bob.account_id
    assert bob_at_alice.peer_ids == (bob.peer_id,)
    assert _bare(bob_at_alice.addrs) == _bare(bob.addresses())  # the intro carried them
    assert [c.name for c in bob.contacts()] == ["ally"]

    number = alice.safety_number("bob")
    assert number == bob.safety_number("ally")
    digits = number.replace(" ", "")
    assert len(digits) == 60 and digits.isdigit()

    # the inviter never dialled the joiner, yet can write first (addresses came in the intro)
    with trio.fail_after(WAIT):
        message_id = await alice.send("bob", "welcome")
        assert await alice.wait_delivered(message_id, timeout=WAIT) == "delivered"
    assert [e.text for e in bob.history("ally")] == ["welcome"]


@pytest.mark.slow(seconds=2)
async def test_joiners_with_clashing_or_unprintable_names_get_usable_names(
        tmp_path: Path, two_nodes: tuple[Node, Node]) -> None:
    alice, bob = two_nodes
    await befriend(alice, bob, "alice")
    long_name = "x" * 64  # MAX_NAME_CHARS
    names = {"bob2": "bob", "mallory": "\x1b[2J  mal\u200blory\n", "opt": "--data-dir=/tmp",
             "long1": long_name, "long2": long_name}
    added: dict[str, str] = {}
    for key, display_name in names.items():
        async with open_node(tmp_path / key, display_name) as joiner:
            added[key] = (await befriend(alice, joiner, "alice")).contact
            # every name the node picks is one the user can type back: re-adding the contact
            # under its name (which only refreshes it) passes the contact-name rules
            alice.add_contact(added[key], joiner.invite())
            assert alice.contact(added[key]).account_id == joiner.account_id
    assert added["bob2"] == "bob-2"  # never merged with, or renamed over, the first "bob"
    assert added["mallory"] == "[2J mallory"  # control/format characters dropped, spaces folded
    assert not added["opt"].startswith("-")  # could pass for a command-line option
    assert added["long1"] == long_name and added["long2"] != long_name
    assert alice.contact("bob").account_id == bob.account_id
    assert len(alice.contacts()) == 6


async def test_renaming_a_contact_and_a_taken_name_is_refused(
        tmp_path: Path, node_pair: tuple[Node, Node]) -> None:
    alice, bob = node_pair
    with pytest.raises(ContactError, match="contact rename"):
        bob.add_contact("al", alice.invite())  # a new name is `rename_contact`'s job
    renamed = bob.rename_contact("alice", "al")
    assert renamed.account_id == alice.account_id
    assert [c.name for c in bob.contacts()] == ["al"]
    async with open_node(tmp_path / "carol", "carol") as carol:
        with pytest.raises(ContactError, match="exists already"):
            bob.add_contact("al", carol.invite())
    assert [c.name for c in bob.contacts()] == ["al"]
    with pytest.raises(ContactError, match="not a usable contact name"):
        bob.add_contact("-rm", alice.invite())
    # still one working conversation, under the new name
    with trio.fail_after(WAIT):
        message_id = await bob.send("al", "still there?")
        assert await bob.wait_delivered(message_id, timeout=WAIT) == "delivered"


def _invite_text(*, now: int, expires: int) -> str:
    """A genuine, correctly signed invite of a fresh account, with the expiry we want."""
    identity, device = IdentityKeyPair.generate(), DeviceKeyPair.generate()
    bundle = PreKeyStore.create(now=now, one_time=0).bundle(
        identity, device, seq=now, expires=expires, one_time=False)
    invite = Invite(identity=identity.public, device=device.public, name="old",
                    addrs=("/ip4/127.0.0.1/tcp/9",), relays=(), bundle=bundle, token=os.urandom(16),
                    seq=now, expires=expires)
    return invite.to_text(identity)


def _flip_middle(text: str) -> str:
    mid = len(text) // 2
    return text[:mid] + ("B" if text[mid] == "A" else "A") + text[mid + 1:]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not an invite", "not a Pigeon invite"),
        ("empty", "not a Pigeon invite"),
        ("no body", "not genuine or is damaged"),
        ("bad base64", "damaged"),
        ("tampered", "not genuine or is damaged"),
        ("truncated", "damaged"),
        ("too long", "too long"),
        ("expired", "expired"),
        ("own", "your own invite"),
    ],
)
async def test_add_contact_refuses_bad_invites(two_nodes: tuple[Node, Node], case: str,
                                               message: str) -> None:
    alice, bob = two_nodes
    good = alice.invite()
    now = TrioClock().now_s()
    text = {
        "not an invite": "hello bob, add me!",
        "empty": "",
        "no body": "pigeon:",
        "bad base64": "pigeon:a",  # one base64 character cannot encode a byte
        "tampered": _flip_middle(good),
        "truncated": good[: len(good) // 2],
        "too long": "pigeon:" + "A" * 100_000,
        "expired": _invite_text(now=now - 3600, expires=now - 10),
        "own": bob.invite(),
    }[case]
    with pytest.raises(InviteError, match=message):
        bob.add_contact("alice", text)
    assert bob.contacts() == []
    assert bob.status().contacts == ()


async def test_invite_lifetime_follows_config(tmp_path: Path) -> None:
    async with open_node(tmp_path / "alice", "alice", invite_lifetime_s=60) as alice:
        before = TrioClock().now_s()
        invite = alice.invite()
        after = TrioClock().now_s()
    expires = Invite.from_text(invite, now=after).expires
    assert before + 60 <= expires <= after + 60
    with pytest.raises(InviteError, match="expired"):
        Invite.from_text(invite, now=expires)  # valid strictly before its expiry


async def test_invite_expiry_is_enforced_by_the_inviter(tmp_path: Path,
                                                      jump_clock: trio.testing.MockClock) -> None:
    """An invite accepted while valid, but whose introduction reaches the inviter after it
    expired, does not make anyone a contact: the inviter checks its own token's expiry."""
    alice_dir = tmp_path / "alice"
    async with open_node(alice_dir, "alice", invite_lifetime_s=60) as alice:
        invite = alice.invite()
        expires = Invite.from_text(invite, now=TrioClock().now_s()).expires
    async with open_node(tmp_path / "bob", "bob") as bob:
        bob.add_contact("alice", invite)  # alice is offline: the intro waits in bob's outbox
        message_id = await bob.send("alice", "hello?")  # queued behind the intro
        # The invite's lifetime passes (trio's clock, which the nodes' clocks read).
        jump_clock.jump(expires - TrioClock().now_s() + 1)
        with bob.events() as b_events:
            async with open_node(alice_dir, "alice", invite_lifetime_s=60) as alice:
                with alice.events() as a_events:
                    with trio.fail_after(WAIT):
                        failed = await next_event(b_events, MessageFailed)
                    assert failed.message_id == message_id
                    assert "does not know us" in failed.reason
                    assert not any(isinstance(e, ContactAdded | MessageReceived)
                                   for e in _drain(a_events))
                assert alice.contacts() == []


# --- messaging ---------------------------------------------------------------------------------


def _drain(events: Subscription) -> list[Event]:
    out = []
    while (event := events.get_nowait()) is not None:
        out.append(event)
    return out


async def _collect(events: Subscription, *, received: int, delivered: int) -> list[Event]:
    """Events until `received` MessageReceived and `delivered` MessageDelivered came in."""
    got: list[Event] = []
    counts = {MessageReceived: 0, MessageDelivered: 0}
    async for event in events:
        got.append(event)
        if type(event) in counts:
            counts[type(event)] += 1
        if counts[MessageReceived] >= received and counts[MessageDelivered] >= delivered:
            return got
    raise AssertionError("event stream ended early")


async def test_messages_both_ways_exactly_once_in_order(node_pair: tuple[Node, Node]) -> None:
    alice, bob = node_pair
    n = 300
    sent: dict[str, list[str]] = {"alice": [], "bob": []}

    async def send_all(node: Node, to: str, who: str) -> None:
        for i in range(n):
            sent[who].append(await node.send(to, f"{who} says {i}"))

    with alice.events() as a_events, bob.events() as b_events, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, alice, "bob", "alice")
            nursery.start_soon(send_all, bob, "alice", "bob")
        a_got = await _collect(a_events, received=n, delivered=n)
        b_got = await _collect(b_events, received=n, delivered=n)
        # One more round trip each way: a late duplicate of anything above would have been
        # committed (and announced) before these.
        for node, to in ((alice, "bob"), (bob, "alice")):
            last = await node.send(to, "over")
            assert await node.wait_delivered(last, timeout=WAIT) == "delivered"
            sent["alice" if node is alice else "bob"].append(last)
        a_got += _drain(a_events)
        b_got += _drain(b_events)

    for me, got, peer, mine, theirs in ((alice, a_got, "bob", sent["alice"], sent["bob"]),
                                        (bob, b_got, "alice", sent["bob"], sent["alice"])):
        received = [e for e in got if isinstance(e, MessageReceived)]
        # exactly once, and in the order they were sent (the final "over" may still be in flight)
        assert [e.message_id for e in received] == theirs[: len(received)]
        assert len(received) >= n
        assert all(e.contact == peer for e in received)
        assert [e.text for e in received[:n]] == [f"{peer} says {i}" for i in range(n)]
        delivered = [e.message_id for e in got if isinstance(e, MessageDelivered)]
        assert sorted(delivered) == sorted(mine) and len(set(delivered)) == len(mine)
        sent_events = [e.message_id for e in got if isinstance(e, MessageSent)]
        assert sorted(sent_events) == sorted(mine)  # MessageSent once per message too
        assert not any(isinstance(e, EventsDropped | MessageFailed) for e in got)

        history = me.history(peer, limit=10_000)
        outgoing = [h for h in history if h.direction == "out"]
        assert [h.message_id for h in outgoing] == mine
        assert {h.state for h in outgoing} == {"delivered"}
        incoming = [h for h in history if h.direction == "in"]
        assert [h.message_id for h in incoming] == theirs[: len(incoming)]
        assert {h.state for h in incoming} == {"received"}
        assert len(incoming) >= n
        # our own timestamps strictly increase, so the history shows our messages in send order
        assert all(a.sent_at_ms < b.sent_at_ms for a, b in itertools.pairwise(outgoing))
    assert alice.status().contacts[0].pending == 0 and alice.status().contacts[0].sent == 0


async def test_messages_to_a_stopped_recipient_arrive_once_it_restarts(tmp_path: Path) -> None:
    alice_dir = tmp_path / "alice"
    async with open_node(tmp_path / "bob", "bob") as bob:
        with bob.events() as b_events:
            async with open_node(alice_dir, "alice") as alice:
                late_invite = alice.invite()  # handed out now, used after the restart
                await befriend(alice, bob, "alice")
                addresses = alice.addresses()
                with trio.fail_after(WAIT):
                    await next_event(b_events, ContactOnline, lambda e: e.contact == "alice")
            # alice is stopped; bob notices the connection going away
            with trio.fail_after(WAIT):
                await next_event(b_events, ContactOffline, lambda e: e.contact == "alice")
            assert not bob.contact("alice").online

        ids = [await bob.send("alice", f"while you were away {i}") for i in range(25)]
        assert {bob.message_state(m) for m in ids} <= {"pending", "sent"}

        async with open_node(alice_dir, "alice") as alice:
            # subscribed before anything could arrive (no checkpoint since the node opened)
            with alice.events() as a_events:
                # same port as before: addresses in invites and in bob's contact stay valid
                assert alice.addresses() == addresses
                with trio.fail_after(WAIT):
                    for message_id in ids:
                        event = await next_event(a_events, MessageReceived)
                        assert event.message_id == message_id  # each once, in order
                    assert await bob.wait_delivered(ids[-1], timeout=WAIT) == "delivered"
                async with open_node(tmp_path / "carol", "carol") as carol:
                    # an invite issued before the restart still works (same address and token)
                    carol.add_contact("alice", late_invite)
                    with trio.fail_after(WAIT):
                        added = await next_event(a_events, ContactAdded)
                    assert added.contact == "carol"
                assert not any(isinstance(e, MessageReceived) for e in _drain(a_events))
            history = alice.history("bob", limit=1000)
            assert [h.message_id for h in history] == ids
            assert {bob.message_state(m) for m in ids} == {"delivered"}


async def test_sender_restarted_with_undelivered_messages_resumes(tmp_path: Path) -> None:
    alice_dir, bob_dir = tmp_path / "alice", tmp_path / "bob"
    async with open_node(alice_dir, "alice") as alice, open_node(bob_dir, "bob") as bob:
        await befriend(alice, bob, "alice")
    # alice (the recipient) is down; bob queues and stops before anything could go out
    async with open_node(bob_dir, "bob") as bob:
        ids = [await bob.send("alice", f"queued {i}") for i in range(30)]
    async with open_node(bob_dir, "bob") as bob, open_node(alice_dir, "alice") as alice:
        with alice.events() as a_events, trio.fail_after(WAIT):
            received = [await next_event(a_events, MessageReceived) for _ in ids]
            assert await bob.wait_delivered(ids[-1], timeout=WAIT) == "delivered"
            # and the next message after them still goes through the same session
            more = await bob.send("alice", "and one more")
            assert await bob.wait_delivered(more, timeout=WAIT) == "delivered"
        assert [e.message_id for e in received] == ids
        assert [h.message_id for h in alice.history("bob", limit=1000)] == [*ids, more]
        assert {bob.message_state(m) for m in ids} == {"delivered"}


async def test_sender_stopped_mid_delivery_resumes_without_loss_or_duplicates(
        tmp_path: Path) -> None:
    alice_dir, bob_dir = tmp_path / "alice", tmp_path / "bob"
    async with open_node(alice_dir, "alice") as alice:
        with alice.events() as a_events:
            async with open_node(bob_dir, "bob") as bob:
                await befriend(alice, bob, "alice")
                with bob.events() as b_events:
                    async with trio.open_nursery() as nursery:

                        async def send_many() -> None:
                            for i in range(400):
                                await bob.send("alice", f"burst {i}")

                        nursery.start_soon(send_many)
                        with trio.fail_after(WAIT):
                            await next_event(b_events, MessageDelivered)
                        nursery.cancel_scope.cancel()  # stop in the middle of the burst
                queued = [h for h in bob.history("alice", limit=1000) if h.direction == "out"]
            # bob is stopped with part of the burst acknowledged, part in flight, part queued
            unfinished = [h for h in queued if h.state != "delivered"]
            assert unfinished, "the stop came too late to leave anything undelivered"
            async with open_node(bob_dir, "bob") as bob:
                with trio.fail_after(WAIT):
                    last = queued[-1].message_id
                    assert await bob.wait_delivered(last, timeout=WAIT) == "delivered"
                    received = []
                    while len(received) < len(queued):
                        received.append(await next_event(a_events, MessageReceived))
                assert {bob.message_state(h.message_id) for h in queued} == {"delivered"}
    expected = [h.message_id for h in queued]
    assert [e.message_id for e in received] == expected
    assert not any(isinstance(e, MessageReceived) for e in _drain(a_events))


@pytest.mark.slow(seconds=1)
async def test_undeliverable_message_fails_with_a_reason(tmp_path: Path) -> None:
    async with open_node(tmp_path / "alice", "alice", fail_after_s=0.5) as alice:
        async with open_node(tmp_path / "bob", "bob") as bob:
            await befriend(alice, bob, "alice")
        # bob is gone for good
        with alice.events() as events:
            message_id = await alice.send("bob", "anyone there?")
            with trio.fail_after(WAIT):
                failed = await next_event(events, MessageFailed)
            assert failed.message_id == message_id and failed.contact == "bob"
            assert "not delivered within 0.5 s" in failed.reason
            assert "unreachable" in failed.reason  # the last delivery error is part of it
        (entry,) = alice.history("bob")
        assert entry.state == "failed" and entry.error == failed.reason
        assert alice.message_state(message_id) == "failed"
        (status,) = alice.status().contacts
        assert status.pending == 0 and status.sent == 0
        assert not any(isinstance(e, MessageFailed) for e in _drain(events))  # only once


# --- who may write to us -----------------------------------------------------------------------


def _first_message(sender: IdentityKeyPair, invite: Invite, content: Intro | Text) -> Msg:
    """What an uninvited device can build from someone's (public) prekey bundle."""
    record = SessionRecord()
    record.initiate(sender, invite.bundle)
    return Msg(content.id, record.encrypt(encode_content(content)).message)


@pytest.mark.parametrize("token", ["none", "forged", "someone else's"])
async def test_uninvited_device_cannot_inject_messages(tmp_path: Path,
                                                       node_pair: tuple[Node, Node],
                                                       token: str) -> None:
    """Carol has only Bob's invite, yet learned Alice's prekey bundle (invites are public-ish
    text). Without a token of Alice's own she is refused: no contact, no message shown."""
    alice, bob = node_pair
    async with open_node(tmp_path / "carol", "carol") as carol:
        await befriend(bob, carol, "bob")
        with pytest.raises(ContactError):
            await carol.send("alice", "hi")  # the API does not even know alice
        bobs_token = Invite.from_text(bob.invite(), now=TrioClock().now_s()).token

    leaked = Invite.from_text(alice.invite(), now=TrioClock().now_s())
    forged_token = {"none": None, "forged": os.urandom(16), "someone else's": bobs_token}[token]
    identity = IdentityKeyPair.generate()
    now_ms = TrioClock().now_ms()
    intro = Intro(id=os.urandom(16), sent_at_ms=now_ms, name="carol",
                  addrs=("/ip4/127.0.0.1/tcp/9",), token=forged_token)
    first = _first_message(identity, leaked, intro)
    text = _first_message(identity, leaked, Text(id=os.urandom(16), sent_at_ms=now_ms + 1,
                                                 body="buy my stuff"))
    ratchet_garbage = Msg(os.urandom(16), b"\x01" + os.urandom(200))

    with alice.events() as events:
        async with raw_peer(os.urandom(32)) as mallory:
            stream = await raw_stream(mallory, alice)
            frames = [first, text, ratchet_garbage]
            await stream.send([encode_frame(f) for f in frames])
            answers = await replies(stream, len(frames))
            await stream.aclose()
        assert answers == [Nack(f.id, "unknown-sender") for f in frames]
        # a genuine contact right after: proves the node is serving and events are flowing
        with trio.fail_after(WAIT):
            message_id = await bob.send("alice", "hello from a real contact")
            await next_event(events, MessageReceived)
        got = [e for e in _drain(events) if isinstance(e, ContactAdded | MessageReceived)]
    assert got == []
    assert [c.name for c in alice.contacts()] == ["bob"]
    assert [h.message_id for h in alice.history("bob")] == [message_id]


async def test_removed_contact_is_refused_and_can_be_added_again(
        node_pair: tuple[Node, Node]) -> None:
    alice, bob = node_pair
    with trio.fail_after(WAIT):
        for node, to in ((alice, "bob"), (bob, "alice")):
            message_id = await node.send(to, "before")
            assert await node.wait_delivered(message_id, timeout=WAIT) == "delivered"
    alice.remove_contact("bob")

    assert alice.contacts() == []
    with pytest.raises(ContactError):
        alice.history("bob")
    with pytest.raises(ContactError):
        await alice.send("bob", "x")
    with sqlite3.connect(alice.data_dir.database_file) as db:  # what is on disk
        # (the hidden row of our own account, PROTOCOL.md section 25, stays)
        assert db.execute("SELECT count(*) FROM contacts WHERE own=0").fetchone() == (0,)
        for table in ("devices", "sessions", "messages", "outbox"):
            assert db.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table

    # alice forgot bob's session: what he sends now is refused and fails on his side
    with bob.events() as b_events, alice.events() as a_events:
        message_id = await bob.send("alice", "are we still friends?")
        with trio.fail_after(WAIT):
            failed = await next_event(b_events, MessageFailed)
        assert failed.message_id == message_id and "does not know us" in failed.reason
        assert not any(isinstance(e, MessageReceived) for e in _drain(a_events))

    # and a fresh invite makes them contacts again, with a working new session
    with trio.fail_after(WAIT):
        alice.add_contact("bob", bob.invite())
        again = await alice.send("bob", "sorry, friends again")
        assert await alice.wait_delivered(again, timeout=WAIT) == "delivered"
        back = await bob.send("alice", "ok")
        assert await bob.wait_delivered(back, timeout=WAIT) == "delivered"
    assert [h.text for h in alice.history("bob")] == ["sorry, friends again", "ok"]


# --- validation and misuse ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", InvalidMessage),
        ("   \n\t", InvalidMessage),
        ("x" * (MAX_TEXT_BYTES + 1), InvalidMessage),
        ("é" * (MAX_TEXT_BYTES // 2 + 1), InvalidMessage),  # counted in UTF-8 bytes
        (None, InvalidMessage),
    ],
)
async def test_send_refuses_invalid_text(node_pair: tuple[Node, Node], text: str,
                                         error: type[Exception]) -> None:
    alice, _ = node_pair
    with pytest.raises(error):
        await alice.send("bob", text)
    assert alice.history("bob") == []


async def test_send_to_unknown_contact_is_refused(node_pair: tuple[Node, Node]) -> None:
    alice, _ = node_pair
    with pytest.raises(ContactError, match="no contact named 'carol'"):
        await alice.send("carol", "hi")
    with pytest.raises(ContactError):
        alice.history("carol")
    with pytest.raises(InvalidMessage):
        alice.message_state("00" * 16)


async def test_longest_allowed_text_is_delivered_intact(node_pair: tuple[Node, Node]) -> None:
    alice, bob = node_pair
    text = ("€" * (MAX_TEXT_BYTES // 3)).ljust(MAX_TEXT_BYTES // 3 + MAX_TEXT_BYTES % 3, "!")
    assert len(text.encode()) == MAX_TEXT_BYTES
    with trio.fail_after(WAIT):
        message_id = await alice.send("bob", text)
        assert await alice.wait_delivered(message_id, timeout=WAIT) == "delivered"
    assert bob.history("alice")[-1].text == text


async def test_using_the_node_after_its_block_raises_not_running(tmp_path: Path) -> None:
    async with open_node(tmp_path / "dave", "dave") as dave:
        invite = dave.invite()
        with dave.events() as events:
            pass
        iterator = dave.events()
    assert [e async for e in iterator] == []  # a subscription ends when the node closes
    assert events.get_nowait() is None
    calls = {
        "invite": lambda: dave.invite(),
        "add_contact": lambda: dave.add_contact("alice", invite),
        "contacts": lambda: dave.contacts(),
        "contact": lambda: dave.contact("alice"),
        "remove_contact": lambda: dave.remove_contact("alice"),
        "safety_number": lambda: dave.safety_number("alice"),
        "history": lambda: dave.history("alice"),
        "message_state": lambda: dave.message_state("00" * 16),
        "events": lambda: dave.events(),
        "status": lambda: dave.status(),
    }
    wrong: dict[str, str] = {}
    for name, call in calls.items():
        try:
            call()
        except NotRunning:
            continue
        except Exception as exc:
            wrong[name] = repr(exc)
        else:
            wrong[name] = "no error"
    assert wrong == {}
    with pytest.raises(NotRunning):
        await dave.send("alice", "hello?")
    with pytest.raises(NotRunning):
        await dave.wait_delivered("00" * 16, timeout=0.1)


async def test_body_exception_comes_out_unwrapped_and_node_closes(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="boom"):
        async with Node.open(tmp_path / "erin", Config(listen=("/ip4/127.0.0.1/tcp/0",),
                                                               mdns=False),
                             create=True) as erin:
            addresses = erin.addresses()
            raise KeyError("boom")
    port = int(addresses[0].split("/")[4])
    with trio.fail_after(WAIT), pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)  # the listener went with the node


# --- events ------------------------------------------------------------------------------------


async def test_slow_subscriber_gets_events_dropped_once_and_others_are_unaffected() -> None:
    bus = EventBus(capacity=3)
    lazy, keen = bus.subscribe(), bus.subscribe()
    published = [ContactAdded(contact=f"c{i}", account_id="x") for i in range(10)]
    for event in published:
        bus.publish(event)
        # the keen subscriber's buffer is just as small, but it reads as events come in
        assert keen.get_nowait() == event
    with trio.fail_after(1):
        assert await lazy.__anext__() == EventsDropped(count=7)
        assert [await lazy.__anext__() for _ in range(3)] == published[:3]
        # caught up: the next event comes through normally, with no second EventsDropped
        later = ContactAdded(contact="later", account_id="x")
        bus.publish(later)
        assert await lazy.__anext__() == later
    assert lazy.get_nowait() is None
    lazy.close()
    bus.publish(later)
    assert lazy.get_nowait() is None  # unsubscribed: nothing queued any more
    bus.close()
    assert [e async for e in lazy] == []


async def test_a_subscriber_that_never_reads_does_not_stall_the_node(
        node_pair: tuple[Node, Node]) -> None:
    alice, bob = node_pair
    with alice.events() as reader:
        # a small buffer for the next subscriber only (the real one holds 10,000 events);
        # the node code is untouched
        alice._bus._capacity = 5
        with alice.events() as never_read:
            ids = [await bob.send("alice", f"m{i}") for i in range(20)]
            with trio.fail_after(WAIT):
                got = [await next_event(reader, MessageReceived) for _ in ids]
                assert await bob.wait_delivered(ids[-1], timeout=WAIT) == "delivered"
            assert [e.message_id for e in got] == ids
            first = never_read.get_nowait()
            assert isinstance(first, EventsDropped) and first.count >= 15


LIBRARY_LOGGERS = ("libp2p", "quic", "aioquic", "multiaddr")


def _library_logging() -> dict[str, tuple[int, bool]]:
    return {name: (logging.getLogger(name).level, logging.getLogger(name).propagate)
            for name in LIBRARY_LOGGERS}


async def test_nodes_opened_while_debugging_give_the_libraries_logging_back_when_they_close(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The libraries under the transport speak while a node runs with Pigeon's logs at DEBUG
    (docs/libp2p.md L27), and are as they were once the last node closes, also when nodes
    close in another order than they opened. They stayed at DEBUG, and every later libp2p host
    in the process built a log record for each address it parsed."""
    before = _library_logging()
    caplog.set_level(logging.DEBUG)
    opened = {name: trio.Event() for name in ("alice", "bob")}
    close = {name: trio.Event() for name in ("alice", "bob")}
    closed = {name: trio.Event() for name in ("alice", "bob")}

    async def run(name: str) -> None:
        async with open_node(tmp_path / name, name):
            opened[name].set()
            await close[name].wait()
        closed[name].set()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for name in ("alice", "bob"):
                nursery.start_soon(run, name)
                await opened[name].wait()
                assert all(level == logging.DEBUG and propagate
                           for level, propagate in _library_logging().values())
            close["alice"].set()  # the first to open closes first
            await closed["alice"].wait()
            # Bob still runs: the libraries still speak.
            assert all(level == logging.DEBUG for level, _ in _library_logging().values())
            close["bob"].set()
    assert _library_logging() == before
