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
not shown. Nothing is held whole in memory: a window of chunks (16 x 64 KiB) at most.
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
    AttachmentInfo,
    AttachmentSaved,
    TransferProgress,
)
from node.device.media import IO_BYTES, MediaOptions, prepare_attachment, restore_attachment
from node.device.media import _decompress as decompress
from node.device.storage import AttachmentRow, Database
from node.errors import (
    AttachmentCorrupt,
    DecodeError,
    InvalidMessage,
    LimitExceeded,
    MediaError,
    NodeError,
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

__all__ = ["BLOB_CAPS", "BlobStore", "TransferStatus", "Transfers", "attachment_info"]

log = logging.getLogger("pigeon.transfers")

#: Sealed chunks written to the stream in one write: per-write cost dominates small writes
#: (docs/libp2p.md L18); a text on the same connection waits behind at most this write.
CHUNKS_PER_WRITE: Final = 4
#: Chunks a downloader asks for per request, and requests it keeps asked ahead: what is in
#: flight (16 x 64 KiB) keeps a loopback or LAN pipe full (benchmarks/media.py), and a text
#: sent on the same connection waits behind that much at most, not behind Yamux's whole window
#: (docs/libp2p.md L21).
CHUNKS_PER_REQUEST: Final = 8
REQUESTS_AHEAD: Final = 2
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
#: Progress events per transfer at most this often (and once at the end).
PROGRESS_EVERY_S: Final = 0.25
#: Disk space kept free beyond what a download needs (the database and logs must still grow).
DISK_MARGIN_BYTES: Final = 64 * 1024 * 1024
#: Inbound blob streams: a contact's device fetches one blob at a time per download, and at most
#: MAX_DOWNLOADS at once; a stranger holds no key to prove, so gets a slot or two to be refused.
BLOB_CAPS: Final = StreamCaps(per_peer=4, per_address=8, strangers=2, total=64)


def attachment_info(descriptor: Descriptor, state: str, *, path: str | None = None,
                    error: str | None = None) -> AttachmentInfo:
    """What the user sees of an attachment."""
    size = descriptor.original_size if descriptor.original_size is not None else descriptor.size
    return AttachmentInfo(name=descriptor.name, media_type=descriptor.media_type, size=size,
                          state=state, width=descriptor.width, height=descriptor.height,
                          blob_size=descriptor.ciphertext_size,
                          thumbnail=descriptor.thumbnail is not None, path=path, error=error)


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
                 connect_timeout_s: float, contact_name: Callable[[int], str]) -> None:
        self.db = db
        self.transport = transport
        self.bus = bus
        self.clock = clock
        self.store = store
        self.options = options
        self.auto_download_bytes = auto_download_bytes
        self.connect_timeout_s = connect_timeout_s
        self.contact_name = contact_name
        self._wake = trio.Event()
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
                if progress is None or progress.message_id != row.message_id.hex():
                    if progress is not None:
                        self._end_progress(progress)
                    progress = self._start_progress(row, descriptor, "out",
                                                    stream.remote_peer_id)
                progress.done = descriptor.chunk_span(request.first)[0]
                await self._serve(stream, descriptor, blob, request, progress)
        finally:
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

    async def _serve(self, stream: FrameStream, descriptor: Descriptor, blob: Path,
                     request: BlobGet, progress: _Progress) -> None:
        """Send the range header, then the requested sealed chunks, read from disk."""
        header: list[bytes] = [encode_range(request.first, request.count)]
        with blob.open("rb") as src:
            index, end = request.first, request.first + request.count
            while index < end:
                chunks = []
                for i in range(index, min(end, index + CHUNKS_PER_WRITE)):
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
            while True:
                self._wake = trio.Event()
                for row in self.db.attachments_in_state("downloading", "offered"):
                    if row.message_rowid in self._running:
                        continue
                    descriptor = Descriptor.from_bytes(row.descriptor)
                    if (row.state == "offered" and row.message_rowid not in self._wanted
                            and descriptor.ciphertext_size > self.auto_download_bytes):
                        continue
                    self._running[row.message_rowid] = trio.Event()
                    nursery.start_soon(self._download_task, row, descriptor)
                with trio.move_on_after(RETRY_S):
                    await self._wake.wait()

    async def wait_downloaded(self, message_id: bytes) -> AttachmentRow:
        """Download the received attachment of this message now (whatever its size) and wait
        until it is stored; returns its row. Raises `InvalidMessage` (no such attachment),
        `StorageError` (no disk space) or the `AttachmentCorrupt` / `TransportError` that
        stopped it."""
        row = self.db.attachment(message_id)
        if row is None or row.direction != "in":
            raise InvalidMessage(f"no received file {message_id.hex()}")
        while row.state != "done":
            descriptor = Descriptor.from_bytes(row.descriptor)
            self._check_space(descriptor, self.store.partial_blob(row.hash))
            if row.state == "failed":
                self.db.set_attachment_state(row.message_rowid, "offered",
                                             now_ms=self.clock.now_ms())
            self._wanted.add(row.message_rowid)
            running = self._running.get(row.message_rowid)
            if running is None:
                self.wake()
                await trio.sleep(0)
                running = self._running.get(row.message_rowid)
            if running is not None:
                await running.wait()
            else:  # pragma: no cover - the run loop starts it at once
                await trio.sleep(0.05)
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
        except (NodeError, OSError) as exc:
            reason = str(exc)
            final = isinstance(exc, AttachmentCorrupt | MediaError | LimitExceeded | OSError
                               | StorageError)
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
                devices = self.db.devices(row.contact_id)
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
                    raise TransportError("no device of the sender serves the file now: "
                                         + ("; ".join(reasons) or "it has no device"))

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
        windows = [(i, min(CHUNKS_PER_REQUEST, descriptor.chunks - i))
                   for i in range(first, descriptor.chunks, CHUNKS_PER_REQUEST)]
        try:
            asked = 0
            for number, (start, count) in enumerate(windows):
                # Keep REQUESTS_AHEAD windows asked for: the pipe stays full while what is in
                # flight on the shared connection, ahead of any text, stays small.
                ahead = [BlobGet(hash=descriptor.sha256, proof=proof, first=i, count=n)
                         for i, n in windows[asked:number + REQUESTS_AHEAD]]
                if ahead:
                    await stream.send([encode_request(r) for r in ahead])
                    asked += len(ahead)
                await self._receive_window(stream, peer_id, descriptor, cipher, start, count,
                                           out, sums, progress)
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
                              cipher: ChunkCipher, first: int, count: int, out: BinaryIO,
                              sums: _Sums, progress: _Progress) -> None:
        """Read the answer to one request: the range, then each chunk, opened and written."""
        reply = await stream.receive()
        if reply is None:
            raise _Retry(f"{peer_id}: closed the stream")
        answer = decode_reply(reply)
        if isinstance(answer, BlobError):
            raise _Retry(f"{peer_id}: {answer.code}")
        if answer.first != first or answer.count != count:
            raise DecodeError("blob reply: not the range asked for")
        last = descriptor.chunks - 1
        sealed_chunks: list[bytes] = []

        def keep() -> None:
            # Off the event loop (the AEAD and hashes release the GIL): the next window
            # arrives meanwhile.
            for index, sealed in enumerate(sealed_chunks, first):
                plain = cipher.open(index, sealed, final=index == last)  # AttachmentCorrupt
                out.write(plain)
                sums.add(sealed, plain)
            progress.done += sum(map(len, sealed_chunks))

        try:
            for index in range(first, first + count):
                sealed = await stream.receive()
                _, length = descriptor.chunk_span(index)
                if sealed is None or len(sealed) != length:
                    raise AttachmentCorrupt(
                        f"{len(sealed) if sealed else 0} bytes where {length} were due",
                        chunk=index)
                sealed_chunks.append(sealed)
        finally:
            # Chunks that came before a cut or a bad one are kept: a resumed download asks
            # for the first one missing.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(keep)
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

    def add(self, sealed: bytes, plain: bytes) -> None:
        self.blob.update(sealed)
        self.plain.update(plain)
        self.chunks += 1


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
