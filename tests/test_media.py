"""Preparing files as attachments and restoring them (node/device/media.py, PROTOCOL.md section
26): real images made with Pillow, real files, real encryption; what is checked is what the
receiver would get."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from node.device.media import MediaOptions, prepare_attachment, restore_attachment
from node.errors import AttachmentCorrupt, LimitExceeded, LocalError, MediaError
from node.protocol.attachment import Descriptor
from tests.mediatools import (
    CAMERA_MAKE,
    COMMENT,
    GPS_DATUM,
    XMP,
    camera_exif,
    camera_jpeg,
    pixels,
)

SMALL = MediaOptions(chunk_bytes=4096)


def _send(path: Path, work: Path, **kwargs: object) -> tuple[Descriptor, bytes]:
    """Prepare and encrypt `path`, check the blob, restore it; (descriptor, restored bytes)."""
    descriptor, blob = prepare_attachment(path, work, **kwargs)  # type: ignore[arg-type]
    assert blob.stat().st_size == descriptor.ciphertext_size
    assert Descriptor.from_bytes(descriptor.to_bytes()) == descriptor
    out = work / "restored"
    size = restore_attachment(descriptor, blob, out)
    restored = out.read_bytes()
    assert size == len(restored)
    return descriptor, restored


def _leftovers(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if p.name.startswith(("attachment-", ".")))


def _assert_no_metadata(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    assert len(image.getexif()) == 0
    assert not {"exif", "xmp", "comment", "XML:com.adobe.xmp"} & set(image.info)
    for marker in (b"Exif", b"GPS", GPS_DATUM.encode(), CAMERA_MAKE.encode(), COMMENT,
                   b"secret-xmp", b"http://ns.adobe.com/xap"):
        assert marker not in data, marker


def test_a_12_megapixel_camera_photo_is_shrunk_and_stripped(tmp_path: Path) -> None:
    original = camera_jpeg(4000, 3000)
    # The metadata is there to strip: GPS block, camera make, comment, XMP.
    with Image.open(io.BytesIO(original)) as source:
        assert source.getexif().get_ifd(0x8825)
    for marker in (b"Exif", b"GPS", CAMERA_MAKE.encode(), COMMENT, b"secret-xmp"):
        assert marker in original
    path = tmp_path / "IMG_0001.jpeg"
    path.write_bytes(original)
    work = tmp_path / "work"
    work.mkdir()

    descriptor, sent = _send(path, work)

    assert descriptor.media_type == "image/jpeg" and descriptor.name == "IMG_0001.jpg"
    assert descriptor.compression is None
    assert len(sent) == descriptor.size < 500_000
    image = Image.open(io.BytesIO(sent))
    assert image.format == "JPEG" and image.size == (1600, 1200)
    assert (descriptor.width, descriptor.height) == image.size
    _assert_no_metadata(sent)
    assert descriptor.thumbnail is not None and len(descriptor.thumbnail) <= 4096
    thumb = Image.open(io.BytesIO(descriptor.thumbnail))
    assert thumb.format == "JPEG" and max(thumb.size) == 96
    _assert_no_metadata(descriptor.thumbnail)
    # Only the blob (and the restored file) remain: the re-encoded image was removed.
    assert sorted(p.suffix for p in work.iterdir()) == ["", ".blob"]


def test_original_keeps_the_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(camera_jpeg(400, 300, orientation=6))
    descriptor, sent = _send(path, tmp_path, original=True)
    assert sent == path.read_bytes()
    assert descriptor.media_type == "image/jpeg" and descriptor.name == "photo.jpg"
    # Still described as displayed: turned upright, with a thumbnail.
    assert (descriptor.width, descriptor.height) == (300, 400)
    assert descriptor.thumbnail is not None


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored landscape: left half red, right half blue. Orientation 6 means "rotate 90 degrees
    # clockwise to display", so the upright image is portrait, red on top.
    stored = Image.new("RGB", (300, 200), (220, 0, 0))
    stored.paste((0, 0, 220), (150, 0, 300, 200))
    path = tmp_path / "rotated.jpg"
    stored.save(path, "JPEG", exif=camera_exif(orientation=6))
    descriptor, sent = _send(path, tmp_path)
    image = Image.open(io.BytesIO(sent)).convert("RGB")
    assert image.size == (200, 300) == (descriptor.width, descriptor.height)
    top, bottom = image.getpixel((100, 40)), image.getpixel((100, 260))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]
    _assert_no_metadata(sent)


def test_large_images_are_capped_at_max_side(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    pixels(900, 300).save(path)
    descriptor, sent = _send(path, tmp_path, options=MediaOptions(max_side=600))
    assert Image.open(io.BytesIO(sent)).size == (600, 200)
    assert descriptor.media_type == "image/jpeg" and descriptor.name == "wide.jpg"


def test_png_with_transparency_becomes_webp_with_alpha(tmp_path: Path) -> None:
    path = tmp_path / "sticker.png"
    pixels(200, 160, alpha=True).save(path)
    descriptor, sent = _send(path, tmp_path)
    image = Image.open(io.BytesIO(sent))
    assert image.format == "WEBP" and image.mode == "RGBA"
    assert descriptor.media_type == "image/webp" and descriptor.name == "sticker.webp"
    alpha = image.getchannel("A")
    low, high = alpha.getextrema()  # type: ignore[misc]
    assert low < 50 and high > 200  # transparency survived
    assert descriptor.thumbnail is not None


def test_a_compressible_file_is_compressed_and_restores(tmp_path: Path) -> None:
    text = "".join(f"{i:08d} INFO connection from 192.0.2.{i % 250}\n" for i in range(20_000))
    path = tmp_path / "server-log.txt"
    path.write_text(text)
    descriptor, restored = _send(path, tmp_path, options=SMALL)
    assert descriptor.compression == "zstd" and descriptor.original_size == len(text)
    assert descriptor.size < 0.5 * len(text)
    assert descriptor.media_type == "text/plain" and descriptor.thumbnail is None
    assert restored == text.encode()


def test_an_incompressible_file_is_sent_as_it_is(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "archive.bin"
    path.write_bytes(data)
    descriptor, restored = _send(path, tmp_path, options=SMALL)
    assert descriptor.compression is None and descriptor.size == len(data)
    assert descriptor.media_type == "application/octet-stream"
    assert restored == data


def test_a_file_saving_less_than_5_percent_is_not_compressed(tmp_path: Path) -> None:
    # 97 % random bytes, 3 % zeros: zstd saves about 3 %.
    data = os.urandom(97_000) + bytes(3_000)
    path = tmp_path / "mostly-random.dat"
    path.write_bytes(data)
    descriptor, restored = _send(path, tmp_path, options=SMALL)
    assert descriptor.compression is None and restored == data


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_image_that_does_not_decode_goes_as_a_file(tmp_path: Path, damage: str) -> None:
    whole = camera_jpeg(300, 200)
    data = whole[: len(whole) // 2] if damage == "truncated" else b"\xff\xd8\xff" + bytes(5000)
    path = tmp_path / "broken.jpg"
    path.write_bytes(data)
    descriptor, restored = _send(path, tmp_path)
    assert restored == data  # the exact bytes, not an image made of half a picture
    assert descriptor.media_type == "application/octet-stream"
    assert descriptor.name == "broken.jpg" and descriptor.width is None
    assert descriptor.thumbnail is None


def test_an_image_over_the_pixel_limit_goes_as_a_file_undecoded(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    pixels(200, 200).save(path)
    descriptor, restored = _send(path, tmp_path, options=MediaOptions(max_pixels=10_000))
    assert restored == path.read_bytes() and descriptor.width is None


def test_missing_directory_unreadable_and_too_large_files_are_refused(tmp_path: Path) -> None:
    cases: dict[str, Path] = {"missing": tmp_path / "nothing-here.jpg", "directory": tmp_path}
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases["unreadable"] = fifo
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(2000))
    cases["too-large"] = big
    for reason, path in cases.items():
        with pytest.raises(MediaError) as caught:
            prepare_attachment(path, tmp_path, options=MediaOptions(max_bytes=1000))
        assert caught.value.reason == reason
        assert isinstance(caught.value, LocalError) and str(path) in str(caught.value)
    assert _leftovers(tmp_path) == []


_UNREADABLE_CHECK = """
import os, sys
from pathlib import Path
from node.device.media import prepare_attachment
from node.errors import MediaError
if os.getuid() == 0:  # imported first: the interpreter's files may be root's alone
    os.setgid(65534)
    os.setuid(65534)  # nobody: root reads any file, so the check runs as a user that cannot
try:
    prepare_attachment(Path(sys.argv[1]), Path(sys.argv[2]))
except MediaError as exc:
    print(exc.reason)
"""


def test_a_file_without_read_permission_is_refused(tmp_path: Path) -> None:
    """Run in a child process as an unprivileged user (as root, every file is readable)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    tmp_path.chmod(0o755)
    shared.chmod(0o777)
    path = shared / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    child = subprocess.run(
        [sys.executable, "-c", _UNREADABLE_CHECK, str(path), str(shared)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "unreadable"


def test_a_tampered_blob_never_produces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(20_000))
    descriptor, blob = prepare_attachment(path, tmp_path, options=SMALL)
    data = bytearray(blob.read_bytes())
    data[descriptor.chunk_span(3)[0] + 10] ^= 0x40
    blob.write_bytes(bytes(data))
    dest = tmp_path / "out.bin"
    with pytest.raises(AttachmentCorrupt) as caught:
        restore_attachment(descriptor, blob, dest)
    assert caught.value.chunk == 3
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_a_compressed_attachment_decompressing_beyond_its_size_is_refused(
        tmp_path: Path) -> None:
    path = tmp_path / "zeros.txt"
    path.write_bytes(bytes(1_000_000))
    descriptor, blob = prepare_attachment(path, tmp_path, options=SMALL)
    assert descriptor.compression == "zstd" and descriptor.size < 1000
    dest = tmp_path / "out"
    for lie in (10_000, 2_000_000):
        with pytest.raises(AttachmentCorrupt, match="decompresses to"):
            restore_attachment(Descriptor(**{**_fields(descriptor), "original_size": lie}),
                               blob, dest)
        assert not dest.exists()


def test_restore_refuses_an_attachment_over_the_local_limit(tmp_path: Path) -> None:
    path = tmp_path / "zeros.txt"
    path.write_bytes(bytes(100_000))
    descriptor, blob = prepare_attachment(path, tmp_path)
    with pytest.raises(LimitExceeded):
        restore_attachment(descriptor, blob, tmp_path / "out",
                           options=MediaOptions(max_bytes=50_000))


def test_names_are_made_safe(tmp_path: Path) -> None:
    path = tmp_path / ("a\\b\x01" + "x" * 200 + ".txt")
    path.write_bytes(b"hello")
    descriptor, _ = _send(path, tmp_path)
    assert descriptor.name.startswith("a_b_x") and descriptor.name.endswith(".txt")
    assert len(descriptor.name.encode()) <= 255


def _fields(descriptor: Descriptor) -> dict[str, object]:
    return {name: getattr(descriptor, name) for name in Descriptor.__dataclass_fields__}


def test_an_rgb_colour_profile_is_kept(tmp_path: Path) -> None:
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "profiled.jpg"
    pixels(120, 80).save(path, "JPEG", icc_profile=icc, exif=camera_exif())
    _, sent = _send(path, tmp_path)
    assert Image.open(io.BytesIO(sent)).info.get("icc_profile") == icc
    _assert_no_metadata(sent)


def test_a_tampered_compressed_blob_is_refused_naming_the_chunk(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("".join(f"{i},{i * i},{i % 7}\n" for i in range(40_000)))
    descriptor, blob = prepare_attachment(path, tmp_path, options=SMALL)
    assert descriptor.compression == "zstd" and descriptor.chunks > 3
    data = bytearray(blob.read_bytes())
    data[descriptor.chunk_span(2)[0]] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(AttachmentCorrupt) as caught:
        restore_attachment(descriptor, blob, tmp_path / "out.csv")
    assert caught.value.chunk == 2
    assert not (tmp_path / "out.csv").exists()


def test_original_files_are_still_compressed_losslessly(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("the same line again\n" * 5000)
    descriptor, restored = _send(path, tmp_path, original=True)
    assert descriptor.compression == "zstd" and restored == path.read_bytes()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_metadata_of_png_and_webp_sources_is_stripped(tmp_path: Path, fmt: str) -> None:
    from PIL import PngImagePlugin

    path = tmp_path / f"shot.{fmt.lower()}"
    extra: dict[str, object] = {"exif": camera_exif()}
    if fmt == "PNG":
        text = PngImagePlugin.PngInfo()
        text.add_text("Comment", COMMENT.decode())
        text.add_itxt("XML:com.adobe.xmp", XMP.decode())
        extra["pnginfo"] = text
    else:
        extra["xmp"] = XMP
    pixels(160, 120).save(path, fmt, **extra)  # type: ignore[arg-type]
    original = path.read_bytes()
    assert CAMERA_MAKE.encode() in original and b"secret-xmp" in original
    descriptor, sent = _send(path, tmp_path)
    assert descriptor.media_type == "image/jpeg"
    _assert_no_metadata(sent)
