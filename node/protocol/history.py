"""Frames of the history transfer `/pigeon/history/1.0.0` (PROTOCOL.md section 25.3).

A device just linked asks a device of its own account for the recent history, in chunks, and
commits each chunk with its cursor, so a transfer cut anywhere resumes where it stopped:

    request = {"v": 1, "t": "get", "after": uint, "until": uint}     until 0: start a transfer
    range   = {"v": 1, "t": "range", "after": uint, "until": uint, "total": uint}
    rows    = {"v": 1, "t": "rows", "last": uint, "rows": [+ row]}
    end     = {"v": 1, "t": "end"}
    error   = {"v": 1, "t": "error", "code": tstr}
    row     = {"ik": bstr .size 32, "dir": "in" / "out", "id": bstr .size 16, "body": tstr,
               "ts": uint, ? "rx": uint, "state": tstr}

The cursor is the serving device's history position (its row order): `after` is the last one
committed, `until` the last one of the transfer, fixed by the server when the transfer starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from node.errors import DecodeError
from node.protocol import codec
from node.protocol.content import MAX_TEXT_BYTES, MESSAGE_ID_BYTES
from node.protocol.keys import KEY_BYTES
from node.protocol.states import Direction, MessageState

__all__ = [
    "HISTORY_PROTOCOL",
    "MAX_HISTORY_FRAME_BYTES",
    "HistoryEnd",
    "HistoryError",
    "HistoryRange",
    "HistoryRow",
    "HistoryRows",
    "decode_reply",
    "decode_request",
    "encode_end",
    "encode_error",
    "encode_range",
    "encode_request",
    "encode_rows",
]

HISTORY_PROTOCOL: Final = "/pigeon/history/1.0.0"
HISTORY_VERSION: Final = 1
#: Rows per chunk, and text bytes per chunk: a chunk is one commit on the receiver, so a cut
#: transfer repeats at most one chunk, and a frame stays well under the frame limit.
HISTORY_CHUNK_ROWS: Final = 250
HISTORY_CHUNK_BYTES: Final = 256 * 1024
#: Largest frame: a chunk's texts, with one message of MAX_TEXT_BYTES past the budget, and the
#: per-row fields.
MAX_HISTORY_FRAME_BYTES: Final = HISTORY_CHUNK_BYTES + MAX_TEXT_BYTES + HISTORY_CHUNK_ROWS * 128
MAX_HISTORY_REQUEST_BYTES: Final = 64
_MAX_CURSOR: Final = 2**63 - 1
_MAX_CODE_BYTES: Final = 32
#: Error code: the asking device is not one of this account's devices.
NOT_OWN_DEVICE: Final = "not-own-device"
_STATES: Final = frozenset(("pending", "sent", "relayed", "delivered", "failed", "received"))


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryRow:
    """One message of the history being transferred."""

    account: bytes  # the contact's identity key
    direction: Direction
    message_id: bytes
    body: str
    sent_at_ms: int
    received_at_ms: int | None
    state: MessageState


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryRange:
    """The server's answer to a request: the transfer's bounds and how many rows remain."""

    after: int
    until: int
    total: int


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryRows:
    """One chunk: rows in order, and the cursor to commit with them."""

    last: int
    rows: tuple[HistoryRow, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryEnd:
    """The transfer is complete."""


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryError:
    """The server refused, with a code."""

    code: str


def encode_request(after: int, until: int) -> bytes:
    """Ask for the rows after cursor `after` up to `until` (0: start a transfer)."""
    return codec.encode({"v": HISTORY_VERSION, "t": "get", "after": after, "until": until})


def decode_request(data: bytes) -> tuple[int, int]:
    """(after, until) of a request; DecodeError otherwise."""
    f = codec.decode_map(data, limit=MAX_HISTORY_REQUEST_BYTES, what="history request",
                         version=HISTORY_VERSION)
    if f.text("t", max_size=_MAX_CODE_BYTES) != "get":
        raise DecodeError("history request: unknown type")
    after, until = f.int("after", 0, _MAX_CURSOR), f.int("until", 0, _MAX_CURSOR)
    f.done()
    return after, until


def encode_range(after: int, until: int, total: int) -> bytes:
    """The range reply."""
    return codec.encode({"v": HISTORY_VERSION, "t": "range", "after": after, "until": until,
                         "total": total})


def encode_rows(last: int, rows: Sequence[HistoryRow]) -> bytes:
    """A chunk of rows ending at cursor `last`."""
    return codec.encode({"v": HISTORY_VERSION, "t": "rows", "last": last,
                         "rows": [_row_cbor(r) for r in rows]})


def _row_cbor(row: HistoryRow) -> dict[str, Any]:
    value: dict[str, Any] = {"ik": row.account, "dir": row.direction, "id": row.message_id,
                             "body": row.body, "ts": row.sent_at_ms, "state": row.state}
    if row.received_at_ms is not None:
        value["rx"] = row.received_at_ms
    return value


def encode_end() -> bytes:
    """The end of the transfer."""
    return codec.encode({"v": HISTORY_VERSION, "t": "end"})


def encode_error(code: str) -> bytes:
    """A refusal."""
    return codec.encode({"v": HISTORY_VERSION, "t": "error", "code": code})


def _row(obj: Any) -> HistoryRow:
    f = codec.Fields(obj, "history row")
    account = f.bytes("ik", KEY_BYTES)
    direction = f.text("dir", max_size=3)
    if direction not in ("in", "out"):
        raise DecodeError("history row: dir must be in or out")
    message_id = f.bytes("id", MESSAGE_ID_BYTES)
    body = f.text("body", max_size=MAX_TEXT_BYTES)
    sent_at = f.int("ts", 0, 2**53)
    rx_raw = f.int("rx", 0, 2**53, optional=True)
    state = f.text("state", max_size=16)
    if state not in _STATES or (state == "received") != (direction == "in"):
        raise DecodeError("history row: unknown state")
    f.done()
    return HistoryRow(account=account, direction="in" if direction == "in" else "out",
                      message_id=message_id, body=body, sent_at_ms=sent_at,
                      received_at_ms=rx_raw, state=state)  # type: ignore[arg-type]


def decode_reply(data: bytes) -> HistoryRange | HistoryRows | HistoryEnd | HistoryError:
    """Decode one reply frame strictly; DecodeError (or LimitExceeded) otherwise."""
    f = codec.decode_map(data, limit=MAX_HISTORY_FRAME_BYTES, what="history reply",
                         version=HISTORY_VERSION)
    kind = f.text("t", max_size=_MAX_CODE_BYTES)
    reply: HistoryRange | HistoryRows | HistoryEnd | HistoryError
    if kind == "range":
        reply = HistoryRange(after=f.int("after", 0, _MAX_CURSOR),
                             until=f.int("until", 0, _MAX_CURSOR),
                             total=f.int("total", 0, _MAX_CURSOR))
    elif kind == "rows":
        last = f.int("last", 0, _MAX_CURSOR)
        raw = f.list("rows", max_items=HISTORY_CHUNK_ROWS)
        if not raw:
            raise DecodeError("history rows: a chunk holds at least one row")
        reply = HistoryRows(last=last, rows=tuple(_row(r) for r in raw))
    elif kind == "end":
        reply = HistoryEnd()
    elif kind == "error":
        reply = HistoryError(code=f.text("code", max_size=_MAX_CODE_BYTES))
    else:
        raise DecodeError("history reply: unknown type")
    f.done()
    return reply
