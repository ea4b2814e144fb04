"""The local control API: JSON-RPC 2.0 over the daemon's Unix socket, and the operations behind it.

Wire format (documented in README.md "Control socket"): one JSON object per line (UTF-8, `\\n`
terminated, at most MAX_RPC_LINE_BYTES). Requests are JSON-RPC 2.0 requests; `subscribe` turns
the connection into a stream of `{"jsonrpc": "2.0", "method": "event", "params": {...}}`
notifications. Errors use the standard codes (-32700 parse error, -32600 invalid request, -32601
method not found, -32602 invalid params) and -32000 for Pigeon errors, with
`data = {"type": <exception class>}`.

The socket file is created with mode 0600 inside the data directory: only its owner can use it.

This module knows nothing of the node or the relay: `serve` serves any table of operations on
any target object. The device's table is `node.device.control.OPERATIONS` (on `pigeon.sock`),
the relay's is in `node.relay.service` (on `relay.sock`); both are reached with `SocketClient`,
or, by a command that needs no event loop, with `node.rpc_wire.BlockingClient`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import trio

from node.errors import NodeError
from node.rpc_wire import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_RPC_DEPTH,
    MAX_RPC_LINE_BYTES,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    PIGEON_ERROR,
    Client,
    InvalidParams,
    LineTooLong,
    RpcError,
    daemon_closed,
    encode_line,
    parse_reply,
    request_line,
    result_of,
)

if TYPE_CHECKING:
    # libp2p 0.8.1 depends on trio-typing, whose trio-stubs package shadows trio's own inline
    # annotations for type checkers and does not export `trio.TaskStatus`; its `TaskStatus` is
    # the type those stubs give `trio.TASK_STATUS_IGNORED`.
    from trio_typing import TaskStatus

log = logging.getLogger("pigeon.rpc")

# The wire format's names (node.rpc_wire) are re-exported: the server and its callers use them.
__all__ = ["INTERNAL_ERROR", "INVALID_PARAMS", "INVALID_REQUEST", "MAX_RPC_DEPTH",
           "MAX_RPC_LINE_BYTES", "METHOD_NOT_FOUND", "PARSE_ERROR", "PIGEON_ERROR", "Client",
           "InvalidParams", "LineTooLong", "Operation", "RpcError", "SocketClient",
           "StreamOperation", "encode_line", "read_lines", "serve"]

# --- operations -----------------------------------------------------------------------------------
#: An operation: (target, params) -> a JSON-serialisable result. The target is what `serve` was
#: given (the Node for the node's table).
Operation = Callable[[Any, dict[str, Any]], Awaitable[Any]]
#: A streaming method: (target, request id, connection); it writes its own lines until it returns.
StreamOperation = Callable[[Any, Any, trio.SocketStream], Awaitable[None]]


# --- server ------------------------------------------------------------------------------------------


async def serve(target: Any, path: Path, *, operations: Mapping[str, Operation],
                streams: Mapping[str, StreamOperation] | None = None,
                task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `operations` (and the streaming methods `streams`) on `target` over a Unix socket at
    `path` until cancelled."""
    streams = streams or {}
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # stale: we hold the data directory lock, so no daemon owns it
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners,
                                _connection_handler(target, operations, streams), [listener])
            task_status.started()
            await trio.sleep_forever()
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _connection_handler(target: Any, operations: Mapping[str, Operation],
                        streams: Mapping[str, StreamOperation]
                        ) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handle(stream: trio.SocketStream) -> None:
        try:
            async for line in read_lines(stream):
                reply = await _dispatch(target, operations, streams, line, stream)
                if reply is not None:
                    await stream.send_all(encode_line(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except LineTooLong:
            await _send_quietly(stream, _error(None, INVALID_REQUEST, "request line too long"))
        except Exception:
            # Whatever one connection does, the daemon serves the others (and stays up).
            log.exception("control connection failed")
    return handle


async def _send_quietly(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(encode_line(reply))


def _too_deep(line: bytes) -> bool:
    """Whether `line` nests arrays or objects deeper than MAX_RPC_DEPTH (brackets inside strings
    are skipped), so that json.loads never recurses that far."""
    depth, in_string, escaped = 0, False, False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_RPC_DEPTH:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a parsed request holds a string that is not valid Unicode (JSON allows `\\ud800`
    escapes that encode no character; such text cannot be stored or shown)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


async def read_lines(stream: trio.abc.ReceiveStream,
                     max_line_bytes: int = MAX_RPC_LINE_BYTES) -> AsyncIterator[bytes]:
    """The non-blank lines of `stream`, without their newlines; the buffer never holds more than
    one chunk past `max_line_bytes` (LineTooLong), so a peer cannot grow it without bound."""
    buffer = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
        if len(buffer) > max_line_bytes:
            raise LineTooLong


def _error(request_id: Any, code: int, message: str, type_: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if type_:
        error["data"] = {"type": type_}
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


async def _dispatch(target: Any, operations: Mapping[str, Operation],
                    streams: Mapping[str, StreamOperation], line: bytes,
                    stream: trio.SocketStream) -> dict[str, Any] | None:
    if _too_deep(line):
        return _error(None, PARSE_ERROR, f"nested deeper than {MAX_RPC_DEPTH} levels")
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _error(None, PARSE_ERROR, "not valid JSON")
    if _has_lone_surrogate(request):
        return _error(request.get("id") if isinstance(request, dict) else None, INVALID_REQUEST,
                      "a string in the request is not valid Unicode (a lone surrogate)")
    if not isinstance(request, dict) or request.get("jsonrpc") != "2.0" or \
            not isinstance(request.get("method"), str):
        return _error(request.get("id") if isinstance(request, dict) else None,
                      INVALID_REQUEST, "not a JSON-RPC 2.0 request")
    request_id = request.get("id")
    params = request.get("params", {})
    if not isinstance(params, dict):
        return _error(request_id, INVALID_PARAMS, "params must be an object")
    method = request["method"]
    stream_operation = streams.get(method)
    if stream_operation is not None:
        await stream_operation(target, request_id, stream)
        return None
    operation = operations.get(method)
    if operation is None:
        return _error(request_id, METHOD_NOT_FOUND, f"no method {method!r}")
    try:
        result = await operation(target, params)
    except InvalidParams as exc:
        return _error(request_id, INVALID_PARAMS, str(exc))
    except NodeError as exc:
        return _error(request_id, PIGEON_ERROR, str(exc), type(exc).__name__)
    except Exception as exc:
        # A bug behind one request must not end the daemon: the caller gets an error and the
        # log the trace; the connection and every other one carry on.
        log.exception("control request %r failed", method)
        return _error(request_id, INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}",
                      type(exc).__name__)
    if request_id is None:
        return None  # a notification: no reply
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


# --- clients -------------------------------------------------------------------------------------


class SocketClient(Client):
    """A connection to a running daemon. `await SocketClient.connect(path)`; None if no daemon."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._lines = read_lines(stream)
        self._next_id = 0

    @classmethod
    async def connect(cls, path: Path) -> Self | None:
        """Connect to the daemon listening at `path`; None if no daemon is running there."""
        if not path.exists():
            return None
        try:
            stream = await trio.open_unix_socket(str(path))
        except OSError:
            return None  # a stale socket file: no daemon behind it
        return cls(stream)

    async def aclose(self) -> None:
        """Close the connection."""
        await self._stream.aclose()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._next_id += 1
        line = request_line(self._next_id, method, params)
        try:
            await self._stream.send_all(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise daemon_closed() from None
        return result_of(await self._read())

    async def _read(self) -> dict[str, Any]:
        try:
            line = await self._lines.__anext__()
        except (StopAsyncIteration, trio.BrokenResourceError, trio.ClosedResourceError):
            raise daemon_closed() from None
        except LineTooLong:
            raise RpcError(PARSE_ERROR, "the daemon sent a line that is too long") from None
        return parse_reply(line)

    async def events(self, *, subscribed: trio.Event | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        await self.call("subscribe")
        if subscribed is not None:
            subscribed.set()
        while True:
            note = await self._read()
            if note.get("method") == "event":
                yield note["params"]
