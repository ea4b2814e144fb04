"""Helpers for the relay tests: relays and clients on 127.0.0.1, real libp2p, real SQLite."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from node.clock import Clock
from node.device.mailbox_client import MailboxClient
from node.net import FrameStream, Transport
from node.protocol import mailbox as mb
from node.protocol.keys import DeviceKey, DeviceKeyPair
from node.protocol.sealed import SealedContent, seal
from node.relay.config import RelayConfig
from node.relay.service import RelayService, open_relay
from node.testing import Party
from tests import forkserver

LOOPBACK = "/ip4/127.0.0.1/tcp/0"

#: Upper bound of any single network wait in these tests.
WAIT = 10.0


def relay_config(path: Path, **changes: Any) -> RelayConfig:
    return RelayConfig(data_dir=path, listen=(LOOPBACK,), circuit_relay=False).replace(**changes)


@asynccontextmanager
async def running_relay(path: Path, clock: Clock | None = None, **changes: Any
                        ) -> AsyncIterator[RelayService]:
    async with open_relay(relay_config(path, **changes), clock=clock) as service:
        yield service


@asynccontextmanager
async def peer(seed: bytes | None = None) -> AsyncIterator[Transport]:
    async with Transport.open(seed or os.urandom(32), (LOOPBACK,)) as transport:
        yield transport


@asynccontextmanager
async def client(transport: Transport, relay_peer_id: str, addrs: list[str], **kwargs: Any
                 ) -> AsyncIterator[MailboxClient]:
    """A mailbox client; connecting and every reply are bounded by WAIT."""
    async with MailboxClient.connect(transport, relay_peer_id, addrs, timeout=WAIT,
                                     reply_timeout=WAIT, **kwargs) as mailbox:
        yield mailbox


async def raw_stream(transport: Transport, relay_peer_id: str, addrs: list[str]
                     ) -> tuple[FrameStream, bytes]:
    """A bare mailbox stream (for hostile tests) and the relay's challenge nonce."""
    with trio.fail_after(WAIT):
        stream = await transport.open_stream(relay_peer_id, addrs, mb.MAILBOX_PROTOCOL,
                                             timeout=WAIT,
                                             max_frame_bytes=mb.MAX_MAILBOX_FRAME_BYTES)
        raw = await stream.receive()
    assert raw is not None
    challenge = mb.decode_reply(raw)
    assert isinstance(challenge, mb.Challenge)
    return stream, challenge.nonce


async def replies(stream: FrameStream, count: int) -> list[mb.Reply]:
    out: list[mb.Reply] = []
    with trio.fail_after(WAIT):
        while len(out) < count:
            raw = await stream.receive()
            assert raw is not None, f"stream ended after {len(out)} of {count} replies"
            out.append(mb.decode_reply(raw))
    return out


def sealed_envelope(sender: Party, recipient: Party, text: bytes) -> bytes:
    """A real sealed-sender envelope from `sender` to `recipient`'s device, with a first session
    message (a prekey message, which carries the sender's identity key inside)."""
    if recipient.name not in sender.sessions:
        sender.start_session(recipient)
    message = sender.encrypt(recipient, text)
    return seal(recipient.device.public, SealedContent(
        sender=sender.identity.public, sender_device=sender.device.public, message=message))


def box_of(device: DeviceKey) -> bytes:
    return mb.mailbox_id(device)


#: The deposit capability the tests' mailbox owners give their depositors.
CAP = b"C" * mb.CAP_BYTES


async def register_at(relay_peer_id: str, addrs: list[str], device: DeviceKeyPair,
                      caps: tuple[bytes, ...] = (CAP,)) -> None:
    """Register `device`'s mailbox at a relay (a process, say) with the capabilities `caps`, as
    the device does when it connects: `auth`, then `caps` (PROTOCOL.md section 21)."""
    async with peer() as t, client(t, relay_peer_id, addrs) as owner:
        await owner.authenticate(device)
        await owner.set_caps([mb.cap_hash(c) for c in caps])


def register(relay: RelayService, *devices: DeviceKey, caps: tuple[bytes, ...] = (CAP,)) -> None:
    """Register the mailboxes of `devices` at `relay` with the capabilities `caps`, through the
    same store calls as their devices' `auth` and `caps` requests (PROTOCOL.md section 21), for
    tests about what happens after that."""
    store = relay.relay.store
    for device in devices:
        box = box_of(device)
        assert store.register(box, now=relay.relay.clock.now_s(),
                              max_mailboxes=relay.relay.config.max_mailboxes)
        store.set_caps(box, [mb.cap_hash(c) for c in caps])


# --- relay processes ---------------------------------------------------------------------------


class RelayProcess:
    """`pigeon relay --json` in a process of its own; stderr (JSON log lines) is collected."""

    def __init__(self, data_dir: Path, *extra: str, log_level: str = "INFO",
                 netns: str | None = None) -> None:
        """`extra`: more flags for `pigeon relay`; `netns`: the network namespace to run it in
        (tests/netlab.py)."""
        self.data_dir = data_dir
        self.process = forkserver.pigeon_process(
            ["relay", "--data-dir", str(data_dir), "--listen", LOOPBACK, "--json", "--log-level",
             log_level, *extra],
            netns=netns, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._stdout: queue.Queue[str] = queue.Queue()
        self._stderr: list[str] = []
        self._pumps = [threading.Thread(target=self._pump_stdout, daemon=True),
                       threading.Thread(target=self._pump_stderr, daemon=True)]
        for pump in self._pumps:
            pump.start()
        self.ready: dict[str, Any] = {}

    def _pump_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._stdout.put(line)

    def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        try:
            line = self._stdout.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise AssertionError(f"relay did not start; stderr:\n{self.stderr}") from None
        ready = json.loads(line)
        if ready.get("type") != "RelayListening":
            self.kill()
            raise AssertionError(f"relay failed to start: {ready}; stderr:\n{self.stderr}")
        self.ready = ready
        return ready

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self._stderr) if line.strip()]

    @property
    def peer_id(self) -> str:
        return str(self.ready["peer_id"])

    @property
    def addresses(self) -> list[str]:
        return list(self.ready["addresses"])

    def kill(self) -> None:
        """kill -9: no cleanup of any kind."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("relay did not stop on SIGTERM") from None
        return self.process.returncode

    def status(self) -> dict[str, Any]:
        """`pigeon relay status --json` (asked of the running relay through its control socket)."""
        return relay_status(self.data_dir)

    def output_complete(self, timeout: float = 10.0) -> None:
        """After the process exited: wait until everything it wrote has been read."""
        assert self.process.poll() is not None, "the relay is still running"
        for pump in self._pumps:
            pump.join(timeout)


def relay_status(data_dir: Path) -> dict[str, Any]:
    """`pigeon relay status --json` of the relay whose data directory is `data_dir`."""
    done = forkserver.run(["relay", "status", "--data-dir", str(data_dir), "--json"], timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"pigeon relay status exited {done.returncode}: {done.stderr}")
    value: dict[str, Any] = json.loads(done.stdout)
    return value


def dial_from(transport: Transport, ip: str) -> Transport:
    """Make `transport`'s TCP dials leave from `ip`, another loopback address (127.0.0.0/8), so
    that a relay sees it as another machine. libp2p's TCP transport binds the source address
    when it is given one (its DCUtR hole punch does); this hands it one for every dial."""
    from functools import partial

    from libp2p.transport.tcp.tcp import TCP

    network: Any = transport._host.get_network()
    for tcp in network.transport_manager.get_transports():
        if isinstance(tcp, TCP):
            tcp._dial_resolved = partial(tcp._dial_resolved, source=(ip, 0))  # type: ignore[method-assign]
    return transport
