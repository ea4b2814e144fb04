"""Attachments through the `pigeon` command, real processes on loopback (PROTOCOL.md section 26):
a camera photo shrunk and stripped, `--original` exact bytes, a large file with both daemons'
memory measured, kill -9 of either side mid-transfer resuming, the same file through the relay
while the recipient is offline with the relay killed mid-upload, clear errors. Bytes sent are
the kernel's TCP counts of the sender's connections (`ss`), so resuming is measured on the wire.

The large file is 24 MiB by default; PIGEON_MEDIA_TEST_MIB sets another size (300 shows the
issue's own figure: `PIGEON_MEDIA_TEST_MIB=300 pytest tests/test_cli_files.py -k large`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.clitools import (
    Daemon,
    Linking,
    contacts_pair,
    pigeon,
    pigeon_json,
    stop_all,
    wait_until,
)
from tests.mediatools import CAMERA_MAKE, GPS_DATUM, camera_jpeg, random_file
from tests.relaytools import RelayProcess

#: Size of the large-file tests, in MiB.
LARGE_MIB = int(os.environ.get("PIGEON_MEDIA_TEST_MIB", "24"))
#: How far a daemon's resident memory may rise above its idle value during a transfer.
RSS_MARGIN_BYTES = 60 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while block := src.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class TcpSent:
    """Bytes a process's TCP connections sent (the kernel's `bytes_sent`, read with `ss`),
    summed over every connection seen by `sample()`: what it put on the wire, Yamux and Noise
    included. A connection's count is read while it is open, so a process is stopped
    (SIGSTOP) and sampled before it is killed. The process's connections are told by their
    socket inodes (its /proc/PID/fd): `ss -p` would walk every process's descriptors at each
    sample, ~4 ms of CPU a time, seconds over a test that samples every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sent: dict[str, int] = {}

    def _socket_inodes(self) -> set[str]:
        fds = Path(f"/proc/{self.pid}/fd")
        inodes: set[str] = set()
        with contextlib.suppress(FileNotFoundError):  # the process is gone
            for fd in fds.iterdir():
                with contextlib.suppress(OSError):  # closed meanwhile
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[len("socket:["):-1])
        return inodes

    def sample(self) -> None:
        inodes = self._socket_inodes()
        if not inodes:
            return
        lines = subprocess.run(["ss", "-tineH"], capture_output=True, text=True,
                               check=True).stdout.splitlines()
        for head, info in itertools.pairwise(lines):
            inode = head.split("ino:")[1].split()[0] if "ino:" in head else None
            if inode not in inodes or "bytes_sent:" not in info:
                continue
            key = " ".join(head.split()[3:5])
            sent = int(info.split("bytes_sent:")[1].split()[0])
            self.sent[key] = max(self.sent.get(key, 0), sent)

    def total(self) -> int:
        return sum(self.sent.values())

    def sample_every(self, seconds: float) -> threading.Event:
        """Sample in a thread until the returned event is set: a connection the process closes
        by itself is counted up to its last sample (at most `seconds` of traffic short)."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(seconds):
                self.sample()

        threading.Thread(target=run, daemon=True).start()
        return stop


#: The kill -9 tests count bytes on the wire with `ss` (iproute2).
NEEDS_SS = pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2)")


def stop_and_kill(daemon: Daemon, *counters: TcpSent) -> None:
    """kill -9, after freezing the process (SIGSTOP) long enough for its sockets to drain and
    `counters` to read them."""
    os.kill(daemon.process.pid, signal.SIGSTOP)
    time.sleep(0.3)
    for counter in counters:
        counter.sample()
    daemon.kill_hard()


class PeakRss:
    """The highest resident memory of some processes, sampled every 20 ms in a thread."""

    def __init__(self, *pids: int) -> None:
        self.peaks = {pid: rss_bytes(pid) for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid in self.peaks:
                with contextlib.suppress(OSError, AssertionError):
                    self.peaks[pid] = max(self.peaks[pid], rss_bytes(pid))

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def partial_file(daemon: Daemon) -> Path | None:
    found = list((daemon.data_dir / "blobs" / "partial").glob("*"))
    return found[0] if found else None


@pytest.mark.slow(seconds=2)
def test_a_camera_photo_arrives_shrunk_and_stripped_and_original_exact(tmp_path: Path) -> None:
    photo = tmp_path / "IMG_0042.jpg"
    photo.write_bytes(camera_jpeg(4000, 3000))  # 12 megapixels, with GPS EXIF
    with contacts_pair(tmp_path) as (a, b):
        sent = pigeon_json(a.data_dir, "send", "Bob", "--file", str(photo), "--caption", "view")
        received = b.next_event("MessageReceived", timeout=30)
        assert received["message_id"] == sent["message_id"] and received["text"] == "view"
        attachment = received["attachment"]
        assert attachment["media_type"] == "image/jpeg" and attachment["thumbnail"]
        saved = b.next_event("AttachmentSaved", timeout=30)
        data = Path(saved["path"]).read_bytes()
        assert len(data) < 500_000
        image = Image.open(io.BytesIO(data))
        assert max(image.size) <= 1600 and len(image.getexif()) == 0
        for marker in (b"Exif", b"GPS", GPS_DATUM.encode(), CAMERA_MAKE.encode()):
            assert marker not in data
        history = pigeon_json(b.data_dir, "history", "alice")
        (entry,) = [e for e in history if e["message_id"] == sent["message_id"]]
        assert entry["kind"] == "file"
        assert {k: entry["attachment"][k] for k in ("name", "media_type", "state")} == {
            "name": "IMG_0042.jpg", "media_type": "image/jpeg", "state": "done"}
        assert entry["attachment"]["size"] == len(data)

        original = pigeon_json(a.data_dir, "send", "Bob", "--file", str(photo), "--original")
        b.next_event("AttachmentSaved", timeout=30)
        out = tmp_path / "exact.jpg"
        copied = pigeon_json(b.data_dir, "save", original["message_id"], str(out))
        assert copied["path"] == str(out)
        assert sha256_file(out) == sha256_file(photo)


@pytest.mark.slow(seconds=2)
def test_a_large_file_arrives_direct_within_the_memory_budget(tmp_path: Path) -> None:
    source = tmp_path / "large.bin"
    digest = random_file(source, LARGE_MIB * 1024 * 1024)
    with contacts_pair(tmp_path) as (a, b):
        time.sleep(1.0)  # idle values after start-up
        peak = PeakRss(a.process.pid, b.process.pid)
        idle = dict(peak.peaks)
        sent = pigeon_json(a.data_dir, "send", "Bob", "--file", str(source), "--wait", "0")
        b.next_event("MessageReceived", timeout=30)
        out = tmp_path / "got.bin"
        pigeon_json(b.data_dir, "save", sent["message_id"], str(out))
        peaks = peak.stop()
        assert sha256_file(out) == digest
        for pid, value in peaks.items():
            rise = value - idle[pid]
            print(f"pid {pid}: idle {idle[pid] / 2**20:.1f} MiB, peak {value / 2**20:.1f} MiB")
            assert rise < RSS_MARGIN_BYTES, f"{rise / 2**20:.1f} MiB over idle"


@NEEDS_SS
@pytest.mark.slow(seconds=2)
@pytest.mark.parametrize("victim", ["receiver", "sender"])
def test_kill_9_mid_transfer_resumes(tmp_path: Path, victim: str) -> None:
    source = tmp_path / "large.bin"
    size = LARGE_MIB * 1024 * 1024
    digest = random_file(source, size)
    with contacts_pair(tmp_path) as (a, b):
        sent = pigeon_json(a.data_dir, "send", "Bob", "--file", str(source), "--wait", "0")
        b.next_event("MessageReceived", timeout=30)
        first_sender = TcpSent(a.process.pid)
        # The download runs in Bob's daemon; `save` started in the background starts it.
        saver = threading.Thread(target=pigeon, args=(b.data_dir, "save", sent["message_id"]),
                                 kwargs={"check": False}, daemon=True)
        saver.start()
        wait_until(lambda: (p := partial_file(b)) is not None and p.stat().st_size > size // 4,
                   timeout=30, what="a quarter of the blob downloaded", interval=0.005)
        stop_and_kill(b if victim == "receiver" else a, first_sender)
        saver.join(timeout=30)
        restarted = Daemon((b if victim == "receiver" else a).data_dir)
        try:
            sender, receiver = (a, restarted) if victim == "receiver" else (restarted, b)
            counters = [first_sender] if victim == "receiver" else [first_sender,
                                                                    TcpSent(sender.process.pid)]
            out = tmp_path / "resumed.bin"
            pigeon_json(receiver.data_dir, "save", sent["message_id"], str(out))
            counters[-1].sample()
            written = sum(c.total() for c in counters)
        finally:
            restarted.stop()
    assert sha256_file(out) == digest
    print(f"{victim} killed: {written / size:.3f}x the file written by the sender")
    assert written < 1.3 * size


def test_clear_errors_for_what_is_not_a_file(tmp_path: Path) -> None:
    data = tmp_path / "a"
    pigeon(data, "init", "--name", "A")
    missing = pigeon(data, "send", "bob", "--file", str(tmp_path / "nope.jpg"), check=False)
    assert missing.returncode == 1 and "no such file" in missing.stderr
    directory = pigeon(data, "send", "bob", "--file", str(tmp_path), "--json", check=False)
    assert directory.returncode == 1
    assert "is a directory" in json.loads(directory.stdout)["error"]["message"]
    unknown = pigeon(data, "save", "00" * 16, "--json", check=False)
    assert unknown.returncode == 1
    assert json.loads(unknown.stdout)["error"]["type"] == "InvalidMessage"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@NEEDS_SS
@pytest.mark.slow(seconds=36)
def test_through_the_relay_with_the_relay_killed_mid_upload(tmp_path: Path) -> None:
    """Bob is offline: Alice's daemon leaves the message and uploads the file to his relay; the
    relay is killed (-9) a quarter of the way and restarted, the upload resumes; then Alice is
    gone and Bob's daemon gets the file from the relay alone. Memory and bytes are measured."""
    source = tmp_path / "large.bin"
    size = LARGE_MIB * 1024 * 1024
    digest = random_file(source, size)
    port = free_port()
    relay_dir = tmp_path / "relay"
    listen = ("--listen", f"/ip4/127.0.0.1/tcp/{port}")
    relay = RelayProcess(relay_dir, *listen)
    relay.wait_ready()
    relay_address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{relay.peer_id}"
    a_dir, b_dir = tmp_path / "alice", tmp_path / "bob"
    pigeon(a_dir, "init", "--name", "Alice")
    pigeon(b_dir, "init", "--name", "Bob")
    daemons: list[Daemon] = []
    try:
        a = Daemon(a_dir)
        b = Daemon(b_dir, "--relay", relay_address)
        daemons += [a, b]
        pigeon_json(b_dir, "contact", "add", "alice", pigeon_json(a_dir, "invite")["invite"])
        a.next_event("ContactAdded", timeout=30)
        wait_until(lambda: all(r["registered"] for r in pigeon_json(b_dir, "status")["relays"]),
                   timeout=30, what="Bob registered at his relay")
        wait_until(lambda: pigeon_json(a_dir, "contact", "list")[0]["peer_ids"], timeout=30,
                   what="Alice knows Bob's device")
        # Bob's intro (his relays, his capability) was acknowledged by Alice: nothing of his
        # is left undelivered.
        wait_until(lambda: all(c["pending"] + c["sent"] + c["relayed"] == 0
                               for c in pigeon_json(b_dir, "status")["contacts"]),
                   timeout=30, what="Bob's intro acknowledged by Alice")
        b.stop()
        sent = pigeon_json(a_dir, "send", "Bob", "--file", str(source), "--wait", "0")
        uploader = TcpSent(a.process.pid)
        sampling = uploader.sample_every(0.01)
        idle_a = rss_bytes(a.process.pid)
        peak = PeakRss(a.process.pid)

        def relay_blob() -> Path | None:
            found = list((relay_dir / "blobs").glob("[0-9a-f]" * 64))
            return found[0] if found else None

        wait_until(lambda: (p := relay_blob()) is not None and p.stat().st_size > size // 4,
                   timeout=60, what="a quarter uploaded", interval=0.005)
        os.kill(relay.process.pid, signal.SIGSTOP)
        time.sleep(0.3)
        uploader.sample()
        relay.kill()
        relay = RelayProcess(relay_dir, *listen)
        relay.wait_ready()
        wait_until(lambda: (p := relay_blob()) is not None and p.stat().st_size >= size,
                   timeout=90, what="the upload resumed and completed")
        time.sleep(0.5)  # the last replies
        sampling.set()
        rise_a = peak.stop()[a.process.pid] - idle_a
        a.stop()
        b = Daemon(b_dir, "--relay", relay_address)
        daemons.append(b)
        b.next_event("MessageReceived", timeout=60)
        idle_b = rss_bytes(b.process.pid)
        peak = PeakRss(b.process.pid)
        out = tmp_path / "from-relay.bin"
        pigeon_json(b_dir, "save", sent["message_id"], str(out))
        rise_b = peak.stop()[b.process.pid] - idle_b
    finally:
        stop_all(daemons)
        relay.terminate()
    assert sha256_file(out) == digest
    print(f"upload with the relay killed: {uploader.total() / size:.3f}x the file sent;"
          f" RSS rise: sender {rise_a / 2**20:.1f} MiB, receiver {rise_b / 2**20:.1f} MiB")
    assert uploader.total() < 1.3 * size
    assert rise_a < RSS_MARGIN_BYTES and rise_b < RSS_MARGIN_BYTES


@pytest.mark.slow(seconds=2)
def test_our_second_device_shows_a_file_we_sent_and_saves_the_exact_bytes(
        tmp_path: Path) -> None:
    """Alice's account has two devices (linked with `pigeon link` and `device add`); device 1
    sends Bob a file; device 2 shows it in its history as sent by us and `pigeon save` there
    gives the exact bytes, fetched from device 1 (PROTOCOL.md sections 25.5, 26.4). Bob's
    copy counts as unread until `pigeon read`."""
    source = tmp_path / "holiday.bin"
    digest = random_file(source, 3 * 1024 * 1024 + 7)
    with contacts_pair(tmp_path) as (a, b):
        linking = Linking(tmp_path / "alice2")
        try:
            pigeon_json(a.data_dir, "device", "add", linking.code)
            linking.next("Linked", timeout=120)
            assert linking.process.wait(timeout=30) == 0
        finally:
            linking.stop()
        a2 = Daemon(tmp_path / "alice2", wait=False)
        try:
            a2.wait_listening()
            wait_until(lambda: any(c["name"] == "Bob" for c in pigeon_json(
                a2.data_dir, "contact", "list")), timeout=60, what="device 2 knows Bob")
            sent = pigeon_json(a.data_dir, "send", "Bob", "--file", str(source),
                               "--caption", "from the trip", "--wait", "0")

            def on_device_2() -> dict[str, Any] | None:
                return next((e for e in pigeon_json(a2.data_dir, "history", "Bob")
                             if e["message_id"] == sent["message_id"]), None)

            wait_until(lambda: on_device_2() is not None, timeout=60,
                       what="the file in device 2's history")
            entry = on_device_2()
            assert entry is not None
            assert (entry["direction"], entry["kind"], entry["text"]) == (
                "out", "file", "from the trip")
            assert entry["attachment"]["name"] == "holiday.bin"
            assert entry["attachment"]["size"] == source.stat().st_size
            out = tmp_path / "saved-on-2.bin"
            pigeon_json(a2.data_dir, "save", sent["message_id"], str(out))
            assert sha256_file(out) == digest
            # Bob has it once, as from Alice.
            b.next_event("MessageReceived", timeout=30)
            files = [e for e in pigeon_json(b.data_dir, "history", "alice")
                     if e["kind"] == "file"]
            assert [(e["message_id"], e["direction"], e["read"]) for e in files] == [
                (sent["message_id"], "in", False)]
            # It is news for Bob until `pigeon read` (PROTOCOL.md section 25.6).
            assert pigeon_json(b.data_dir, "read", "alice") == {
                "contact": "alice", "read": 1, "unread": 0}
        finally:
            stop_all([a2])


@pytest.mark.slow(seconds=2)
def test_a_progress_bar_on_a_terminal_and_only_json_with_json(tmp_path: Path) -> None:
    source = tmp_path / "bar.bin"
    random_file(source, 4 * 1024 * 1024)
    with contacts_pair(tmp_path) as (a, b):
        main, other = pty.openpty()
        try:
            # stderr is a terminal: the bar follows Bob's download of the file, with sizes.
            result = subprocess.run(
                [sys.executable, "-m", "node", "--data-dir", str(a.data_dir), "send", "Bob",
                 "--file", str(source), "--wait", "20"],
                stdout=subprocess.PIPE, stderr=other, text=True, timeout=60)
            os.close(other)
            shown = b""
            with contextlib.suppress(OSError):
                while chunk := os.read(main, 65536):
                    shown += chunk
        finally:
            os.close(main)
        assert result.returncode == 0, shown
        message_id, state, name = result.stdout.split()
        assert (state, name) == ("delivered", "bar.bin")
        assert f"sending {message_id[:8]}".encode() in shown and b"MB" in shown, shown
        b.next_event("AttachmentSaved", timeout=30)
        # With --json, stdout is one JSON value and nothing else.
        sent = pigeon(a.data_dir, "send", "Bob", "--file", str(source), "--wait", "20", "--json")
        assert json.loads(sent.stdout)["state"] == "delivered"
