"""Attachments end to end between real nodes on loopback (PROTOCOL.md sections 26.4, 26.5): the
file message, the blob stream, resuming, refusing corrupt chunks, the content-addressed store."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
import trio

from node import Node
from node.device.events import AttachmentSaved, MessageReceived, TransferProgress
from node.device.transfers import REQUEST_BYTES, REQUESTS_AHEAD
from node.errors import InvalidMessage, MediaError, StorageError, TransportError
from node.net import FrameStream
from node.protocol.attachment import DEFAULT_CHUNK_BYTES, Descriptor
from node.protocol.blob import (
    BLOB_PROTOCOL,
    MAX_BLOB_FRAME_BYTES,
    UNAUTHORIZED,
    BlobError,
    BlobGet,
    decode_reply,
    encode_range,
    encode_request,
)
from tests.conftest import WAIT, befriend, next_event, open_node
from tests.mediatools import random_file

pytestmark = pytest.mark.trio


def tampering_server(node: Node, monkeypatch: pytest.MonkeyPatch,
                     tamper: Callable[[int, bytes], bytes | None]) -> list[tuple[int, int]]:
    """Make `node` serve blobs chunk by chunk through `tamper(index, sealed)`: what it returns
    is sent instead (None: the stream is reset there). Returns the list of requests served,
    (first, count), as they come."""
    requests: list[tuple[int, int]] = []

    async def serve(stream: FrameStream, descriptor: Descriptor, src: BinaryIO,
                    request: BlobGet, progress: object) -> None:
        requests.append((request.first, request.count))
        await stream.send([encode_range(request.first, request.count)])
        for i in range(request.first, request.first + request.count):
            offset, length = descriptor.chunk_span(i)
            src.seek(offset)
            data = tamper(i, src.read(length))
            if data is None:
                await stream.reset()
                return
            await stream.send([data])

    monkeypatch.setattr(node._transfers, "_serve", serve)
    return requests


#: Chunks per blob request, and the chunks of the blobs these tests send.
PER_REQUEST = REQUEST_BYTES // DEFAULT_CHUNK_BYTES
BLOB_CHUNKS = 16
BLOB_BYTES = BLOB_CHUNKS * DEFAULT_CHUNK_BYTES


def assert_refetched_from(bad: int, served: list[tuple[int, int]]) -> None:
    """A blob of BLOB_CHUNKS chunks whose chunk `bad` was refused: asked for again from `bad` on,
    after at most the windows already asked for (REQUESTS_AHEAD of PER_REQUEST chunks)."""
    firsts = [first for first, _ in served]
    assert bad in firsts, served
    assert set(firsts[:firsts.index(bad)]) <= set(range(0, BLOB_CHUNKS, PER_REQUEST)), served
    assert firsts[firsts.index(bad):] == list(range(bad, BLOB_CHUNKS, PER_REQUEST)), served


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while block := src.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def received_file(node: Node, contact: str) -> MessageReceived:
    with node.events() as events, trio.fail_after(WAIT):
        return await next_event(events, MessageReceived, lambda e: e.attachment is not None)


async def test_a_small_file_arrives_by_itself_with_its_name_and_hash(
        node_pair: tuple[Node, Node], tmp_path: Path) -> None:
    alice, bob = node_pair
    source = tmp_path / "notes.bin"
    digest = random_file(source, 300_000)
    with bob.events() as events:
        message_id = await alice.send_file("bob", source, caption="the notes")
        with trio.fail_after(WAIT):
            received = await next_event(events, MessageReceived)
            saved = await next_event(events, AttachmentSaved)
    assert received.message_id == message_id and received.text == "the notes"
    assert received.attachment is not None
    assert (received.attachment.name, received.attachment.size) == ("notes.bin", 300_000)
    assert saved.message_id == message_id
    assert sha256_file(Path(saved.path)) == digest
    (entry,) = [e for e in bob.history("alice") if e.message_id == message_id]
    assert entry.kind == "file" and entry.attachment is not None
    assert entry.attachment.state == "done" and entry.attachment.path == saved.path
    (mine,) = [e for e in alice.history("bob") if e.message_id == message_id]
    assert mine.attachment is not None and mine.attachment.state == "ready"
    # `save` copies it out under its name; a second save to the same place is refused.
    out = tmp_path / "out"
    out.mkdir()
    copied = await bob.save(message_id, out)
    assert copied == out / "notes.bin" and sha256_file(copied) == digest
    with pytest.raises(MediaError, match="already exists"):
        await bob.save(message_id, out)
    # The sender can restore its own copy from the encrypted blob it keeps.
    assert sha256_file(await alice.save(message_id, tmp_path / "mine.bin")) == digest


async def test_the_same_file_twice_is_stored_once(node_pair: tuple[Node, Node],
                                                  tmp_path: Path) -> None:
    alice, bob = node_pair
    source = tmp_path / "twice.bin"
    random_file(source, 100_000)
    paths = []
    with bob.events() as events:
        for _ in range(2):
            await alice.send_file("bob", source)
            with trio.fail_after(WAIT):
                paths.append((await next_event(events, AttachmentSaved)).path)
    assert paths[0] == paths[1]
    assert len(list((bob.data_dir.path / "files").iterdir())) == 1


async def test_a_large_file_waits_for_save_and_resumes_after_a_cut(
        node_pair: tuple[Node, Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = node_pair
    bob._transfers.auto_download_bytes = 100_000
    source = tmp_path / "big.bin"
    digest = random_file(source, 24 * DEFAULT_CHUNK_BYTES)
    message_id = await alice.send_file("bob", source)
    with trio.fail_after(WAIT):
        while not [e for e in bob.history("alice") if e.message_id == message_id]:
            await trio.sleep(0.02)
    (entry,) = [e for e in bob.history("alice") if e.message_id == message_id]
    assert entry.attachment is not None and entry.attachment.state == "offered"

    # The first stream breaks at chunk 10: the download resumes from chunk 10.
    cut = [False]
    in_flight: list[tuple[str, str]] = []

    def cut_once(index: int, sealed: bytes) -> bytes | None:
        if index == 10 and not cut[0]:
            # Mid-transfer, `status` lists it on both sides.
            in_flight.extend((t.direction, t.message_id) for node in (alice, bob)
                             for t in node.status().transfers)
            cut[0] = True
            return None
        return sealed

    served = tampering_server(alice, monkeypatch, cut_once)
    with bob.events() as events:
        with trio.fail_after(WAIT):
            stored = await bob.save(message_id)
            progress = await next_event(events, TransferProgress)
    assert sha256_file(stored) == digest
    # 24 chunks, asked for PER_REQUEST at a time, REQUESTS_AHEAD requests ahead. The stream
    # broke inside the request of the window holding chunk 10, after the chunks of it before
    # 10 (kept unless the reset overtook them: then they are asked for again); the requests
    # asked ahead reach the server's broken stream at most, and nothing of them is kept. The
    # download went on from there, nothing else twice.
    window = 10 - 10 % PER_REQUEST
    before = window // PER_REQUEST + 1  # the requests up to the broken one
    firsts = [first for first, _ in served]
    resumed = next(i for i in range(before, len(firsts)) if window <= firsts[i] <= 10)
    assert firsts[:before] == list(range(0, window + 1, PER_REQUEST)), served
    assert set(firsts[before:resumed]) <= set(
        range(window + PER_REQUEST, window + REQUESTS_AHEAD * PER_REQUEST, PER_REQUEST)), served
    assert firsts[resumed:] == list(range(firsts[resumed], 24, PER_REQUEST)), served
    assert progress.direction == "in"
    assert sorted(in_flight) == [("in", message_id), ("out", message_id)]
    assert not list((bob.data_dir.path / "blobs" / "partial").iterdir())


async def test_a_flipped_chunk_is_refused_and_fetched_again(
        node_pair: tuple[Node, Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = node_pair
    source = tmp_path / "flip.bin"
    digest = random_file(source, BLOB_BYTES)
    flipped = [False]

    def flip_once(index: int, sealed: bytes) -> bytes | None:
        if index == 5 and not flipped[0]:
            flipped[0] = True
            return sealed[:100] + bytes([sealed[100] ^ 1]) + sealed[101:]
        return sealed

    served = tampering_server(alice, monkeypatch, flip_once)
    with bob.events() as events:
        await alice.send_file("bob", source)
        with trio.fail_after(WAIT):
            saved = await next_event(events, AttachmentSaved)
    assert_refetched_from(5, served)
    assert sha256_file(Path(saved.path)) == digest


async def test_a_stranger_without_the_key_gets_nothing(
        node_pair: tuple[Node, Node], tmp_path: Path) -> None:
    alice, bob = node_pair
    source = tmp_path / "secret.bin"
    random_file(source, 200_000)
    bob._transfers.auto_download_bytes = 0
    message_id = await alice.send_file("bob", source)
    row = alice._db.attachment(bytes.fromhex(message_id))
    assert row is not None
    descriptor = Descriptor.from_bytes(row.descriptor)
    stream = await bob._transport.open_stream(
        alice.peer_id, alice.addresses(), BLOB_PROTOCOL, timeout=WAIT,
        max_frame_bytes=MAX_BLOB_FRAME_BYTES)
    await stream.send([encode_request(BlobGet(hash=descriptor.sha256, proof=bytes(32),
                                              first=0, count=1))])
    with trio.fail_after(WAIT):
        reply = await stream.receive()
    assert reply is not None and decode_reply(reply) == BlobError(code=UNAUTHORIZED)
    await stream.aclose()


async def test_sending_refuses_what_is_not_a_readable_file(
        node_pair: tuple[Node, Node], tmp_path: Path) -> None:
    alice, _ = node_pair
    with pytest.raises(MediaError) as missing:
        await alice.send_file("bob", tmp_path / "nope.bin")
    assert missing.value.reason == "missing"
    with pytest.raises(MediaError) as directory:
        await alice.send_file("bob", tmp_path)
    assert directory.value.reason == "directory"
    with pytest.raises(InvalidMessage):
        await alice.save("00" * 16)


async def test_a_full_disk_refuses_the_download_before_it_starts(
        node_pair: tuple[Node, Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = node_pair
    bob._transfers.auto_download_bytes = 0
    source = tmp_path / "roomy.bin"
    digest = random_file(source, 500_000)
    message_id = await alice.send_file("bob", source)
    with trio.fail_after(WAIT):
        while bob._db.attachment(bytes.fromhex(message_id)) is None:
            await trio.sleep(0.02)
    monkeypatch.setattr(bob._transfers.store, "free_bytes", lambda: 1000)
    with pytest.raises(StorageError, match="not enough disk space"):
        await bob.save(message_id)
    monkeypatch.undo()
    with trio.fail_after(WAIT):
        assert sha256_file(await bob.save(message_id)) == digest


async def test_a_file_over_the_configured_limit_is_refused(tmp_path: Path) -> None:
    async with open_node(tmp_path / "a", "alice", max_attachment_bytes=100_000) as alice, \
            open_node(tmp_path / "b", "bob") as bob:
        await befriend(alice, bob, "alice")
        source = tmp_path / "big.bin"
        random_file(source, 100_001)
        with pytest.raises(MediaError) as refused:
            await alice.send_file("bob", source)
        assert refused.value.reason == "too-large"
        assert not [e for e in alice.history("bob") if e.kind == "file"]


@pytest.mark.parametrize("damage", ["truncate", "reorder", "foreign"])
async def test_a_cut_swapped_or_foreign_chunk_is_refused_and_fetched_again(
        node_pair: tuple[Node, Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        damage: str) -> None:
    alice, bob = node_pair
    source = tmp_path / "damaged.bin"
    digest = random_file(source, BLOB_BYTES)
    other = tmp_path / "other.bin"
    random_file(other, BLOB_BYTES)
    foreign_id = await alice.send_file("bob", other)  # another attachment's blob
    with bob.events() as events, trio.fail_after(WAIT):
        await next_event(events, AttachmentSaved, lambda e: e.message_id == foreign_id)
    foreign_row = alice._db.attachment(bytes.fromhex(foreign_id))
    assert foreign_row is not None
    foreign_blob = alice._transfers.store.blob(foreign_row.hash).read_bytes()
    done = [False]

    def tamper(index: int, sealed: bytes) -> bytes | None:
        if index != 6 or done[0]:
            return sealed
        done[0] = True
        if damage == "truncate":
            return sealed[:-1]
        descriptor = Descriptor.from_bytes(foreign_row.descriptor)
        offset, length = descriptor.chunk_span(7 if damage == "reorder" else 6)
        if damage == "reorder":  # chunk 7 of this blob in the place of chunk 6
            with source_blob().open("rb") as src:
                src.seek(offset)
                return src.read(length)
        return foreign_blob[offset:offset + length]  # chunk 6 of another attachment

    def source_blob() -> Path:
        (row,) = [r for r in alice._db.outgoing_attachments(target_hash[0])]
        return alice._transfers.store.blob(row.hash)

    target_hash: list[bytes] = []
    served = tampering_server(alice, monkeypatch, tamper)
    with bob.events() as events:
        message_id = await alice.send_file("bob", source)
        row = alice._db.attachment(bytes.fromhex(message_id))
        assert row is not None
        target_hash.append(row.hash)
        with trio.fail_after(WAIT):
            saved = await next_event(events, AttachmentSaved,
                                     lambda e: e.message_id == message_id)
    assert done[0]
    assert_refetched_from(6, served)
    assert sha256_file(Path(saved.path)) == digest


async def test_save_after_a_failed_try_tries_again(
        node_pair: tuple[Node, Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = node_pair
    bob._transfers.auto_download_bytes = 0
    source = tmp_path / "later.bin"
    digest = random_file(source, 300_000)
    message_id = await alice.send_file("bob", source)
    with trio.fail_after(WAIT):
        while bob._db.attachment(bytes.fromhex(message_id)) is None:
            await trio.sleep(0.02)
    blob = alice._transfers.store.blob(alice._db.attachment(bytes.fromhex(message_id)).hash)  # type: ignore[union-attr]
    hidden = blob.with_name("hidden")
    blob.rename(hidden)  # Alice cannot serve it now: "unknown-blob"
    with pytest.raises(TransportError, match="unknown-blob"):
        await bob.save(message_id)
    hidden.rename(blob)
    with trio.fail_after(WAIT):
        assert sha256_file(await bob.save(message_id)) == digest


async def test_sent_blobs_are_deleted_after_their_keeping_time(
        node_pair: tuple[Node, Node], tmp_path: Path) -> None:
    alice, bob = node_pair
    source = tmp_path / "old.bin"
    random_file(source, 100_000)
    with bob.events() as events:
        message_id = await alice.send_file("bob", source)
        with trio.fail_after(WAIT):
            await next_event(events, AttachmentSaved)
    row = alice._db.attachment(bytes.fromhex(message_id))
    assert row is not None and alice._transfers.store.blob(row.hash).exists()
    assert alice._transfers.prune_sent() == 0  # just sent: kept
    alice._transfers.sent_blob_keep_s = 0.0
    await trio.sleep(0.01)
    assert alice._transfers.prune_sent() == 1
    assert not alice._transfers.store.blob(row.hash).exists()
    (entry,) = [e for e in alice.history("bob") if e.message_id == message_id]
    assert entry.attachment is not None and entry.attachment.state == "expired"
    with pytest.raises(InvalidMessage, match="deleted"):
        await alice.save(message_id, tmp_path / "gone.bin")
