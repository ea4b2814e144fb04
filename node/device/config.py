"""Node configuration, and every limit of the node shell with the reason for its value.

Protocol limits (ratchet, records, sealed sender) live in `node.protocol.limits`; the limits here
are about the node: frames, streams, retries, queues.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Any, Final, Literal, Self

from node.errors import ConfigError
from node.protocol import content
from node.protocol.attachment import MAX_ATTACHMENT_BYTES
from node.protocol.outbound import KEEPALIVE_S

__all__ = ["Config"]

# --- wire and streams --------------------------------------------------------------------------

#: Largest frame on /pigeon/msg/1.0.0: one session message (<= MAX_SEALED_BYTES) plus framing,
#: with room. Checked on the length prefix, before the body is read.
MAX_MSG_FRAME_BYTES: Final = 320 * 1024

#: Frames a peer may send per second on one stream (a token bucket of this rate, burst twice
#: it). Far above what a person or a bulk sync produces through batching; a flood beyond it gets
#: the stream reset and the peer disconnected.
MAX_FRAMES_PER_S: Final = 20_000

#: Consecutive frames from a peer that fail (undecryptable, malformed content) before the peer is
#: disconnected. A genuine peer produces failures only after losing state, and then rarely.
MAX_CONSECUTIVE_FAILURES: Final = 64

#: Most outgoing messages written to a stream and not yet acknowledged, per device: bounds what
#: we resend after a reconnect and keeps Yamux's ~2 MiB unread-window limit far away.
MAX_IN_FLIGHT: Final = 1024

#: Most messages encrypted and written in one batch (one SQLite transaction, one stream write).
MAX_BATCH: Final = 256

#: Largest text of one message, in bytes of UTF-8 (the content format's own limit, PROTOCOL.md
#: section 11; re-exported here with the node's other limits).
MAX_TEXT_BYTES: Final = content.MAX_TEXT_BYTES

#: Seconds a receiver remembers the ids of messages it accepted, to recognise resends. Far longer
#: than any sender keeps retrying (Config.fail_after_s, 7 days by default; relay TTLs, 30 days at
#: most). PROTOCOL.md promises at least 60 days.
SEEN_RETENTION_S: Final = 60 * 24 * 3600

#: Seconds before work stopped by a local failure starts again (a delivery lane or a relay
#: inbox after a full disk, or after a bug): short, so delivery resumes within seconds of space
#: returning; not shorter, since each try that fails costs a transaction and a log line.
RESTART_AFTER_FAILURE_S: Final = 2.0

#: Most messages one `send_many` call queues (one transaction).
MAX_SEND_MANY: Final = 10_000

#: Longest contact or display name, in characters.
MAX_NAME_CHARS: Final = 64

#: Inbound /pigeon/msg/1.0.0 streams open at once: per peer id (a contact's device keeps one,
#: a reconnect briefly two), for strangers (peers that are no contact's device: first messages
#: of invitations) all together and per address (IPv4 address, IPv6 /64, or one relay), and in
#: total. A stranger with many peer ids on one address cannot take the slots contacts need.
MSG_STREAMS_PER_PEER: Final = 8
MSG_STREAMS_PER_ADDRESS: Final = 16
MSG_STRANGER_STREAMS: Final = 128
MSG_STREAMS_TOTAL: Final = 2_048

#: The same for /pigeon/bundle/1.0.0 (one request each, answered or dropped within 10 s): only
#: people holding one of our invites need it, and a few at a time.
BUNDLE_STREAMS_PER_PEER: Final = 2
BUNDLE_STREAMS_PER_ADDRESS: Final = 4
BUNDLE_STREAMS_TOTAL: Final = 64

#: Buffered events per subscriber before it is told it lagged (EventsDropped) instead of
#: stalling the node.
EVENT_BUFFER: Final = 10_000


Durability = Literal["full", "normal"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """Settings of one node. Every field has a default that suits a personal device.

    `listen`: multiaddrs to listen on (by default TCP, QUIC and WebSocket on every interface; a
    host can dial only the kinds it listens on). Port 0 picks a free port the first time; the node
    then remembers the ports it got and asks for them again on the next start, so invites stay
    valid.
    """

    listen: tuple[str, ...] = (
        "/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1", "/ip4/0.0.0.0/tcp/0/ws")
    #: Relays holding this device's mailbox (multiaddrs ending in /p2p/<relay peer id>). The
    #: node drains them and stays subscribed; they go into invites and intros, so contacts
    #: deposit there when this device is unreachable. Relays given here are pinned. "auto" (the
    #: default): with bootstrap peers, the node finds relays in the DHT's relay directory, picks
    #: `auto_relays` of them by round-trip time and load, and replaces one that goes down, is
    #: full or much slower (PROTOCOL.md section 28.2); without bootstrap peers, no relays.
    relays: tuple[str, ...] | Literal["auto"] = "auto"
    #: How many relays "auto" picks: two survive one going down (deposits go to two, too).
    auto_relays: int = 2
    #: "auto": seconds a relay may stay unreachable before it is replaced...
    relay_down_after_s: float = 20.0
    #: ...seconds between checks of the chosen relays' health, and between two refreshes of
    #: the relay directory (its records live 2 hours and carry the relays' load).
    relay_check_s: float = 5.0
    relay_discover_s: float = 600.0
    #: Seconds a relay this device left is still drained: contacts that have not heard of the
    #: move (offline, say) keep depositing there meanwhile; relays keep a message 14 days by
    #: default, 30 at most.
    relay_drain_s: float = 30 * 24 * 3600
    #: Reserve a circuit relay v2 slot on each of `relays` and advertise the relayed address
    #: (after the direct ones), so a device behind a NAT stays reachable while online.
    relay_reservations: bool = True
    #: LAN discovery over mDNS: browse for contacts' devices and announce this one.
    mdns: bool = True
    #: False: browse only, do not announce this device on the LAN.
    mdns_announce: bool = True
    #: IPv4 addresses of the interfaces mDNS binds; empty means all interfaces (what a device
    #: needs; tests pin 127.0.0.1).
    mdns_interfaces: tuple[str, ...] = ()
    #: Kademlia DHT bootstrap peers (multiaddrs ending in /p2p/<peer id>). There is no built-in
    #: public list: with none (and dht_server off) the node does not use the DHT.
    bootstrap: tuple[str, ...] = ()
    #: Serve DHT requests (for always-on nodes and relays); devices are clients by default.
    dht_server: bool = False
    #: Seconds a single dial + stream open may take before the attempt counts as failed.
    connect_timeout_s: float = 5.0
    #: Seconds to wait for an end-to-end ack before the path counts as dead: the connection is
    #: closed, unacknowledged messages go to the device's relays, and the device is dialed again
    #: with backoff. A live receiver acks a batch within a second; 6 s keeps relay fallback well
    #: within 15 s of a partition.
    ack_timeout_s: float = 6.0
    #: Seconds a single write to a device's stream may take before the path counts as dead (a
    #: silent peer stops taking data once Yamux's window or the socket buffer is full).
    write_timeout_s: float = 5.0
    #: Seconds between keepalive pings on an open stream with nothing in flight, so that a
    #: silent path is noticed while nothing is being sent (libp2p ping, docs/libp2p.md L56).
    keepalive_s: float = KEEPALIVE_S
    #: Seconds a keepalive ping may take before the path counts as dead: with keepalive_s, an
    #: idle silent path is noticed within ~8 s.
    ping_timeout_s: float = 4.0
    #: Exponential backoff between delivery attempts to an unreachable device: first, cap.
    retry_initial_s: float = 0.5
    retry_max_s: float = 60.0
    #: A message still undelivered after this many seconds is marked failed (with the reason).
    fail_after_s: float = 7 * 24 * 3600
    #: Longest random wait before depositing receipts at a contact's relays (uniform in
    #: [0, this]): a relay that sees our mailbox acknowledged and then a deposit elsewhere
    #: cannot pair them by their timing alone (PROTOCOL.md section 21 "What a relay learns").
    #: The sender learns of delivery that much later; direct acks are not delayed.
    receipt_jitter_s: float = 10.0
    #: "full": every commit is fsynced (survives power loss). "normal": survives a crash of the
    #: process (kill -9) but a power loss may undo the last commits. Messages are acknowledged
    #: only after the commit, so "full" is what makes an ack a promise.
    durability: Durability = "full"
    #: Display name offered to people who use our invites.
    display_name: str = ""
    #: Seconds an invite stays valid.
    invite_lifetime_s: int = 7 * 24 * 3600
    #: Maximum frame size on the message protocol.
    max_frame_bytes: int = MAX_MSG_FRAME_BYTES
    #: History a linked device gets from the device that approved it (PROTOCOL.md section
    #: 25.3): the messages of the last this many days...
    link_history_days: int = 90
    #: ...and of those at most this many (the most recent ones); 0 transfers no history.
    link_history_max: int = 100_000
    #: Messages per chunk of that transfer (at most 250, PROTOCOL.md section 25.3): each chunk
    #: is one commit on the receiving device, and a cut transfer repeats at most one.
    link_history_chunk: int = 250
    #: Largest attachment this device sends or downloads, in bytes (PROTOCOL.md section 26.1
    #: allows 2 GiB; a device may set less).
    max_attachment_bytes: int = MAX_ATTACHMENT_BYTES
    #: Received attachments whose blob is at most this many bytes are downloaded as soon as
    #: their message arrives; larger ones on `Node.save` (`pigeon save`).
    auto_download_bytes: int = 16 * 1024 * 1024
    #: Seconds between tries of a download no device of the sender nor relay of ours serves
    #: (a device coming online tries at once).
    transfer_retry_s: float = 30.0
    #: Seconds a file we sent stays in the data directory for the recipient's devices to fetch
    #: (longer than relays keep the message, PROTOCOL.md section 21); then it is deleted.
    sent_blob_keep_s: float = 45 * 24 * 3600.0

    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("listen needs at least one multiaddr")
        for name in ("connect_timeout_s", "ack_timeout_s", "write_timeout_s", "keepalive_s",
                     "ping_timeout_s", "retry_initial_s", "retry_max_s", "fail_after_s",
                     "transfer_retry_s", "sent_blob_keep_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("relay_down_after_s", "relay_check_s", "relay_discover_s", "relay_drain_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if not 1 <= self.auto_relays <= 8:
            raise ConfigError("auto_relays must be within 1..8")
        if not self.receipt_jitter_s >= 0:
            raise ConfigError("receipt_jitter_s must not be negative")
        if self.retry_max_s < self.retry_initial_s:
            raise ConfigError("retry_max_s must be at least retry_initial_s")
        # Every multiaddr is checked fully here, at start-up: one that fails later would end the
        # running node instead of the command that named it.
        from node.net.addresses import check_listen_address, check_peer_address

        try:
            for listen in self.listen:
                check_listen_address(listen)
            if isinstance(self.relays, str):
                if self.relays != "auto":
                    raise ValueError(f"relays must be a list of multiaddrs or \"auto\", not"
                                     f" {self.relays!r}")
            else:
                for relay in self.relays:
                    check_peer_address(relay, "relay address")
            for peer in self.bootstrap:
                check_peer_address(peer, "bootstrap address")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for interface in self.mdns_interfaces:
            try:
                ipaddress.IPv4Address(interface)
            except ValueError:
                raise ConfigError(f"mdns interface {interface!r} is not an IPv4 address") from None
        if self.link_history_days < 0 or self.link_history_max < 0:
            raise ConfigError("link_history_days and link_history_max must not be negative")
        if not 1 <= self.link_history_chunk <= 250:
            raise ConfigError("link_history_chunk must be within 1..250")
        if self.durability not in ("full", "normal"):
            raise ConfigError("durability must be 'full' or 'normal'")
        if not 0 <= self.max_attachment_bytes <= MAX_ATTACHMENT_BYTES:
            raise ConfigError(f"max_attachment_bytes must be within 0..{MAX_ATTACHMENT_BYTES}")
        if self.auto_download_bytes < 0:
            raise ConfigError("auto_download_bytes must not be negative")
        if len(self.display_name) > MAX_NAME_CHARS:
            raise ConfigError(f"display_name longer than {MAX_NAME_CHARS} characters")

    @property
    def pinned_relays(self) -> tuple[str, ...]:
        """The relays given by hand (none when `relays` is "auto")."""
        return () if isinstance(self.relays, str) else self.relays

    @property
    def relay_choice(self) -> bool:
        """Whether the node chooses its relays itself (`relays = "auto"` and bootstrap peers
        to find the relay directory through)."""
        return self.relays == "auto" and bool(self.bootstrap)

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` (field name to value) applied and validated again."""
        return dataclasses.replace(self, **changes)
