"""Helpers for tests that drive the real `pigeon` command in real processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests import forkserver

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
#: Daemons in tests never announce on a real interface: no mDNS unless a test pins it itself.
MDNS_OFF = ("--no-mdns",)
COMMAND_TIMEOUT_S = 60
#: Daemons in tests retry quickly (as tests/conftest.py's FAST): processes cannot share a trio
#: clock to jump, and a first dial or reservation that fails on a loaded machine (a relay still
#: starting) must not wait out the production backoff (0.5 s doubling up to 60 s). Written as
#: the data directory's config.toml unless the test wrote one.
FAST_RETRIES_TOML = "retry_initial_s = 0.05\nretry_max_s = 0.5\n"


def pigeon(data_dir: Path, *args: str, stdin: str | None = None, check: bool = True,
           timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run `pigeon --data-dir DATA_DIR ARGS...` to completion."""
    result = forkserver.run(["--data-dir", str(data_dir), *args], input=stdin, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"pigeon {' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def pigeon_json(data_dir: Path, *args: str, stdin: str | None = None) -> Any:
    result = pigeon(data_dir, *args, "--json", stdin=stdin)
    return json.loads(result.stdout)


class Daemon:
    """A `pigeon run --json` process; its event lines are collected by a reader thread."""

    def __init__(self, data_dir: Path, *extra: str, netns: str | None = None,
                 wait: bool = True) -> None:
        """`extra`: more flags for `pigeon run` (a --listen there replaces the loopback one);
        `netns`: the network namespace to run it in (tests/netlab.py). Returns once the daemon
        listens, or at once with `wait=False` (then call `wait_listening`: daemons started
        together start in parallel)."""
        self.data_dir = data_dir
        config_toml = data_dir / "config.toml"
        if data_dir.is_dir() and not config_toml.exists() and "--config" not in extra:
            config_toml.write_text(FAST_RETRIES_TOML)
        listen = () if "--listen" in extra else ("--listen", LOOPBACK)
        self.process = forkserver.pigeon_process(
            ["--data-dir", str(data_dir), "run", *listen, "--json", *extra,
             *(() if {"--mdns-interface", "--no-mdns"} & set(extra) else MDNS_OFF)],
            netns=netns, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.hello: dict[str, Any] = {}
        if wait:
            self.wait_listening()

    def wait_listening(self) -> dict[str, Any]:
        """Wait for the daemon's Listening event (its addresses); kept as `hello`."""
        if not self.hello:
            self.hello = self.next_event("Listening", timeout=30)
        return self.hello

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = json.loads(line)
            if event.get("type") == "MessageReceived":
                with self._lock:
                    self.received.append(event)
            self.events.put(event)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def received_count(self) -> int:
        with self._lock:
            return len(self.received)

    def next_event(self, kind: str, *, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.process.poll() is not None and self.events.empty()):
                raise AssertionError(f"no {kind} event from {self.data_dir}; stderr:\n{self.stderr}")
            try:
                event = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if event.get("type") == kind:
                return event

    def wait_received(self, count: int, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.received_count() < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(
                    f"{self.data_dir}: {self.received_count()}/{count} received; "
                    f"stderr:\n{self.stderr[-3000:]}")
            time.sleep(0.05)

    def kill_hard(self) -> None:
        """kill -9: no cleanup of any kind."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        stop_all([self])


class DeviceSlot:
    """One device's data directory and, while it runs, its daemon: for tests that stop, kill -9
    and restart the same devices again and again."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.daemon: Daemon | None = None

    def start(self, *, wait: bool = True) -> None:
        """Start the daemon; with `wait=False` return at once (`wait_started` waits for it to
        listen: daemons start in parallel, or while other devices send)."""
        assert self.daemon is None
        self.daemon = Daemon(self.data_dir, wait=wait)

    def wait_started(self) -> None:
        assert self.daemon is not None
        self.daemon.wait_listening()

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def kill_hard(self) -> None:
        assert self.daemon is not None
        self.daemon.kill_hard()
        self.daemon = None


@contextmanager
def contacts_pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """Alice and Bob daemons (in `tmp_path`/alice and /bob) that became contacts through the
    CLI: Bob added Alice's invite, so she calls him "Bob" and he calls her "alice"."""
    a_dir, b_dir = tmp_path / "alice", tmp_path / "bob"
    pigeon(a_dir, "init", "--name", "Alice")
    pigeon(b_dir, "init", "--name", "Bob")
    daemons: list[Daemon] = []
    try:
        a = Daemon(a_dir)
        daemons.append(a)
        b = Daemon(b_dir)
        daemons.append(b)
        invite = pigeon_json(a_dir, "invite")["invite"]
        added = pigeon_json(b_dir, "contact", "add", "alice", invite)
        assert added["name"] == "alice"
        joined = a.next_event("ContactAdded", timeout=30)
        assert joined["contact"] == "Bob"
        yield a, b
    finally:
        stop_all(daemons)


def stop_all(daemons: Sequence[Daemon]) -> None:
    """SIGTERM every daemon still running, then wait for each (they shut down in parallel);
    kill -9 one that takes longer than 15 s."""
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.send_signal(signal.SIGTERM)
    for daemon in daemons:
        try:
            daemon.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill_hard()


class Linking:
    """A `pigeon link --json` process; its JSON lines are collected by a reader thread."""

    def __init__(self, data_dir: Path, config_toml: str = FAST_RETRIES_TOML, *extra: str) -> None:
        """Starts `pigeon link` in `data_dir` (made, with `config_toml` as its config.toml;
        `extra`: more flags) and waits for the code it prints."""
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "config.toml").write_text(config_toml)
        self.data_dir = data_dir
        self.process = forkserver.pigeon_process(
            ["--data-dir", str(data_dir), "link", "--json", "--listen", LOOPBACK, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.code = str(self.next("LinkCode", timeout=30)["code"])

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(json.loads(line))

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    def next(self, kind: str, *, timeout: float, where: Any = lambda v: True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(value)
            if value.get("type") == kind and where(value):
                return value
        raise AssertionError(f"no {kind} from `pigeon link`; stderr:\n{''.join(self._stderr)}")

    def kill_hard(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill_hard()


def wait_until(predicate: Any, *, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
