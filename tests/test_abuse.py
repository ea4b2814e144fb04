"""Attacks on a running node by strangers, on loopback: the stranger
holds only the victim's public bundle (from an invite) and a bare libp2p host. Each forged or
replayed first message must cost the victim little and no work that grows with what the message
claims, and a genuine contact must keep being served.

The work is counted, not timed (timing goals are benchmarks/abuse.py's): message keys derived
to skip ahead in a chain (`_skip`) and PQXDH agreements run (`respond`), by wrapping the real
functions in the node's own process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import node.device.inbound as inbound_module
import node.device.relay_client as relay_client_module
import node.protocol.ratchet as ratchet_module
import node.protocol.session as session_module
from node import MessageReceived, Node
from node.device.inbound import BatchResult, Inbound, Incoming
from node.device.mailbox_client import DepositRequest, MailboxClient, mailbox_id
from node.net import FrameStream
from node.protocol.invite import Invite
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.protocol.limits import MAX_SKIP
from node.protocol.sealed import SealedContent, seal
from node.protocol.wire import Msg, Nack, decode_frame, encode_frame
from node.relay.config import RelayConfig
from node.relay.service import RelayService, open_relay
from node.testing import forge_first_message
from tests.conftest import (
    LOOPBACK,
    WAIT,
    befriend,
    next_event,
    open_node,
    raw_peer,
    raw_stream,
    replies,
)


class Work:
    """Counts calls of the expensive functions, by wrapping the real ones."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.skipped_keys = 0
        self.agreements = 0
        skip, respond = ratchet_module._skip, session_module.respond

        def counted_skip(ck: bytes, hk: bytes, start: int, until: int
                         ) -> tuple[bytes, list[tuple[tuple[bytes, int], bytes]]]:
            self.skipped_keys += until - start
            return skip(ck, hk, start, until)

        def counted_respond(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.agreements += 1
            return respond(*args, **kwargs)

        monkeypatch.setattr(ratchet_module, "_skip", counted_skip)
        monkeypatch.setattr(session_module, "respond", counted_respond)


async def _until_reset(stream: FrameStream) -> list[bytes]:
    """The frames the node still wrote before it reset the stream."""
    frames: list[bytes] = []
    with trio.fail_after(WAIT):
        try:
            while (frame := await stream.receive()) is not None:
                frames.append(frame)
        except Exception:  # the reset: what it is raised as is libp2p's business
            pass
    return frames


async def _exchange(alice: Node, bob: Node, text: str) -> None:
    with alice.events() as events:
        await bob.send("alice", text)
        with trio.fail_after(WAIT):
            got = await next_event(events, MessageReceived, lambda e: e.text == text)
    assert got.contact == "bob"


async def test_forged_first_messages_derive_nothing_replays_cost_a_hash_and_contacts_are_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    # A budget that does not refill during the test, so what it allows is exact: Bob's own
    # introduction takes one, the forgeries the other four.
    monkeypatch.setattr(inbound_module, "STRANGER_FIRST_MESSAGES_PER_S", 0)
    monkeypatch.setattr(inbound_module, "STRANGER_FIRST_MESSAGES_BURST", 5)
    async with open_node(tmp_path / "alice", "alice") as alice, \
            open_node(tmp_path / "bob", "bob") as bob:
        await befriend(alice, bob, "alice")
        await _exchange(alice, bob, "before")
        bundle = Invite.from_text(alice.invite(), now=alice._clock.now_s()).bundle
        work = Work(monkeypatch)

        # Finding 1: one first message claiming MAX_SKIP skipped keys, from a stranger.
        forged = forge_first_message(bundle, message_id=os.urandom(16), counter=MAX_SKIP,
                                     token=os.urandom(16))
        mid = decode_frame(encode_frame(Msg(os.urandom(16), forged)))
        async with raw_peer(os.urandom(32)) as stranger:
            stream = await raw_stream(stranger, alice)
            await stream.send([encode_frame(mid)])
            assert await replies(stream, 1) == [Nack(mid.id, "unknown-sender")]
            assert (work.skipped_keys, work.agreements) == (0, 1)

            # The same bytes again, on this stream and on new ones: one hash each.
            for _ in range(3):
                replay = await raw_stream(stranger, alice)
                await replay.send([encode_frame(mid)] * 10)
                assert await replies(replay, 10) == [Nack(mid.id, "unknown-sender")] * 10
            assert (work.skipped_keys, work.agreements) == (0, 1)

            # Fresh forgeries: the budget (4, one used) decides three, the fourth is deferred
            # before any agreement and the stream ends.
            fresh = [Msg(os.urandom(16), forge_first_message(
                bundle, message_id=os.urandom(16), token=os.urandom(16))) for _ in range(6)]
            flood = await raw_stream(stranger, alice)
            await flood.send([encode_frame(f) for f in fresh])
            answered = [decode_frame(f) for f in await _until_reset(flood)]
            assert answered == [Nack(f.id, "unknown-sender") for f in fresh[:3]]
            assert work.agreements == 1 + 3

        # A contact is served throughout, and is not charged to the strangers' budget.
        await _exchange(alice, bob, "after")
        assert work.agreements == 1 + 3
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "a first message refused before" in log
    assert "first messages from unknown devices over the budget" in log


@asynccontextmanager
async def _relay(path: Path) -> AsyncIterator[RelayService]:
    # Strangers may store all the junk below in one mailbox (the defaults stop a flood at 64
    # envelopes, PROTOCOL.md section 21): what the node does with that much is what is tested.
    async with open_relay(RelayConfig(data_dir=path, listen=(LOOPBACK,),
                                      open_mailbox_max_messages=UNIQUE * COPIES,
                                      open_mailbox_max_bytes=64 * 2**20)) as service:
        yield service


#: Junk deposits in the victim's mailbox: UNIQUE distinct forgeries, each deposited COPIES times
#: under different message ids (a replay costs the attacker only a deposit).
UNIQUE, COPIES = 40, 10


@pytest.mark.slow(seconds=2)
async def test_junk_in_the_mailbox_is_drained_in_slices_that_yield_and_costs_little(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Finding 2: forged first messages, sealed and deposited anonymously in Bob's mailbox while
    # he is offline, ahead of a real message from Alice.
    async with _relay(tmp_path / "relay") as relay:
        relays = (relay.addresses()[0],)
        async with open_node(tmp_path / "alice", "alice") as alice:
            async with open_node(tmp_path / "bob", "bob", relays=relays) as bob:
                await befriend(bob, alice, "bob")
                invite = Invite.from_text(bob.invite(), now=bob._clock.now_s())
            box = mailbox_id(invite.device)
            deposits = []
            for _ in range(UNIQUE):
                identity, device = IdentityKeyPair.generate(), DeviceKeyPair.generate()
                forged = forge_first_message(invite.bundle, message_id=os.urandom(16),
                                             counter=MAX_SKIP, token=os.urandom(16),
                                             identity=identity)
                envelope = seal(invite.device, SealedContent(
                    sender=identity.public, sender_device=device.public, message=forged))
                deposits += [DepositRequest(box, os.urandom(16), envelope)
                             for _ in range(COPIES)]
            dial, _, peer_id = relays[0].rpartition("/p2p/")
            async with raw_peer(os.urandom(32)) as stranger, \
                    MailboxClient.connect(stranger, peer_id, [dial], timeout=WAIT) as client:
                assert await client.deposit_many(deposits) == [None] * len(deposits)
            real = await alice.send("bob", "real, behind the junk")
            with trio.fail_after(WAIT):
                while alice.message_state(real) != "relayed":
                    await trio.sleep(0.05)
        assert relay.relay.status()["messages"] == UNIQUE * COPIES + 1

        work = Work(monkeypatch)
        ticks = 0
        slices: list[tuple[int, int]] = []  # (items in one Inbound.process, ticks before it)
        process = Inbound.process

        def recording(self: Inbound, items: list[Incoming]) -> BatchResult:
            slices.append((len(items), ticks))
            return process(self, items)

        monkeypatch.setattr(Inbound, "process", recording)

        async def ticker() -> None:  # any other task of the node's process: it must get turns
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            async with open_node(tmp_path / "bob", "bob", relays=relays) as bob:
                with bob.events() as events, trio.fail_after(WAIT * 3):
                    got = await next_event(events, MessageReceived)
                assert got.text == "real, behind the junk"
                with trio.fail_after(WAIT):  # the junk is refused, acknowledged and deleted
                    while relay.relay.status()["messages"]:
                        await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    assert work.skipped_keys == 0  # nothing derived for what the junk claimed
    assert work.agreements <= UNIQUE + 1  # each forgery decrypted once, its replays never
    assert sum(n for n, _ in slices) >= UNIQUE * COPIES + 1
    assert max(n for n, _ in slices) <= relay_client_module.RELAY_SLICE
    # The node's other tasks ran while the junk was drained: trio runs the tasks ready at a
    # checkpoint in either order, so the ticker gets a turn at least every other slice.
    assert all(b > a for (_, a), (_, b) in zip(slices, slices[2:], strict=False)), slices
