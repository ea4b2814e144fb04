"""A file we send reaches our own other devices too (PROTOCOL.md sections 25.5, 26.4): its sent
transcript carries the descriptor, and each of our devices fetches the blob like a recipient,
from the sending device directly or, when it was offline, from its own relay. Real nodes and a
real relay on loopback."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import trio

from node import AttachmentSaved, MessageSent, Node
from node.relay.config import RelayConfig
from node.relay.service import open_relay
from tests.conftest import LOOPBACK, WAIT, befriend, next_event, open_node
from tests.devicetools import open_linked
from tests.mediatools import random_file

pytestmark = pytest.mark.trio


async def wait_until(check: Any, what: str, timeout: float = WAIT) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.05)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_entry(node: Node, contact: str, message_id: str) -> Any:
    (entry,) = [e for e in node.history(contact) if e.message_id == message_id]
    return entry


async def test_our_other_device_shows_the_file_as_sent_and_saves_the_exact_bytes(
        tmp_path: Path) -> None:
    async with open_node(tmp_path / "a1", "alice") as a1, \
            open_node(tmp_path / "b1", "bob") as b1:
        await befriend(a1, b1, "alice")
        async with open_linked(a1, tmp_path / "a2", "alice") as a2:
            a2._transfers.auto_download_bytes = 0  # it waits for `save`, as a large file does
            source = tmp_path / "report.bin"
            digest = random_file(source, 700_000)
            with a2.events() as on_a2:
                message_id = await a1.send_file("bob", source, caption="the report")
                with trio.fail_after(WAIT):
                    await next_event(on_a2, MessageSent, lambda e: e.message_id == message_id)
            entry = file_entry(a2, "bob", message_id)
            assert (entry.direction, entry.kind, entry.text) == ("out", "file", "the report")
            assert entry.attachment is not None and entry.read is None
            assert (entry.attachment.name, entry.attachment.size) == ("report.bin", 700_000)
            assert entry.attachment.state == "offered"
            # A2 fetches the blob from A1 (the sending device) and keeps the exact bytes.
            out = tmp_path / "saved.bin"
            assert sha256_file(await a2.save(message_id, out)) == digest
            assert file_entry(a2, "bob", message_id).attachment.state == "done"
            # Bob got it once; A1's own copy is unchanged; A2's ack does not make it delivered
            # before Bob's did, and a transcript is no unread news.
            assert await a1.wait_delivered(message_id, timeout=WAIT) == "delivered"
            assert file_entry(a1, "bob", message_id).attachment.state == "ready"
            assert [e.message_id for e in b1.history("alice") if e.kind == "file"] == [
                message_id]
            assert a2.contact("bob").unread == 0


@pytest.mark.slow(seconds=4)
async def test_an_offline_device_of_ours_gets_the_file_from_its_relay(tmp_path: Path) -> None:
    """A2 is offline when A1 sends: its transcript and the blob wait at A2's relay (uploaded
    with the capability every device of the account derives); A2 comes back when A1 is gone and
    fetches the blob there."""
    source = tmp_path / "away.bin"
    digest = random_file(source, 1024 * 1024 + 5)
    async with open_relay(RelayConfig(data_dir=tmp_path / "r", listen=(LOOPBACK,))) as relay:
        relays = (relay.addresses()[0],)
        async with open_node(tmp_path / "a1", "alice") as a1, \
                open_node(tmp_path / "b1", "bob") as b1:
            await befriend(a1, b1, "alice")
            async with open_linked(a1, tmp_path / "a2", "alice", relays=relays) as a2:
                # A text while A2 is up gives A1 a session with it (its sent transcript).
                with a2.events() as on_a2:
                    hello = await a1.send("bob", "hello")
                    with trio.fail_after(WAIT):
                        await next_event(on_a2, MessageSent, lambda e: e.message_id == hello)
            message_id = await a1.send_file("bob", source)
            await wait_until(lambda: any(
                s == "done" for (s,) in a1._db._q("SELECT state FROM attachment_uploads")),
                "the blob uploaded to A2's relay")
        async with open_node(tmp_path / "a2", "alice", relays=relays) as a2:
            with a2.events() as events, trio.fail_after(WAIT * 2):
                saved = await next_event(events, AttachmentSaved)
            assert saved.message_id == message_id
            assert sha256_file(Path(saved.path)) == digest
            entry = file_entry(a2, "bob", message_id)
            assert (entry.direction, entry.attachment.state) == ("out", "done")
