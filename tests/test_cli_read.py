"""`pigeon read` with real processes: two daemons on loopback, the read state in `history
--json` and the unread count in `status --json` (PROTOCOL.md section 25.6, `read`)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.clitools import contacts_pair, pigeon, pigeon_json, wait_until


def _incoming(data_dir: Path, contact: str) -> list[tuple[str, bool]]:
    return [(e["text"], e["read"]) for e in pigeon_json(data_dir, "history", contact)
            if e["direction"] == "in"]


def _unread(data_dir: Path, contact: str) -> int:
    (status,) = [c for c in pigeon_json(data_dir, "status")["contacts"] if c["name"] == contact]
    return int(status["unread"])


def test_read_marks_messages_and_history_and_status_show_it(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "alice", tmp_path / "bob"
    with contacts_pair(tmp_path) as (a, _):
        for text in ("one", "two", "three"):
            pigeon(b_dir, "send", "alice", text, "--wait", "0")
        a.wait_received(3, timeout=30)
        wait_until(lambda: len(_incoming(a_dir, "Bob")) == 3, timeout=30, what="history")
        assert _incoming(a_dir, "Bob") == [("one", False), ("two", False), ("three", False)]
        assert _unread(a_dir, "Bob") == 3
        assert [e["read"] for e in pigeon_json(b_dir, "history", "alice")] == [None] * 3

        first = pigeon_json(a_dir, "history", "Bob")[0]["message_id"]
        assert pigeon_json(a_dir, "read", "bob", "--up-to", first) == {
            "contact": "Bob", "read": 1, "unread": 2}
        assert a.next_event("MessagesRead", timeout=30) == {
            "type": "MessagesRead", "contact": "Bob", "count": 1}
        human = pigeon(a_dir, "read", "Bob").stdout
        assert human.strip() == "2 read; 0 unread from Bob"
        assert _incoming(a_dir, "Bob") == [("one", True), ("two", True), ("three", True)]
        assert _unread(a_dir, "Bob") == 0

        bad = pigeon(a_dir, "read", "Bob", "--up-to", "f" * 32, "--json", check=False)
        assert bad.returncode == 1
        assert json.loads(bad.stdout)["error"]["type"] == "InvalidMessage"
