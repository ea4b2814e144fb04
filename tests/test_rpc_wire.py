"""`node.rpc_wire.BlockingClient` against a plain Unix socket server (a thread): results, the
daemon's errors, a connection closed or flooded mid-reply, no daemon; and `run_to_completion`,
which runs a one-shot command without an event loop. The same client against a real daemon is
in tests/test_layers.py (test_a_command_the_daemon_serves_loads_no_event_loop)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from node.rpc_wire import (
    INVALID_PARAMS,
    MAX_RPC_LINE_BYTES,
    PARSE_ERROR,
    PIGEON_ERROR,
    BlockingClient,
    RpcError,
    run_to_completion,
)

#: Answers one request with the bytes to send back; after None, or bytes with no newline, the
#: server closes the connection.
Answer = Callable[[dict[str, Any]], bytes | None]


@pytest.fixture
def serve_once(tmp_path: Path) -> Iterator[Callable[[Answer], Path]]:
    """Start a server that accepts one connection and answers each request with `answer`."""
    threads: list[threading.Thread] = []

    def start(answer: Answer) -> Path:
        path = tmp_path / "pigeon.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)

        def run() -> None:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as lines:
                for line in lines:
                    reply = answer(json.loads(line))
                    if reply is None:
                        break
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        conn.sendall(reply)
                    if not reply.endswith(b"\n"):
                        break  # a reply cut short: the daemon went away
            listener.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for thread in threads:
        thread.join(timeout=10)


def _result(request: dict[str, Any], result: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}).encode() + b"\n"


def test_calls_in_turn_get_their_results(serve_once: Callable[[Answer], Path]) -> None:
    seen: list[dict[str, Any]] = []

    def answer(request: dict[str, Any]) -> bytes:
        seen.append(request)
        return _result(request, {"echo": request["params"], "n": request["id"]})

    client = BlockingClient.connect(serve_once(answer))
    assert client is not None
    try:
        assert run_to_completion(client.call("status")) == {"echo": {}, "n": 1}
        assert run_to_completion(client.call("send", {"text": "hé"})) == \
            {"echo": {"text": "hé"}, "n": 2}
    finally:
        client.close()
    assert [(r["jsonrpc"], r["method"]) for r in seen] == [("2.0", "status"), ("2.0", "send")]


def test_the_daemons_error_comes_back_with_its_code_and_type(
        serve_once: Callable[[Answer], Path]) -> None:
    def answer(request: dict[str, Any]) -> bytes:
        error = {"code": INVALID_PARAMS, "message": "no contact named 'x'",
                 "data": {"type": "ContactError"}}
        return json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}).encode() + b"\n"

    client = BlockingClient.connect(serve_once(answer))
    assert client is not None
    with pytest.raises(RpcError) as raised:
        run_to_completion(client.call("history", {"contact": "x"}))
    client.close()
    assert (raised.value.code, raised.value.type, str(raised.value)) == \
        (INVALID_PARAMS, "ContactError", "no contact named 'x'")


@pytest.mark.parametrize("reply, code, words", [
    (None, PIGEON_ERROR, "closed the connection"),
    (b'{"jsonrpc": "2.0", "id": 1, "res', PIGEON_ERROR, "closed the connection"),
    (b"not json\n", PARSE_ERROR, "not JSON"),
    (b"[1, 2]\n", PARSE_ERROR, "not an object"),
    (b"x" * (MAX_RPC_LINE_BYTES + 10), PARSE_ERROR, "too long"),
])
def test_a_broken_reply_is_a_clear_error(serve_once: Callable[[Answer], Path],
                                         reply: bytes | None, code: int, words: str) -> None:
    client = BlockingClient.connect(serve_once(lambda request: reply))
    assert client is not None
    with pytest.raises(RpcError) as raised:
        run_to_completion(client.call("status"))
    client.close()
    assert raised.value.code == code and words in str(raised.value)


def test_no_daemon_is_none(tmp_path: Path) -> None:
    assert BlockingClient.connect(tmp_path / "pigeon.sock") is None
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "pigeon.sock"))
    stale.close()  # the file stays, nobody listens: a daemon that was killed
    assert BlockingClient.connect(tmp_path / "pigeon.sock") is None


def test_a_coroutine_that_waits_on_a_loop_is_refused_and_closed() -> None:
    closed: list[bool] = []

    class Suspend:
        def __await__(self) -> Generator[None, None, None]:
            yield None

    async def waits() -> int:
        try:
            await Suspend()
        finally:
            closed.append(True)
        return 1

    async def returns() -> int:
        return 7

    assert run_to_completion(returns()) == 7
    with pytest.raises(RuntimeError, match="event loop"):
        run_to_completion(waits())
    assert closed == [True]
