"""The relay service: store-and-forward mailboxes (`/pigeon/mailbox/1.0.0`, PROTOCOL.md "Relay
mailbox") and circuit relay v2 HOP, with limits, metrics, a control socket and JSON logs.

    pigeon relay --data-dir DIR --listen /ip4/0.0.0.0/tcp/4040 [--config FILE]
                 [--metrics-listen 127.0.0.1:9464]

Data directory: relay.key (Ed25519 host key, mode 0600, written once), relay.db (SQLite, WAL,
synchronous=FULL: node/relay/store.py), relay.lock (flock: one relay per directory), relay.sock
(JSON-RPC control socket, the generalized node/rpc.py server: `pigeon relay status`).

Modules: node/relay/server.py serves the mailbox protocol, node/relay/store.py stores,
node/relay/config.py holds the settings and limits, node/relay/log.py writes the logs,
node/relay/metrics.py the Prometheus endpoint; this module puts them together.

Privacy (PROTOCOL.md "Relay mailbox", security considerations): the relay learns mailbox ids,
message ids and sealed envelopes, nothing about senders: no peer id or address of a depositor is
stored or logged.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

import trio

from node.clock import Clock, TrioClock
from node.errors import ConfigError
from node.net import CircuitRelayLimits, Transport
from node.net.dht import Dht, open_pigeon_dht
from node.protocol.keys import DeviceKeyPair
from node.protocol.mailbox import MAILBOX_PROTOCOL, MAX_MAILBOX_FRAME_BYTES
from node.relay.announce import Announcer
from node.relay.blobs import BlobLimits, RelayBlobs
from node.relay.config import RelayConfig, parse_host_port
from node.relay.datadir import RelayDir
from node.relay.log import configure_relay_logging, event
from node.relay.metrics import serve_metrics
from node.relay.server import Relay
from node.relay.store import RelayStore, StoreLimits
from node.rpc import Operation, serve

__all__ = ["RELAY_OPERATIONS", "Relay", "RelayDir", "RelayService", "configure_relay_logging",
           "open_relay", "run_relay"]

log = logging.getLogger("pigeon.relay")


# --- data directory -------------------------------------------------------------------------------


# --- control socket ----------------------------------------------------------------------------------


async def _rpc_status(relay: Relay, params: dict[str, Any]) -> Any:
    return relay.status()


RELAY_OPERATIONS: dict[str, Operation] = {"status": _rpc_status}


# --- the service ---------------------------------------------------------------------------------


@dataclass
class RelayService:
    """A running relay (what `open_relay` yields)."""

    relay: Relay
    transport: Transport
    directory: RelayDir
    metrics_address: tuple[str, int] | None
    #: Keeps the relay in the DHT's relay directory (PROTOCOL.md section 28.1); None without
    #: the DHT or with `announce = false`.
    announcer: Announcer | None = None

    @property
    def peer_id(self) -> str:
        return self.transport.peer_id

    def addresses(self) -> list[str]:
        return self.transport.listen_addrs()


@asynccontextmanager
async def open_relay(config: RelayConfig, *, clock: Clock | None = None
                     ) -> AsyncIterator[RelayService]:
    """Run a relay for the duration of the block: lock the data directory, open the key and the
    database, listen, serve mailboxes, HOP, the control socket and metrics, purge expired
    messages. Leaving the block shuts down gracefully (Relay.shutdown), closes the listeners and
    connections, checkpoints and closes the database, and releases the lock.

    Raises DataDirLocked if another relay runs on the directory, DataDirError for damaged files,
    TransportError if an address cannot be bound.

    `clock` is the relay's one clock (node.clock): trio's by default, so a test under trio's
    `autojump_clock` drives its TTLs, rate limits and timers.
    """
    if config.data_dir is None:
        raise ConfigError("the relay needs a data directory (--data-dir or data_dir in the config)")
    clock = clock or TrioClock()
    directory = RelayDir(config.data_dir)
    directory.lock()
    try:
        key = directory.load_or_create_key()
        store = RelayStore.open(directory.database_file, StoreLimits(
            mailbox_max_messages=config.mailbox_max_messages,
            mailbox_max_bytes=config.mailbox_max_bytes,
            storage_max_bytes=config.storage_max_bytes,
            open_mailbox_max_messages=config.open_mailbox_max_messages,
            open_mailbox_max_bytes=config.open_mailbox_max_bytes,
            open_storage_max_bytes=config.open_storage_max_bytes,
            open_max_ttl_s=config.open_max_ttl_s,
            require_registration=config.require_registration))
        try:
            blobs = RelayBlobs.open(directory.path / "blobs", BlobLimits(
                max_bytes=config.blob_max_bytes, mailbox_max_bytes=config.blob_mailbox_max_bytes,
                storage_max_bytes=config.blob_storage_max_bytes,
                default_ttl_s=config.blob_default_ttl_s, max_ttl_s=config.blob_max_ttl_s))
            try:
                hop = CircuitRelayLimits.from_settings(config) if config.circuit_relay else None
                async with (
                    Transport.open(key.to_bytes(), config.listen, circuit_relay=hop,
                                   max_connections=config.max_connections,
                                   clock=clock) as transport,
                    _dht_server(transport, config, clock) as dht,
                    _serving(config, directory, store, key, transport, clock, dht,
                             blobs) as service,
                ):
                    yield service
            finally:
                blobs.close()
        finally:
            store.checkpoint()
            store.close()
    finally:
        directory.unlock()


@asynccontextmanager
async def _dht_server(transport: Transport, config: RelayConfig, clock: Clock
                      ) -> AsyncIterator[Dht | None]:
    """DHT server mode for the relay's lifetime (off with `dht = false`)."""
    if not config.dht:
        yield None
        return
    async with open_pigeon_dht(transport, server=True, bootstrap=config.bootstrap,
                               clock=clock) as dht:
        yield dht


@asynccontextmanager
async def _serving(config: RelayConfig, directory: RelayDir, store: RelayStore,
                   key: DeviceKeyPair, transport: Transport, clock: Clock, dht: Dht | None,
                   blobs: RelayBlobs | None = None) -> AsyncIterator[RelayService]:
    relay = Relay(store=store, config=config, key=key, transport=transport, clock=clock,
                  blobs=blobs)
    unsubscribe = transport.on_connection_change(relay.on_connection_change)
    if config.circuit_relay:
        # The relay's users (peers that authenticated a mailbox) reserve ahead of strangers.
        transport.prioritize_reservations(relay.is_member)
    transport.set_stream_handler(MAILBOX_PROTOCOL, relay.handle_stream,
                                 max_frame_bytes=MAX_MAILBOX_FRAME_BYTES)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, relay, directory.socket_file,
                                        operations=RELAY_OPERATIONS))
            metrics_address = None
            if config.metrics_listen is not None:
                host, port = parse_host_port(config.metrics_listen)
                metrics_address = await nursery.start(serve_metrics, relay.registry, host, port)
            nursery.start_soon(relay.purge_loop)
            await nursery.start(relay.waker.run)
            relay.wake_waiting()
            announcer = None
            if dht is not None and config.announce:
                announcer = Announcer(dht=dht, config=config, key=key, clock=clock,
                                      addresses=transport.listen_addrs,
                                      load=lambda: store.totals.registered)
                nursery.start_soon(announcer.run)
            service = RelayService(relay, transport, directory, metrics_address, announcer)
            event(logging.INFO, "relay.started", peer_id=service.peer_id,
                   addresses=service.addresses(), data_dir=str(directory.path),
                   metrics=f"{metrics_address[0]}:{metrics_address[1]}" if metrics_address else None,
                   circuit_relay=config.circuit_relay, messages=store.totals.messages,
                   mailboxes=store.totals.mailboxes)
            try:
                yield service
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                with trio.CancelScope(shield=True):
                    await relay.shutdown()
                unsubscribe()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Give the caller its own exception back when it is all the nursery holds (as
        # Transport.open does).
        if body_error is None or group.split(lambda e: e is body_error)[1] is not None:
            raise
    if body_error is not None:
        raise body_error


async def run_relay(config: RelayConfig, *, as_json: bool = False,
                    out: IO[str] | None = None) -> int:
    """`pigeon relay`: run until SIGTERM or SIGINT, then shut down gracefully. Prints one line
    (JSON with --json) on stdout when it is ready: its peer id, addresses and metrics address."""
    out = out if out is not None else sys.stdout
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_relay(config) as service:
            ready = {"type": "RelayListening", "peer_id": service.peer_id,
                     "addresses": service.addresses(), "data_dir": str(service.directory.path),
                     "metrics": (f"{service.metrics_address[0]}:{service.metrics_address[1]}"
                                 if service.metrics_address else None)}
            if as_json:
                print(json.dumps(ready), file=out, flush=True)
            else:
                print(f"pigeon relay {service.peer_id}", file=out)
                for address in service.addresses():
                    print(f"listening on {address}", file=out)
                if ready["metrics"]:
                    print(f"metrics on http://{ready['metrics']}/metrics", file=out)
                out.flush()
            async for signum in signals:
                event(logging.INFO, "relay.stopping", signal=signal.Signals(signum).name)
                break
    event(logging.INFO, "relay.stopped")
    return 0

