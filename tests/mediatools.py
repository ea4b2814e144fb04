"""Images for attachment tests and benchmarks/media.py: photo-like pixels (gradients plus
noise at two scales) with the metadata a phone camera writes (EXIF with GPS position, camera
make and model, orientation; a JPEG comment; XMP)."""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

from PIL import ExifTags, Image

#: Strings planted in the metadata, which must not survive re-encoding.
CAMERA_MAKE = "PigeonCam"
#: The GPS datum written into the GPS block; the block's other entries are numbers only, so this
#: is what a byte scan for "GPS" finds.
GPS_DATUM = "GPS-WGS-84"
COMMENT = b"secret-comment"
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
       b'02/22-rdf-syntax-ns#"><rdf:Description>secret-xmp</rdf:Description></rdf:RDF>'
       b'</x:xmpmeta>')


def pixels(width: int, height: int, *, alpha: bool = False, seed: int = 0) -> Image.Image:
    """A photo-like image: colour gradients, blotches (coarse noise scaled up) and fine grain.
    Pure per-pixel noise would be the JPEG worst case, unlike any photograph."""
    rng = random.Random(seed)
    bands = []
    for band in range(3):
        coarse = Image.frombytes("L", (max(1, width // 32), max(1, height // 32)),
                                 rng.randbytes(max(1, width // 32) * max(1, height // 32)))
        coarse = coarse.resize((width, height), Image.Resampling.BICUBIC)
        gradient = Image.linear_gradient("L").resize((width, height)).rotate(90 * band)
        grain = Image.frombytes("L", (width, height), rng.randbytes(width * height))
        bands.append(Image.blend(Image.blend(coarse, gradient, 0.6), grain, 0.05))
    image = Image.merge("RGB", bands)
    if alpha:
        mask = Image.radial_gradient("L").resize((width, height))
        image.putalpha(mask)
    return image


def camera_exif(*, orientation: int | None = None) -> Image.Exif:
    """EXIF as a phone writes it: make, model, a GPS position, and an orientation if given."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = CAMERA_MAKE
    exif[ExifTags.Base.Model] = "Model 7"
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (48.0, 51.0, 29.5)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (2.0, 17.0, 40.2)
    gps[ExifTags.GPS.GPSMapDatum] = GPS_DATUM
    return exif


def camera_jpeg(width: int, height: int, *, orientation: int | None = None,
                quality: int = 92) -> bytes:
    """A JPEG with camera metadata (EXIF with GPS, comment, XMP) around `pixels`."""
    out = io.BytesIO()
    pixels(width, height).save(out, "JPEG", quality=quality,
                               exif=camera_exif(orientation=orientation), comment=COMMENT,
                               xmp=XMP)
    return out.getvalue()


def random_file(path: Path, size: int) -> str:
    """A file of `size` random (incompressible) bytes; returns its SHA-256 (hex)."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            data = os.urandom(min(left, 1 << 20))
            out.write(data)
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()
