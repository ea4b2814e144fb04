"""End-to-end acceptance through the real `pigeon` command: real processes, real libp2p on
loopback, real SQLite files, set up only with the CLI (init, invite, contact add)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.device.config import MAX_TEXT_BYTES
from node.device.datadir import DataDir
from node.rpc import INVALID_REQUEST, MAX_RPC_LINE_BYTES, METHOD_NOT_FOUND, PARSE_ERROR
from tests.clitools import Daemon, contacts_pair, pigeon, pigeon_json, wait_until

N = 1000


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """Alice and Bob daemons that became contacts through the CLI: Bob added Alice's invite."""
    with contacts_pair(tmp_path) as daemons:
        yield daemons


def _send_lines(data_dir: Path, contact: str, texts: list[str]) -> subprocess.CompletedProcess[str]:
    return pigeon(data_dir, "send", contact, "--stdin", "--wait", "0", "--json",
                  stdin="".join(t + "\n" for t in texts), timeout=300)


def _history(data_dir: Path, contact: str) -> list[dict[str, object]]:
    result: list[dict[str, object]] = pigeon_json(data_dir, "history", contact, "--limit",
                                                  str(10 * N))
    return result


def _assert_exactly_once_in_order(entries: list[dict[str, object]], texts: list[str],
                                  direction: str) -> None:
    got = [e for e in entries if e["direction"] == direction]
    assert [e["text"] for e in got] == texts, "each message exactly once, in send order"
    assert len({e["message_id"] for e in got}) == len(texts)


@pytest.mark.slow(seconds=3)
def test_two_daemons_exchange_1000_messages_both_ways(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    to_bob = [f"a->b {i:04d}" for i in range(N)]
    to_alice = [f"b->a {i:04d}" for i in range(N)]
    senders = [
        threading.Thread(target=_send_lines, args=(a.data_dir, "Bob", to_bob)),
        threading.Thread(target=_send_lines, args=(b.data_dir, "alice", to_alice)),
    ]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(timeout=300)
    b.wait_received(N, timeout=120)
    a.wait_received(N, timeout=120)
    assert [e["text"] for e in b.received] == to_bob  # events: once each, in order
    assert [e["text"] for e in a.received] == to_alice

    def all_delivered(data_dir: Path, contact: str) -> bool:
        return all(e["state"] == "delivered" for e in _history(data_dir, contact)
                   if e["direction"] == "out")

    wait_until(lambda: all_delivered(a.data_dir, "Bob") and all_delivered(b.data_dir, "alice"),
               timeout=60, what="every message acknowledged end to end")
    for data_dir, contact in ((a.data_dir, "Bob"), (b.data_dir, "alice")):
        history = _history(data_dir, contact)
        mine, theirs = (to_bob, to_alice) if contact == "Bob" else (to_alice, to_bob)
        _assert_exactly_once_in_order(history, mine, "out")
        _assert_exactly_once_in_order(history, theirs, "in")


@pytest.mark.slow(seconds=2)
def test_receiver_killed_mid_stream_gets_everything_exactly_once(
        pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    texts = [f"to a killed receiver {i:04d} " + "x" * 400 for i in range(N)]
    sender = threading.Thread(target=_send_lines, args=(a.data_dir, "Bob", texts))
    sender.start()
    b.wait_received(50, timeout=60)
    b.kill_hard()
    killed_at = len({e["message_id"] for e in b.received})
    assert killed_at < N, "the receiver must die mid-stream for this test to mean anything"
    sender.join(timeout=300)
    b2 = Daemon(b.data_dir)
    try:
        wait_until(lambda: len([e for e in _history(b.data_dir, "alice") if e["direction"] == "in"])
                   >= N, timeout=120, what="all messages at the restarted receiver")
        _assert_exactly_once_in_order(_history(b.data_dir, "alice"), texts, "in")
        wait_until(lambda: all(e["state"] == "delivered" for e in _history(a.data_dir, "Bob")),
                   timeout=60, what="sender sees every message delivered")
    finally:
        b2.stop()


@pytest.mark.slow(seconds=3)
def test_sender_killed_mid_stream_resumes_its_outbox(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    texts = [f"from a killed sender {i:04d} " + "y" * 400 for i in range(N)]
    b.stop()  # queue everything first, so the outbox holds all N when the sender dies
    queued = json.loads(_send_lines(a.data_dir, "Bob", texts).stdout)
    assert len(queued) == N and {q["state"] for q in queued} == {"pending"}
    b2 = Daemon(b.data_dir)
    try:
        b2.wait_received(50, timeout=60)
        a.kill_hard()
        assert b2.received_count() < N, "the sender must die mid-stream"
        a2 = Daemon(a.data_dir)
        try:
            wait_until(
                lambda: len([e for e in _history(b.data_dir, "alice") if e["direction"] == "in"])
                >= N, timeout=120, what="all messages after the sender restarted")
            _assert_exactly_once_in_order(_history(b.data_dir, "alice"), texts, "in")
            wait_until(lambda: all(e["state"] == "delivered" for e in _history(a.data_dir, "Bob")),
                       timeout=60, what="restarted sender sees every message delivered")
        finally:
            a2.stop()
    finally:
        b2.stop()


def test_second_daemon_on_the_same_data_dir_is_refused(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    result = pigeon(a.data_dir, "run", "--listen", "/ip4/127.0.0.1/tcp/0", check=False)
    assert result.returncode == 1
    assert "in use by another Pigeon process" in result.stderr
    assert "Traceback" not in result.stderr


def test_commands_use_the_running_daemon(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    status = pigeon_json(a.data_dir, "status")
    assert status["daemon"] is True
    assert [c["name"] for c in status["contacts"]] == ["Bob"]
    sent = pigeon_json(b.data_dir, "send", "alice", "through the daemon", "--wait", "10")
    assert sent["state"] == "delivered"
    assert a.next_event("MessageReceived", timeout=10)["text"] == "through the daemon"
    contacts = pigeon_json(a.data_dir, "contact", "list")
    peers = pigeon_json(b.data_dir, "contact", "list")
    assert contacts[0]["safety_number"] == peers[0]["safety_number"]


def test_chat_sends_typed_lines_and_shows_incoming_messages(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    chat = subprocess.Popen(
        [sys.executable, "-m", "node", "--data-dir", str(b.data_dir), "chat", "alice"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert chat.stdin is not None and chat.stdout is not None and chat.stderr is not None
        # A line longer than a message may be is refused with a note; the chat goes on.
        chat.stdin.write("x" * (MAX_TEXT_BYTES + 1) + "\n")
        chat.stdin.write("typed in the chat\n")
        chat.stdin.flush()
        assert a.next_event("MessageReceived", timeout=20)["text"] == "typed in the chat"
        pigeon(a.data_dir, "send", "Bob", "answer to the chat", "--wait", "10")
        lines: list[str] = []
        stdout = chat.stdout
        threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")),
                         daemon=True).start()
        wait_until(lambda: any("alice: answer to the chat" in line for line in lines),
                   timeout=20, what="the incoming message in the chat window")
        # What the chat showed is read (PROTOCOL.md section 25.6, `read`).
        wait_until(lambda: [(e["text"], e["read"]) for e in pigeon_json(b.data_dir, "history",
                                                                        "alice")
                            if e["direction"] == "in"] == [("answer to the chat", True)],
                   timeout=20, what="the message shown in the chat marked read")
        chat.stdin.close()  # Ctrl-D
        assert chat.wait(timeout=20) == 0
        assert "(not sent: message longer than" in chat.stderr.read()
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.wait()


def test_control_socket_answers_bad_requests_with_errors_and_keeps_serving(tmp_path: Path) -> None:
    """Garbage, unknown methods and an endless line on the daemon's socket get JSON-RPC errors;
    the oversized line is cut off at the limit rather than buffered, and the daemon stays up."""
    pigeon(tmp_path, "init", "--name", "Alice")
    daemon = Daemon(tmp_path)
    try:
        path = str(DataDir(tmp_path).socket_file)

        def exchange(payload: bytes) -> dict[str, object]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(20)
                sock.connect(path)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(payload)
                reply: dict[str, object] = json.loads(sock.makefile("rb").readline())
                return reply

        assert exchange(b"not json\n")["error"]["code"] == PARSE_ERROR  # type: ignore[index]
        unknown = exchange(b'{"jsonrpc": "2.0", "id": 7, "method": "nope"}\n')
        assert unknown["id"] == 7
        assert unknown["error"]["code"] == METHOD_NOT_FOUND  # type: ignore[index]
        endless = exchange(b"x" * (MAX_RPC_LINE_BYTES + 70_000))
        assert endless["error"] == {"code": INVALID_REQUEST,  # type: ignore[comparison-overlap]
                                    "message": "request line too long"}
        status = exchange(b'{"jsonrpc": "2.0", "id": 8, "method": "status"}\n')
        assert status["result"]["addresses"], "the daemon still serves, and is listening"  # type: ignore[index]
    finally:
        daemon.stop()
