"""Relay settings: every limit of the relay service with the reason for its default, and the TOML
config file (`pigeon relay --config FILE`).

The file has the same keys as the command-line flags (with `_` for `-`) plus every limit below,
at the top level; command-line flags override the file, and the file overrides the defaults.
Unknown keys and values of the wrong type are refused (ConfigError), so a typo never silently
leaves a limit at its default. Example:

    data_dir = "/var/lib/pigeon-relay"
    listen = ["/ip4/0.0.0.0/tcp/4040", "/ip4/0.0.0.0/udp/4040/quic-v1"]
    metrics_listen = "127.0.0.1:9464"
    mailbox_max_messages = 50000
    deposit_rate_per_s = 200
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Self, get_args

from node import config_file
from node.errors import ConfigError
from node.protocol.limits import MAX_SEALED_BYTES
from node.protocol.wakeup import parse_networks

if TYPE_CHECKING:
    import ssl

__all__ = ["LogLevel", "RelayConfig", "load_relay_config"]

DAY: Final = 24 * 3600
MIB: Final = 1024 * 1024

# --- mailbox limits ---------------------------------------------------------------------------

#: Largest envelope accepted: one sealed session message (PROTOCOL.md "Sealed sender"). Larger
#: deposits are refused "too-large"; an operator may lower it, never raise it.
MAX_ENVELOPE_BYTES: Final = MAX_SEALED_BYTES

#: Messages one mailbox may hold: weeks of a busy conversation for an offline device, while one
#: flooded mailbox cannot crowd out the others ("mailbox-full").
MAILBOX_MAX_MESSAGES: Final = 20_000

#: Bytes one mailbox may hold (envelopes only): 500 maximum-size envelopes, or 20,000 of ~6 KiB.
MAILBOX_MAX_BYTES: Final = 128 * MIB

#: TTL used when a deposit asks for 0 ("relay default"): two weeks of a device being offline.
DEFAULT_TTL_S: Final = 14 * DAY

#: Longest TTL a deposit may ask for; a longer one is refused "bad-ttl". Beyond a month a message
#: is stale and the sender should know it was not picked up.
MAX_TTL_S: Final = 30 * DAY

#: Total envelope bytes the relay stores ("storage-full" beyond): what a small VPS disk holds
#: comfortably besides the WAL and indexes.
STORAGE_MAX_BYTES: Final = 4 * 1024 * MIB

#: Deposits per second one peer may make, sustained (token bucket), and its burst: far above a
#: person's or a device's catch-up after an outage (which the burst absorbs), low enough that one
#: peer cannot fill the disk in minutes ("rate-limited").
DEPOSIT_RATE_PER_S: Final = 500.0
DEPOSIT_BURST: Final = 5_000

#: Deposits without a capability of the mailbox's device (PROTOCOL.md section 21 "Deposit
#: capabilities"): strangers' first messages. Each mailbox holds at most this many of them and
#: bytes of them, apart from its contacts' quota, so junk from anyone cannot crowd out a contact
#: ("mailbox-full" then concerns strangers only): 64 introductions of a few KiB, or 8
#: maximum-size envelopes.
OPEN_MAILBOX_MAX_MESSAGES: Final = 64
OPEN_MAILBOX_MAX_BYTES: Final = 2 * MIB

#: Longest a deposit without a capability is kept: a first message is either picked up within
#: days or stale; junk expires soon and frees the strangers' budget.
OPEN_MAX_TTL_S: Final = 3 * DAY

#: Total bytes of deposits without a capability the relay holds at once ("storage-full" for
#: strangers beyond it): 1/16 of the default total, so a flood of junk from fresh peer ids can
#: never fill the storage that contacts' deposits use.
OPEN_STORAGE_MAX_BYTES: Final = 256 * MIB

#: Mailboxes registered at once: each is a row (and up to MAX_CAPS capability hashes), so this
#: bounds the rows anyone can make the relay keep by registering keys of their own.
MAX_MAILBOXES: Final = 100_000

#: A registration lapses after this long without its device authenticating (a device that moved
#: to other relays); its messages then expire as usual and new deposits are refused.
REGISTRATION_TTL_S: Final = 90 * DAY

#: Seconds between two sweeps deleting expired messages (they are never served in between).
PURGE_INTERVAL_S: Final = 60.0

#: Frames per second one stream may send (token bucket, burst twice it) before the relay resets
#: it: a flood costs decoding before any per-request limit applies.
MAX_FRAMES_PER_S: Final = 20_000.0

#: Mailbox streams open at once; new ones beyond it are reset. ~70 KB of relay memory each
#: (docs/libp2p.md L15) plus ours: about 1 GB at the limit.
MAX_STREAMS: Final = 10_000

#: Mailbox streams one peer id may hold at once: a device holds one subscribed stream and one
#: for deposits, a reconnect briefly twice that.
MAX_STREAMS_PER_PEER: Final = 8

#: Mailbox streams of strangers (peers that have not authenticated a mailbox on their
#: connection: depositors, and anyone before its `auth`) open at once, all together and per
#: address (IPv4 address or IPv6 /64, node/protocol/slots.py). Peer ids cost nothing, addresses
#: do: one machine cannot take more than its address's share, and the relay's users never
#: count against these pools. 64 per address leaves room for a NAT with many depositors.
MAX_UNAUTHENTICATED_STREAMS: Final = 2_000
MAX_UNAUTHENTICATED_STREAMS_PER_ADDRESS: Final = 64

#: Seconds a stranger's mailbox stream may stay silent before the relay closes it: a depositor
#: writes its deposits at once, and a slot of the strangers' pool held idle is a slot an
#: attacker keeps from everyone else.
UNAUTHENTICATED_IDLE_TIMEOUT_S: Final = 10.0

#: Connections accepted at once (every protocol). libp2p's own defaults would stop at 250
#: inbound connections, far below what a relay serves.
MAX_CONNECTIONS: Final = 10_000

#: Seconds a mailbox stream that is not subscribed may stay silent before the relay closes it:
#: an open stream holds memory, and a device that waits for messages subscribes.
IDLE_TIMEOUT_S: Final = 300.0

#: Subscriptions one mailbox may have at once (a device reconnecting before its old connection
#: timed out); the oldest is dropped for a new one.
MAX_SUBSCRIBERS_PER_BOX: Final = 4

#: Seconds between two announcements of the relay in the DHT when its load did not change: a
#: record lives two hours (node/protocol/relayrecord.py), so several may be missed.
ANNOUNCE_INTERVAL_S: Final = 600.0
#: Shortest time between announcements when the load changes: a relay filling up tells the
#: devices choosing relays within a minute, and a burst of registrations costs one put.
ANNOUNCE_MIN_INTERVAL_S: Final = 60.0

#: Seconds a SIGTERM waits for streams to finish the batch they are committing and answering.
SHUTDOWN_GRACE_S: Final = 5.0

# --- wake-ups (PROTOCOL.md section 29) -------------------------------------------------------------

#: Wake-ups one mailbox may get at once, and how many more per second: a burst for a
#: conversation that starts while the device sleeps, then one every 30 s (a due wake-up waits
#: for a token, it is never dropped), so deposits cannot make the relay flood a push service.
PUSH_BURST: Final = 4
PUSH_RATE_PER_S: Final = 1 / 30
#: POST attempts per wake-up (the first and its retries) and the first retry's delay, doubled
#: for each next one: a push service that is down for a minute still gets the wake-up.
PUSH_ATTEMPTS: Final = 5
PUSH_RETRY_INITIAL_S: Final = 1.0
#: Seconds one POST (resolving, connecting, sending, reading the status) may take.
PUSH_TIMEOUT_S: Final = 10.0
#: Wake-ups due at once (beyond it new ones are dropped, counted failed) and POSTs in flight:
#: what a burst of deposits into many sleeping mailboxes can make the relay hold and open.
PUSH_MAX_PENDING: Final = 10_000
PUSH_CONCURRENCY: Final = 32
# --- blob store limits (PROTOCOL.md section 26.6) -------------------------------------------------

#: Largest blob: the largest attachment (2 GiB) plus the tags of its 64 KiB chunks (512 KiB),
#: with room ("too-large" beyond).
BLOB_MAX_BYTES: Final = 2 * 1024 * MIB + MIB
#: Blob bytes one mailbox may hold: a few large files for a device that is away ("mailbox-full").
BLOB_MAILBOX_MAX_BYTES: Final = 4 * 1024 * MIB
#: Blob bytes the relay holds in all ("storage-full" beyond).
BLOB_STORAGE_MAX_BYTES: Final = 32 * 1024 * MIB
#: TTL of a blob uploaded with ttl 0, and the longest one may ask for ("bad-ttl" beyond): as
#: for envelopes, the message that names the blob waits as long.
BLOB_DEFAULT_TTL_S: Final = 14 * DAY
BLOB_MAX_TTL_S: Final = 30 * DAY

# --- circuit relay v2 (HOP) limits ---------------------------------------------------------------

#: Peers that may hold a reservation (be reachable through this relay) at once. A reservation
#: costs a few hundred bytes; the relay's users (peers that authenticated a mailbox here) may
#: take all of them, evicting strangers' reservations if they must.
CIRCUIT_MAX_RESERVATIONS: Final = 1024
#: Reservations strangers (not the relay's users) may hold, all together and per address: 128
#: throwaway keys cannot take the slots the relay's users need (go-libp2p's default total).
CIRCUIT_MAX_STRANGER_RESERVATIONS: Final = 128
CIRCUIT_MAX_RESERVATIONS_PER_ADDRESS: Final = 8
#: Relayed connections one source peer id, and one source address, may have open at once
#: (across all destinations): a device dials each contact once; no one ties up every circuit.
CIRCUIT_MAX_CIRCUITS_PER_PEER: Final = 16
CIRCUIT_MAX_CIRCUITS_PER_ADDRESS: Final = 64
#: Relayed connections per reservation at once.
CIRCUIT_MAX_CIRCUITS: Final = 16
#: Seconds and bytes one relayed connection may last and carry: enough to coordinate a hole punch
#: or exchange a few messages, not a free proxy (bulk traffic goes direct or through mailboxes).
CIRCUIT_DURATION_S: Final = 120
CIRCUIT_DATA_BYTES: Final = 128 * 1024
#: Seconds a reservation lasts before the client must refresh it.
CIRCUIT_RESERVATION_TTL_S: Final = 3600

DEFAULT_LISTEN: Final = ("/ip4/0.0.0.0/tcp/4040", "/ip4/0.0.0.0/udp/4040/quic-v1")
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
"""The relay's log levels (names of the standard `logging` levels)."""
LOG_LEVELS: Final = get_args(LogLevel)


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """Settings of one relay. Every field is also a key of the TOML config file."""

    data_dir: Path | None = None
    listen: tuple[str, ...] = DEFAULT_LISTEN
    #: "HOST:PORT" of the Prometheus endpoint (GET /metrics); None: no endpoint.
    metrics_listen: str | None = None
    log_level: LogLevel = "INFO"

    max_envelope_bytes: int = MAX_ENVELOPE_BYTES
    mailbox_max_messages: int = MAILBOX_MAX_MESSAGES
    mailbox_max_bytes: int = MAILBOX_MAX_BYTES
    default_ttl_s: int = DEFAULT_TTL_S
    max_ttl_s: int = MAX_TTL_S
    storage_max_bytes: int = STORAGE_MAX_BYTES
    open_mailbox_max_messages: int = OPEN_MAILBOX_MAX_MESSAGES
    open_mailbox_max_bytes: int = OPEN_MAILBOX_MAX_BYTES
    open_max_ttl_s: int = OPEN_MAX_TTL_S
    open_storage_max_bytes: int = OPEN_STORAGE_MAX_BYTES
    max_mailboxes: int = MAX_MAILBOXES
    #: Refuse deposits into mailboxes that no device registered ("unknown-mailbox"). False
    #: serves every mailbox id, as relays did before registration (a relay for a closed group
    #: whose devices predate it).
    require_registration: bool = True
    registration_ttl_s: int = REGISTRATION_TTL_S
    deposit_rate_per_s: float = DEPOSIT_RATE_PER_S
    deposit_burst: int = DEPOSIT_BURST
    purge_interval_s: float = PURGE_INTERVAL_S
    max_frames_per_s: float = MAX_FRAMES_PER_S
    max_streams: int = MAX_STREAMS
    max_streams_per_peer: int = MAX_STREAMS_PER_PEER
    max_unauthenticated_streams: int = MAX_UNAUTHENTICATED_STREAMS
    max_unauthenticated_streams_per_address: int = MAX_UNAUTHENTICATED_STREAMS_PER_ADDRESS
    unauthenticated_idle_timeout_s: float = UNAUTHENTICATED_IDLE_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    max_subscribers_per_box: int = MAX_SUBSCRIBERS_PER_BOX
    idle_timeout_s: float = IDLE_TIMEOUT_S
    shutdown_grace_s: float = SHUTDOWN_GRACE_S

    #: Take push registrations and send wake-ups (PROTOCOL.md section 29).
    push: bool = True
    #: Address ranges wake-ups may go to besides globally routable ones (CIDR, e.g.
    #: "127.0.0.1/32" for a push distributor on this machine): loopback, private and link-local
    #: targets are refused at registration unless listed here.
    push_allow: tuple[str, ...] = ()
    push_burst: int = PUSH_BURST
    push_rate_per_s: float = PUSH_RATE_PER_S
    push_attempts: int = PUSH_ATTEMPTS
    push_retry_initial_s: float = PUSH_RETRY_INITIAL_S
    push_timeout_s: float = PUSH_TIMEOUT_S
    push_max_pending: int = PUSH_MAX_PENDING
    push_concurrency: int = PUSH_CONCURRENCY
    #: PEM file of the certificate authorities trusted for HTTPS push distributors, for one that
    #: runs under a private CA; "" trusts the usual public ones (certifi's bundle, as httpx does).
    #: A distributor whose certificate does not verify for its URL's host is never posted to.
    push_ca_file: str = ""

    #: Serve the Pigeon DHT (PROTOCOL.md section 23): a relay is an always-on node, the kind the
    #: DHT needs as servers. `bootstrap`: other DHT servers to join through (none built in).
    dht: bool = True
    bootstrap: tuple[str, ...] = ()

    #: Announce this relay in the DHT's relay directory (PROTOCOL.md section 28.1), so devices
    #: with `relays = "auto"` find it: a signed record of `announce_addresses` (default: the
    #: listen addresses), its capacity (`max_mailboxes`), load, limits, version and `operator`.
    announce: bool = True
    announce_addresses: tuple[str, ...] = ()
    #: Who runs the relay (a name or domain, at most 64 bytes): devices spread their two
    #: relays over different operators when they can.
    operator: str = ""
    #: Seconds between two announcements when nothing changed (the record lives 2 hours).
    announce_interval_s: float = ANNOUNCE_INTERVAL_S
    #: Shortest time between two announcements when the load changes.
    announce_min_interval_s: float = ANNOUNCE_MIN_INTERVAL_S

    circuit_relay: bool = True
    circuit_max_reservations: int = CIRCUIT_MAX_RESERVATIONS
    circuit_max_stranger_reservations: int = CIRCUIT_MAX_STRANGER_RESERVATIONS
    circuit_max_reservations_per_address: int = CIRCUIT_MAX_RESERVATIONS_PER_ADDRESS
    circuit_max_circuits_per_peer: int = CIRCUIT_MAX_CIRCUITS_PER_PEER
    circuit_max_circuits_per_address: int = CIRCUIT_MAX_CIRCUITS_PER_ADDRESS
    circuit_max_circuits: int = CIRCUIT_MAX_CIRCUITS
    circuit_duration_s: int = CIRCUIT_DURATION_S
    circuit_data_bytes: int = CIRCUIT_DATA_BYTES
    circuit_reservation_ttl_s: int = CIRCUIT_RESERVATION_TTL_S

    #: Attachments' blobs held for offline devices (PROTOCOL.md section 26.6).
    blob_max_bytes: int = BLOB_MAX_BYTES
    blob_mailbox_max_bytes: int = BLOB_MAILBOX_MAX_BYTES
    blob_storage_max_bytes: int = BLOB_STORAGE_MAX_BYTES
    blob_default_ttl_s: int = BLOB_DEFAULT_TTL_S
    blob_max_ttl_s: int = BLOB_MAX_TTL_S

    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("listen needs at least one multiaddr")
        if not 0 < self.max_envelope_bytes <= MAX_SEALED_BYTES:
            raise ConfigError(f"max_envelope_bytes must be within 1..{MAX_SEALED_BYTES}")
        for name in ("mailbox_max_messages", "mailbox_max_bytes", "default_ttl_s", "max_ttl_s",
                     "storage_max_bytes", "open_mailbox_max_messages", "open_mailbox_max_bytes",
                     "open_max_ttl_s", "open_storage_max_bytes", "max_mailboxes",
                     "registration_ttl_s", "deposit_burst", "max_streams", "max_connections",
                     "max_subscribers_per_box", "circuit_max_reservations",
                     "circuit_max_circuits", "circuit_duration_s", "circuit_data_bytes",
                     "circuit_reservation_ttl_s", "max_streams_per_peer",
                     "max_unauthenticated_streams", "max_unauthenticated_streams_per_address",
                     "circuit_max_stranger_reservations", "circuit_max_reservations_per_address",
                     "circuit_max_circuits_per_peer", "circuit_max_circuits_per_address",
                     "push_burst", "push_attempts", "push_max_pending", "push_concurrency",
                     "blob_max_bytes", "blob_mailbox_max_bytes", "blob_storage_max_bytes",
                     "blob_default_ttl_s", "blob_max_ttl_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for name in ("deposit_rate_per_s", "purge_interval_s", "max_frames_per_s",
                     "shutdown_grace_s", "idle_timeout_s", "unauthenticated_idle_timeout_s",
                     "push_rate_per_s", "push_retry_initial_s", "push_timeout_s",
                     "announce_interval_s", "announce_min_interval_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.default_ttl_s > self.max_ttl_s:
            raise ConfigError("default_ttl_s must not exceed max_ttl_s")
        if self.blob_default_ttl_s > self.blob_max_ttl_s:
            raise ConfigError("blob_default_ttl_s must not exceed blob_max_ttl_s")
        if self.open_storage_max_bytes > self.storage_max_bytes:
            raise ConfigError("open_storage_max_bytes must not exceed storage_max_bytes")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.metrics_listen is not None:
            parse_host_port(self.metrics_listen)
        try:
            parse_networks(self.push_allow)
        except ValueError as exc:
            raise ConfigError(f"push_allow: {exc}") from None
        if self.push_ca_file:
            push_tls_context(self.push_ca_file)  # a file that is no CA bundle fails here
        if len(self.operator.encode("utf-8", "surrogatepass")) > 64:
            raise ConfigError("operator longer than 64 bytes")
        for address in self.announce_addresses:
            if not address.startswith("/") or "/p2p/" in address:
                raise ConfigError(f"announce address {address!r} must be a multiaddr without "
                                  "/p2p/ (the relay's peer id is added by readers)")

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` (field name to value) applied and validated again."""
        return dataclasses.replace(self, **changes)


def push_tls_context(ca_file: str) -> ssl.SSLContext:
    """The TLS settings for wake-up POSTs that trust the CAs in `ca_file` (PEM) only."""
    import ssl

    try:
        return ssl.create_default_context(cafile=os.path.expanduser(ca_file))
    except FileNotFoundError:
        raise ConfigError(f"push_ca_file: no such file {ca_file}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"push_ca_file: {ca_file} holds no PEM certificates "
                          f"({getattr(exc, 'strerror', None) or exc})") from None


def parse_host_port(text: str) -> tuple[str, int]:
    """"127.0.0.1:9464" or "[::1]:9464" -> (host, port); ConfigError otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def load_relay_config(path: Path | None, **overrides: Any) -> RelayConfig:
    """Defaults, then the TOML file at `path` (if any), then `overrides` whose value is not None
    (the command-line flags). ConfigError names the offending key or file."""
    return config_file.load(RelayConfig, path, **overrides)
