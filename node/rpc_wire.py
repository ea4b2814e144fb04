"""The control socket's wire format as a client sees it, and the client that needs no event loop.

The wire format is described in `node.rpc` and README.md "Control socket". This module holds the
parts a client needs (limits, error codes, `RpcError`, line encoding, reading a reply) and
`BlockingClient`, and imports no trio: a one-shot CLI command served by a running daemon
(`pigeon send`, `pigeon history`, ...) spent most of its time loading trio before it sent one
line. `node.rpc` (server, `SocketClient`) builds on this module and re-exports its names.
"""

from __future__ import annotations

import abc
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self

from node.errors import LocalError

if TYPE_CHECKING:
    import trio

__all__ = ["INTERNAL_ERROR", "INVALID_PARAMS", "INVALID_REQUEST", "MAX_RPC_DEPTH",
           "MAX_RPC_LINE_BYTES", "METHOD_NOT_FOUND", "PARSE_ERROR", "PIGEON_ERROR",
           "BlockingClient", "Client", "InvalidParams", "LineTooLong", "RpcError", "daemon_closed",
           "encode_line", "parse_reply", "request_line", "result_of", "run_to_completion"]

#: Largest JSON-RPC request line accepted on a control socket.
MAX_RPC_LINE_BYTES: Final = 1024 * 1024

#: Deepest nesting of arrays and objects accepted in a request: Pigeon's requests are flat, and
#: the depth is checked on the raw bytes before parsing, so no request can exhaust the parser's
#: recursion.
MAX_RPC_DEPTH: Final = 32

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR, PIGEON_ERROR = (
    -32700, -32600, -32601, -32602, -32603, -32000)


class RpcError(LocalError):
    """The daemon answered a request with an error (`code`, and `type`: the Pigeon error class)."""

    def __init__(self, code: int, message: str, type_: str | None = None) -> None:
        self.code, self.type = code, type_
        super().__init__(message)


class InvalidParams(LocalError):
    """A request's parameters are missing or of the wrong type."""


class LineTooLong(Exception):
    """A line grew past the reader's limit before its newline arrived."""


def encode_line(value: Any) -> bytes:
    """`value` as one line of the control socket: ASCII-only JSON (a lone surrogate in a string
    becomes a `\\udcXX` escape instead of failing to encode) and a newline."""
    return json.dumps(value, ensure_ascii=True).encode("ascii") + b"\n"


def request_line(request_id: int, method: str, params: dict[str, Any] | None) -> bytes:
    """A JSON-RPC 2.0 request as one line; RpcError if it is longer than a daemon reads."""
    line = encode_line({"jsonrpc": "2.0", "id": request_id, "method": method,
                        "params": params or {}})
    if len(line) > MAX_RPC_LINE_BYTES:
        raise RpcError(INVALID_REQUEST, f"request larger than {MAX_RPC_LINE_BYTES} bytes")
    return line


def parse_reply(line: bytes) -> dict[str, Any]:
    """One line from the daemon as a JSON object; RpcError(PARSE_ERROR) if it is not one."""
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError):
        raise RpcError(PARSE_ERROR, "the daemon sent something that is not JSON") from None
    if not isinstance(reply, dict):
        raise RpcError(PARSE_ERROR, "the daemon sent something that is not an object")
    return reply


def result_of(reply: dict[str, Any]) -> Any:
    """A reply's result, or its error raised as RpcError."""
    if "error" in reply:
        error = reply["error"]
        raise RpcError(error.get("code", PIGEON_ERROR), error.get("message", "error"),
                       (error.get("data") or {}).get("type"))
    return reply.get("result")


def daemon_closed() -> RpcError:
    """The error for a connection the daemon closed (it stopped, or refused the request)."""
    return RpcError(PIGEON_ERROR, "the daemon closed the connection")


class Client(abc.ABC):
    """What the CLI talks to: the daemon (`BlockingClient`, `node.rpc.SocketClient`) or a node of
    its own (`node.device.control.LocalClient`)."""

    #: Whether a daemon answers (the node runs on after the command), not a node of this process.
    daemon: ClassVar[bool] = True

    @abc.abstractmethod
    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Run `method` with `params`; its JSON result, or RpcError."""

    @abc.abstractmethod
    def events(self, *, subscribed: trio.Event | None = None) -> AsyncIterator[dict[str, Any]]:
        """The node's events as JSON objects (`{"type": <event class>, ...fields}`), until the
        connection closes; `subscribed` is set once no later event can be missed."""


class BlockingClient(Client):
    """A connection to a running daemon over a plain blocking socket, for a command that makes
    its calls one after another. `call` is a coroutine that never suspends (it blocks), so the
    command runs to its end on one `send(None)` with no event loop (`run_to_completion`).
    `BlockingClient.connect(path)`; None if no daemon."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._next_id = 0

    @classmethod
    def connect(cls, path: Path) -> Self | None:
        """Connect to the daemon listening at `path`; None if no daemon is running there."""
        if not path.exists():
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            return None  # a stale socket file: no daemon behind it
        return cls(sock)

    def close(self) -> None:
        """Close the connection."""
        self._reader.close()
        self._sock.close()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._next_id += 1
        line = request_line(self._next_id, method, params)
        try:
            self._sock.sendall(line)
            reply = self._reader.readline(MAX_RPC_LINE_BYTES + 1)
        except OSError:
            raise daemon_closed() from None
        if not reply.endswith(b"\n"):
            if len(reply) > MAX_RPC_LINE_BYTES:
                raise RpcError(PARSE_ERROR, "the daemon sent a line that is too long")
            raise daemon_closed()
        return result_of(parse_reply(reply))

    def events(self, *, subscribed: trio.Event | None = None) -> AsyncIterator[dict[str, Any]]:
        # Commands that follow events (chat, save, send --file) run in trio with SocketClient.
        raise RpcError(INVALID_REQUEST, "events need the event loop: use node.rpc.SocketClient")


def run_to_completion(coroutine: Any) -> Any:
    """The value of a coroutine that never suspends (one whose only awaits are
    `BlockingClient.call`s), run without an event loop. RuntimeError, after closing it, if it
    tried to wait on something else: such a command belongs in trio."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("a command run without an event loop tried to wait on one")
