"""Relay settings: defaults, the TOML file, flag overrides and strict checking; the JSON logs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.errors import ConfigError
from node.net import CircuitRelayLimits
from node.protocol.limits import MAX_SEALED_BYTES
from node.relay.config import RelayConfig, load_relay_config, parse_host_port
from node.relay.log import JsonLogFormatter, configure_relay_logging, event, scrub

PEER = "12D3KooWQmi9vEZCNcBCh6v2Ra5u2sztCxJXQK6aYYZvZBkoj4iS"


def test_defaults_are_the_documented_limits() -> None:
    config = RelayConfig()
    assert config.max_envelope_bytes == MAX_SEALED_BYTES
    assert (config.mailbox_max_messages, config.mailbox_max_bytes) == (20_000, 128 * 1024**2)
    assert (config.default_ttl_s, config.max_ttl_s) == (14 * 86400, 30 * 86400)
    assert config.storage_max_bytes == 4 * 1024**3
    assert (config.deposit_rate_per_s, config.deposit_burst) == (500.0, 5_000)
    # Strangers' deposits (PROTOCOL.md section 21): a small share, kept briefly.
    assert (config.open_mailbox_max_messages, config.open_mailbox_max_bytes) == (64, 2 * 1024**2)
    assert (config.open_storage_max_bytes, config.open_max_ttl_s) == (256 * 1024**2, 3 * 86400)
    assert config.require_registration is True
    assert (config.max_mailboxes, config.registration_ttl_s) == (100_000, 90 * 86400)


def test_circuit_limits_come_from_the_settings() -> None:
    config = RelayConfig(circuit_max_reservations=5, circuit_max_circuits=2, circuit_duration_s=30,
                         circuit_data_bytes=4096, circuit_reservation_ttl_s=600)
    assert CircuitRelayLimits.from_settings(config) == CircuitRelayLimits(
        max_reservations=5, max_circuits=2, duration_s=30, data_bytes=4096, reservation_ttl_s=600)


def test_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('data_dir = "~/relay"\nlisten = ["/ip4/127.0.0.1/tcp/4040"]\n'
                    "mailbox_max_messages = 7\ndeposit_rate_per_s = 50\ncircuit_relay = false\n"
                    'metrics_listen = "127.0.0.1:9464"\n')
    config = load_relay_config(path, listen=("/ip4/127.0.0.1/tcp/0",), data_dir=None,
                               metrics_listen=None)
    assert config.data_dir == Path("~/relay").expanduser()  # from the file (flag not given)
    assert config.listen == ("/ip4/127.0.0.1/tcp/0",)  # the flag wins
    assert (config.mailbox_max_messages, config.deposit_rate_per_s) == (7, 50.0)
    assert config.circuit_relay is False and config.metrics_listen == "127.0.0.1:9464"
    assert load_relay_config(None, data_dir=Path("/x")).data_dir == Path("/x")


@pytest.mark.parametrize(("text", "message"), [
    ("mailbox_max_mesages = 2\n", "unknown key 'mailbox_max_mesages'"),
    ('mailbox_max_messages = "2"\n', "must be int"),
    ("mailbox_max_messages = true\n", "not a boolean"),
    ("mailbox_max_messages = 2.5\n", "must be int"),
    ("circuit_relay = 1\n", "must be bool"),
    ('listen = "/ip4/0.0.0.0/tcp/1"\n', "array of strings"),
    ("mailbox_max_messages = 0\n", "at least 1"),
    (f"max_envelope_bytes = {MAX_SEALED_BYTES + 1}\n", "max_envelope_bytes"),
    ("default_ttl_s = 100\nmax_ttl_s = 10\n", "must not exceed"),
    ('metrics_listen = "9464"\n', "HOST:PORT"),
    ('log_level = "chatty"\n', "log_level"),
    ("deposit_rate_per_s = 0\n", "positive"),
    ("open_storage_max_bytes = 5000\nstorage_max_bytes = 4000\n", "must not exceed"),
    ("open_mailbox_max_messages = 0\n", "at least 1"),
    ("require_registration = 1\n", "must be bool"),
    ("this is = not toml\n", "not valid TOML"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_relay_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_relay_config(tmp_path / "absent.toml")


def test_host_port() -> None:
    assert parse_host_port("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_host_port("[::1]:0") == ("::1", 0)
    for bad in ("9464", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ConfigError):
            parse_host_port(bad)


def test_scrub_masks_peer_ids_and_addresses() -> None:
    text = (f"stream to {PEER} at /ip4/10.1.2.3/tcp/4001/p2p/{PEER} via /ip6/fe80::1/udp/9 "
            "and 192.168.0.7, host /dns4/example.org/tcp/1")
    cleaned = scrub(text)
    for secret in (PEER, "10.1.2.3", "fe80::1", "192.168.0.7", "example.org"):
        assert secret not in cleaned
    assert "/tcp/4001" in cleaned  # the rest of the message stays readable


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_relay_logging takes over the root logger; give it back to pytest afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: (logging.getLogger(name).level, logging.getLogger(name).propagate)
                 for name in ("libp2p", "quic", "aioquic", "multiaddr")}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, (library_level, propagate) in libraries.items():
        logging.getLogger(name).setLevel(library_level)
        logging.getLogger(name).propagate = propagate


@pytest.mark.usefixtures("restore_logging")
def test_json_log_lines() -> None:
    out = io.StringIO()
    configure_relay_logging("DEBUG", out)
    try:
        event(logging.INFO, "deposit.batch", deposits=3, mailboxes=["0123abcd"])
        logging.getLogger("libp2p.network.swarm").error("connection to %s failed", PEER)
        logging.getLogger("some.library").info("chatter below WARNING is dropped")
        logging.getLogger("pigeon.transport").debug("peer %s connected", PEER)
    finally:
        logging.getLogger().handlers[0].flush()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["deposit.batch", "log", "log"]
    assert lines[0]["deposits"] == 3 and lines[0]["level"] == "info"
    assert lines[0]["ts"].endswith("Z")
    assert lines[1] == lines[1] | {"logger": "libp2p.network.swarm", "level": "error",
                                   "msg": "connection to <peer> failed"}
    assert PEER not in out.getvalue()


def test_formatter_survives_a_bad_library_record() -> None:
    record = logging.LogRecord("lib", logging.ERROR, __file__, 1, "%s %s", ("one",), None)
    assert json.loads(JsonLogFormatter().format(record))["msg"] == "%s %s"
