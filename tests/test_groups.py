"""Groups with real nodes on loopback (PROTOCOL.md section 27): membership travels as signed
operations, messages are encrypted once with sender keys and reach every member device once,
a removed member reads nothing sent afterwards, and what the rules refuse changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from node import Node
from node.device.events import GroupChanged, MessageDelivered, MessageReceived, MessageSent
from node.errors import DecryptionFailed, GroupError
from node.protocol.content import GroupMessage, GroupOps
from node.protocol.groups import GroupOp
from node.protocol.keys import IdentityKeyPair
from node.protocol.senderkey import ReceiverChain
from tests.conftest import WAIT, befriend, next_event, open_node
from tests.devicetools import open_linked


async def wait_until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll `check()` (a cheap read of a node's store) until it is true, within WAIT."""
    with trio.fail_after(WAIT):
        while not check():
            await trio.sleep(0.02)


def group_texts(node: Node, group: str) -> list[tuple[str | None, str]]:
    return [(e.sender, e.text) for e in node.history(group, limit=1000) if e.kind == "text"]


def knows_group(node: Node, name: str) -> bool:
    return any(g.name == name for g in node.groups())


@asynccontextmanager
async def three(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, Node]]:
    """Alice, Bob and Carol, every two of them contacts (named by their display names)."""
    async with open_node(tmp_path / "a", "alice") as alice, \
            open_node(tmp_path / "b", "bob") as bob, \
            open_node(tmp_path / "c", "carol") as carol:
        await befriend(alice, bob, "alice")
        await befriend(alice, carol, "alice")
        await befriend(bob, carol, "bob")
        yield alice, bob, carol


async def test_a_group_message_reaches_every_member_once_and_a_removed_member_reads_nothing(
        tmp_path: Path) -> None:
    async with three(tmp_path) as (alice, bob, carol):
        info = alice.create_group("friends", ["bob", "carol"])
        assert info.admin and {m.name for m in info.members} == {"(you)", "bob", "carol"}
        await wait_until(lambda: knows_group(bob, "friends") and knows_group(carol, "friends"),
                         "bob and carol learn the group")
        assert bob.group_info("friends").title == "friends"
        with carol.events() as on_carol:
            await alice.send("friends", "hello from alice")
            await bob.send("friends", "hello from bob")
            with trio.fail_after(WAIT):
                got = [await next_event(on_carol, MessageReceived) for _ in range(2)]
        assert {(e.contact, e.sender, e.text) for e in got} == {
            ("friends", "alice", "hello from alice"), ("friends", "bob", "hello from bob")}
        await wait_until(lambda: len(group_texts(alice, "friends")) == 2, "alice has both")
        # Bob's own message is outgoing (no sender); alice's shows who wrote it.
        assert group_texts(bob, "friends") == [("alice", "hello from alice"),
                                               (None, "hello from bob")]
        # Every member's history shows the creation as a notice.
        assert any("created the group" in e.text for e in carol.history("friends")
                   if e.kind == "notice")

        # What carol holds of the others' chains before her removal (a modified client would
        # keep it): it must open nothing sent afterwards.
        group_id = bytes.fromhex(carol.group_info("friends").group_id)
        kept = [ReceiverChain.from_bytes(bytes(state)) for (state,) in carol._db._q(
            "SELECT state FROM peer_chains WHERE group_id=?", (group_id,))]
        assert len(kept) == 2  # alice's and bob's
        # Carol is removed: she is told, and nothing sent afterwards is readable with her keys.
        with carol.events() as on_carol:
            alice.group_remove("friends", ["carol"])
            with trio.fail_after(WAIT):
                change = await next_event(on_carol, GroupChanged)
        assert change.change == "alice removed you"
        assert not carol.group_info("friends").member
        await wait_until(lambda: "carol" not in {m.name for m in
                                                 bob.group_info("friends").members},
                         "bob applies the removal")
        with bob.events() as on_bob:
            message_id = await alice.send("friends", "after carol left")
            with trio.fail_after(WAIT):
                await next_event(on_bob, MessageReceived, lambda e: e.text == "after carol left")
        # The ciphertext that went to bob, as anyone could capture it: carol's stored chains of
        # alice's device (kept from before her removal, if any) do not open it.
        rowid = alice._db.message(bytes.fromhex(message_id))
        assert rowid is not None
        payload = alice._db.group_payload(rowid.rowid)
        assert payload is not None
        captured = GroupMessage(id=bytes.fromhex(message_id), sent_at_ms=rowid.sent_at_ms,
                                group_id=group_id, message=payload)
        for chain in kept:
            with pytest.raises(DecryptionFailed):
                chain.decrypt(captured.message)
        assert "after carol left" not in [t for _, t in group_texts(carol, "friends")]


async def test_changes_the_rules_refuse_are_clear_errors(tmp_path: Path) -> None:
    async with three(tmp_path) as (alice, bob, _carol):
        with pytest.raises(GroupError, match="unknown member"):
            alice.create_group("x", ["nobody"])
        alice.create_group("team", ["bob"])
        await wait_until(lambda: knows_group(bob, "team"), "bob learns the group")
        with pytest.raises(GroupError, match="only an admin"):
            bob.group_add("team", ["carol"])
        with pytest.raises(GroupError, match="already a member"):
            alice.group_add("team", ["bob"])
        with pytest.raises(GroupError, match="no group"):
            alice.group_info("nope")
        alice.group_leave("team")
        with pytest.raises(GroupError, match="not a member"):
            await alice.send("team", "still here?")
        # The last admin left: bob, the only member left, became admin.
        await wait_until(lambda: bob.group_info("team").admin, "bob becomes admin")


async def test_forged_operations_and_bad_sender_key_signatures_change_nothing(
        tmp_path: Path) -> None:
    """Carol, a member but no admin, runs a modified client: she sends the group operations it
    would not sign (a non-admin add, a rename with a wrong signature) and a group
    message whose signature she broke. Alice and Bob refuse every one and show nothing."""
    async with three(tmp_path) as (alice, bob, carol):
        alice.create_group("club", ["bob", "carol"])
        await wait_until(lambda: knows_group(bob, "club") and knows_group(carol, "club"),
                         "everyone learns the group")
        group_id = bytes.fromhex(alice.group_info("club").group_id)
        glog = carol._groups._log(group_id)
        mallory = IdentityKeyPair.generate()
        heads = glog.state.heads
        non_admin = GroupOp.sign(carol._identity, group_id=group_id, kind="add", prev=heads,
                                 sent_at_ms=1, who=[mallory.public.to_bytes()])
        rename = GroupOp.sign(carol._identity, group_id=group_id, kind="rename", prev=heads,
                              sent_at_ms=2, name="carol's now")
        wrong_sig = rename.signed[:-3] + bytes([rename.signed[-3] ^ 1]) + rename.signed[-2:]
        forged = [non_admin.signed, wrong_sig]
        real = carol._groups.group_ops_content

        def with_forgeries(gid: bytes, message_id: bytes, sent_at_ms: int) -> GroupOps:
            content = real(gid, message_id, sent_at_ms)
            return GroupOps(id=content.id, sent_at_ms=content.sent_at_ms, group_id=gid,
                            ops=(*content.ops, *forged))

        carol._groups.group_ops_content = with_forgeries  # type: ignore[method-assign]
        before = [(n.group_info("club").members, n.group_info("club").title)
                  for n in (alice, bob)]
        with carol._db.transaction():
            contact = carol._groups.find("club")
            assert contact is not None
            carol._groups._queue_log(contact, glog, glog.state.members)
        # (`status` counts a contact's conversation; a group's rows are in the outbox.)
        await wait_until(lambda: not carol._db._q("SELECT 1 FROM outbox"),
                         "carol's forged log delivered")
        # A message whose sender-key signature is broken, then a genuine one.
        real_payload = carol._db.group_payload

        def broken(rowid: int) -> bytes | None:
            payload = real_payload(rowid)
            return None if payload is None else payload[:-1] + bytes([payload[-1] ^ 1])

        carol._db.group_payload = broken  # type: ignore[method-assign]
        await carol.send("club", "forged signature")
        await wait_until(lambda: not carol._db._q("SELECT 1 FROM outbox"),
                         "the broken message acknowledged")
        carol._db.group_payload = real_payload  # type: ignore[method-assign]
        with alice.events() as on_alice:
            await carol.send("club", "genuine")
            with trio.fail_after(WAIT):
                got = await next_event(on_alice, MessageReceived)
        assert got.text == "genuine"
        await wait_until(lambda: "genuine" in [t for _, t in group_texts(bob, "club")],
                         "bob has the genuine one")
        for node, (members, title) in zip((alice, bob), before, strict=True):
            info = node.group_info("club")
            assert (info.members, info.title) == (members, title)
            assert [t for _, t in group_texts(node, "club")] == ["genuine"]
            assert not any("mallory" in e.text or "carol's now" in e.text
                           for e in node.history("club"))
        held = alice._db.group_ops(group_id)
        assert non_admin.signed in held  # kept (it is a member's), refused by the rule
        assert alice._groups._log(group_id).state.refused == {non_admin.hash}


@pytest.mark.slow(seconds=1)
async def test_a_device_linked_to_a_member_later_learns_the_group_and_its_messages(
        tmp_path: Path) -> None:
    async with three(tmp_path) as (alice, bob, carol):
        alice.create_group("later", ["bob", "carol"])
        await wait_until(lambda: knows_group(bob, "later"), "bob learns the group")
        await alice.send("later", "before b2")
        async with open_linked(bob, tmp_path / "b2", "bob") as b2:
            await wait_until(lambda: len(alice.contact("bob").peer_ids) == 2,
                             "alice learns bob's second device")
            await carol.send("later", "from carol")
            await alice.send("later", "from alice")
            await wait_until(lambda: knows_group(b2, "later") and len(
                group_texts(b2, "later")) == 2, "b2 learns the group and gets both")
            # It reads from the senders' chains' positions on: nothing sent before it joined.
            assert group_texts(b2, "later") == [("carol", "from carol"),
                                                ("alice", "from alice")]
            assert {m.name for m in b2.group_info("later").members} == {"(you)", "alice",
                                                                        "carol"}
            # What bob writes on his first device is his own message on the second.
            await bob.send("later", "from bob")
            await wait_until(lambda: len(group_texts(b2, "later")) == 3, "b2 gets bob's")
            assert [(e.direction, e.state) for e in b2.history("later")
                    if e.text == "from bob"] == [("out", "sent")]
            # Reading the group on one device reads it on the other (PROTOCOL.md 25.6, `read`).
            await wait_until(lambda: len(group_texts(bob, "later")) == 4, "bob has all four")
            assert bob.mark_read("later") == 3
            await wait_until(lambda: all(e.read for e in b2.history("later")
                                         if e.kind == "text" and e.direction == "in"),
                             "b2 shows them read")


async def test_a_group_text_is_sent_and_delivered_under_the_group_s_name(tmp_path: Path) -> None:
    async with three(tmp_path) as (alice, bob, carol):
        alice.create_group("news", ["bob", "carol"])
        await wait_until(lambda: knows_group(bob, "news") and knows_group(carol, "news"),
                         "everyone learns the group")
        with alice.events() as on_alice:
            message_id = await alice.send("news", "state?")
            with trio.fail_after(WAIT):
                sent = await next_event(on_alice, MessageSent, lambda e: e.message_id == message_id)
                delivered = await next_event(on_alice, MessageDelivered,
                                             lambda e: e.message_id == message_id)
        assert sent.contact == delivered.contact == "news"
        await wait_until(lambda: all(d.state == "delivered" for e in alice.history("news")
                                     if e.kind == "text" for d in e.devices),
                         "both members' devices confirmed it")
        entry = next(e for e in alice.history("news") if e.kind == "text")
        assert entry.state == "delivered"
        assert sorted(d.peer_id for d in entry.devices) == sorted([bob.peer_id, carol.peer_id])
        assert not any(d.own for d in entry.devices)


async def test_a_delivered_sender_key_leaves_no_chain_key_in_the_history_table(
        tmp_path: Path) -> None:
    async with three(tmp_path) as (alice, bob, carol):
        alice.create_group("keys", ["bob", "carol"])
        await wait_until(lambda: knows_group(bob, "keys") and knows_group(carol, "keys"),
                         "everyone learns the group")
        await alice.send("keys", "one")
        await wait_until(lambda: not alice._db._q("SELECT 1 FROM outbox"), "all delivered")
        assert alice._db._q("SELECT count(*) FROM messages WHERE kind='sender-key'")[0][0] == 1
        await alice.send("keys", "two")
        assert alice._db._q("SELECT count(*) FROM messages WHERE kind IN"
                            " ('sender-key', 'group-ops')")[0][0] == 0


async def test_a_removed_admins_operation_on_its_stale_state_changes_nothing(
        tmp_path: Path) -> None:
    """Carol, an admin, is removed; her modified client then signs a removal of Bob on the state
    she held before (its `prev` names the old heads) and sends it. It is concurrent with her
    removal, so every member refuses it (PROTOCOL.md section 27.3, rule 4)."""
    async with three(tmp_path) as (alice, bob, carol):
        alice.create_group("board", ["bob", "carol"])
        await wait_until(lambda: knows_group(bob, "board") and knows_group(carol, "board"),
                         "everyone learns the group")
        alice.group_promote("board", ["carol"])
        await wait_until(lambda: carol.group_info("board").admin, "carol is admin")
        group_id = bytes.fromhex(alice.group_info("board").group_id)
        stale_heads = carol._groups._log(group_id).state.heads
        alice.group_remove("board", ["carol"])
        await wait_until(lambda: not carol.group_info("board").member, "carol is told")
        stale = GroupOp.sign(carol._identity, group_id=group_id, kind="remove",
                             prev=stale_heads, sent_at_ms=1, who=[bob._identity.public.to_bytes()])
        real = carol._groups.group_ops_content

        def with_stale(gid: bytes, message_id: bytes, sent_at_ms: int) -> GroupOps:
            content = real(gid, message_id, sent_at_ms)
            return GroupOps(id=content.id, sent_at_ms=content.sent_at_ms, group_id=gid,
                            ops=(*content.ops, stale.signed))

        carol._groups.group_ops_content = with_stale  # type: ignore[method-assign]
        contact = carol._groups.find("board")
        assert contact is not None
        with carol._db.transaction():
            glog = carol._groups._log(group_id)
            carol._groups._queue_log(contact, glog, frozenset({alice._identity.public.to_bytes(),
                                                               bob._identity.public.to_bytes()}))
        await wait_until(lambda: all(stale.signed in n._db.group_ops(group_id)
                                     for n in (alice, bob)), "the stale op arrives")
        for node in (alice, bob):
            info = node.group_info("board")
            assert {m.name for m in info.members} == {"(you)", "bob" if node is alice
                                                      else "alice"}
            assert stale.hash in node._groups._log(group_id).state.refused
        assert "bob" in {m.name for m in alice.group_info("board").members}
