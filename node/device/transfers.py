"""Moving attachments' blobs (PROTOCOL.md sections 26.4, 26.5): the store in the data directory,
the server of `/pigeon/blob/1.0.0` and the downloads.

Layout in the data directory:

    blobs/<hash hex>             sealed blobs of files we sent, served to every device of the
                                 recipient (one upload serves them all) and kept across restarts
    blobs/partial/<hash hex>     a download in progress: the plaintext of the chunks opened so far
    blobs/tmp/                   files being prepared or encrypted (emptied on start)
    files/<sha256 hex>           received files, named by the SHA-256 of their content, so the
                                 same file received twice is stored once

A download asks the sending device for the chunks it does not have yet, a few at a time, opens
every chunk as it arrives (section 26.2) and appends the plaintext of chunks that opened to the
partial file, hashing the blob and the plaintext as it goes. After a cut connection, a refused
chunk or a restart (kill -9 included) it asks again from the first chunk the partial file
lacks, so only the chunks in flight are fetched twice; after a restart the hashes are rebuilt
from the partial file (sealing its chunks again: the encryption is deterministic). When the last
chunk is in and the blob's hash matches the descriptor, the partial file (decompressed first if
it was compressed) is moved into `files/` under the SHA-256 of its content; until then it is
not shown. Nothing is held whole in memory: the windows of chunks asked for, received and being
opened (3 MiB at most).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

import trio

from node.clock import Clock
from node.device.eventbus import EventBus
from node.device.events import (
    AttachmentFailed,
    AttachmentSaved,
    TransferProgress,
)
from node.device.mailbox_client import MailboxClient
from node.device.media import IO_BYTES, MediaOptions, prepare_attachment, restore_attachment
from node.device.media import _decompress as decompress
from node.device.relay_client import OpenTransport, split_relay_address
from node.device.storage import AttachmentRow, Contact, Database, Device
from node.errors import (
    AttachmentCorrupt,
    DecodeError,
    InvalidMessage,
    MediaError,
    NodeError,
    NotRunning,
    RelayRefused,
    StorageError,
    TransportError,
)
from node.net import FrameStream, StreamCaps, Transport
from node.protocol.attachment import ChunkCipher, Descriptor
from node.protocol.blob import (
    BAD_RANGE,
    BLOB_PROTOCOL,
    MAX_BLOB_FRAME_BYTES,
    UNAUTHORIZED,
    UNKNOWN_BLOB,
    BlobError,
    BlobGet,
    blob_proof,
    check_proof,
    decode_reply,
    decode_request,
    encode_error,
    encode_range,
    encode_request,
)
from node.protocol.keys import DeviceKey, DeviceKeyPair, IdentityKeyPair
from node.protocol.mailbox import MAX_BLOB_PIECE_BYTES, mailbox_id, mailbox_key, own_cap

__all__ = ["BLOB_CAPS", "BlobStore", "TransferStatus", "Transfers", "is_download"]

log = logging.getLogger("pigeon.transfers")

#: Bytes of sealed chunks written to the stream in one write (whole chunks, at least one):
#: per-write cost dominates small writes (docs/libp2p.md L18); a text on the same connection
#: waits behind at most this write.
WRITE_BYTES: Final = 256 * 1024
#: Bytes a downloader asks for per request (whole chunks, at least one), and requests it keeps
#: asked ahead: what is in flight (4 MiB) keeps a loopback or LAN pipe full
#: (benchmarks/media.py), and a text sent on the same connection waits behind that much at most,
#: not behind Yamux's whole window (docs/libp2p.md L81).
REQUEST_BYTES: Final = 1024 * 1024
REQUESTS_AHEAD: Final = 4
#: Windows received that wait while the keeper opens, hashes and writes the one before. The
#: keeper (~600 MiB/s: benchmarks/media.py) outruns the stream several times over, so one keeps
#: the reader reading; each more would only add to what was sent but is not yet on disk when
#: the device dies, and is sent again after it restarts (tests/test_cli_files.py bounds it).
WINDOWS_WAITING: Final = 1
#: Chunks of one download that may fail to open before it stops (each is fetched again after
#: a failure): a peer that keeps sending bad data is not fetched from forever.
MAX_BAD_CHUNKS: Final = 8
#: Whole-blob hash failures after which a download stops: the partial file is dropped and
#: fetched again once; a second failure means the sender's blob is not the one it described.
MAX_HASH_FAILURES: Final = 2
#: Downloads running at once.
MAX_DOWNLOADS: Final = 2
#: Seconds between attempts while no device of the sender serves the blob (offline), and the
#: longest wait before looking at pending downloads again.
RETRY_S: Final = 30.0
#: Seconds between looks for sent files whose recipient device was offline (their blob goes to
#: its relays), and pieces of an upload written at once (512 KiB each).
UPLOAD_CHECK_S: Final = 2.0
UPLOAD_PIECES_AHEAD: Final = 4
#: How long a sent blob is kept for devices to fetch: longer than a relay keeps the message
#: that names it (30 days at most, PROTOCOL.md section 21), and how often that is looked at.
SENT_BLOB_KEEP_S: Final = 45 * 24 * 3600.0
PRUNE_EVERY_S: Final = 3600.0
#: Progress events per transfer at most this often (and once at the end).
PROGRESS_EVERY_S: Final = 0.25
#: Disk space kept free beyond what a download needs (the database and logs must still grow).
DISK_MARGIN_BYTES: Final = 64 * 1024 * 1024
#: Inbound blob streams: a contact's device fetches one blob at a time per download, and at most
#: MAX_DOWNLOADS at once; a stranger holds no key to prove, so gets a slot or two to be refused.
BLOB_CAPS: Final = StreamCaps(per_peer=4, per_address=8, strangers=2, total=64)


#: States of the attachment of a file we sent from this device, whose blob we hold ('ready')
#: or held: every other attachment is downloaded here (storage.py, migration 9).
SENT_STATES: Final = frozenset({"ready", "expired"})


def is_download(row: AttachmentRow) -> bool:
    """Whether this attachment is fetched here: a received file, or one another device of our
    account sent (its sent transcript, PROTOCOL.md section 26.4)."""
    return row.direction == "in" or row.state not in SENT_STATES


class BlobStore:
    """The attachment files of one data directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.partial = self.blobs / "partial"
        self.work = self.blobs / "tmp"
        self.files = root / "files"
        for directory in (self.blobs, self.partial, self.work, self.files):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Whatever a crash left half-prepared is of no use: the message was never queued.
        for leftover in self.work.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    def blob(self, blob_hash: bytes) -> Path:
        """Where the sealed blob we sent with this hash lives."""
        return self.blobs / blob_hash.hex()

    def partial_blob(self, blob_hash: bytes) -> Path:
        """Where the download of the blob with this hash collects verified chunks."""
        return self.partial / blob_hash.hex()

    def file(self, name: str) -> Path:
        """A received file in the store, by its name there (the hex SHA-256 of its content)."""
        if len(name) != 64 or any(c not in "0123456789abcdef" for c in name):
            raise StorageError(f"{name!r} is not a stored file's name")
        return self.files / name

    def free_bytes(self) -> int:
        """Free space on the data directory's file system."""
        return shutil.disk_usage(self.root).free


@dataclass(frozen=True, kw_only=True, slots=True)
class TransferStatus:
    """A transfer in flight (`Node.status`): `direction` "in" (we download) or "out" (a
    device downloads from us); `peer_id` the other side."""

    message_id: str
    contact: str
    name: str
    direction: str
    peer_id: str
    done_bytes: int
    total_bytes: int


@dataclass
class _Progress:
    message_id: str
    contact: str
    name: str
    direction: str
    peer_id: str
    done: int
    total: int
    last_event: float = float("-inf")


class _Retry(Exception):
    """This device cannot serve the blob now; try another, or later."""


class Transfers:
    """Serves our blobs and downloads received ones, for one node."""

    def __init__(self, *, db: Database, transport: Transport, bus: EventBus, clock: Clock,
                 store: BlobStore, options: MediaOptions, auto_download_bytes: int,
                 connect_timeout_s: float, contact_name: Callable[[int], str],
                 retry_s: float = RETRY_S, open_transport: OpenTransport | None = None,
                 device: DeviceKeyPair | None = None,
                 relays: Callable[[], Sequence[str]] = tuple,
                 sent_blob_keep_s: float = SENT_BLOB_KEEP_S,
                 identity: IdentityKeyPair | None = None,
                 own: Callable[[], Contact] | None = None) -> None:
        self.db = db
        # Our account (its key and its row of our other devices): a file one of them sent is
        # fetched from them, and the blob of a file we sent goes to their relays as to a
        # contact's, under the capability every device of the account derives (section 21).
        self.identity = identity
        self.own = own
        self.sent_blob_keep_s = sent_blob_keep_s
        self.retry_s = retry_s
        # Our relays, reached from throwaway identities as for the mailboxes (PROTOCOL.md
        # section 21): blobs that waited there for us (section 26.6), and contacts' relays,
        # where blobs for their offline devices go.
        self.open_transport = open_transport
        self.device = device
        self.relays = relays  # ours as they are now (they may change: PROTOCOL.md section 28.3)
        self.transport = transport
        self.bus = bus
        self.clock = clock
        self.store = store
        self.options = options
        self.auto_download_bytes = auto_download_bytes
        self.connect_timeout_s = connect_timeout_s
        self.contact_name = contact_name
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._upload_tried: dict[tuple[int, str], float] = {}  # (message, relay) -> monotonic
        self._running: dict[int, trio.Event] = {}  # message rowid -> set when it ends
        self._wanted: set[int] = set()  # asked for by `save`, whatever their size
        self._progress: dict[tuple[str, str, str], _Progress] = {}
        self._limiter = trio.CapacityLimiter(MAX_DOWNLOADS)

    # --- sending --------------------------------------------------------------------------------

    async def prepare(self, path: Path, *, original: bool) -> Descriptor:
        """Prepare and encrypt the file at `path` (in a worker thread) into the blob store;
        returns its descriptor. Raises `MediaError`."""
        descriptor, blob = await trio.to_thread.run_sync(
            lambda: prepare_attachment(path, self.store.work, original=original,
                                       options=self.options))
        os.replace(blob, self.store.blob(descriptor.sha256))
        return descriptor

    # --- serving (PROTOCOL.md section 26.5) ------------------------------------------------------

    async def handle_stream(self, stream: FrameStream) -> None:
        """Answer `get` requests on one inbound blob stream until the peer closes it."""
        progress: _Progress | None = None
        # The blob being served stays open from one request to the next: a download asks for
        # hundreds of ranges of the same blob, and opening and closing the file for each one
        # showed in the profile of benchmarks/media.py.
        source: tuple[Path, BinaryIO] | None = None
        try:
            while True:
                frame = await stream.receive()
                if frame is None:
                    return
                request = decode_request(frame)  # DecodeError: the stream is reset
                found = self._servable(request)
                if isinstance(found, str):
                    await stream.send([encode_error(found)])
                    continue
                row, descriptor, blob = found
                if source is None or source[0] != blob:
                    if source is not None:
                        source[1].close()
                    source = (blob, blob.open("rb"))
                if progress is None or progress.message_id != row.message_id.hex():
                    if progress is not None:
                        self._end_progress(progress)
                    progress = self._start_progress(row, descriptor, "out",
                                                    stream.remote_peer_id)
                progress.done = descriptor.chunk_span(request.first)[0]
                await self._serve(stream, descriptor, source[1], request, progress)
        finally:
            if source is not None:
                source[1].close()
            if progress is not None:
                self._report(progress, final=True)
                self._end_progress(progress)

    def _servable(self, request: BlobGet) -> str | tuple[AttachmentRow, Descriptor, Path]:
        for row in self.db.outgoing_attachments(request.hash):
            descriptor = Descriptor.from_bytes(row.descriptor)
            if not check_proof(descriptor, request.proof):
                continue
            if request.first + request.count > descriptor.chunks:
                return BAD_RANGE
            blob = self.store.blob(request.hash)
            if not blob.exists():
                return UNKNOWN_BLOB
            return row, descriptor, blob
        return UNAUTHORIZED if self.db.outgoing_attachments(request.hash) else UNKNOWN_BLOB

    async def _serve(self, stream: FrameStream, descriptor: Descriptor, src: BinaryIO,
                     request: BlobGet, progress: _Progress) -> None:
        """Send the range header, then the requested sealed chunks, read from the open blob."""
        header: list[bytes] = [encode_range(request.first, request.count)]
        index, end = request.first, request.first + request.count
        while index < end:
            chunks = []
            for i in range(index, min(end, index + chunks_in(WRITE_BYTES, descriptor))):
                offset, length = descriptor.chunk_span(i)
                src.seek(offset)
                data = src.read(length)
                if len(data) != length:
                    raise StorageError(f"blob {request.hash.hex()} is cut short")
                chunks.append(data)
            await stream.send(header + chunks)  # the header goes with the first chunks
            header = []
            index += len(chunks)
            progress.done += sum(map(len, chunks))
            self._report(progress)

    # --- downloading ----------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at pending downloads now (a file message arrived, a device came online)."""
        self._wake.set()

    async def run(self) -> None:
        """Start downloads: interrupted ones again, and offered ones up to the auto-download
        size; forever, in the node's nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                self._wake = trio.Event()
                for row in self.db.attachments_in_state("downloading", "offered"):
                    descriptor = Descriptor.from_bytes(row.descriptor)
                    if (row.state == "offered" and row.message_rowid not in self._wanted
                            and descriptor.ciphertext_size > self.auto_download_bytes):
                        continue
                    self._start(row)
                with trio.move_on_after(self.retry_s):
                    await self._wake.wait()

    def _start(self, row: AttachmentRow) -> trio.Event:
        """Start downloading `row` unless it is already; the event set when that ends."""
        running = self._running.get(row.message_rowid)
        if running is None:
            if self._nursery is None:
                raise NotRunning("the node's transfers are not running")
            running = self._running[row.message_rowid] = trio.Event()
            self._nursery.start_soon(self._download_task, row,
                                     Descriptor.from_bytes(row.descriptor))
        return running

    async def wait_downloaded(self, message_id: bytes) -> AttachmentRow:
        """Download the received attachment of this message now (whatever its size) and wait
        until it is stored; returns its row. Raises `InvalidMessage` (no such attachment),
        `StorageError` (no disk space) or the `AttachmentCorrupt` / `TransportError` that
        stopped it."""
        row = self.db.attachment(message_id)
        if row is None or not is_download(row):
            raise InvalidMessage(f"no received file {message_id.hex()}")
        while row.state != "done":
            descriptor = Descriptor.from_bytes(row.descriptor)
            self._check_space(descriptor, self.store.partial_blob(row.hash))
            if row.state == "failed":
                self.db.set_attachment_state(row.message_rowid, "offered",
                                             now_ms=self.clock.now_ms())
            self._wanted.add(row.message_rowid)
            await self._start(row).wait()
            row = self.db.attachment(message_id)
            assert row is not None
            if row.state == "failed":
                raise MediaError(f"file {message_id.hex()} not downloaded: {row.error}",
                                 reason="invalid")
            if row.state != "done" and row.error:
                raise TransportError(f"file {message_id.hex()} not downloaded yet: {row.error}")
        return row

    def _check_space(self, descriptor: Descriptor, partial: Path) -> None:
        have = partial.stat().st_size if partial.exists() else 0
        final = descriptor.original_size if descriptor.original_size is not None \
            else descriptor.size
        need = descriptor.ciphertext_size - have + final + DISK_MARGIN_BYTES
        free = self.store.free_bytes()
        if free < need:
            raise StorageError(f"not enough disk space for {descriptor.name!r}: it needs "
                               f"{need:,} bytes free, {free:,} are")

    async def _download_task(self, row: AttachmentRow, descriptor: Descriptor) -> None:
        done = self._running[row.message_rowid]
        try:
            async with self._limiter:
                await self._download(row, descriptor)
        except Exception as exc:  # a bug here must not end the node: the download fails
            reason = str(exc) or type(exc).__name__
            if not isinstance(exc, NodeError | OSError):
                log.exception("download of %s failed", row.message_id.hex())
            final = not isinstance(exc, TransportError)
            log.info("download of %s %s: %s", row.message_id.hex(),
                     "failed" if final else "waits", reason)
            self.db.set_attachment_state(row.message_rowid, "failed" if final else "downloading",
                                         now_ms=self.clock.now_ms(), error=reason)
            if final:
                self._wanted.discard(row.message_rowid)
                self.bus.publish(AttachmentFailed(message_id=row.message_id.hex(),
                                                  contact=self.contact_name(row.contact_id),
                                                  reason=reason))
        finally:
            del self._running[row.message_rowid]
            done.set()

    async def _download(self, row: AttachmentRow, descriptor: Descriptor) -> None:
        partial = self.store.partial_blob(row.hash)
        self._check_space(descriptor, partial)
        if descriptor.ciphertext_size > self.options.max_bytes + 16 * descriptor.chunks:
            raise MediaError(f"{descriptor.name!r} is larger than the largest attachment "
                             f"accepted ({self.options.max_bytes:,} bytes)", reason="too-large")
        self.db.set_attachment_state(row.message_rowid, "downloading", now_ms=self.clock.now_ms())
        progress = self._start_progress(row, descriptor, "in", "")
        try:
            for _ in range(MAX_HASH_FAILURES):
                sums = await self._fetch(row, descriptor, partial, progress)
                if sums.blob.digest() == descriptor.sha256:
                    break
                log.info("blob %s: the hash does not match; fetching it again", row.hash.hex())
                partial.unlink()
            else:
                raise AttachmentCorrupt("ciphertext hash does not match the descriptor")
            stored = await trio.to_thread.run_sync(self._store, descriptor, partial, sums)
        finally:
            self._end_progress(progress)
        partial.unlink(missing_ok=True)
        self.db.set_attachment_state(row.message_rowid, "done", now_ms=self.clock.now_ms(),
                                     file=stored)
        self._wanted.discard(row.message_rowid)
        self.bus.publish(AttachmentSaved(message_id=row.message_id.hex(),
                                         contact=self.contact_name(row.contact_id),
                                         path=str(self.store.file(stored))))

    def _store(self, descriptor: Descriptor, partial: Path, sums: _Sums) -> str:
        """Move the complete, checked plaintext into the content-addressed store (decompressed
        first when the descriptor says so); its name there."""
        name: str
        if descriptor.compression is None:
            source, name = partial, sums.plain.hexdigest()
        else:
            assert descriptor.original_size is not None
            source = self.store.work / f"restore-{os.urandom(8).hex()}"
            digest = hashlib.sha256()
            try:
                with partial.open("rb") as src, _HashingWriter(source, digest) as out:
                    decompress(iter(lambda: src.read(IO_BYTES), b""), out,
                               descriptor.original_size)
            except BaseException:
                source.unlink(missing_ok=True)
                raise
            name = digest.hexdigest()
        target = self.store.file(name)
        if target.exists():  # the same file received before: stored once
            source.unlink()
        else:
            os.replace(source, target)
        return name

    async def _fetch(self, row: AttachmentRow, descriptor: Descriptor, partial: Path,
                     progress: _Progress) -> _Sums:
        """Fill `partial` with the plaintext of every chunk, each opened as it arrives, from
        whichever of the sender's devices serves them; returns when it is complete, with the
        hashes of the blob and of the plaintext. TransportError when no device can now."""
        bad = 0
        with _open_partial(partial) as out:
            have, sums = await trio.to_thread.run_sync(_resume, out, descriptor)
            while True:
                progress.done = min(have * (descriptor.chunk_bytes + 16),
                                    descriptor.ciphertext_size)
                if have == descriptor.chunks:
                    return sums
                devices = self._senders(row)
                devices.sort(key=lambda d: not self.transport.is_connected(d.peer_id))
                reasons = []
                for device in devices:
                    before = have
                    try:
                        await self._fetch_from(device.peer_id, device.addrs, descriptor, out,
                                               sums, have, progress)
                        have = descriptor.chunks
                        break
                    except AttachmentCorrupt as exc:
                        bad += 1
                        have = sums.chunks
                        log.info("blob %s from %s: %s", row.hash.hex(), device.peer_id, exc)
                        if bad >= MAX_BAD_CHUNKS:
                            raise AttachmentCorrupt(
                                f"{bad} chunks from the sender did not open") from exc
                        break  # ask again from the chunk that failed
                    except _Retry as exc:
                        reasons.append(str(exc))
                        have = sums.chunks
                        if have > before:
                            break  # cut after some chunks came: resume from there at once
                else:
                    # No device of the sender serves it now: it may wait at our relays.
                    before = have
                    try:
                        await self._fetch_from_relays(descriptor, out, sums, have, progress)
                        have = descriptor.chunks
                    except AttachmentCorrupt as exc:
                        bad += 1
                        have = sums.chunks
                        log.info("blob %s from a relay: %s", row.hash.hex(), exc)
                        if bad >= MAX_BAD_CHUNKS:
                            raise AttachmentCorrupt(
                                f"{bad} chunks from the sender did not open") from exc
                    except _Retry as exc:
                        reasons.append(str(exc))
                        have = sums.chunks
                        if have == before:
                            raise TransportError(
                                "neither the sender's devices nor our relays serve the file"
                                " now: " + "; ".join(reasons)) from None

    def _senders(self, row: AttachmentRow) -> list[Device]:
        """The devices that may serve this attachment's blob: the contact's, or, for a file
        another device of ours sent, our other devices (PROTOCOL.md section 26.5)."""
        if row.direction == "in":
            return self.db.devices(row.contact_id)
        return self.db.devices(self.own().id) if self.own is not None else []

    async def _fetch_from(self, peer_id: str, addrs: Sequence[str], descriptor: Descriptor,
                          out: BinaryIO, sums: _Sums, first: int, progress: _Progress) -> None:
        """Append the plaintext of chunks `first`.. from one device to `out`, each opened before
        it is written. AttachmentCorrupt for a chunk that does not open (the ones before it are
        kept)."""
        try:
            stream = await self.transport.open_stream(
                peer_id, addrs, BLOB_PROTOCOL, timeout=self.connect_timeout_s,
                max_frame_bytes=MAX_BLOB_FRAME_BYTES)
        except TransportError as exc:
            raise _Retry(f"{peer_id}: {exc}") from exc
        progress.peer_id = peer_id
        cipher = descriptor.cipher()
        proof = blob_proof(descriptor)
        per_request = chunks_in(REQUEST_BYTES, descriptor)
        windows = [(i, min(per_request, descriptor.chunks - i))
                   for i in range(first, descriptor.chunks, per_request)]
        # Chunks are opened and written by a second task while the next window arrives; a
        # failure on either side stops both, and the earlier one in the blob is raised once
        # both have stopped (the keeper's: it is behind the reader).
        failure: list[BaseException] = []  # the reader's
        refused: list[AttachmentCorrupt] = []  # the keeper's
        # Windows received but not yet kept wait here (WINDOWS_WAITING).
        send, receive = trio.open_memory_channel[tuple[int, list[bytes]]](WINDOWS_WAITING)

        async def keeper() -> None:
            async with receive:
                async for index, sealed_chunks in receive:
                    if refused:
                        continue  # after a bad chunk: nothing more is kept from this stream
                    try:
                        await self._keep(descriptor, cipher, index, sealed_chunks, out, sums,
                                         progress)
                    except AttachmentCorrupt as exc:
                        # The reader stops after the window it is reading (not cancelled
                        # inside a read: the stream is reset below, whole).
                        refused.append(exc)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keeper)
                async with send:
                    asked = 0
                    for number, (start, count) in enumerate(windows):
                        # Keep REQUESTS_AHEAD windows asked for: the pipe stays full while what
                        # is in flight on the shared connection, ahead of any text, stays small.
                        ahead = [BlobGet(hash=descriptor.sha256, proof=proof, first=i, count=n)
                                 for i, n in windows[asked:number + REQUESTS_AHEAD]]
                        sealed_chunks: list[bytes] = []
                        try:
                            if ahead:
                                await stream.send([encode_request(r) for r in ahead])
                                asked += len(ahead)
                            await self._receive_window(stream, peer_id, descriptor, start,
                                                       count, sealed_chunks)
                        except (TransportError, DecodeError, AttachmentCorrupt, _Retry) as exc:
                            failure.append(exc)
                        # Chunks that came before a cut or a bad one are kept: a resumed
                        # download asks for the first one missing.
                        if sealed_chunks:
                            await send.send((start, sealed_chunks))
                        if failure or refused:
                            break
            if refused or failure:
                raise (refused or failure)[0]
            out.flush()
            self._report(progress, final=True)
            await stream.aclose()
        except (TransportError, DecodeError) as exc:
            out.flush()
            await stream.reset()
            raise _Retry(f"{peer_id}: {exc}") from exc
        except BaseException:
            out.flush()
            with trio.CancelScope(shield=True):
                await stream.reset()
            raise

    async def _receive_window(self, stream: FrameStream, peer_id: str, descriptor: Descriptor,
                              first: int, count: int, sealed_chunks: list[bytes]) -> None:
        """Read the answer to one request into `sealed_chunks`: the range, then each chunk
        (its length checked; it is opened by the keeper)."""
        reply = await stream.receive()
        if reply is None:
            raise _Retry(f"{peer_id}: closed the stream")
        answer = decode_reply(reply)
        if isinstance(answer, BlobError):
            raise _Retry(f"{peer_id}: {answer.code}")
        if answer.first != first or answer.count != count:
            raise DecodeError("blob reply: not the range asked for")
        for index in range(first, first + count):
            sealed = await stream.receive()
            _, length = descriptor.chunk_span(index)
            if sealed is None or len(sealed) != length:
                raise AttachmentCorrupt(
                    f"{len(sealed) if sealed else 0} bytes where {length} were due",
                    chunk=index)
            sealed_chunks.append(sealed)

    async def _keep(self, descriptor: Descriptor, cipher: ChunkCipher, first: int,
                    sealed_chunks: Sequence[bytes], out: BinaryIO, sums: _Sums,
                    progress: _Progress) -> None:
        """Open chunks `first`.. and append their plaintext, in a worker thread (the AEAD and
        hashes release the GIL: the next chunks arrive meanwhile); AttachmentCorrupt at the
        first that does not open, after the ones before it were kept."""
        last = descriptor.chunks - 1

        def keep() -> None:
            # One write and one update of each hash for the whole window, not one per chunk:
            # every call that releases the GIL must win it back from the event loop's thread,
            # which is busy with the transfer itself, and those waits stalled downloads.
            opened: list[bytes] = []
            try:
                for index, sealed in enumerate(sealed_chunks, first):
                    opened.append(cipher.open(index, sealed, final=index == last))
            finally:  # the chunks before a bad one are kept
                kept = sealed_chunks[:len(opened)]
                plain = b"".join(opened)
                out.write(plain)
                sums.add(b"".join(kept), plain, chunks=len(opened))
                progress.done += sum(map(len, kept))

        try:
            await trio.to_thread.run_sync(keep)
        finally:
            self._report(progress)

    # --- relays (PROTOCOL.md section 26.6) ------------------------------------------------------

    async def _fetch_from_relays(self, descriptor: Descriptor, out: BinaryIO, sums: _Sums,
                                 first: int, progress: _Progress) -> None:
        """Chunks `first`.. from our own relays, where a contact left the blob while we were
        offline: read over a stream authenticated for one of our two mailboxes (the same proof
        as for the mailbox, section 21), each chunk opened before it is kept. _Retry when no
        relay holds it."""
        if self.open_transport is None or self.device is None or not self.relays():
            raise _Retry("no relay of ours to look at")
        reasons = []
        cipher = descriptor.cipher()
        for relay in self.relays():
            peer_id, address = split_relay_address(relay)
            for key in (mailbox_key(self.device), self.device):
                try:
                    async with self.open_transport() as transport, MailboxClient.connect(
                            transport, peer_id, [address],
                            timeout=self.connect_timeout_s) as client:
                        await client.authenticate(key)
                        progress.peer_id = peer_id
                        index = first
                        while index < descriptor.chunks:
                            # Read in pieces the protocol allows (MAX_BLOB_PIECE_BYTES each).
                            count = min(chunks_in(REQUEST_BYTES, descriptor),
                                        descriptor.chunks - index)
                            sealed = await _read_chunks(client, descriptor, index, count)
                            await self._keep(descriptor, cipher, index, sealed, out, sums,
                                             progress)
                            if len(sealed) < count:
                                raise AttachmentCorrupt("cut short by the relay",
                                                        chunk=index + len(sealed))
                            index += count
                        out.flush()
                        with contextlib.suppress(RelayRefused, TransportError, DecodeError):
                            await client.blob_delete(descriptor.sha256)
                        return
                except AttachmentCorrupt:
                    out.flush()
                    raise
                except (RelayRefused, TransportError, DecodeError) as exc:
                    out.flush()
                    reasons.append(f"relay {peer_id}: {exc}")
                    if sums.chunks > first:
                        raise _Retry("; ".join(reasons)) from exc
        raise _Retry("; ".join(reasons))

    def prune_sent(self) -> int:
        """Delete the sent blobs kept longer than `sent_blob_keep_s` (devices that have not
        fetched them by then are not coming for them); returns how many went."""
        now = self.clock.now_ms()
        gone = 0
        for blob_hash in self.db.sent_blobs_older_than(now - int(self.sent_blob_keep_s * 1000)):
            self.store.blob(blob_hash).unlink(missing_ok=True)
            self.db.expire_sent_blob(blob_hash, now_ms=now)
            gone += 1
        return gone

    async def run_uploads(self) -> None:
        """Upload sent blobs to the relays of recipient devices that were offline (their
        message waits there too), and delete sent blobs past their keeping time, forever, in
        the node's nursery."""
        pruned_at = float("-inf")
        while True:
            if self.clock.monotonic() - pruned_at >= PRUNE_EVERY_S:
                pruned_at = self.clock.monotonic()
                try:
                    self.prune_sent()
                except (OSError, NodeError) as exc:
                    log.info("sent blobs not pruned: %s", exc)
            for rowid, device in self.db.files_waiting_at_relays():
                try:
                    await self._upload_for(rowid, device)
                except (OSError, NodeError) as exc:
                    log.info("upload of message %d: %s", rowid, exc)
                except Exception:  # a bug here must not end the node
                    log.exception("upload of message %d failed", rowid)
            await trio.sleep(UPLOAD_CHECK_S)

    async def _upload_for(self, rowid: int, device_key: bytes) -> None:
        row = self.db.attachment_of_row(rowid)
        device = self.db.device(device_key)
        if row is None or device is None or not device.relays or self.open_transport is None:
            return
        descriptor = Descriptor.from_bytes(row.descriptor)
        blob = self.store.blob(row.hash)
        box = device.box or mailbox_id(DeviceKey(device_key))
        cap = device.cap
        if cap is None and self.identity is not None and self.own is not None \
                and device.contact_id == self.own().id:
            cap = own_cap(self.identity, DeviceKey(device_key))
        for relay in device.relays:
            state = self.db.upload_state(rowid, relay, box)
            tried = self._upload_tried.get((rowid, relay))
            if state == "done" or (state == "pending" and tried is not None
                                   and self.clock.monotonic() - tried < self.retry_s):
                continue  # a refused or failed upload is tried again every retry_s, no sooner
            self._upload_tried[(rowid, relay)] = self.clock.monotonic()
            peer_id, address = split_relay_address(relay)
            progress = self._start_progress(row, descriptor, "out", peer_id)
            try:
                async with self.open_transport() as transport, MailboxClient.connect(
                        transport, peer_id, [address], timeout=self.connect_timeout_s) as client:
                    await self._upload(client, box, cap, descriptor, blob, progress)
            except RelayRefused as exc:
                # The transfer stays pending, the code shown (PROTOCOL.md section 26.6).
                reason = f"relay {peer_id} refused the file: {exc.code} (upload pending)"
                self.db.set_upload_state(rowid, relay, box, "pending", exc.code)
                self.db.set_attachment_state(rowid, row.state, now_ms=self.clock.now_ms(),
                                             error=reason)
                continue
            except (TransportError, DecodeError) as exc:
                self.db.set_upload_state(rowid, relay, box, "pending", str(exc))
                continue
            finally:
                self._report(progress, final=True)
                self._end_progress(progress)
            self.db.set_upload_state(rowid, relay, box, "done")
            self.db.set_attachment_state(rowid, row.state, now_ms=self.clock.now_ms())

    async def _upload(self, client: MailboxClient, box: bytes, cap: bytes | None,
                      descriptor: Descriptor, blob: Path, progress: _Progress) -> None:
        """Upload the blob from where the relay's copy ends (a resumed upload sends the rest)."""
        size = descriptor.ciphertext_size
        have = await client.blob_put(box, descriptor.sha256, size, 0, b"", cap=cap)
        with blob.open("rb") as src:
            while have < size:
                src.seek(have)
                pieces = [piece for _ in range(UPLOAD_PIECES_AHEAD)
                          if (piece := src.read(MAX_BLOB_PIECE_BYTES))]
                if not pieces:
                    raise StorageError(f"blob {descriptor.sha256.hex()} is cut short")
                before = have
                have = await client.blob_put_many(box, descriptor.sha256, size, have, pieces,
                                                  cap=cap)
                if have <= before:
                    raise TransportError("the relay took none of the blob's bytes")
                progress.done = have
                self._report(progress)

    async def copy_out(self, stored: Path, dest: Path, name: str) -> Path:
        """Copy a stored file to `dest` (into it, as `name`, if it is a directory); never over
        an existing file. Returns the path written."""
        if dest.is_dir():
            dest = dest / name
        if dest.exists():
            raise MediaError(f"{dest}: already exists", reason="exists")

        def copy() -> None:
            part = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.part")
            try:
                shutil.copyfile(stored, part)
                os.replace(part, dest)
            finally:
                part.unlink(missing_ok=True)

        try:
            await trio.to_thread.run_sync(copy)
        except OSError as exc:
            raise MediaError(f"{dest}: cannot be written ({exc.strerror or exc})",
                             reason="unwritable") from exc
        return dest

    async def restore_to(self, descriptor: Descriptor, dest: Path) -> Path:
        """Decrypt a blob we sent into `dest` (as `copy_out`)."""
        if dest.is_dir():
            dest = dest / descriptor.name
        if dest.exists():
            raise MediaError(f"{dest}: already exists", reason="exists")
        blob = self.store.blob(descriptor.sha256)
        try:
            await trio.to_thread.run_sync(
                lambda: restore_attachment(descriptor, blob, dest, options=self.options))
        except OSError as exc:
            raise MediaError(f"{dest}: cannot be written ({exc.strerror or exc})",
                             reason="unwritable") from exc
        return dest

    # --- progress and status --------------------------------------------------------------------

    def _start_progress(self, row: AttachmentRow, descriptor: Descriptor, direction: str,
                        peer_id: str) -> _Progress:
        progress = _Progress(message_id=row.message_id.hex(),
                             contact=self.contact_name(row.contact_id), name=descriptor.name,
                             direction=direction, peer_id=peer_id, done=0,
                             total=descriptor.ciphertext_size)
        self._progress[(progress.message_id, direction, peer_id or os.urandom(8).hex())] = \
            progress
        return progress

    def _end_progress(self, progress: _Progress) -> None:
        for key, value in list(self._progress.items()):
            if value is progress:
                del self._progress[key]

    def _report(self, progress: _Progress, *, final: bool = False) -> None:
        now = self.clock.monotonic()
        if not final and now - progress.last_event < PROGRESS_EVERY_S:
            return
        progress.last_event = now
        self.bus.publish(TransferProgress(message_id=progress.message_id,
                                          contact=progress.contact,
                                          direction=progress.direction,
                                          done_bytes=progress.done,
                                          total_bytes=progress.total))

    def status(self) -> list[TransferStatus]:
        """Transfers in flight now."""
        return [TransferStatus(message_id=p.message_id, contact=p.contact, name=p.name,
                               direction=p.direction, peer_id=p.peer_id, done_bytes=p.done,
                               total_bytes=p.total) for p in self._progress.values()]


async def _read_chunks(client: MailboxClient, descriptor: Descriptor, first: int,
                       count: int) -> list[bytes]:
    """Sealed chunks `first`..`first + count - 1` read from a relay, in pieces the protocol
    allows; fewer if the relay's copy ends early."""
    offset, _ = descriptor.chunk_span(first)
    end = sum(descriptor.chunk_span(first + count - 1))
    data = bytearray()
    while offset + len(data) < end:
        piece = await client.blob_read(descriptor.sha256, offset + len(data),
                                       min(MAX_BLOB_PIECE_BYTES, end - offset - len(data)))
        if not piece:
            break
        data += piece
    chunks = []
    for index in range(first, first + count):
        start, length = descriptor.chunk_span(index)
        sealed = bytes(data[start - offset:start - offset + length])
        if len(sealed) < length:
            break
        chunks.append(sealed)
    return chunks


def chunks_in(nbytes: int, descriptor: Descriptor) -> int:
    """Whole chunks of `descriptor`'s blob in `nbytes` of plaintext, at least one."""
    return max(1, nbytes // descriptor.chunk_bytes)


def _open_partial(path: Path) -> BinaryIO:
    """The partial file of a download, opened to append (created if missing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return os.fdopen(fd, "r+b")


@dataclass
class _Sums:
    """Running SHA-256 of the blob and of the plaintext, over the chunks kept so far."""

    blob: Any = field(default_factory=hashlib.sha256)
    plain: Any = field(default_factory=hashlib.sha256)
    chunks: int = 0

    def add(self, sealed: bytes, plain: bytes, *, chunks: int = 1) -> None:
        """Count `chunks` consecutive chunks, `sealed` and `plain` each all of them at once."""
        self.blob.update(sealed)
        self.plain.update(plain)
        self.chunks += chunks


def _resume(out: BinaryIO, descriptor: Descriptor) -> tuple[int, _Sums]:
    """The chunks complete in the partial file (plaintext), and the hashes over them: the blob's
    is computed by sealing them again (the encryption is deterministic, PROTOCOL.md section
    26.2). A chunk cut by a crash is dropped; the file is left positioned after the last one."""
    out.seek(0, os.SEEK_END)
    size = out.tell()
    if size == descriptor.size and size > 0:
        have = descriptor.chunks
    else:
        have = min(size // descriptor.chunk_bytes, descriptor.chunks - 1)
        out.truncate(have * descriptor.chunk_bytes)
    sums = _Sums()
    cipher = descriptor.cipher()
    out.seek(0)
    for index in range(have):
        plain = out.read(min(descriptor.chunk_bytes, descriptor.size - out.tell()))
        sums.add(cipher.seal(index, plain, final=index == descriptor.chunks - 1), plain)
    out.seek(out.tell())
    return have, sums


class _HashingWriter:
    """A file opened for writing that also feeds what is written to a hash."""

    def __init__(self, path: Path, digest: Any) -> None:
        self._file = path.open("wb")
        self._digest = digest

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return self._file.write(data)

    def __enter__(self) -> BinaryIO:
        return self  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        self._file.close()
