"""Attachments through the recipient's relay (PROTOCOL.md section 26.6): the sender uploads the
blob next to the message when the recipient is offline; the recipient fetches it from there,
with its mailbox's proof, when the sender is gone too. Real relays and nodes on loopback."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from node import AttachmentSaved
from node.protocol.attachment import DEFAULT_CHUNK_BYTES, TAG_BYTES
from node.relay.config import RelayConfig
from node.relay.service import RelayService, open_relay
from tests.conftest import LOOPBACK, WAIT, befriend, next_event, open_node
from tests.mediatools import random_file

pytestmark = pytest.mark.trio


@asynccontextmanager
async def relay(path: Path, **limits: Any) -> AsyncIterator[RelayService]:
    async with open_relay(RelayConfig(data_dir=path, listen=(LOOPBACK,), **limits)) as service:
        yield service


async def wait_until(check: Any, what: str, timeout: float = WAIT) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.05)


async def sent_while_bob_is_away(tmp_path: Path, relays: tuple[str, ...], source: Path,
                                 **alice_config: Any) -> tuple[str, Path]:
    """Bob (on `relays`) and Alice become contacts; Bob goes; Alice sends him `source` and
    stays until the message waits at his relays. Returns the message id and Alice's data dir."""
    async with open_node(tmp_path / "alice", "alice", **alice_config) as alice:
        async with open_node(tmp_path / "bob", "bob", relays=relays) as bob:
            await befriend(bob, alice, "bob")
        message_id = await alice.send_file("bob", source)
        await wait_until(lambda: alice.message_state(message_id) == "relayed", "relayed")
        await wait_until(lambda: any(
            s == "done" for (s,) in alice._db._q("SELECT state FROM attachment_uploads")),
            "the blob uploaded")
    return message_id, tmp_path / "alice"


@pytest.mark.slow(seconds=3)
async def test_an_offline_recipient_gets_the_file_from_its_relay(tmp_path: Path) -> None:
    source = tmp_path / "away.bin"
    digest = random_file(source, 3 * 1024 * 1024 + 123)
    async with relay(tmp_path / "r") as r:
        relays = (r.addresses()[0],)
        message_id, _ = await sent_while_bob_is_away(tmp_path, relays, source)
        blobs = list((tmp_path / "r" / "blobs").glob("[0-9a-f]" * 64))
        assert len(blobs) == 1 and blobs[0].stat().st_size > 3 * 1024 * 1024
        assert r.relay.status()["blob_bytes"] == blobs[0].stat().st_size
        # Alice is gone: only the relay has the file now.
        async with open_node(tmp_path / "bob", "bob", relays=relays) as bob:
            with bob.events() as events, trio.fail_after(WAIT * 2):
                saved = await next_event(events, AttachmentSaved)
            assert saved.message_id == message_id
            assert hashlib.sha256(Path(saved.path).read_bytes()).hexdigest() == digest
            # Bob's device said it has it: the relay forgets it.
            await wait_until(lambda: not list((tmp_path / "r" / "blobs").glob("[0-9a-f]" * 64)),
                             "the relay dropped the blob")
            assert r.relay.status()["blob_bytes"] == 0


@pytest.mark.slow(seconds=3)
async def test_a_relay_that_refuses_for_quota_keeps_the_upload_pending_with_the_code(
        tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    random_file(source, 2 * 1024 * 1024)
    async with relay(tmp_path / "r", blob_mailbox_max_bytes=1024 * 1024) as r:
        relays = (r.addresses()[0],)
        async with open_node(tmp_path / "alice", "alice") as alice:
            async with open_node(tmp_path / "bob", "bob", relays=relays) as bob:
                await befriend(bob, alice, "bob")
            message_id = await alice.send_file("bob", source)

            def shown() -> str | None:
                (entry,) = [e for e in alice.history("bob") if e.message_id == message_id]
                assert entry.attachment is not None
                return entry.attachment.error

            await wait_until(lambda: shown() is not None, "the refusal shown")
            assert "mailbox-full" in (shown() or "") and "pending" in (shown() or "")
            (state,) = alice._db._q("SELECT state, error FROM attachment_uploads")
            assert state == ("pending", "mailbox-full")
            # Not asked again before retry_s has passed: the relay sees no second refusal.
            refused = r.relay.status()["rejects"]["mailbox_full"]
            assert alice._db.files_waiting_at_relays()
            for rowid, device in alice._db.files_waiting_at_relays():
                await alice._transfers._upload_for(rowid, device)
            assert r.relay.status()["rejects"]["mailbox_full"] == refused


@pytest.mark.slow(seconds=4)
async def test_a_corrupting_relay_is_caught_and_the_chunk_fetched_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "flip.bin"
    digest = random_file(source, 2 * 1024 * 1024)
    async with relay(tmp_path / "r") as r:
        relays = (r.addresses()[0],)
        await sent_while_bob_is_away(tmp_path, relays, source)
        assert r.relay.blobs is not None
        real_read = r.relay.blobs.read
        served: list[int] = []

        def flipping_read(box: bytes, blob_hash: bytes, off: int, length: int) -> bytes | str:
            data = real_read(box, blob_hash, off, length)
            served.append(off)
            if isinstance(data, bytes) and len(served) == 2:  # one byte of the second read
                return data[:1000] + bytes([data[1000] ^ 0x40]) + data[1001:]
            return data

        monkeypatch.setattr(r.relay.blobs, "read", flipping_read)
        async with open_node(tmp_path / "bob", "bob", relays=relays) as bob:
            with bob.events() as events, trio.fail_after(WAIT * 2):
                saved = await next_event(events, AttachmentSaved)
            assert hashlib.sha256(Path(saved.path).read_bytes()).hexdigest() == digest
        # The chunk holding the flipped byte was refused and read again from its start, the
        # ones before it kept: nothing before it was read twice.
        span = DEFAULT_CHUNK_BYTES + TAG_BYTES
        bad = (served[1] + 1000) // span * span
        again = served.index(bad)
        assert again >= 2 and all(off >= bad for off in served[again:]), served
