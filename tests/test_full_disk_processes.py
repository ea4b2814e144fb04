"""A full disk under real `pigeon run` and `pigeon relay` processes: the data directory of the
sender, then of the receiver, then of the relay lives on a small tmpfs that the test fills up.
No process exits, `status` says the disk is full, nothing is lost, and delivery resumes by itself
once the filler is deleted (benchmarks/full_disk.py measures how soon). Needs root (to mount the
tmpfs); skipped otherwise."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clitools import Daemon, pigeon, pigeon_json, wait_until
from tests.relaytools import RelayProcess, relay_status
from tests.test_storage_faults import FullDisk, full_disk  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow(seconds=3)

#: Big enough that writing one needs new pages of the WAL (a small write could reuse its space).
TEXTS = [f"message {i} " + "x" * 60_000 for i in range(4)]
WAIT_S = 60.0  # a bound for a loaded machine, not a timing goal


class Cluster:
    def __init__(self) -> None:
        self.daemons: list[Daemon] = []
        self.relays: list[RelayProcess] = []
        self.stopped: list[Daemon] = []

    def daemon(self, data_dir: Path, *extra: str) -> Daemon:
        d = Daemon(data_dir, *extra)
        self.daemons.append(d)
        return d

    def relay(self, data_dir: Path) -> RelayProcess:
        r = RelayProcess(data_dir)
        self.relays.append(r)
        r.wait_ready()
        return r

    def stop(self, daemon: Daemon) -> None:
        """Stop one daemon on purpose (it no longer counts for `alive`)."""
        daemon.stop()
        self.daemons.remove(daemon)
        self.stopped.append(daemon)

    def alive(self) -> None:
        for d in self.daemons:
            assert d.process.poll() is None, d.stderr[-3000:]
        for r in self.relays:
            assert r.process.poll() is None, r.stderr[-3000:]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        for d in c.daemons:
            d.stop()
        for r in c.relays:
            r.terminate()


def _befriend(cluster: Cluster, a_dir: Path, b_dir: Path, *b_extra: str) -> tuple[Daemon, Daemon]:
    pigeon(a_dir, "init", "--name", "Alice")
    pigeon(b_dir, "init", "--name", "Bob")
    a = cluster.daemon(a_dir)
    b = cluster.daemon(b_dir, *b_extra)
    invite = pigeon_json(a_dir, "invite")["invite"]
    pigeon_json(b_dir, "contact", "add", "alice", invite)
    assert a.next_event("ContactAdded", timeout=WAIT_S)["contact"] == "Bob"
    return a, b


def _send(data_dir: Path, texts: list[str]) -> list[str]:
    result = pigeon(data_dir, "send", "Bob", "--stdin", "--wait", "0", "--json",
                    stdin="".join(t + "\n" for t in texts))
    value = json.loads(result.stdout)
    return [r["message_id"] for r in (value if isinstance(value, list) else [value])]


def _states(data_dir: Path) -> dict[str, Any]:
    return {e["message_id"]: e["state"] for e in pigeon_json(data_dir, "history", "Bob")
            if e["direction"] == "out"}


def _exactly_once(b_dir: Path, texts: list[str]) -> None:
    got = [e["text"] for e in pigeon_json(b_dir, "history", "alice", "--limit", "100")
           if e["direction"] == "in"]
    assert got == texts


def _no_traceback(cluster: Cluster) -> None:
    for d in [*cluster.daemons, *cluster.stopped]:
        assert "Traceback" not in d.stderr, d.stderr[-3000:]


def test_the_senders_disk_fills_up(tmp_path: Path, full_disk: FullDisk,  # noqa: F811
                                   cluster: Cluster) -> None:
    a_dir, b_dir = full_disk.path / "alice", tmp_path / "bob"
    _befriend(cluster, a_dir, b_dir)
    full_disk.fill()
    refused = pigeon(a_dir, "send", "Bob", "--stdin", "--wait", "0", check=False,
                     stdin="".join(t + "\n" for t in TEXTS))
    assert refused.returncode == 1
    assert "is full" in refused.stderr and "Traceback" not in refused.stderr
    assert "is full" in pigeon_json(a_dir, "status")["storage_error"]
    human = pigeon(a_dir, "status").stdout
    assert "storage" in human and "is full" in human
    cluster.alive()
    full_disk.free()
    ids = _send(a_dir, TEXTS)
    wait_until(lambda: set(_states(a_dir).values()) == {"delivered"}, timeout=WAIT_S,
               what="delivery after space returned")
    assert list(_states(a_dir)) == ids
    _exactly_once(b_dir, TEXTS)
    assert pigeon_json(a_dir, "status")["storage_error"] is None
    cluster.alive()
    _no_traceback(cluster)


def test_the_receivers_disk_fills_up(tmp_path: Path, full_disk: FullDisk,  # noqa: F811
                                     cluster: Cluster) -> None:
    a_dir, b_dir = tmp_path / "alice", full_disk.path / "bob"
    _, b = _befriend(cluster, a_dir, b_dir)
    full_disk.fill()
    ids = _send(a_dir, TEXTS)
    wait_until(lambda: "is full" in (pigeon_json(b_dir, "status")["storage_error"] or ""),
               timeout=WAIT_S, what="the receiver's status to say its disk is full")
    wait_until(lambda: any("cannot store" in (c["last_error"] or "")
                           for c in pigeon_json(a_dir, "status")["contacts"]),
               timeout=WAIT_S, what="the sender to see the retry-later answers")
    assert set(_states(a_dir).values()) <= {"pending", "sent"}  # waiting, not failed
    cluster.alive()
    full_disk.free()
    b.wait_received(len(TEXTS), timeout=WAIT_S)
    wait_until(lambda: set(_states(a_dir).values()) == {"delivered"}, timeout=WAIT_S,
               what="delivery after space returned")
    assert list(_states(a_dir)) == ids
    _exactly_once(b_dir, TEXTS)
    cluster.alive()
    _no_traceback(cluster)


def test_the_relays_disk_fills_up(tmp_path: Path, full_disk: FullDisk,  # noqa: F811
                                  cluster: Cluster) -> None:
    relay = cluster.relay(full_disk.path / "relay")
    address = relay.addresses[0]
    a_dir, b_dir = tmp_path / "alice", tmp_path / "bob"
    _, b = _befriend(cluster, a_dir, b_dir, "--relay", address)
    cluster.stop(b)  # Bob is away: only his relay can take Alice's messages
    full_disk.fill()
    ids = _send(a_dir, TEXTS)

    def status() -> dict[str, Any]:
        return relay_status(full_disk.path / "relay")

    wait_until(lambda: (status()["storage_error"] or {}).get("reason") == "disk-full",
               timeout=WAIT_S, what="the relay's status to say its disk is full")
    wait_until(lambda: any("storage-full" in (c["last_error"] or "")
                           for c in pigeon_json(a_dir, "status")["contacts"]),
               timeout=WAIT_S, what="the sender to see the relay's storage-full")
    assert set(_states(a_dir).values()) <= {"pending", "sent"}
    cluster.alive()
    full_disk.free()
    wait_until(lambda: set(_states(a_dir).values()) == {"relayed"}, timeout=WAIT_S,
               what="the deposits after space returned")
    assert status()["storage_error"] is None
    b = cluster.daemon(b_dir, "--relay", address)
    b.wait_received(len(TEXTS), timeout=WAIT_S)
    wait_until(lambda: set(_states(a_dir).values()) == {"delivered"}, timeout=WAIT_S,
               what="the receipts")
    assert list(_states(a_dir)) == ids
    _exactly_once(b_dir, TEXTS)
    cluster.alive()
    _no_traceback(cluster)
