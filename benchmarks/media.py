"""Attachment preparation and chunk encryption, against a raw file copy measured in the same run.

Image: re-encoding a 12-megapixel camera JPEG (photo-like pixels, EXIF with GPS, comment, XMP;
made with Pillow, tests/mediatools.py) into the 1600-px JPEG and thumbnail that are sent.
Chunk code: encrypting a 200 MiB file to another file through `encrypt_stream` (the chunks
senders use, `DEFAULT_CHUNK_BYTES`),
and decrypting it back through `decrypt_stream`, each against copying the same file with
`shutil.copyfileobj` (the floor: the same reads and writes, no crypto); for context, the crypto
alone (XChaCha20-Poly1305 and SHA-256 over those chunks in memory), which bounds both.

Transfer (PROTOCOL.md section 26.5), two nodes in this process on loopback (TCP, Noise, Yamux),
against raw libp2p measured the same way in the same run:
- raw libp2p: the same bytes as frames of a sealed chunk over one `FrameStream` between two bare
  `Transport`s, nothing done with them but counting;
- Pigeon: Bob downloads Alice's encrypted blob of the same file (`Node.save`): every chunk
  opened on arrival and written to disk, then the whole blob checked and decrypted into the
  store; the time from the request to the file stored;
- resume: the same download cut once after half the chunks (the stream reset) and resumed:
  bytes the sender sent in total, as a multiple of the blob, and the time against the uncut one;
- text during a transfer: Alice sends Bob a text every 20 ms while he downloads (a first run);
  the time from `send` to his `MessageReceived` (p50, p99).

Goals: re-encode under 1 s; encrypting and decrypting files each reach at least 60 % of the
crypto alone (the reads, writes and Python around it cost less than the crypto's 2/3); the
Pigeon transfer at least 0.7x raw libp2p; text p50 during a transfer under 50 ms. The ratio to
the copy is reported: it is mostly the price of the crypto on this CPU. Every measurement is
bounded (best of 3 runs, each one pass over the file; raw and Pigeon transfers alternate, best
of 3 each; the text and resume runs once each); a few minutes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import emit, parse_args, percentile
from node import ContactAdded, MessageReceived, Node
from node.device.config import Config
from node.device.media import prepare
from node.device.transfers import WRITE_BYTES
from node.net import FrameStream, Transport
from node.protocol.attachment import (
    DEFAULT_CHUNK_BYTES,
    TAG_BYTES,
    ChunkCipher,
    Descriptor,
    decrypt_stream,
    encrypt_stream,
)
from node.protocol.blob import MAX_BLOB_FRAME_BYTES
from tests.mediatools import camera_jpeg

MIB = 1024 * 1024
RUNS = 3
#: Runs of each transfer, raw and Pigeon in turns.
TRANSFER_RUNS = 3
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
RAW_PROTOCOL = "/pigeon-bench/raw/1.0.0"
#: The nodes of the transfer: loopback only, no discovery, commits as for kill -9 survival.
NODE_CONFIG = Config(listen=(LOOPBACK,), mdns=False, durability="normal",
                     receipt_jitter_s=0.0)


def best_seconds(step: Callable[[], object], runs: int = RUNS) -> float:
    """Shortest wall time of `runs` calls of `step` (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    def extra(parser: object) -> None:
        parser.add_argument("--mib", type=int, default=200,  # type: ignore[attr-defined]
                            help="size of the encrypted file in MiB (default 200)")

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    with tempfile.TemporaryDirectory(prefix="pigeon-media-bench-") as tmp:
        work = Path(tmp)
        photo = work / "photo.jpg"
        photo.write_bytes(camera_jpeg(4000, 3000))
        original_bytes = photo.stat().st_size
        prepared_sizes: list[int] = []

        def reencode() -> None:
            prepared = prepare(photo, work)
            prepared_sizes.append(prepared.size)
            prepared.discard()

        reencode_s = best_seconds(reencode)

        plain, sealed, opened, copied = (work / n for n in ("plain", "sealed", "opened", "copy"))
        with plain.open("wb") as out:
            for _ in range(args.mib):
                out.write(os.urandom(MIB))
        size = args.mib * MIB
        cipher = ChunkCipher.generate()
        results = []

        def copy() -> None:
            with plain.open("rb") as src, copied.open("wb") as dst:
                shutil.copyfileobj(src, dst, DEFAULT_CHUNK_BYTES)

        def encrypt() -> None:
            with plain.open("rb") as src, sealed.open("wb") as dst:
                results.append(encrypt_stream(src, dst, cipher))

        chunk = os.urandom(DEFAULT_CHUNK_BYTES)

        def crypto_floor() -> None:
            digest = hashlib.sha256()
            for index in range(size // len(chunk)):
                digest.update(cipher.seal(index, chunk, final=False))

        floor_s = best_seconds(crypto_floor)
        copy_s = best_seconds(copy)
        encrypt_s = best_seconds(encrypt)
        result = results[-1]
        descriptor = Descriptor(
            name="plain", media_type="application/octet-stream", size=result.size,
            chunk_bytes=DEFAULT_CHUNK_BYTES, sha256=result.sha256, key=cipher.key,
            nonce_prefix=cipher.nonce_prefix)

        def decrypt() -> None:
            with sealed.open("rb") as src, opened.open("wb") as dst:
                decrypt_stream(src, dst, descriptor)

        decrypt_s = best_seconds(decrypt)
        assert opened.stat().st_size == size

        transfer = trio.run(measure_transfers, work, plain, size)

    copy_rate, floor_rate, encrypt_rate, decrypt_rate = (
        size / MIB / s for s in (copy_s, floor_s, encrypt_s, decrypt_s))
    figures = {
        "photo_megapixels": 12,
        "reencode_ms": round(reencode_s * 1000, 1),
        "reencoded_kb": round(prepared_sizes[-1] / 1000, 1),
        "original_kb": round(original_bytes / 1000, 1),
        "file_mib": args.mib,
        "copy_mib_per_s": round(copy_rate, 1),
        "crypto_floor_mib_per_s": round(floor_rate, 1),
        "encrypt_mib_per_s": round(encrypt_rate, 1),
        "decrypt_mib_per_s": round(decrypt_rate, 1),
        "encrypt_ratio_to_copy": round(encrypt_s / copy_s, 2),
        "decrypt_ratio_to_copy": round(decrypt_s / copy_s, 2),
        "goal_reencode_ms": 1000,
        "encrypt_fraction_of_crypto_floor": round(encrypt_rate / floor_rate, 2),
        "decrypt_fraction_of_crypto_floor": round(decrypt_rate / floor_rate, 2),
        "goal_min_fraction_of_crypto_floor": 0.6,
    }
    figures.update(transfer)
    figures["goal_transfer_ratio_to_raw"] = 0.7
    figures["goal_text_p50_during_transfer_ms"] = 50
    figures["goals_met"] = (figures["reencode_ms"] <= 1000
                            and min(encrypt_rate, decrypt_rate) >= 0.6 * floor_rate
                            and transfer["transfer_ratio_to_raw"] >= 0.7
                            and transfer["text_p50_during_transfer_ms"] < 50)
    rows = [
        ("12-MP photo re-encode (1600 px + thumbnail)", reencode_s * 1000, "ms (goal < 1000)"),
        ("  original", figures["original_kb"], "kB"),
        ("  sent", figures["reencoded_kb"], "kB"),
        (f"raw file copy, {args.mib} MiB", copy_rate, "MiB/s"),
        ("crypto alone: AEAD + SHA-256 in memory", floor_rate, "MiB/s"),
        (f"encrypt file to file ({DEFAULT_CHUNK_BYTES // 1024} KiB chunks)", encrypt_rate, "MiB/s"),
        ("  ratio of time to copy", figures["encrypt_ratio_to_copy"], "x"),
        ("  fraction of crypto alone", figures["encrypt_fraction_of_crypto_floor"],
         "(goal >= 0.6)"),
        ("decrypt file to file, verified", decrypt_rate, "MiB/s"),
        ("  ratio of time to copy", figures["decrypt_ratio_to_copy"], "x"),
        ("  fraction of crypto alone", figures["decrypt_fraction_of_crypto_floor"],
         "(goal >= 0.6)"),
        (f"raw libp2p stream, {args.mib} MiB in {DEFAULT_CHUNK_BYTES // 1024} KiB frames",
         transfer["raw_libp2p_mib_per_s"],
         "MiB/s"),
        ("Pigeon download: verified, on disk, decrypted", transfer["transfer_mib_per_s"],
         "MiB/s"),
        ("  ratio to raw libp2p", transfer["transfer_ratio_to_raw"], "x (goal >= 0.7)"),
        ("download cut at half and resumed", transfer["resume_mib_per_s"], "MiB/s"),
        ("  bytes sent / blob", transfer["resume_sent_ratio"], "x"),
        ("  time / uncut download", transfer["resume_time_ratio"], "x"),
        ("text latency during a transfer, p50", transfer["text_p50_during_transfer_ms"],
         "ms (goal < 50)"),
        ("  p99", transfer["text_p99_during_transfer_ms"], "ms"),
        ("goals met", str(figures["goals_met"]), ""),
    ]
    emit("Pigeon attachments: image preparation and chunk encryption", rows, figures, args.json)
    return 0


async def raw_libp2p_seconds(plain: Path, size: int) -> float:
    """Seconds to move `size` bytes of `plain` as frames of a sealed chunk from one bare Transport to
    another, until the receiver has counted them all."""
    got = trio.Event()
    received = 0

    async def count(stream: FrameStream) -> None:
        nonlocal received
        while (frame := await stream.receive()) is not None:
            received += len(frame)
            if received >= size:
                got.set()

    async with Transport.open(os.urandom(32), [LOOPBACK]) as a, \
            Transport.open(os.urandom(32), [LOOPBACK]) as b:
        b.set_stream_handler(RAW_PROTOCOL, count, max_frame_bytes=MAX_BLOB_FRAME_BYTES)
        stream = await a.open_stream(b.peer_id, b.listen_addrs(), RAW_PROTOCOL, timeout=10,
                                     max_frame_bytes=MAX_BLOB_FRAME_BYTES)
        start = time.perf_counter()
        with plain.open("rb") as src:
            # As the blob server does: WRITE_BYTES of frames per write, read from disk.
            while batch := [block for _ in range(max(1, WRITE_BYTES // DEFAULT_CHUNK_BYTES))
                            if (block := src.read(DEFAULT_CHUNK_BYTES + TAG_BYTES))]:
                await stream.send(batch)
        await got.wait()
        seconds = time.perf_counter() - start
        await stream.aclose()
    return seconds


async def measure_transfers(work: Path, plain: Path, size: int) -> dict[str, float]:
    """The transfer figures (see the module docstring)."""
    async with Node.open(work / "alice", NODE_CONFIG.replace(display_name="alice"),
                         create=True) as alice, \
            Node.open(work / "bob", NODE_CONFIG.replace(display_name="bob"),
                      create=True) as bob:
        with alice.events() as events:
            bob.add_contact("alice", alice.invite())
            async for event in events:
                if isinstance(event, ContactAdded):
                    break
        bob._transfers.auto_download_bytes = 0  # every download starts with `save`
        message_id = await alice.send_file("bob", plain)
        descriptor = Descriptor.from_bytes(
            alice._db.attachment(bytes.fromhex(message_id)).descriptor)  # type: ignore[union-attr]
        blob = descriptor.ciphertext_size
        while bob._db.attachment(bytes.fromhex(message_id)) is None:
            await trio.sleep(0.01)

        # An uncut download, with texts flowing the other way round meanwhile.
        latencies: list[float] = []
        sent_at: dict[str, float] = {}
        done = trio.Event()

        async def texts() -> None:
            with bob.events() as bob_events:
                async with trio.open_nursery() as nursery:
                    async def receive() -> None:
                        async for event in bob_events:
                            if isinstance(event, MessageReceived) and event.message_id in sent_at:
                                latencies.append(time.perf_counter() - sent_at[event.message_id])
                    nursery.start_soon(receive)
                    while not done.is_set():
                        start = time.perf_counter()
                        sent_at[await alice.send("bob", "ping")] = start
                        await trio.sleep(0.02)
                    await trio.sleep(1.0)  # the last ones arrive
                    nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(texts)
            stored = await bob.save(message_id)
            done.set()
        assert stored.stat().st_size == size

        # Raw libp2p and Pigeon downloads in turns (the best of each): a machine that is
        # busier during one of them does not decide the ratio alone.
        raw_runs, transfer_runs = [], []
        row = bob._db.attachment(bytes.fromhex(message_id))
        assert row is not None
        for _ in range(TRANSFER_RUNS):
            raw_runs.append(await raw_libp2p_seconds(plain, size))
            bob._db.set_attachment_state(row.message_rowid, "offered", now_ms=0)
            for leftover in (bob.data_dir.path / "files").iterdir():
                leftover.unlink()
            start = time.perf_counter()
            await bob.save(message_id)
            transfer_runs.append(time.perf_counter() - start)
        raw_s, transfer_s = min(raw_runs), min(transfer_runs)

        # The same download again, cut once at half and resumed.
        bob._db.set_attachment_state(row.message_rowid, "offered", now_ms=0)
        served = [0]
        real_serve = alice._transfers._serve
        cut = [False]

        async def counting_serve(stream: FrameStream, descriptor: Descriptor, src: Any,
                                 request: Any, progress: Any) -> None:
            if cut[0] or request.first < descriptor.chunks // 2:
                served[0] += sum(descriptor.chunk_span(i)[1]
                                 for i in range(request.first, request.first + request.count))
                await real_serve(stream, descriptor, src, request, progress)
                return
            cut[0] = True  # half way: the stream breaks
            await stream.reset()

        alice._transfers._serve = counting_serve  # type: ignore[method-assign]
        for leftover in (bob.data_dir.path / "files").iterdir():
            leftover.unlink()
        start = time.perf_counter()
        await bob.save(message_id)
        resume_s = time.perf_counter() - start
    return {
        "raw_libp2p_mib_per_s": round(size / MIB / raw_s, 1),
        "transfer_mib_per_s": round(size / MIB / transfer_s, 1),
        "transfer_ratio_to_raw": round(raw_s / transfer_s, 2),
        "resume_mib_per_s": round(size / MIB / resume_s, 1),
        "resume_sent_ratio": round(served[0] / blob, 3),
        "resume_time_ratio": round(resume_s / transfer_s, 2),
        "text_p50_during_transfer_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "text_p99_during_transfer_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "texts_during_transfer": len(latencies),
    }


if __name__ == "__main__":
    sys.exit(main())
