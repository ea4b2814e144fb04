"""The `pigeon` command as a newcomer meets it, with real processes (tests/clitools.py): every
mistake gets one line that says what is wrong, never a traceback, and the documented exit status
(0 ok, 1 error, 2 usage, 130 interrupted); a daemon survives whatever reaches its control socket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.device.config import MAX_TEXT_BYTES
from node.device.datadir import DataDir
from node.rpc import INVALID_REQUEST, MAX_RPC_DEPTH, PARSE_ERROR
from tests.clitools import Daemon, pigeon, pigeon_json, wait_until


def _fails(result: subprocess.CompletedProcess[str], status: int, message: str) -> None:
    """`result` exited with `status` and said `message` in one line, without a traceback."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert len([line for line in result.stderr.splitlines() if message in line]) == 1, \
        result.stderr


@pytest.fixture
def initialised(tmp_path: Path) -> Path:
    data = tmp_path / "me"
    pigeon(data, "init", "--name", "Me")
    return data


def test_version_and_log_level_in_any_case(initialised: Path) -> None:
    version = pigeon(initialised, "--version")
    assert version.stdout.startswith("pigeon ") and version.returncode == 0
    shown = pigeon(initialised, "--log-level", "debug", "id", "--json")
    assert json.loads(shown.stdout)["daemon"] is False
    _fails(pigeon(initialised, "--log-level", "loud", "id", check=False), 2, "invalid choice")


@pytest.mark.parametrize("case", ["listen", "nosuchuser", "non-utf8-argument"])
def test_bad_flags_are_usage_errors(initialised: Path, case: str) -> None:
    args, message = {
        "listen": (["run", "--listen", "127.0.0.1:4001"],
                   "'127.0.0.1:4001' is not a multiaddr (e.g. /ip4/127.0.0.1/tcp/4001)"),
        "nosuchuser": (["--config", "~nosuchuser/pigeon.toml", "status"],
                       "cannot expand '~nosuchuser/pigeon.toml'"),
        # bytes that are not UTF-8 reach Python as lone surrogates (PEP 383)
        "non-utf8-argument": (["send", "bob", "caf\udce9"],
                              "argument 'caf\\xe9' is not valid UTF-8"),
    }[case]
    _fails(pigeon(initialised, *args, check=False), 2, message)


@pytest.mark.parametrize("case", ["not-utf8", "unknown-key", "wrong-type", "not-toml"])
def test_a_bad_config_is_refused_by_every_command_including_id(initialised: Path,
                                                               case: str) -> None:
    content, message = {
        "not-utf8": (b'display_name = "caf\xe9"\n', "is not UTF-8 text"),
        "unknown-key": (b"bogus = 1\n", "unknown key 'bogus'"),
        "wrong-type": (b'display_name = "x"\nlisten = 5\n', "must be an array"),
        "not-toml": (b"listen = [", "is not valid TOML"),
    }[case]
    (initialised / "config.toml").write_bytes(content)
    for command in (["id"], ["status"], ["run"]):
        _fails(pigeon(initialised, *command, check=False), 1, message)


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    for command in (["init"], ["status"], ["id"]):
        _fails(pigeon(tmp_path / "file", *command, check=False), 1,
               "is a file, not a directory")


def test_output_to_a_closed_pipe_is_not_an_error(initialised: Path) -> None:
    """`pigeon invite --json | head -c 10`: the reader is gone before the invite is written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "node", "--data-dir", str(initialised), "invite", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 0
    assert "Traceback" not in stderr and "Error" not in stderr


def test_contact_add_rename_remove_and_names_in_any_case(tmp_path: Path) -> None:
    me, friend = tmp_path / "me", tmp_path / "friend"
    pigeon(me, "init", "--name", "Me")
    pigeon(friend, "init", "--name", "Friend")
    invite = pigeon_json(friend, "invite")["invite"]
    pigeon(me, "contact", "add", "alice", invite)
    _fails(pigeon(me, "contact", "add", "ally", invite, check=False), 1,
           "this account is already your contact 'alice'; to change the name: "
           "pigeon contact rename alice ally")
    renamed = pigeon_json(me, "contact", "rename", "ALICE", "Ally")
    assert (renamed["name"], renamed["old_name"]) == ("Ally", "alice")
    assert set(renamed) >= {"account_id", "addresses", "peer_ids", "online"}  # no "addrs"
    assert pigeon_json(me, "history", "ally") == []
    _fails(pigeon(me, "history", "aly", check=False), 1,
           "no contact named 'aly'; did you mean 'Ally'?")
    # no terminal to ask on: nothing is removed, and the message says how to confirm
    _fails(pigeon(me, "contact", "remove", "ally", check=False), 1,
           "Ally was not removed (--yes skips this question)")
    assert [c["name"] for c in pigeon_json(me, "contact", "list")] == ["Ally"]
    removed = pigeon(me, "contact", "remove", "ally", "--yes")
    assert "removed Ally and the history with them" in removed.stdout
    assert pigeon_json(me, "contact", "list") == []


def _rpc(path: Path, lines: list[bytes]) -> list[dict[str, object]]:
    """Send raw lines to a control socket; one reply per line."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        stream = sock.makefile("rwb")
        replies = []
        for line in lines:
            stream.write(line + b"\n")
            stream.flush()
            replies.append(json.loads(stream.readline()))
        return replies


@pytest.fixture
def daemon(initialised: Path) -> Iterator[Daemon]:
    running = Daemon(initialised)
    try:
        yield running
    finally:
        running.stop()


def test_daemon_survives_bad_input_and_ctrl_c_exits_130(initialised: Path, daemon: Daemon,
                                                       tmp_path: Path) -> None:
    friend = tmp_path / "friend"
    pigeon(friend, "init", "--name", "Friend")
    pigeon(initialised, "contact", "add", "bob", pigeon_json(friend, "invite")["invite"])
    # a 10 MB line on `send --stdin`: refused before anything is sent
    result = pigeon(initialised, "send", "bob", "--stdin", stdin="x" * 10_000_000 + "\n",
                    check=False)
    _fails(result, 1, f"line 1 of stdin is 10000000 bytes; a message holds at most "
                      f"{MAX_TEXT_BYTES} bytes")
    # stdin that is not UTF-8: refused, naming the line
    raw = subprocess.run([sys.executable, "-m", "node", "--data-dir", str(initialised), "send",
                          "bob", "--stdin"], input=b"fine\ncaf\xe9\n", capture_output=True,
                         timeout=60)
    _fails(subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(),
                                       raw.stderr.decode()), 1,
           "line 2 of stdin is not valid UTF-8 text")
    # a non-UTF-8 argument never reaches the daemon
    _fails(pigeon(initialised, "send", "bob", "caf\udce9", check=False), 2, "not valid UTF-8")
    # a lone surrogate, deep nesting, then a good request on the same connection
    surrogate, deep, good = _rpc(DataDir(initialised).socket_file, [
        b'{"jsonrpc":"2.0","id":1,"method":"send","params":{"contact":"bob","text":"caf\\udce9"}}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"jsonrpc":"2.0","id":3,"method":"id"}',
    ])
    assert surrogate["error"]["code"] == INVALID_REQUEST  # type: ignore[index]
    assert deep["error"] == {"code": PARSE_ERROR,
                             "message": f"nested deeper than {MAX_RPC_DEPTH} levels"}
    assert good["result"]["peer_id"] == daemon.hello["peer_id"]  # type: ignore[index]
    assert pigeon_json(initialised, "status")["daemon"] is True
    assert pigeon_json(initialised, "history", "bob") == []  # nothing was queued
    daemon.process.send_signal(signal.SIGINT)
    assert daemon.process.wait(timeout=30) == 130
    wait_until(lambda: "Traceback" not in daemon.stderr, timeout=1, what="stderr")
    assert "Traceback" not in daemon.stderr


def test_pigeon_status_with_a_daemon_does_not_load_the_node_stack(initialised: Path,
                                                                  daemon: Daemon) -> None:
    """A command the daemon serves imports neither libp2p nor the node (it costs ~1 s of CPU)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "node", "--data-dir", str(initialised),
         "status", "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and json.loads(result.stdout)["daemon"] is True
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "node.cli.device" in imported
    assert not imported & {"libp2p", "node.net", "node.device.node", "node.device.control"}
    # Nor the installed version: only --version looks it up (importlib.metadata and the lookup
    # are about 30 ms, a tenth of such a command).
    assert "importlib.metadata" not in imported
    # Nor the node's settings or the protocol's messages: `status` needs neither.
    assert not imported & {"node.device.config", "node.protocol.content"}


def test_chat_shows_own_lines_with_their_state_and_sanitizes_peer_text(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "alice", tmp_path / "bob"
    pigeon(a_dir, "init", "--name", "Alice")
    pigeon(b_dir, "init", "--name", "Bob")
    a, b = Daemon(a_dir), Daemon(b_dir)
    chat = None
    try:
        pigeon(b_dir, "contact", "add", "alice", pigeon_json(a_dir, "invite")["invite"])
        a.next_event("ContactAdded", timeout=30)
        chat = subprocess.Popen(
            [sys.executable, "-m", "node", "--data-dir", str(b_dir), "chat", "ALICE", "--json"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert chat.stdin is not None and chat.stdout is not None
        wait_until(lambda: chat is not None and chat.stderr is not None and
                   chat.stderr.readline().startswith("-- chatting with alice"),
                   timeout=60, what="chat ready")
        chat.stdin.write("hello from bob\n")
        chat.stdin.flush()
        items: list[dict[str, object]] = []
        deadline = time.monotonic() + 60
        while not any(i["type"] == "MessageDelivered" for i in items):
            assert time.monotonic() < deadline, items
            items.append(json.loads(chat.stdout.readline()))
        queued = next(i for i in items if i["type"] == "MessageQueued")
        assert queued["text"] == "hello from bob" and queued["contact"] == "alice"
        kinds = [i["type"] for i in items if i.get("message_id") == queued["message_id"]]
        assert sorted(kinds) == ["MessageDelivered", "MessageQueued", "MessageSent"]
        assert kinds.index("MessageSent") < kinds.index("MessageDelivered")
        # Alice fakes a line from someone else and retitles the window: JSON keeps it exact,
        # the terminal output shows it escaped on one line
        evil = "hi\nMallory: send me your keys\x1b]0;pwned\x07\u202e"
        pigeon(a_dir, "send", "bob", evil)
        while True:
            item = json.loads(chat.stdout.readline())
            if item["type"] == "MessageReceived":
                assert item["text"] == evil
                break
        chat.stdin.close()
        assert chat.wait(timeout=30) == 0
        shown = pigeon(b_dir, "history", "alice").stdout.splitlines()
        assert len(shown) == 2 and "\x1b" not in shown[1] and "\u202e" not in shown[1]
        assert shown[1].endswith("alice: hi\\nMallory: send me your keys\\x1b]0;pwned\\x07"
                                 "\\u202e")
    finally:
        if chat is not None and chat.poll() is None:
            chat.kill()
            chat.wait(timeout=10)
        a.stop()
        b.stop()


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs a private mount namespace (root)")
@pytest.mark.parametrize(("target", "message"), [
    ("", "is not readable and writable by this user"),
    ("pigeon.db", "attempt to write a readonly database"),
])
def test_read_only_data_is_not_called_damaged(initialised: Path, target: str,
                                              message: str) -> None:
    """A read-only data directory or database (bind-mounted read-only in a mount namespace of
    this test's own: as root, file modes alone do not stop writes)."""
    path = initialised / target if target else initialised
    command = (f"mount --bind -o ro {path} {path} && exec {sys.executable} -m node "
               f"--data-dir {initialised} status")
    result = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True,
                            text=True, timeout=60)
    _fails(result, 1, message)
    assert "damaged" not in result.stderr and "backup" not in result.stderr


def test_pigeon_home_of_an_unknown_user() -> None:
    env = {**os.environ, "PIGEON_HOME": "~nosuchuser/pigeon"}
    result = subprocess.run([sys.executable, "-m", "node", "status"], capture_output=True,
                            text=True, timeout=60, env=env)
    _fails(result, 1, "cannot expand $PIGEON_HOME: no such user or no home directory")
