"""Wake-ups end to end (PROTOCOL.md section 29) with real processes on loopback: a `pigeon relay`
that allows wake-ups to 127.0.0.1, two `pigeon` devices, and the stand-in push distributor of
examples/push_distributor.py receiving the relay's POSTs.

Bob registers a push URL (`pigeon push register`) and stops. Alice's message to him makes the
relay POST an encrypted wake-up to the distributor; the test opens it with Bob's keys (it says
"fetch") and runs `pigeon fetch`, which receives the message, sends its receipt and exits.
A push URL that points to a private address the relay does not allow is refused at registration.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.device.push import decrypt_wakeup
from tests.clitools import FAST_RETRIES_TOML, Daemon, pigeon, pigeon_json, stop_all
from tests.pushtools import Distributor
from tests.relaytools import RelayProcess

#: Upper bound of a wait for something the processes do at once (a loaded 2-core machine).
WAIT = 30.0


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    config = tmp_path / "relay.toml"
    config.write_text('push_allow = ["127.0.0.1/32"]\npush_retry_initial_s = 0.1\n')
    process = RelayProcess(tmp_path / "relay", "--config", str(config))
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def device_dir(tmp_path: Path, name: str, relay: str) -> Path:
    data_dir = tmp_path / name
    pigeon(data_dir, "init", "--name", name.title())
    # Loopback only (`pigeon fetch` opens the node itself); receipts without the random wait
    # the product adds (PROTOCOL.md section 21), so a fetch does not wait up to 10 s for them.
    (data_dir / "config.toml").write_text(
        FAST_RETRIES_TOML + f"relays = [{json.dumps(relay)}]\n"
        'listen = ["/ip4/127.0.0.1/tcp/0"]\nconnect_timeout_s = 2.0\nreceipt_jitter_s = 0.0\n')
    return data_dir


@pytest.mark.slow(seconds=2)
def test_a_stopped_device_is_woken_and_fetches(tmp_path: Path, relay: RelayProcess) -> None:
    address = relay.addresses[0]
    a_dir, b_dir = device_dir(tmp_path, "alice", address), device_dir(tmp_path, "bob", address)
    daemons: list[Daemon] = []
    with Distributor().running() as distributor:
        try:
            alice, bob = Daemon(a_dir), Daemon(b_dir)
            daemons += [alice, bob]
            invite = pigeon_json(a_dir, "invite")["invite"]
            pigeon_json(b_dir, "contact", "add", "alice", invite)
            alice.next_event("ContactAdded", timeout=WAIT)

            # A private address the relay's operator did not allow: refused at registration.
            refused = pigeon(b_dir, "push", "register", "http://10.1.2.3:8080/up/bob", "--json",
                             check=False)
            assert refused.returncode == 1, refused.stderr
            (answer,) = json.loads(refused.stdout)["relays"]
            assert answer["wake"].startswith("refused: wake-refused"), answer
            assert "10.1.2.3" in answer["wake"]

            url = distributor.url("/up/bob")
            registered = pigeon_json(b_dir, "push", "register", url)
            assert registered["url"] == url
            assert [r["wake"] for r in registered["relays"]] == ["registered"]
            status = pigeon_json(b_dir, "status")
            assert [r["wake"] for r in status["relays"]] == ["registered"]

            stop_all([bob])
            sent = pigeon_json(a_dir, "send", "Bob", "wake up, Bob", "--wait", "0")
            post = distributor.wait_post(timeout=WAIT)
            assert post.path == "/up/bob"
            assert decrypt_wakeup(b_dir, post.body) == b"fetch"

            fetched = pigeon_json(b_dir, "fetch")
            assert fetched["received"] >= 1 and fetched["acked"] >= 1, fetched
            assert fetched["relays_drained"] == fetched["relays"] == 1, fetched
            assert fetched["receipts_waiting"] == 0 and fetched["daemon"] is False
            history = pigeon_json(b_dir, "history", "alice")
            assert [m["text"] for m in history if m["direction"] == "in"] == ["wake up, Bob"]
            # The receipt `pigeon fetch` sent reaches Alice (through the relay or directly).
            delivered = alice.next_event("MessageDelivered", timeout=WAIT)
            assert delivered["message_id"] == sent["message_id"]
        finally:
            stop_all(daemons)
