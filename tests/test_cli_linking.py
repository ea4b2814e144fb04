"""Linking devices through the real `pigeon` command (PROTOCOL.md sections 25.2, 25.3): real
processes on loopback, set up only with the CLI. `pigeon link` on the new device, `pigeon device
add CODE` on the account's daemon; the history of 2,000 messages (the acceptance's scale) follows
in order with its progress lines, and a transfer cut by kill -9 of either side resumes and
completes without duplicates. Each test takes well under a minute on a two-core machine: the
history is made with one `pigeon send --stdin` each way, sent at once."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.clitools import FAST_RETRIES_TOML, Daemon, Linking, pigeon, pigeon_json, wait_until

#: Messages each way before linking: 2,000 in all, as the acceptance asks; the history goes in
#: 10-message chunks (200 of them) so that a kill falls inside the transfer.
N = 1000
CHUNK_TOML = "link_history_chunk = 10\n"


def _devices_state(data_dir: Path) -> list[Any]:
    """What a link changes on the approving device, read beside its running daemon."""
    conn = sqlite3.connect(f"file:{data_dir / 'pigeon.db'}?mode=ro", uri=True)
    try:
        return [conn.execute(q).fetchall() for q in (
            "SELECT account, seq FROM device_lists ORDER BY account",
            "SELECT device FROM devices ORDER BY device",
            "SELECT nonce FROM link_codes")]
    finally:
        conn.close()


def _history(data_dir: Path, contact: str) -> list[tuple[str, str, str]]:
    entries = pigeon_json(data_dir, "history", contact, "--limit", str(10 * N))
    return [(e["message_id"], e["direction"], e["text"]) for e in entries]


@pytest.fixture
def account(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon, list[tuple[str, str, str]]]]:
    """Alice's first device and Bob, contacts through the CLI, with N messages each way."""
    a_dir, b_dir = tmp_path / "a1", tmp_path / "bob"
    pigeon(a_dir, "init", "--name", "Alice")
    pigeon(b_dir, "init", "--name", "Bob")
    (a_dir / "config.toml").write_text(FAST_RETRIES_TOML + CHUNK_TOML)
    daemons: list[Daemon] = []
    try:
        a1 = Daemon(a_dir)
        daemons.append(a1)
        b = Daemon(b_dir)
        daemons.append(b)
        pigeon_json(b_dir, "contact", "add", "alice", pigeon_json(a_dir, "invite")["invite"])
        a1.next_event("ContactAdded", timeout=30)

        def send(data_dir: Path, contact: str, prefix: str) -> None:
            pigeon(data_dir, "send", contact, "--stdin", "--wait", "0", "--json",
                   stdin="".join(f"{prefix} {i:04d}\n" for i in range(N)), timeout=300)

        # Both ways at once, each in one `pigeon send --stdin`; their arrival is seen in the
        # daemons' event lines (no process per look).
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(send, (b_dir, a_dir), ("alice", "Bob"), ("b->a", "a->b")))
        a1.wait_received(N, timeout=120)
        b.wait_received(N, timeout=120)
        wait_until(lambda: len(_history(a_dir, "Bob")) == 2 * N, timeout=60,
                   what="both ways in Alice's history", interval=1.0)
        yield a1, b, _history(a_dir, "Bob")
    finally:
        for daemon in daemons:
            daemon.stop()


@pytest.mark.slow(seconds=7)
def test_link_through_the_cli_with_history_and_refused_codes(
        tmp_path: Path, account: tuple[Daemon, Daemon, list[tuple[str, str, str]]]) -> None:
    a1, _, history = account
    linking = Linking(tmp_path / "a2")
    try:
        before = _devices_state(a1.data_dir)
        body = linking.code[len("pigeon-link:"):]
        tampered = "pigeon-link:" + body[:50] + ("A" if body[50] != "A" else "B") + body[51:]
        refused = pigeon(a1.data_dir, "device", "add", tampered, "--json", check=False)
        assert refused.returncode == 1
        error = json.loads(refused.stdout)["error"]
        assert "link code" in error["message"], error
        assert _devices_state(a1.data_dir) == before

        approved = pigeon_json(a1.data_dir, "device", "add", linking.code)
        shown = linking.next("Confirmation", timeout=30)
        assert approved["confirmation"] == shown["confirmation"]
        assert approved["devices"] == 2
        linked = linking.next("Linked", timeout=120)
        assert linked["peer_id"] == approved["peer_id"] and linked["confirmation"] == \
            approved["confirmation"]
        assert linked["history"] == {"received": 2 * N, "total": 2 * N, "done": True}
        progress = [v["received"] for v in linking.seen if v["type"] == "HistoryProgress"]
        assert progress == sorted(progress) and len(progress) > 2
        assert linking.process.wait(timeout=30) == 0

        # A code works once: the approver remembers it, and nothing changes the second time.
        after = _devices_state(a1.data_dir)
        assert after != before
        again = pigeon(a1.data_dir, "device", "add", linking.code, "--json", check=False)
        assert again.returncode == 1 and "used already" in json.loads(again.stdout)["error"][
            "message"]
        assert _devices_state(a1.data_dir) == after
        # The new device refuses to be linked a second time.
        twice = pigeon(tmp_path / "a2", "link", "--json", check=False)
        assert twice.returncode == 1 and "holds an account" in twice.stdout

        a2 = Daemon(tmp_path / "a2")
        try:
            assert _history(a2.data_dir, "Bob") == history
            ids = pigeon_json(a2.data_dir, "id")
            assert ids["account_id"] == pigeon_json(a1.data_dir, "id")["account_id"]
            # A contact renamed on the first device is renamed on the new one (section 25.6).
            pigeon_json(a1.data_dir, "contact", "rename", "Bob", "Robert")
            wait_until(lambda: [c["name"] for c in pigeon_json(a2.data_dir, "contact", "list")]
                       == ["Robert"], timeout=30, what="the rename on the new device")
        finally:
            a2.stop()
    finally:
        linking.stop()


@pytest.mark.slow(seconds=11)
def test_a_history_transfer_cut_by_kill_9_of_either_side_completes_once(
        tmp_path: Path, account: tuple[Daemon, Daemon, list[tuple[str, str, str]]]) -> None:
    a1, _, history = account

    def started(value: dict[str, Any]) -> bool:
        return 0 < value["received"] < 2 * N

    # kill -9 of the new device during the transfer; `pigeon run` there finishes it.
    linking = Linking(tmp_path / "a2")
    try:
        pigeon_json(a1.data_dir, "device", "add", linking.code)
        linking.next("HistoryProgress", timeout=60, where=started)
        linking.kill_hard()
    finally:
        linking.stop()
    a2 = Daemon(tmp_path / "a2")
    try:
        wait_until(lambda: len(_history(a2.data_dir, "Bob")) == 2 * N, timeout=120,
                   what="the rest of the history on the new device", interval=1.0)
        assert _history(a2.data_dir, "Bob") == history
    finally:
        a2.stop()

    # kill -9 of the approving device during the transfer; its restart lets it finish.
    linking = Linking(tmp_path / "a3")
    try:
        pigeon_json(a1.data_dir, "device", "add", linking.code)
        linking.next("HistoryProgress", timeout=60, where=started)
        a1.kill_hard()
        assert linking.process.poll() is None  # the new device waits for the approver
        a1_again = Daemon(a1.data_dir)
        try:
            linked = linking.next("Linked", timeout=120)
            assert linked["history"]["done"] and linked["history"]["received"] >= 2 * N
        finally:
            a1_again.stop()
        assert linking.process.wait(timeout=30) == 0
    finally:
        linking.stop()
    assert _history(tmp_path / "a3", "Bob") == history
