"""The relay's blob store (node/relay/blobs.py, PROTOCOL.md section 26.6) on real files:
resumable uploads across a reopen, the hash check, one copy for several mailboxes, quotas and
refusal codes, deletion and expiry."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from node.protocol import mailbox as mb
from node.relay.blobs import BlobLimits, RelayBlobs

LIMITS = BlobLimits(max_bytes=10_000, mailbox_max_bytes=15_000, storage_max_bytes=25_000,
                    default_ttl_s=100, max_ttl_s=1000)
BOX_A, BOX_B = b"a" * 32, b"b" * 32
CAP = b"c" * 16
CAPS = {mb.cap_hash(CAP)}


def put(blobs: RelayBlobs, data: bytes, off: int, piece: bytes, *, box: bytes = BOX_A,
        now: int = 0, cap: bytes | None = CAP, ttl: int = 0, size: int | None = None
        ) -> int | str:
    return blobs.put(mb.BlobPut(rid=1, box=box, hash=hashlib.sha256(data).digest(),
                                size=len(data) if size is None else size, off=off, data=piece,
                                ttl=ttl, cap=cap), registered=True, caps=CAPS, now=now)


def test_an_upload_resumes_after_a_reopen_and_is_read_back(tmp_path: Path) -> None:
    data = os.urandom(9000)
    blobs = RelayBlobs.open(tmp_path, LIMITS)
    assert put(blobs, data, 0, b"") == 0
    assert put(blobs, data, 0, data[:4000]) == 4000
    assert put(blobs, data, 1000, data[1000:2000]) == 4000  # not where it ends: nothing taken
    blobs.close()
    blobs = RelayBlobs.open(tmp_path, LIMITS)  # the relay restarted (kill -9 or not)
    assert put(blobs, data, 0, b"") == 4000
    blob_hash = hashlib.sha256(data).digest()
    assert blobs.read(BOX_A, blob_hash, 0, 10) == mb.UNKNOWN_BLOB  # not complete yet
    assert put(blobs, data, 4000, data[4000:]) == 9000
    assert blobs.read(BOX_A, blob_hash, 8990, 100) == data[8990:]
    assert blobs.read(BOX_B, blob_hash, 0, 10) == mb.UNKNOWN_BLOB  # not this mailbox's
    blobs.close()


def test_a_blob_that_does_not_match_its_hash_is_dropped(tmp_path: Path) -> None:
    data = os.urandom(3000)
    blobs = RelayBlobs.open(tmp_path, LIMITS)
    assert put(blobs, data, 0, data[:1000]) == 1000
    assert put(blobs, data, 1000, bytes(2000)) == mb.BAD_BLOB
    assert not list(tmp_path.glob("[0-9a-f]" * 64))
    assert put(blobs, data, 0, b"") == 0  # it can be uploaded again
    blobs.close()


def test_one_copy_serves_every_mailbox_and_goes_with_the_last(tmp_path: Path) -> None:
    data = os.urandom(5000)
    blob_hash = hashlib.sha256(data).digest()
    blobs = RelayBlobs.open(tmp_path, LIMITS)
    assert put(blobs, data, 0, data) == 5000
    assert put(blobs, data, 0, b"", box=BOX_B) == 5000  # no byte sent again
    assert len(list(tmp_path.glob("[0-9a-f]" * 64))) == 1
    blobs.delete(BOX_A, blob_hash)
    assert blobs.read(BOX_B, blob_hash, 0, 5000) == data
    blobs.delete(BOX_B, blob_hash)
    assert not list(tmp_path.glob("[0-9a-f]" * 64))
    blobs.close()


def test_refusals_in_the_order_written(tmp_path: Path) -> None:
    blobs = RelayBlobs.open(tmp_path, LIMITS)
    data = os.urandom(6000)
    request = mb.BlobPut(rid=1, box=BOX_A, hash=hashlib.sha256(data).digest(), size=6000,
                         off=0, data=b"", ttl=0, cap=CAP)
    assert blobs.put(request, registered=False, caps=CAPS, now=0) == mb.UNKNOWN_MAILBOX
    assert put(blobs, data, 0, b"", cap=None) == mb.UNAUTHORIZED
    assert put(blobs, data, 0, b"", cap=b"x" * 16) == mb.UNAUTHORIZED
    assert put(blobs, data, 0, b"", ttl=1001) == mb.BAD_TTL
    assert put(blobs, data, 0, b"", size=10_001) == mb.TOO_LARGE
    assert put(blobs, data, 0, b"") == 0
    second = os.urandom(9001)  # 6000 + 9001 > the mailbox's 15,000
    assert put(blobs, second, 0, b"") == mb.MAILBOX_FULL
    assert put(blobs, second, 0, b"", box=BOX_B) == 0
    third = os.urandom(10_000)  # 6000 + 9001 + 10,000 > the relay's 25,000
    assert put(blobs, third, 0, b"", box=b"c" * 32) == mb.STORAGE_FULL
    blobs.close()


def test_expired_blobs_go(tmp_path: Path) -> None:
    data = os.urandom(2000)
    blobs = RelayBlobs.open(tmp_path, LIMITS)
    assert put(blobs, data, 0, data, now=0, ttl=50) == 2000
    assert blobs.purge(now=49) == 0
    assert blobs.purge(now=50) == 1
    assert not list(tmp_path.glob("[0-9a-f]" * 64))
    blobs.close()
