"""Preparing a file to be sent as an attachment, and restoring one received (PROTOCOL.md
section 26 "Attachments"; the chunk encryption itself is `node.protocol.attachment`).

Sending (`prepare_attachment`):

- Images (JPEG, PNG, WebP; Pillow here reads no HEIC) are re-encoded: EXIF orientation applied,
  the longest side brought down to `MediaOptions.max_side` (1600 px), and written into a fresh
  image, so every metadata block of the original (EXIF with GPS, XMP, comments, maker notes)
  is left behind; only the ICC colour profile is kept, since without it wide-gamut photos show
  wrong colours. Opaque images become JPEG at quality 80. Images with transparency become WebP
  (quality 80, lossy with an alpha channel): JPEG has no alpha, and a 1600-px photo-like PNG
  is several megabytes where WebP is the size of the JPEG; every current platform decodes it.
  A thumbnail (longest side 96 px, JPEG, under ~4 KB) goes inline in the descriptor.
- `original=True` sends an image's exact bytes (metadata included); the thumbnail and size
  are still made when the image decodes.
- An image that does not decode, is animated, or has more than `max_pixels` pixels is sent as a
  plain file, its bytes untouched.
- Other files are compressed with Zstandard when that saves at least 5 %; the descriptor says so.

Every size is checked before anything is allocated: the file's size against `max_bytes` before
it is opened, the image's pixel count (read from its header) before it is decoded, and the bytes
actually read while they are read (a file that grows is refused, not followed).

Receiving (`restore_attachment`): the blob is decrypted chunk by chunk, decompressed when the
descriptor says so (never beyond its `osize`), into a temporary file next to the destination
that is renamed into place only once every chunk and the hash checked out.
"""

from __future__ import annotations

import contextlib
import io
import mimetypes
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, cast

import zstandard
from PIL import Image, ImageOps

from node.errors import AttachmentCorrupt, LimitExceeded, MediaError
from node.protocol.attachment import (
    DEFAULT_CHUNK_BYTES,
    MAX_ATTACHMENT_BYTES,
    MAX_THUMBNAIL_BYTES,
    ChunkCipher,
    Compression,
    Descriptor,
    check_media_type,
    check_name,
    decrypt_chunks,
    encrypt_stream,
)
from node.protocol.keys import Random

__all__ = ["MAX_IMAGE_PIXELS", "MediaOptions", "Prepared", "prepare", "prepare_attachment",
           "restore_attachment"]

#: Most pixels of an image we decode. The largest phone sensors (108 MP) fit; decoding a
#: 128-MP image with alpha takes 512 MiB, the most we let one attachment cost. Larger images go
#: as plain files.
MAX_IMAGE_PIXELS: Final = 128_000_000

# Pillow's own decompression-bomb guard, set explicitly to ours (it warns above the limit and
# refuses above twice it); `_open_image` checks the header's size against the caller's
# `max_pixels` before Pillow decodes anything.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

#: Formats we re-encode; anything else Pillow might read is sent as a plain file.
IMAGE_FORMATS: Final = ("JPEG", "PNG", "WEBP")

#: zstd level 3 (the library's default): most of the gain of higher levels at a fraction of
#: their time; the content checksum lets a receiver's decoder catch a bad frame itself.
ZSTD_LEVEL: Final = 3
#: How much of a file is compressed first to decide whether compressing all of it pays off.
COMPRESSION_SAMPLE_BYTES: Final = 1024 * 1024
#: Copy and decompression buffer.
IO_BYTES: Final = 1024 * 1024
#: ICC profiles larger than this are dropped (the common ones, sRGB and Display P3, are < 4 KB).
MAX_ICC_BYTES: Final = 64 * 1024
OCTET_STREAM: Final = "application/octet-stream"


@dataclass(frozen=True, kw_only=True, slots=True)
class MediaOptions:
    """How files are prepared. Defaults are what a phone-sized screen needs."""

    #: Largest attachment sent or accepted (at most the protocol's 2 GiB).
    max_bytes: int = MAX_ATTACHMENT_BYTES
    #: Longest side of a re-encoded image, in pixels.
    max_side: int = 1600
    #: JPEG and WebP quality of a re-encoded image.
    quality: int = 80
    #: Longest side of the thumbnail, in pixels.
    thumbnail_side: int = 96
    #: The thumbnail's quality is lowered until it fits this many bytes.
    thumbnail_bytes: int = 4096
    #: Images with more pixels are sent as plain files, undecoded.
    max_pixels: int = MAX_IMAGE_PIXELS
    #: Chunk size of the encryption.
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: Compress a non-image file only when this fraction of it is saved (5 %).
    min_compression_saving: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.max_bytes <= MAX_ATTACHMENT_BYTES:
            raise ValueError(f"max_bytes must be 0 to {MAX_ATTACHMENT_BYTES}")
        if not 16 <= self.max_side <= 65_535 or not 16 <= self.thumbnail_side <= 512:
            raise ValueError("max_side must be 16 to 65535, thumbnail_side 16 to 512")
        if not 1 <= self.quality <= 100:
            raise ValueError("quality must be 1 to 100")
        if not 256 <= self.thumbnail_bytes <= MAX_THUMBNAIL_BYTES:
            raise ValueError(f"thumbnail_bytes must be 256 to {MAX_THUMBNAIL_BYTES}")
        if not 1 <= self.max_pixels <= MAX_IMAGE_PIXELS:
            raise ValueError(f"max_pixels must be 1 to {MAX_IMAGE_PIXELS}")
        if not 0 <= self.min_compression_saving < 1:
            raise ValueError("min_compression_saving must be in [0, 1)")


@dataclass(frozen=True, kw_only=True, slots=True)
class Prepared:
    """A file made ready to encrypt: `path` holds the bytes to encrypt (the original file, or
    a file `prepare` wrote into the work directory, then `temporary` is True)."""

    path: Path
    temporary: bool
    size: int
    name: str
    media_type: str
    compression: Compression | None = None
    original_size: int | None = None
    thumbnail: bytes | None = None
    width: int | None = None
    height: int | None = None

    def discard(self) -> None:
        """Delete the prepared file if `prepare` made it."""
        if self.temporary:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _check_file(path: Path, max_bytes: int) -> int:
    """Size of the regular file at `path`, or the `MediaError` that says why it cannot be sent."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file", reason="missing") from None
    except OSError as exc:
        raise MediaError(f"{path}: cannot be read ({exc.strerror})", reason="unreadable") from exc
    if stat.S_ISDIR(info.st_mode):
        raise MediaError(f"{path}: is a directory, not a file", reason="directory")
    if not stat.S_ISREG(info.st_mode):
        raise MediaError(f"{path}: not a regular file", reason="unreadable")
    if info.st_size > max_bytes:
        raise MediaError(f"{path}: {info.st_size:,} bytes, more than the largest attachment "
                         f"({max_bytes:,} bytes)", reason="too-large")
    return info.st_size


def _open(path: Path) -> BinaryIO:
    """`path` opened for reading, or the `MediaError` that says why it cannot be. Only the
    opening is translated: an error writing elsewhere inside the caller's `with` stays itself."""
    try:
        return path.open("rb")
    except IsADirectoryError:
        raise MediaError(f"{path}: is a directory, not a file", reason="directory") from None
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file", reason="missing") from None
    except OSError as exc:
        raise MediaError(f"{path}: cannot be read ({exc.strerror or exc})",
                         reason="unreadable") from exc


def _safe_name(name: str, suffix: str | None = None) -> str:
    """`name` as a valid attachment name (PROTOCOL.md section 26.1), with `suffix` replacing its
    extension when given."""
    cleaned = "".join("_" if c in "/\\" or ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF else c
                      for c in name).strip() or "file"
    if cleaned in (".", ".."):
        cleaned = "file"
    if suffix is not None:
        stem = cleaned.rsplit(".", 1)[0] if "." in cleaned.lstrip(".") else cleaned
        cleaned = stem + suffix
    else:
        suffix = "." + cleaned.rsplit(".", 1)[1] if "." in cleaned.lstrip(".") else ""
        if len(suffix.encode()) > 32:
            suffix = ""
    while len(cleaned.encode("utf-8")) > 255:
        stem = cleaned[: len(cleaned) - len(suffix)]
        cleaned = stem[:-1] + suffix
    return cleaned if check_name(cleaned) is None else "file" + (suffix or "")


def _guess_type(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name, strict=False)
    guessed = (guessed or OCTET_STREAM).lower()
    return guessed if check_media_type(guessed) is None else OCTET_STREAM


@dataclass(frozen=True, slots=True)
class _Image:
    data: bytes | None  # the re-encoded image, None when the original bytes go
    media_type: str
    suffix: str
    width: int
    height: int
    thumbnail: bytes | None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)


def _thumbnail(image: Image.Image, options: MediaOptions) -> bytes | None:
    thumb = image.copy()
    thumb.thumbnail((options.thumbnail_side, options.thumbnail_side), Image.Resampling.LANCZOS)
    if thumb.mode != "RGB":
        # JPEG has no alpha: transparent parts show on white, as most chat backgrounds.
        rgba = thumb.convert("RGBA")
        thumb = Image.new("RGB", rgba.size, (255, 255, 255))
        thumb.paste(rgba, mask=rgba.getchannel("A"))
    smallest: bytes | None = None
    for quality in (70, 55, 40, 25, 10):
        out = io.BytesIO()
        thumb.save(out, "JPEG", quality=quality, optimize=True)
        smallest = out.getvalue()
        if len(smallest) <= options.thumbnail_bytes:
            return smallest
    return smallest if smallest is not None and len(smallest) <= MAX_THUMBNAIL_BYTES else None


def _process_image(path: Path, *, original: bool, options: MediaOptions) -> _Image | None:
    """The re-encoded image (or, with `original`, just its size and thumbnail); None when the
    file is not an image we handle and goes as a plain file."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as opened:
            width, height = opened.size
            # The header's size, before a single pixel is decoded.
            if width * height > options.max_pixels or width < 1 or height < 1:
                return None
            if getattr(opened, "n_frames", 1) > 1:
                return None  # animated: re-encoding would keep one frame
            source_format = opened.format
            icc = opened.info.get("icc_profile")
            if opened.format == "JPEG":
                # Decode at 1/2, 1/4 or 1/8 scale when that still leaves `max_side`
                # (libjpeg's DCT scaling): a 12-MP photo decodes 4x faster and smaller.
                scale = max(width, height) / options.max_side
                opened.draft("RGB", (int(width / scale), int(height / scale)))
            opened.load()
            upright = ImageOps.exif_transpose(opened)
        alpha = _has_alpha(upright)
        mode = "RGBA" if alpha else "RGB"
        converted = upright if upright.mode == mode else upright.convert(mode)
        converted.thumbnail((options.max_side, options.max_side), Image.Resampling.LANCZOS)
        # A fresh image holds pixels only: no EXIF, XMP, comments or other info of the source.
        clean = Image.new(mode, converted.size)
        clean.paste(converted)
        thumbnail = _thumbnail(clean, options)
        if original:
            return _Image(None, Image.MIME[source_format or "JPEG"], "", upright.width,
                          upright.height, thumbnail)
        # Only an RGB profile (ICC header: colour space at bytes 16..20) describes the RGB
        # pixels written; a CMYK or grey source's profile would misdescribe them.
        keep_icc = (icc if isinstance(icc, bytes) and len(icc) <= MAX_ICC_BYTES
                    and icc[16:20] == b"RGB " else None)
        out = io.BytesIO()
        if alpha:
            clean.save(out, "WEBP", quality=options.quality, icc_profile=keep_icc)
            media_type, suffix = "image/webp", ".webp"
        else:
            clean.save(out, "JPEG", quality=options.quality, optimize=True,
                       icc_profile=keep_icc)
            media_type, suffix = "image/jpeg", ".jpg"
        return _Image(out.getvalue(), media_type, suffix, clean.width, clean.height, thumbnail)
    except MemoryError:
        raise
    except Exception:
        # Pillow's decoders raise many kinds (OSError for truncation, SyntaxError, ValueError,
        # struct.error, EOFError, DecompressionBombError, ...): whatever fails to decode goes as
        # the file it is.
        return None


def _compress(path: Path, size: int, work_dir: Path, options: MediaOptions) -> Path | None:
    """A zstd frame of the file in `work_dir`, if it saves `min_compression_saving`; else None."""
    if size == 0:
        return None
    keep_below = size * (1 - options.min_compression_saving)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    with _open(path) as src:
        sample = src.read(COMPRESSION_SAMPLE_BYTES)
        if len(compressor.compress(sample)) > len(sample) * (1 - options.min_compression_saving):
            return None
        src.seek(0)
        target = _temporary(work_dir, ".zst")
        try:
            with target.open("wb") as dst:
                try:
                    read, _ = compressor.copy_stream(src, dst, size=size, read_size=IO_BYTES)
                except zstandard.ZstdError:  # more bytes than the size pledged in the frame
                    read = -1
            if read != size:
                raise MediaError(f"{path}: changed while it was read", reason="unreadable")
            if target.stat().st_size > keep_below:
                target.unlink()
                return None
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            raise
    return target


def _temporary(work_dir: Path, suffix: str) -> Path:
    return work_dir / f"attachment-{os.urandom(8).hex()}{suffix}"


def prepare(path: Path | str, work_dir: Path | str, *, original: bool = False,
            options: MediaOptions | None = None) -> Prepared:
    """Make `path` ready to encrypt (see the module docstring); files it writes go in
    `work_dir`. Raises `MediaError` (missing, directory, unreadable, too-large)."""
    options = options or MediaOptions()
    path, work_dir = Path(path), Path(work_dir)
    size = _check_file(path, options.max_bytes)
    _open(path).close()  # unreadable files are refused here, before any decoding is tried
    image = _process_image(path, original=original, options=options)
    if image is not None and image.data is not None:
        target = _temporary(work_dir, image.suffix)
        target.write_bytes(image.data)
        return Prepared(path=target, temporary=True, size=len(image.data),
                        name=_safe_name(path.name, image.suffix), media_type=image.media_type,
                        thumbnail=image.thumbnail, width=image.width, height=image.height)
    if image is not None:  # original=True: the exact bytes, with the image's size and thumbnail
        return Prepared(path=path, temporary=False, size=size, name=_safe_name(path.name),
                        media_type=image.media_type, thumbnail=image.thumbnail,
                        width=image.width, height=image.height)
    name = _safe_name(path.name)
    # A file that claims an image type but did not decode as one is not announced as an image.
    media_type = _guess_type(name)
    if media_type.startswith("image/"):
        media_type = OCTET_STREAM
    # Compression is lossless: `original` (the exact bytes) does not need to skip it.
    compressed = _compress(path, size, work_dir, options)
    if compressed is not None:
        return Prepared(path=compressed, temporary=True, size=compressed.stat().st_size,
                        name=name, media_type=media_type, compression="zstd",
                        original_size=size)
    return Prepared(path=path, temporary=False, size=size, name=name, media_type=media_type)


def prepare_attachment(path: Path | str, work_dir: Path | str, *, original: bool = False,
                       options: MediaOptions | None = None,
                       rng: Random = os.urandom) -> tuple[Descriptor, Path]:
    """Prepare `path` and encrypt it with a fresh key: returns the descriptor (for the message)
    and the path of the blob written into `work_dir` (for the transfer; the caller deletes it
    once sent). Raises `MediaError`."""
    options = options or MediaOptions()
    work_dir = Path(work_dir)
    prepared = prepare(path, work_dir, original=original, options=options)
    blob = _temporary(work_dir, ".blob")
    cipher = ChunkCipher.generate(rng)
    try:
        with _open(prepared.path) as src, blob.open("wb") as dst:
            result = encrypt_stream(src, dst, cipher, chunk_bytes=options.chunk_bytes,
                                    max_bytes=min(prepared.size, options.max_bytes))
            if src.read(1):
                raise LimitExceeded("MAX_ATTACHMENT_BYTES")
    except LimitExceeded:
        blob.unlink()
        raise MediaError(f"{path}: changed while it was read", reason="unreadable") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            blob.unlink()
        raise
    finally:
        prepared.discard()
    if result.size != prepared.size:
        blob.unlink()
        raise MediaError(f"{path}: changed while it was read", reason="unreadable")
    descriptor = Descriptor(
        name=prepared.name, media_type=prepared.media_type, size=result.size,
        chunk_bytes=options.chunk_bytes, sha256=result.sha256, key=cipher.key,
        nonce_prefix=cipher.nonce_prefix, compression=prepared.compression,
        original_size=prepared.original_size, thumbnail=prepared.thumbnail,
        width=prepared.width, height=prepared.height)
    return descriptor, blob


class _ChunkReader(io.RawIOBase):
    """The decrypted plaintext of a blob as a readable file (for the zstd decoder)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buffer = memoryview(chunk)
        n = min(len(buffer), len(self._buffer))
        buffer[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def restore_attachment(descriptor: Descriptor, blob: Path | str, dest: Path | str, *,
                       options: MediaOptions | None = None) -> int:
    """Decrypt (and decompress) the blob at `blob` into the file `dest`; returns its size.

    `dest` appears only when everything checked out. Raises `AttachmentCorrupt` (naming the bad
    chunk when there is one) or `LimitExceeded` for an attachment over `options.max_bytes`.
    """
    options = options or MediaOptions()
    blob, dest = Path(blob), Path(dest)
    final_size = descriptor.original_size if descriptor.compression else descriptor.size
    if max(descriptor.size, final_size or 0) > options.max_bytes:
        raise LimitExceeded("MAX_ATTACHMENT_BYTES",
                            f"{max(descriptor.size, final_size or 0)} > {options.max_bytes}")
    part = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.part")
    try:
        with _open(blob) as src, part.open("wb") as out:
            chunks = decrypt_chunks(src, descriptor)
            if descriptor.compression is None:
                written = 0
                for plain in chunks:
                    out.write(plain)
                    written += len(plain)
            else:
                assert descriptor.original_size is not None
                written = _decompress(chunks, out, descriptor.original_size)
        os.replace(part, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    return written


def _decompress(chunks: Iterator[bytes], out: BinaryIO, original_size: int) -> int:
    """Decode the one zstd frame in `chunks` into `out`, refusing output beyond
    `original_size` before it is produced, and a frame that ends short of it."""
    written = 0
    reader = zstandard.ZstdDecompressor().stream_reader(
        cast(BinaryIO, _ChunkReader(chunks)), read_size=IO_BYTES, read_across_frames=False)
    try:
        while True:
            # Ask for one byte more than may remain: getting it means the frame is too long.
            data = reader.read(min(IO_BYTES, original_size - written + 1))
            if not data:
                break
            written += len(data)
            if written > original_size:
                raise AttachmentCorrupt(f"decompresses to more than {original_size} bytes")
            out.write(data)
        # Drain the blob: the remaining chunks and the hash are still checked.
        for _ in chunks:
            pass
    except zstandard.ZstdError as exc:
        raise AttachmentCorrupt(f"not a valid zstd frame ({exc})") from exc
    if written != original_size:
        raise AttachmentCorrupt(f"decompresses to {written} bytes, not {original_size}")
    return written
