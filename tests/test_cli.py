"""The `pigeon` command without a daemon: setup, errors, JSON output, the demo and the examples."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clitools import pigeon, pigeon_json

ROOT = Path(__file__).resolve().parent.parent


def test_init_id_and_refusing_to_init_twice(tmp_path: Path) -> None:
    created = pigeon_json(tmp_path / "d", "init", "--name", "Ann")
    assert created["account_id"].startswith("pg") and created["peer_id"].startswith("12D3KooW")
    shown = pigeon_json(tmp_path / "d", "id")
    assert (shown["account_id"], shown["peer_id"]) == (created["account_id"], created["peer_id"])
    again = pigeon(tmp_path / "d", "init", check=False)
    assert again.returncode == 1 and "already holds an identity" in again.stderr
    as_json = pigeon(tmp_path / "d", "init", "--json", check=False)
    assert json.loads(as_json.stdout)["error"]["type"] == "DataDirError"


def test_commands_before_init_say_what_to_do(tmp_path: Path) -> None:
    result = pigeon(tmp_path / "empty", "history", "bob", check=False)
    assert result.returncode == 1
    assert "pigeon init" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("damage", ["truncate", "garbage", "mode", "swap"])
def test_damaged_key_files_give_a_clear_error(tmp_path: Path, damage: str) -> None:
    data = tmp_path / "d"
    pigeon(data, "init")
    identity, device = data / "identity.key", data / "device.key"
    if damage == "truncate":
        identity.write_bytes(identity.read_bytes()[:20])
    elif damage == "garbage":
        identity.write_bytes(os.urandom(90))
    elif damage == "mode":
        identity.chmod(0o644)
    else:
        identity_bytes = identity.read_bytes()
        identity.write_bytes(device.read_bytes())
        device.write_bytes(identity_bytes)
    result = pigeon(data, "id", check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "identity.key" in result.stderr
    expected = {"truncate": "damaged", "garbage": "damaged", "mode": "readable by other users",
                "swap": "holds the device key"}[damage]
    assert expected in result.stderr


def test_damaged_database_gives_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "d"
    pigeon(data, "init")
    (data / "pigeon.db").write_bytes(b"this is not SQLite" * 100)
    for name in ("pigeon.db-wal", "pigeon.db-shm"):
        (data / name).unlink(missing_ok=True)
    result = pigeon(data, "status", check=False)
    assert result.returncode == 1
    assert "pigeon.db is damaged" in result.stderr and "Traceback" not in result.stderr


def test_bad_invite_on_the_command_line(tmp_path: Path) -> None:
    pigeon(tmp_path / "d", "init")
    for invite, reason in [("hello", "not a Pigeon invite"), ("pigeon:!!!!", "damaged"),
                           ("pigeon:" + "A" * 200, "not genuine or is damaged")]:
        result = pigeon(tmp_path / "d", "contact", "add", "bob", invite, "--json", check=False)
        assert result.returncode == 1
        error = json.loads(result.stdout)["error"]
        assert error["type"] == "InviteError" and reason in error["message"]
    assert pigeon_json(tmp_path / "d", "contact", "list") == []


def test_json_output_is_json_only_for_every_command(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    pigeon(a, "init", "--name", "A")
    pigeon(b, "init", "--name", "B")
    invite = pigeon_json(a, "invite")["invite"]
    assert invite.startswith("pigeon:")
    outputs = [
        pigeon(b, "contact", "add", "a", invite, "--json"),
        pigeon(b, "contact", "list", "--json"),
        pigeon(b, "send", "a", "queued while a is offline", "--wait", "0", "--json"),
        pigeon(b, "history", "a", "--json"),
        pigeon(b, "status", "--json"),
        pigeon(b, "id", "--json"),
        pigeon(b, "read", "a", "--json"),
    ]
    for result in outputs:
        json.loads(result.stdout)  # exactly one JSON value, nothing else
    status = json.loads(outputs[4].stdout)
    assert status["contacts"][0]["pending"] == 2  # the intro and the message, both queued
    history = json.loads(outputs[3].stdout)
    assert [h["state"] for h in history] == ["pending"]


@pytest.mark.slow(seconds=4)
def test_demo_shows_a_real_exchange_including_offline_delivery() -> None:
    result = subprocess.run([sys.executable, "-m", "node", "demo", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["exactly_once"] and summary["safety_numbers_match"]
    assert summary["offline_delivered"] == 3
    assert not any(Path(d).exists() for d in summary["data_dirs"])


@pytest.mark.slow(seconds=2)
def test_embedding_example_runs() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "embed.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "alice -> bob: echo: how are you?" in result.stdout
    assert result.stdout.count("echo:") == 3


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    assert readme[0] == "```sh" and readme[3] == "```"
    demo, tests = readme[1], readme[2]
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("pigeon demo")
    assert tests.startswith("python3 -m venv .venv") and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, ".ci/run must run exactly the README's test command"
    assert re.search(r"^set -euo pipefail$", ci, re.M)


class _SignalOnListening(io.StringIO):
    """Standard output that sends this process SIGTERM as the daemon writes "Listening": what a
    supervisor does that stops the daemon the moment it says it is up."""

    def write(self, text: str) -> int:
        written = super().write(text)
        if '"Listening"' in text:
            os.kill(os.getpid(), signal.SIGTERM)
        return written


def test_sigterm_as_soon_as_the_daemon_is_listening_stops_it_gracefully(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pigeon run` in this process (a signal handler is per process): SIGTERM that arrives the
    moment "Listening" is printed ends the daemon as a later one does, with exit status 0, not
    with the default action (here caught by a stand-in handler, which must not see it)."""
    from node.cli import main

    pigeon(tmp_path / "a", "init", "--name", "A")
    missed: list[int] = []

    def stand_in(signum: int, _frame: object) -> None:
        missed.append(signum)
        raise KeyboardInterrupt  # the daemon would go on running: end it here

    previous = signal.signal(signal.SIGTERM, stand_in)
    status = None
    try:
        monkeypatch.setattr(sys, "stdout", _SignalOnListening())
        status = main(["--data-dir", str(tmp_path / "a"), "run", "--json", "--no-mdns",
                       "--listen", "/ip4/127.0.0.1/tcp/0"])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert missed == [] and status == 0
