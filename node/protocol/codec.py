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

import builtins
import io
from collections.abc import Mapping
from typing import Any, Literal, overload

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

    # The accessors are named after the CBOR types they read, so inside this class `int`, `bytes`,
    # `bool` and `list` name methods; annotations spell the builtin types as `builtins.int` etc.
    # Each accessor returns None only when called with `optional=True` and the key is absent.

    def has(self, key: str) -> builtins.bool:
        """Whether the map holds `key` (does not mark it as used)."""
        return key in self._map

    def _get(self, key: str, optional: builtins.bool) -> Any:
        self._seen.add(key)
        if key not in self._map:
            if optional:
                return None
            raise DecodeError(f"{self.what}: missing field {key!r}")
        return self._map[key]

    @overload
    def bytes(
        self, key: str, size: builtins.int | None = None, *, max_size: builtins.int | None = None,
        optional: Literal[False] = False,
    ) -> builtins.bytes: ...
    @overload
    def bytes(
        self, key: str, size: builtins.int | None = None, *, max_size: builtins.int | None = None,
        optional: builtins.bool,
    ) -> builtins.bytes | None: ...
    def bytes(
        self, key: str, size: builtins.int | None = None, *, max_size: builtins.int | None = None,
        optional: builtins.bool = False,
    ) -> builtins.bytes | None:
        """Field `key` as a byte string, exactly `size` or at most `max_size` bytes long."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, builtins.bytes):
            raise DecodeError(f"{self.what}: field {key!r} must be bytes")
        if size is not None and len(value) != size:
            raise DecodeError(f"{self.what}: field {key!r} must be {size} bytes, not {len(value)}")
        if max_size is not None and len(value) > max_size:
            raise DecodeError(f"{self.what}: field {key!r} longer than {max_size} bytes")
        return value

    @overload
    def int(
        self, key: str, low: builtins.int, high: builtins.int, *, optional: Literal[False] = False
    ) -> builtins.int: ...
    @overload
    def int(
        self, key: str, low: builtins.int, high: builtins.int, *, optional: builtins.bool
    ) -> builtins.int | None: ...
    def int(
        self, key: str, low: builtins.int, high: builtins.int, *, optional: builtins.bool = False
    ) -> builtins.int | None:
        """Field `key` as an integer in [`low`, `high`] (a CBOR boolean is not an integer here)."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, builtins.int) or isinstance(value, builtins.bool):
            raise DecodeError(f"{self.what}: field {key!r} must be an integer")
        if not low <= value <= high:
            raise DecodeError(f"{self.what}: field {key!r}={value} outside [{low}, {high}]")
        return value

    @overload
    def text(
        self, key: str, *, max_size: builtins.int, optional: Literal[False] = False
    ) -> str: ...
    @overload
    def text(self, key: str, *, max_size: builtins.int, optional: builtins.bool) -> str | None: ...
    def text(
        self, key: str, *, max_size: builtins.int, optional: builtins.bool = False
    ) -> str | None:
        """Field `key` as text of at most `max_size` UTF-8 bytes."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise DecodeError(f"{self.what}: field {key!r} must be text")
        if len(value.encode("utf-8", "surrogatepass")) > max_size:
            raise DecodeError(f"{self.what}: field {key!r} longer than {max_size} bytes")
        return value

    @overload
    def bool(self, key: str, *, optional: Literal[False] = False) -> builtins.bool: ...
    @overload
    def bool(self, key: str, *, optional: builtins.bool) -> builtins.bool | None: ...
    def bool(self, key: str, *, optional: builtins.bool = False) -> builtins.bool | None:
        """Field `key` as a boolean."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, builtins.bool):
            raise DecodeError(f"{self.what}: field {key!r} must be a boolean")
        return value

    @overload
    def list(
        self, key: str, *, max_items: builtins.int, optional: Literal[False] = False
    ) -> builtins.list[Any]: ...
    @overload
    def list(
        self, key: str, *, max_items: builtins.int, optional: builtins.bool
    ) -> builtins.list[Any] | None: ...
    def list(
        self, key: str, *, max_items: builtins.int, optional: builtins.bool = False
    ) -> builtins.list[Any] | None:
        """Field `key` as an array of at most `max_items` items; the caller checks the items."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, builtins.list):
            raise DecodeError(f"{self.what}: field {key!r} must be an array")
        if len(value) > max_items:
            raise DecodeError(f"{self.what}: field {key!r} has more than {max_items} items")
        return value

    def map(self, key: str) -> Fields:
        """Field `key` as a nested map, wrapped in its own `Fields`."""
        return Fields(self._get(key, False), f"{self.what}.{key}")

    def optional_map(self, key: str) -> Fields | None:
        """Like `map`, or None when the key is absent."""
        value = self._get(key, True)
        return None if value is None else Fields(value, f"{self.what}.{key}")

    def done(self) -> None:
        """Refuse keys that no accessor asked for."""
        extra = set(self._map) - self._seen
        if extra:
            raise DecodeError(f"{self.what}: unknown fields {sorted(extra)}")
