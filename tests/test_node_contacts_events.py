"""Node API behaviour behind the CLI's newcomer cases: contact names (rename, case, suggestions),
the delivery event stream (each message: one MessageSent, then one MessageDelivered), and
`status` forgetting an error once the path recovered. Real nodes on loopback (tests/conftest.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import trio

from node import ContactError, ContactOnline, MessageDelivered, MessageSent, Node
from tests.conftest import WAIT, befriend, next_event, open_node


async def test_contact_names_rename_case_and_suggestions(tmp_path: Path,
                                                         node_pair: tuple[Node, Node]) -> None:
    alice, bob = node_pair
    invite = alice.invite()
    # the same account under a new name: refused, pointing at `contact rename`
    with pytest.raises(ContactError, match="pigeon contact rename alice ally"):
        bob.add_contact("ally", invite)
    assert [c.name for c in bob.contacts()] == ["alice"]
    bob.add_contact("alice", invite)  # the same name: only refreshes
    # names match regardless of case
    assert bob.contact("ALICE").account_id == alice.account_id
    renamed = bob.rename_contact("Alice", "Ally")
    assert renamed.name == "Ally" and renamed.account_id == alice.account_id
    assert [c.name for c in bob.contacts()] == ["Ally"]
    with trio.fail_after(WAIT):
        message_id = await bob.send("ally", "still you?")
        assert await bob.wait_delivered(message_id, timeout=WAIT) == "delivered"
    assert [e.text for e in bob.history("ALLY")] == ["still you?"]
    # a miss suggests the closest names
    with pytest.raises(ContactError, match=r"no contact named 'aly'; did you mean 'Ally'\?"):
        bob.history("aly")
    with pytest.raises(ContactError, match=r"no contact named 'zzz'$"):
        bob.history("zzz")
    # a name that differs only in case from another contact's is taken
    async with open_node(tmp_path / "carol", "carol") as carol:
        with pytest.raises(ContactError, match="'Ally' exists already"):
            bob.add_contact("ally", carol.invite())
        bob.add_contact("carol", carol.invite())
        with pytest.raises(ContactError, match="'carol' exists already"):
            bob.rename_contact("ally", "CAROL")
    assert sorted(c.name for c in bob.contacts()) == ["Ally", "carol"]


N_MESSAGES = 3000
BATCH = 50


async def test_each_message_gets_one_sent_then_one_delivered_event(
        node_pair: tuple[Node, Node]) -> None:
    """Acks race the writes: batches are queued while earlier ones are still being written and
    acknowledged. Every message must show exactly MessageSent then MessageDelivered."""
    _, bob = node_pair
    seen: dict[str, list[str]] = defaultdict(list)
    with bob.events() as events:
        ids: list[str] = []
        with trio.fail_after(120):
            for start in range(0, N_MESSAGES, BATCH):
                ids += await bob.send_many("alice", [f"m{i}" for i in range(start, start + BATCH)])
                await trio.sleep(0)  # let the lane write while the next batch is queued
            delivered = 0
            async for event in events:
                if isinstance(event, MessageSent | MessageDelivered):
                    seen[event.message_id].append(type(event).__name__)
                    delivered += isinstance(event, MessageDelivered)
                    if delivered == N_MESSAGES:
                        break
    wrong = {m: kinds for m, kinds in seen.items() if kinds != ["MessageSent", "MessageDelivered"]}
    assert not wrong, f"{len(wrong)} messages with other event sequences, e.g. " \
                      f"{list(wrong.items())[:3]}"
    assert set(seen) == set(ids)


async def test_status_forgets_the_error_once_the_path_recovered(tmp_path: Path) -> None:
    alice_dir = tmp_path / "alice"
    async with open_node(tmp_path / "bob", "bob") as bob:
        async with open_node(alice_dir, "alice") as alice:
            await befriend(alice, bob, "alice")
        message_id = await bob.send("alice", "are you there?")
        with trio.fail_after(WAIT):
            while bob.status().contacts[0].last_error is None:  # alice is stopped: dials fail
                await trio.sleep(0.02)
        with bob.events() as events:
            async with open_node(alice_dir, "alice"):
                with trio.fail_after(WAIT):
                    await next_event(events, ContactOnline, lambda e: e.contact == "alice")
                    assert await bob.wait_delivered(message_id, timeout=WAIT) == "delivered"
                status = bob.status().contacts[0]
                assert (status.path, status.pending, status.sent) == ("direct", 0, 0)
                assert status.last_error is None
