"""The relay as operators run it: `pigeon relay` in a process of its own, killed with SIGKILL,
stopped with SIGTERM, started twice on one directory, asked for its status, and audited for what
its database and its logs hold after a real exchange of sealed envelopes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from node.device.mailbox_client import DepositRequest
from node.errors import RelayRefused, TransportError
from node.protocol import mailbox as mb
from node.protocol.keys import DeviceKeyPair
from node.protocol.sealed import unseal
from node.testing import Party
from tests.relaytools import (
    CAP,
    WAIT,
    RelayProcess,
    box_of,
    client,
    peer,
    raw_stream,
    register_at,
    sealed_envelope,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def relays() -> Iterator[list[RelayProcess]]:
    """Every relay process a test starts is stopped at the end, whatever happened."""
    started: list[RelayProcess] = []
    yield started
    for process in started:
        process.kill()


async def start(relays: list[RelayProcess], data_dir: Path, *extra: str,
                log_level: str = "INFO") -> RelayProcess:
    process = RelayProcess(data_dir, *extra, log_level=log_level)
    relays.append(process)
    await trio.to_thread.run_sync(process.wait_ready)
    return process


async def fetch_all(device: DeviceKeyPair, relay: RelayProcess) -> list[mb.Item]:
    out: list[mb.Item] = []
    async with peer(device.to_bytes()) as t, client(t, relay.peer_id, relay.addresses) as inbox:
        await inbox.authenticate(device)
        after, more = 0, True
        with trio.fail_after(WAIT):
            for _ in range(1000):
                if not more:
                    break
                items, more = await inbox.fetch(after=after)
                out += items
                after = items[-1].seq if items else after
    return out


@pytest.mark.slow(seconds=11)
async def test_kill_9_during_deposits_loses_no_acknowledged_deposit(
        tmp_path: Path, relays: list[RelayProcess]) -> None:
    bob = DeviceKeyPair.generate()
    box = box_of(bob.public)
    data_dir = tmp_path / "relay"
    relay = await start(relays, data_dir)
    sent: set[bytes] = set()
    acked: list[bytes] = []
    kill_after = 400

    await register_at(relay.peer_id, relay.addresses, bob)
    async with peer() as t, client(t, relay.peer_id, relay.addresses) as alice:

        async def depositor() -> None:
            # One deposit at a time per task, 16 tasks: the relay reads them in bursts, commits
            # each burst in one transaction, and acks only then. Bounded: the kill comes first.
            for _ in range(10 * kill_after):
                message_id = os.urandom(16)
                sent.add(message_id)
                try:
                    await alice.deposit(box, message_id, b"envelope-" + message_id, cap=CAP)
                except TransportError:
                    return
                acked.append(message_id)
                if len(acked) == kill_after:
                    relay.kill()  # SIGKILL while the other tasks' deposits are in flight

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(depositor)

    assert relay.process.returncode == -9
    assert len(acked) >= kill_after and len(sent) > len(acked)  # some were in flight
    again = await start(relays, data_dir)
    assert again.peer_id == relay.peer_id
    stored = await fetch_all(bob, again)
    ids = [item.id for item in stored]
    assert len(ids) == len(set(ids)), "a deposit is stored twice"
    assert set(acked) <= set(ids), f"{len(set(acked) - set(ids))} acknowledged deposits lost"
    assert set(ids) <= sent
    assert all(item.env == b"envelope-" + item.id for item in stored)
    assert [item.seq for item in stored] == sorted(item.seq for item in stored)
    assert again.terminate() == 0


def windows(data: bytes, size: int = 8) -> set[bytes]:
    return {data[i:i + size] for i in range(len(data) - size + 1)}


async def test_database_and_logs_hold_no_plaintext_and_no_sender_identifier(
        tmp_path: Path, relays: list[RelayProcess]) -> None:
    alice = Party.create("alice", seed=os.urandom(32))
    bob = Party.create("bob", seed=os.urandom(32))
    box = box_of(bob.device.public)
    marker = b"PLAINTEXT-MARKER-" + os.urandom(6).hex().encode()
    data_dir = tmp_path / "relay"
    relay = await start(relays, data_dir, log_level="DEBUG")
    envelopes = [sealed_envelope(alice, bob, marker + b" %d" % i) for i in range(5)]
    ids = [os.urandom(16) for _ in envelopes]
    # Worst case for the sender: it deposits over a connection with its own device key.
    async with peer(alice.device.to_bytes()) as alice_t, peer(bob.device.to_bytes()) as bob_t:
        async with client(alice_t, relay.peer_id, relay.addresses) as depositor, \
                client(bob_t, relay.peer_id, relay.addresses) as inbox:
            await inbox.authenticate(bob.device)
            await inbox.subscribe()
            results = await depositor.deposit_many(
                [DepositRequest(box, i, e) for i, e in zip(ids, envelopes, strict=True)]
                + [DepositRequest(box, os.urandom(16), b"x" * 300_000)])  # refused: logged
            assert [r.code if r else None for r in results] == [None] * 5 + [mb.TOO_LARGE]
            with trio.fail_after(WAIT):
                async for pushed in inbox.pushes():
                    if pushed.id == ids[-1]:
                        break
            items, _ = await inbox.fetch()
            # The exchange is real: Bob opens the envelopes and finds the marker.
            opened = [unseal(bob.device, item.env) for item in items]
            assert all(o.sender == alice.identity.public for o in opened)
            assert marker in bob.decrypt(alice, opened[0].message)
            await inbox.ack(ids[:3])
        # A malformed frame from the sender's connection: the relay logs a reset reason.
        stream, _ = await raw_stream(alice_t, relay.peer_id, relay.addresses)
        await stream.send([b"\xffgarbage"])
        with trio.fail_after(WAIT), pytest.raises(TransportError):
            await stream.receive()
    assert relay.terminate() == 0
    relay.output_complete()

    database = b"".join(p.read_bytes() for p in sorted(data_dir.glob("relay.db*")))
    logs = relay.stderr.encode()
    events = relay.log_events()
    # The check could fail: the files and logs are the right ones and hold what is expected.
    assert envelopes[4] in database and envelopes[3] in database  # not acked: still stored
    assert box in database
    assert any(e["event"] == "stream.reset" and e["reason"] == "malformed-frame" for e in events)
    assert any(e.get("mailbox") == box.hex()[:8] for e in events)  # DEBUG events were written
    assert relay.peer_id.encode() in logs

    assert marker not in database and marker not in logs
    for acked_envelope in envelopes[:3]:  # deleted and overwritten, not only unlinked
        assert acked_envelope[-64:] not in database
    sender_texts = [alice.device.public.peer_id(), alice.identity.public.account_id()]
    sender_keys = [alice.device.public.to_bytes(), alice.identity.public.to_bytes(),
                   alice.device.public.to_x25519(), alice.identity.public.to_x25519()]
    for text in sender_texts:
        assert text.encode() not in logs and text.encode() not in database, text
        assert text[-12:].encode() not in logs, text
    for key in sender_keys:
        assert not windows(key) & windows(database), key.hex()
        assert key.hex().encode() not in logs
    assert box.hex().encode() not in logs  # mailbox ids only truncated


async def test_status_json_prints_json_only(tmp_path: Path, relays: list[RelayProcess]) -> None:
    data_dir = tmp_path / "relay"
    relay = await start(relays, data_dir)
    owner = DeviceKeyPair.generate()
    box = box_of(owner.public)
    await register_at(relay.peer_id, relay.addresses, owner)
    async with peer() as t, client(t, relay.peer_id, relay.addresses) as alice:
        await alice.deposit(box, os.urandom(16), b"one")
        with pytest.raises(RelayRefused):
            await alice.deposit(box, os.urandom(16), b"one", ttl=10**9)

        def status(*flags: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "node", "relay", "status", "--data-dir",
                                   str(data_dir), *flags], capture_output=True, text=True,
                                  timeout=60)

        result = await trio.to_thread.run_sync(status, "--json")
        human = await trio.to_thread.run_sync(status)
        # Asked again and again by operators' scripts: it loads no trio nor network stack
        # (node/cli/relay.py).
        imports = await trio.to_thread.run_sync(partial(
            subprocess.run, [sys.executable, "-X", "importtime", "-m", "node", "relay", "status",
                             "--data-dir", str(data_dir), "--json"],
            capture_output=True, text=True, timeout=60, check=True))
    loaded = {line.rsplit("|", 1)[-1].strip() for line in imports.stderr.splitlines()
              if line.startswith("import time:")}
    assert "node.rpc_wire" in loaded and json.loads(imports.stdout)["peer_id"] == relay.peer_id
    assert not sorted(m for m in loaded if m.split(".")[0] in ("trio", "libp2p", "multiaddr"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and result.stderr == ""
    figures = json.loads(result.stdout)
    assert figures["peer_id"] == relay.peer_id
    assert (figures["deposits"], figures["messages"], figures["mailboxes"]) == (1, 1, 1)
    assert figures["rejects"]["bad_ttl"] == 1
    assert figures["connected_peers"] == 1 and figures["streams"] == 1
    assert human.returncode == 0 and relay.peer_id in human.stdout
    assert (figures["registered_mailboxes"], figures["open_messages"]) == (1, 1)
    assert "registered     1 mailboxes" in human.stdout
    assert "bad_ttl 1" in human.stdout
    relay.terminate()
    after = await trio.to_thread.run_sync(status, "--json")
    assert after.returncode == 1
    assert json.loads(after.stdout)["error"]["message"].startswith("no relay is running")


async def test_a_second_relay_on_the_same_directory_is_refused(
        tmp_path: Path, relays: list[RelayProcess]) -> None:
    data_dir = tmp_path / "relay"
    first = await start(relays, data_dir)
    second = RelayProcess(data_dir)
    relays.append(second)
    returncode = await trio.to_thread.run_sync(lambda: second.process.wait(timeout=60))
    second.output_complete()
    assert returncode == 1
    failures = [e for e in second.log_events() if e["event"] == "relay.failed"]
    assert len(failures) == 1 and failures[0]["type"] == "DataDirLocked"
    assert f"in use by another pigeon relay (pid {first.process.pid})" in failures[0]["message"]
    assert second.ready == {} and first.process.poll() is None  # the first one is unharmed
    owner = DeviceKeyPair.generate()
    await register_at(first.peer_id, first.addresses, owner)
    async with peer() as t, client(t, first.peer_id, first.addresses) as alice:
        await alice.deposit(box_of(owner.public), os.urandom(16), b"e")


async def test_sigterm_stops_the_relay_cleanly(tmp_path: Path, relays: list[RelayProcess]) -> None:
    bob = DeviceKeyPair.generate()
    data_dir = tmp_path / "relay"
    relay = await start(relays, data_dir, "--metrics-listen", "127.0.0.1:0")
    async with peer(bob.to_bytes()) as bob_t, client(bob_t, relay.peer_id, relay.addresses) as inbox:
        await inbox.authenticate(bob)
        await inbox.subscribe()
        await inbox.fetch()
        with trio.fail_after(30):
            returncode = await trio.to_thread.run_sync(relay.terminate)
        with trio.fail_after(WAIT), pytest.raises(TransportError):
            async for _ in inbox.pushes():
                pass
    relay.output_complete()
    assert returncode == 0
    events = relay.log_events()
    names = [e["event"] for e in events]
    assert names[-2:] == ["relay.stopping", "relay.stopped"]
    assert not [e for e in events if e["level"] in ("error", "critical")], events
    assert not (data_dir / "relay.sock").exists()
    wal = data_dir / "relay.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed at shutdown
    for name in ("relay.key", "relay.db"):
        assert (data_dir / name).stat().st_mode & 0o777 == 0o600, name


async def test_config_file_sets_limits_and_flags_override_it(
        tmp_path: Path, relays: list[RelayProcess]) -> None:
    data_dir = tmp_path / "relay"
    config = tmp_path / "relay.toml"
    config.write_text(f'data_dir = "{tmp_path / "unused"}"\n'
                      'listen = ["/ip4/127.0.0.1/tcp/1"]\n'
                      "mailbox_max_messages = 2\nmax_ttl_s = 3600\ndefault_ttl_s = 600\n")
    relay = await start(relays, data_dir, "--config", str(config))  # flags: data dir, listen
    assert relay.ready["data_dir"] == str(data_dir)
    assert "/tcp/1/" not in relay.addresses[0]
    owner = DeviceKeyPair.generate()
    box = box_of(owner.public)
    await register_at(relay.peer_id, relay.addresses, owner)
    async with peer() as t, client(t, relay.peer_id, relay.addresses) as alice:
        results = await alice.deposit_many(
            [DepositRequest(box, os.urandom(16), b"e", ttl=60, cap=CAP) for _ in range(3)]
            + [DepositRequest(box, os.urandom(16), b"e", ttl=3601, cap=CAP)])
    assert [r.code if r else None for r in results] == [None, None, mb.MAILBOX_FULL, mb.BAD_TTL]
    assert relay.terminate() == 0
    config.write_text("mailbox_max_mesages = 2\n")  # a typo must not go unnoticed
    bad = RelayProcess(data_dir, "--config", str(config))
    relays.append(bad)
    assert await trio.to_thread.run_sync(lambda: bad.process.wait(timeout=60)) == 1
    bad.output_complete()
    assert "unknown key 'mailbox_max_mesages'" in bad.stderr

