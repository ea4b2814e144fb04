"""Strict CBOR (RFC 8949) encoding and decoding for every Pigeon object.

Decoding is where untrusted bytes meet the program, so it is strict: the size is checked before
parsing, trailing bytes, duplicate map keys, indefinite-length items and deep nesting are refused,
and every failure of cbor2 becomes our `DecodeError`. `Fields` then checks each field's type, size
and range and refuses unknown keys, so a decoded object is exactly what the schema (PROTOCOL.md,
"CDDL") says or an error.

Encoding is canonical (RFC 8949 section 4.2.1, deterministic: sorted keys, shortest forms) so the
same object always gives the same bytes, which signatures and test vectors rely on.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import cbor2

from node.errors import DecodeError, LimitExceeded, UnknownVersion

__all__ = ["Fields", "decode", "decode_map", "encode"]

#: Deepest nesting any Pigeon object uses is 4; 16 leaves room without letting a hostile input
#: recurse deeply.
MAX_DEPTH = 16


def encode(obj: Any) -> bytes:
    """Canonical CBOR encoding of `obj` (maps with text keys, bytes, ints, text, lists, bool, None)."""
    return cbor2.dumps(obj, canonical=True)


def decode(data: bytes, *, limit: int, what: str) -> Any:
    """Decode exactly one CBOR item from `data`, refusing anything larger than `limit` bytes.

    `what` names the object for error messages ("prekey bundle", "frame", ...).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise LimitExceeded(what, f"{len(data)} bytes > {limit}")
    if not data:
        raise DecodeError(f"{what}: empty")
    stream = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(
            stream, max_depth=MAX_DEPTH, allow_indefinite=False, allow_duplicate_keys=False
        ).decode()
    except RecursionError as exc:  # pragma: no cover - max_depth stops this first
        raise DecodeError(f"{what}: nested too deeply") from exc
    except Exception as exc:  # cbor2 raises CBORDecodeError, ValueError, TypeError, ...
        raise DecodeError(f"{what}: not valid CBOR ({exc})") from exc
    if stream.tell() != len(data):
        raise DecodeError(f"{what}: {len(data) - stream.tell()} trailing bytes")
    return obj


def decode_map(data: bytes, *, limit: int, what: str, version: int | None = None) -> Fields:
    """Decode a CBOR map and wrap it in `Fields`. If `version` is given, the map must carry
    `"v": version`; another integer raises `UnknownVersion`."""
    fields = Fields(decode(data, limit=limit, what=what), what)
    if version is not None:
        found = fields.int("v", 0, 2**32)
        if found != version:
            raise UnknownVersion(f"{what}: version {found} is not supported (this is {version})")
    return fields


class Fields:
    """Typed, checked access to a decoded CBOR map.

    Every accessor records the key as used; `done()` then refuses keys nobody asked for, so an
    object with extra fields is rejected instead of half-understood.
    """

    __slots__ = ("_map", "_seen", "what")

    def __init__(self, obj: Any, what: str) -> None:
        if not isinstance(obj, Mapping):
            raise DecodeError(f"{what}: expected a map, got {type(obj).__name__}")
        for key in obj:
            if not isinstance(key, str):
                raise DecodeError(f"{what}: map keys must be text, got {type(key).__name__}")
        self._map = obj
        self._seen: set[str] = set()
        self.what = what

    def has(self, key: str) -> bool:
        return key in self._map

    def _get(self, key: str, optional: bool) -> Any:
        self._seen.add(key)
        if key not in self._map:
            if optional:
                return None
            raise DecodeError(f"{self.what}: missing field {key!r}")
        return self._map[key]

    def bytes(
        self, key: str, size: int | None = None, *, max_size: int | None = None,
        optional: bool = False,
    ) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, bytes):
            raise DecodeError(f"{self.what}: field {key!r} must be bytes")
        if size is not None and len(value) != size:
            raise DecodeError(f"{self.what}: field {key!r} must be {size} bytes, not {len(value)}")
        if max_size is not None and len(value) > max_size:
            raise DecodeError(f"{self.what}: field {key!r} longer than {max_size} bytes")
        return value

    def int(self, key: str, low: int, high: int, *, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise DecodeError(f"{self.what}: field {key!r} must be an integer")
        if not low <= value <= high:
            raise DecodeError(f"{self.what}: field {key!r}={value} outside [{low}, {high}]")
        return value

    def text(self, key: str, *, max_size: int, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise DecodeError(f"{self.what}: field {key!r} must be text")
        if len(value.encode("utf-8", "surrogatepass")) > max_size:
            raise DecodeError(f"{self.what}: field {key!r} longer than {max_size} bytes")
        return value

    def bool(self, key: str, *, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            raise DecodeError(f"{self.what}: field {key!r} must be a boolean")
        return value

    def list(self, key: str, *, max_items: int, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, list):
            raise DecodeError(f"{self.what}: field {key!r} must be an array")
        if len(value) > max_items:
            raise DecodeError(f"{self.what}: field {key!r} has more than {max_items} items")
        return value

    def map(self, key: str) -> Fields:
        return Fields(self._get(key, False), f"{self.what}.{key}")

    def optional_map(self, key: str) -> Fields | None:
        value = self._get(key, True)
        return None if value is None else Fields(value, f"{self.what}.{key}")

    def done(self) -> None:
        """Refuse keys that no accessor asked for."""
        extra = set(self._map) - self._seen
        if extra:
            raise DecodeError(f"{self.what}: unknown fields {sorted(extra)}")
