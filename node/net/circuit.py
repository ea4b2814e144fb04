"""Circuit relay v2 and DCUtR for the transport: NAT traversal on the client side.

A device behind a NAT cannot be dialed. It keeps a *reservation* on a relay that serves circuit
relay v2 HOP (a Pigeon relay, node/relay/service.py) and advertises relayed addresses
(`<relay addr>/p2p/<relay id>/p2p-circuit/p2p/<device id>`). A peer that dials such an address
asks the relay to CONNECT it to the device; the relay opens a STOP stream to the device, and the
two ends run Noise and Yamux over that pair of streams, so the relay passes only ciphertext.
Once relayed, the dialing side tries to get a direct connection (DCUtR: a plain dial of the
addresses identify reported, then the CONNECT/SYNC hole punch over the relayed connection) and
closes the relayed one once a direct one exists.

Everything here runs on the host of `node.net.host.Transport`, which is the only API the
rest of Pigeon sees. What libp2p 0.8.1 gets wrong and how this module works around it (each
item cites the section of docs/libp2p.md that says what was observed and where it is in libp2p):

* `host.connect()` drops `/p2p-circuit` addresses (docs/libp2p.md L9, L39): relayed addresses
  are dialed with the explicit `CircuitV2Transport.dial`, after we connected to the relay
  ourselves with the transport's own staggered dialing (host.connect would dial whatever the
  peerstore holds).
* The default `RelayConfig()` makes every dial RESERVE a slot for the dialer first
  (docs/libp2p.md L40): the dialer uses `RelayRole.STOP` only.
* `CircuitV2Transport.dial` stores `/p2p-circuit` addresses for the destination in the peerstore
  with an infinite TTL and tries them first on every later relayed dial, whatever relay the
  caller asked for (docs/libp2p.md L41): `_CircuitDialer` does not store them.
* libp2p's reservation refresher sleeps until ~TTL in the nursery it is given and swallows
  `trio.Cancelled`, hanging that nursery at shutdown (docs/libp2p.md L42). Reservations are made
  and refreshed here instead (the RESERVE message is one varint-delimited protobuf each way), in a
  nursery this module owns and cancels first at shutdown; a lost reservation is reported.
* On the destination, libp2p puts its OWN peer id as the relay in the relayed connection's
  address (docs/libp2p.md L43): `_CircuitProtocol` puts the relay's. Path reporting uses
  `get_connection_type()` anyway, never the address.
* DCUtR on both ends makes two direct connections (docs/libp2p.md L44): every host answers
  DCUtR, but its auto-drive loop is off and only the side that dialed through the relay
  initiates. The relayed connection is never closed after a "unilateral" upgrade (same section):
  we close it.
* DCUtR's QUIC hole punch dialed and sprayed from fresh UDP sockets, never from the listen port
  whose NAT mapping the peer dials (docs/libp2p.md L80): while `_DialerDCUtR` punches, QUIC
  dials and the spray leave from the QUIC listener's socket (`node.net.quicpunch`).
* A relay enforces its time and byte caps by resetting the circuit (the data cap counts protocol
  overhead too; the time cap only when the next chunk arrives: docs/libp2p.md L45).
  `FrameStream` reports the end of a relayed stream that was not a clean close as
  TransportError("circuit closed by the relay ...") so the caller redials.
* libp2p's HOP side counts a reservation until it expires (an hour), even after its holder
  disconnected, and has one pool for everyone, so 128 throwaway keys took every slot; its
  per-IP limits are not enforced (docs/libp2p.md L46, L63). `_ReservationSlots` drops the
  reservations of peers that left, serves the relay's users (`Transport.prioritize_reservations`)
  ahead of strangers, who share a smaller pool capped per address, and `_CircuitProtocol` caps
  the relayed connections per source peer and per source address.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2 import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2 import CircuitV2Protocol, CircuitV2Transport, DCUtRProtocol, RelayLimits
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayResourceManager
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from node.clock import Clock
from node.errors import TransportError
from node.net.quicpunch import hole_punching, install_listener_dials, spray_from_listener
from node.protocol.slots import SlotCaps, Slots, address_key

__all__ = [
    "CIRCUIT_HOP_PROTOCOL",
    "CIRCUIT_STOP_PROTOCOL",
    "DCUTR_PROTOCOL",
    "CircuitClient",
    "CircuitRelayLimits",
    "Reservation",
    "ReservationLostCallback",
    "ReservationPriority",
    "circuit_address",
    "dcutr_addresses",
    "is_circuit_address",
    "open_circuit",
    "split_circuit_address",
]

log = logging.getLogger("pigeon.transport.circuit")

CIRCUIT_HOP_PROTOCOL: str = str(HOP_PROTOCOL_ID)
"""Circuit relay v2 HOP (reservations and relayed connects), served when `circuit_relay` is set."""

CIRCUIT_STOP_PROTOCOL: str = str(STOP_PROTOCOL_ID)
"""Circuit relay v2 STOP: a relay hands us a relayed connection. Served by every Pigeon host."""

DCUTR_PROTOCOL: str = str(DCUTR_PROTOCOL_ID)
"""Direct Connection Upgrade through Relay, answered by every host whose transport enables it."""

RESERVE_TIMEOUT_SECONDS = 10.0
"""Bound on one RESERVE exchange (the stream open and the relay's answer)."""

REFRESH_MARGIN_SECONDS = 30.0
"""Refresh a reservation this long before it expires (as libp2p does), or at 3/4 of a short TTL."""

MIN_REFRESH_SECONDS = 1.0
MAX_REFRESH_SECONDS = 15 * 60.0
"""Bounds on the wait between refreshes. The upper one also limits the damage of a clock skew:
the relay gives the expiry as a Unix time by its own clock."""

SKEWED_TTL_REFRESH_SECONDS = 30.0
"""Refresh interval when the relay's expiry is already past by our clock (clocks disagree)."""

REFRESH_RETRY_SECONDS = 5.0
"""After a failed refresh (not a refusal), retry this often until the reservation expires."""

IDENTIFY_WAIT_SECONDS = 2.0
"""How long an upgrade waits for identify over the relayed connection (it brings the peer's
listen addresses, which the unilateral direct dial uses)."""

UPGRADE_TIMEOUT_SECONDS = 20.0
"""Bound on one direct-connection upgrade (identify wait, direct dial, DCUtR exchange)."""

UNILATERAL_DIAL_SECONDS = 5.0
"""Bound on the direct dial before DCUtR: a QUIC dial to a private address behind a NAT waits
out its 10 s handshake timeout (docs/libp2p.md L80), which would leave the hole punch little of
the upgrade's time; a peer reachable directly answers well within it."""

DCUTR_STREAM_TIMEOUT_SECONDS = 10
DCUTR_DIAL_TIMEOUT_SECONDS = 5
"""libp2p's DCUtR defaults are 30 s per message and 10 s per dial."""

MAX_DCUTR_ADDRS = 20
"""At most this many of our addresses in a DCUtR CONNECT message (libp2p's MAX_OBSERVED_ADDRS)."""

MAX_RELAYED_ADDRS = 8
"""At most this many relayed addresses per reservation (the relay reports its own addresses)."""

RENEW_MIN_AGE_SECONDS = 1.0
"""A relayed connection that ends after at least this long is renewed at once (a relay's time
cap is 120 s by default); one that dies sooner is left to the caller's redial (no loop)."""

RELAY_CLOSE_GRACE_SECONDS = 10.0
"""Once a direct connection exists, a relayed connection to the same peer is closed as soon as
it carries no stream, and at the latest after this long (its streams are then reset, and their
users redial, which now goes direct). Read at use, so tests may change it."""


@dataclass(frozen=True, kw_only=True)
class CircuitRelayLimits:
    """Limits of a circuit relay v2 HOP service (libp2p's `RelayLimits`; they are enforced only
    through `CircuitV2Protocol(limits=...)`, and HopConfig's per-IP and rate limits are not
    enforced at all in 0.8.1: docs/libp2p.md L46)."""

    max_reservations: int = 1024  # the relay's users may take them all
    max_circuits: int = 16  # relayed connections per reservation
    duration_s: int = 120  # per relayed connection, checked when its next chunk arrives
    data_bytes: int = 128 * 1024  # per relayed connection, both directions and overhead included
    reservation_ttl_s: int = 3600
    max_stranger_reservations: int = 128  # strangers' pool, inside max_reservations
    max_reservations_per_address: int = 8  # strangers', per address (node/protocol/slots.py)
    max_circuits_per_peer: int = 16  # relayed connections one source peer has open at once
    max_circuits_per_address: int = 64  # ... and one source address

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be at least 1")

    @classmethod
    def from_settings(cls, settings: object) -> CircuitRelayLimits:
        """The limits in a relay's settings: each field read from the attribute "circuit_" + its
        name (a RelayConfig's `circuit_max_reservations`, `circuit_duration_s`, ...)."""
        return cls(**{f.name: getattr(settings, "circuit_" + f.name) for f in fields(cls)})


ReservationPriority = Callable[[str], bool]
"""`is_member(peer_id)`: whether a peer is one of the relay's own users, whose reservations
come before strangers'. Called while a RESERVE is handled: it must be quick and not block."""

ReservationLostCallback = Callable[[str, str], None]
"""`callback(relay_peer_id, reason)`; runs inside libp2p's connection bookkeeping or the refresh
task, so it must not block (hand the event to a task with `send_nowait`)."""


@dataclass(eq=False)
class Reservation:
    """A slot held on one relay; refreshed in the background until it is lost or dropped."""

    relay_peer_id: str
    relay_addr: str
    """The relay multiaddr (ending in /p2p/<relay id>) we reserved through."""
    addrs: list[str]
    """Relayed addresses to advertise, `<relay addr>/p2p/<relay>/p2p-circuit/p2p/<our id>`; the
    one built from `relay_addr` first, then the relay's other reported addresses."""
    expires_at: float
    """Unix time by the RELAY's clock (as the relay sent it)."""
    limit_duration_s: int | None = None
    """The relay's caps on each relayed connection (None: not announced or unlimited)."""
    limit_data_bytes: int | None = None
    refreshes: int = 0
    lost_reason: str | None = None
    lost: trio.Event = field(default_factory=trio.Event)
    """Set once the reservation is lost (relay disconnected, refresh refused or failed until
    expiry) or dropped; `lost_reason` says why."""

    @property
    def active(self) -> bool:
        return not self.lost.is_set()


# --- addresses -----------------------------------------------------------------------------------


def is_circuit_address(addr: str | multiaddr.Multiaddr) -> bool:
    """Whether `addr` goes through a circuit relay (holds /p2p-circuit)."""
    return "/p2p-circuit" in str(addr)


def split_circuit_address(addr: str | multiaddr.Multiaddr) -> tuple[multiaddr.Multiaddr, ID]:
    """Split `<relay addr>/p2p/<relay>/p2p-circuit[/p2p/<dest>]` into the relay's multiaddr
    (ending in /p2p/<relay>) and the relay's peer id. The destination part is ignored: the
    caller knows whom it dials. ValueError for anything else (no relay id, nested circuits)."""
    text = str(multiaddr.Multiaddr(str(addr)))
    relay_text, marker, rest = text.partition("/p2p-circuit")
    if not marker:
        raise ValueError(f"not a circuit address: {text}")
    if "/p2p-circuit" in rest:
        raise ValueError(f"nested circuit addresses are not supported: {text}")
    if rest and not (rest.startswith("/p2p/") and rest.count("/") == 2):
        raise ValueError(f"unexpected components after /p2p-circuit: {text}")
    if not relay_text:
        raise ValueError(f"circuit address without a relay: {text}")
    relay = multiaddr.Multiaddr(relay_text)
    protocols = [p.name for p in relay.protocols()]
    if protocols.count("p2p") != 1 or protocols[-1] != "p2p":
        raise ValueError(f"the relay part must end in /p2p/<relay id>: {text}")
    relay_id = ID.from_base58(str(relay.value_for_protocol("p2p")))
    return relay, relay_id


def circuit_address(relay_addr: str | multiaddr.Multiaddr, peer_id: str) -> str:
    """`<relay addr ending in /p2p/<relay>>/p2p-circuit/p2p/<peer_id>`."""
    return f"{relay_addr}/p2p-circuit/p2p/{peer_id}"


def dcutr_addresses(observed: Sequence[str], listening: Sequence[str],
                    advertised: Sequence[str]) -> list[str]:
    """Our addresses for a DCUtR CONNECT message (pure; see `_DialerDCUtR._get_observed_addrs`).

    First every external IP that identify observers reported (`observed`) paired with each TCP
    and QUIC listen port (`listening`): NATs tend to keep the source port, so that is where a
    hole punch can reach us. Then the `advertised` addresses (never unspecified). Relayed,
    WebSocket and /p2p/ parts are left out; at most MAX_DCUTR_ADDRS, no duplicates."""
    ips: list[tuple[str, str]] = []
    for text in observed:
        parts = text.split("/")
        if "/p2p-circuit" not in text and len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            ips.append((parts[1], parts[2]))
    out: list[str] = []
    for family, ip in dict.fromkeys(ips):
        for listen in listening:
            parts = str(listen).split("/p2p/")[0].split("/")
            if len(parts) < 5 or parts[1] != family or "/p2p-circuit" in listen:
                continue
            rest = "/".join(parts[3:])  # tcp/<port>[/ws] or udp/<port>/quic-v1
            if (rest.startswith("tcp/") and rest.count("/") == 1) or \
                    (rest.startswith("udp/") and rest.endswith("/quic-v1")):
                out.append(f"/{family}/{ip}/{rest}")
    for addr in advertised:
        if "/p2p-circuit" not in addr and "/ws" not in addr:
            out.append(addr.split("/p2p/")[0])
    return list(dict.fromkeys(out))[:MAX_DCUTR_ADDRS]


def _udp_endpoint(addr: multiaddr.Multiaddr) -> tuple[str, int] | None:
    """(ip, port) of a /ip4|ip6/<ip>/udp/<port>/... address, else None."""
    parts = str(addr).split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "udp":
        return None
    try:
        return parts[2], int(parts[4])
    except ValueError:
        return None


def _is_loopback(addr: str) -> bool:
    return addr.startswith(("/ip4/127.", "/ip6/::1/"))


def _transport_rank(addr: str) -> int:
    """Order for the peer's learned addresses in a direct upgrade: TCP, QUIC, then WebSocket
    (TCP carries bulk best: docs/libp2p.md L48)."""
    if "/quic" in addr:
        return 1
    return 2 if "/ws" in addr else 0


def _connections(host: IHost, pid: ID) -> list[Any]:
    conns = host.get_network().connections.get(pid, [])
    if not isinstance(conns, list):
        conns = [conns]
    return [c for c in conns if not c.is_closed]


def _peer_address(host: IHost, pid: ID) -> str:
    """The per-address caps' key (node/protocol/slots.py) of the peer's live connection."""
    for conn in _connections(host, pid):
        try:
            addrs = conn.get_transport_addresses()
        except Exception:
            continue
        if addrs:
            return address_key(str(addrs[0]))
    return address_key(None)


def _is_relayed(conn: Any) -> bool:
    try:
        return bool(conn.get_connection_type() == ConnectionType.RELAYED)
    except Exception:
        return any(is_circuit_address(a) for a in conn.get_transport_addresses())


def _status_of(exc: BaseException) -> StatusCode | None:
    """The relay's status code carried somewhere in an exception chain (RelayConnectionError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "status_code", None)
        if code is not None:
            try:
                return StatusCode(int(code))
            except ValueError:
                return None
        current = current.__cause__ or current.__context__
    return None


_STATUS_REASONS = {
    StatusCode.NO_RESERVATION: "the peer holds no reservation on this relay",
    StatusCode.RESOURCE_LIMIT_EXCEEDED: "the relay's limits are reached",
    StatusCode.PERMISSION_DENIED: "the relay refused",
    StatusCode.CONNECTION_FAILED: "the relay could not reach the peer",
    StatusCode.RESERVATION_REFUSED: "the relay refused the reservation",
    StatusCode.MALFORMED_MESSAGE: "the relay could not parse our request",
    StatusCode.UNEXPECTED_MESSAGE: "the relay did not expect our request",
}


def _status_reason(code: StatusCode) -> str:
    return _STATUS_REASONS.get(code, f"relay status {code.name}")


class _Refused(TransportError):
    """The relay answered and said no: retrying the same request will not help."""


# --- libp2p classes, corrected -------------------------------------------------------------------


class _ReservationSlots(RelayResourceManager):
    """libp2p's reservation book with Pigeon's admission (docs/libp2p.md L63): reservations of
    peers no longer connected are dropped (libp2p counts them until they expire); the relay's
    users (`is_member`) may take every slot and evict the oldest stranger's reservation when
    all are taken; strangers share `max_stranger_reservations`, at most
    `max_reservations_per_address` from one address."""

    def __init__(self, limits: RelayLimits, host: IHost, caps: CircuitRelayLimits) -> None:
        super().__init__(limits, host)
        self.caps = caps
        self.is_member: ReservationPriority = lambda peer_id: False
        self.refused = 0
        self.evicted = 0

    def can_accept_reservation(self, peer_id: ID) -> bool:
        self._clean_expired()
        for gone in [p for p in self._reservations if not self._is_peer_connected(p)]:
            del self._reservations[gone]
        if peer_id in self._reservations:
            return True
        member = self._member(peer_id)
        strangers = [p for p in self._reservations if not self._member(p)]
        if member:
            if len(self._reservations) < self.limits.max_reservations:
                return True
            if strangers:
                oldest = min(strangers, key=lambda p: self._reservations[p].created_at)
                del self._reservations[oldest]
                self.evicted += 1
                log.info("reservation of stranger %s evicted for a user of this relay", oldest)
                return True
        elif len(self._reservations) < self.limits.max_reservations \
                and len(strangers) < self.caps.max_stranger_reservations:
            address = _peer_address(self.host, peer_id) if self.host else address_key(None)
            same = sum(1 for p in strangers
                       if self.host and _peer_address(self.host, p) == address)
            if same < self.caps.max_reservations_per_address:
                return True
        self.refused += 1
        return False

    def _member(self, peer_id: ID) -> bool:
        try:
            return bool(self.is_member(peer_id.to_base58()))
        except Exception:
            log.exception("reservation priority callback failed")
            return False


class _CircuitProtocol(CircuitV2Protocol):
    """CircuitV2Protocol whose STOP side names the right relay in the relayed connection's
    address. libp2p 0.8.1 writes `/p2p/<our own id>/p2p-circuit/p2p/<source>`
    (docs/libp2p.md L43); the relay is the peer the STOP stream came from.

    On a relay (HOP), reservations go through `_ReservationSlots`, and each CONNECT takes a slot
    per source peer and per source address for the circuit's lifetime (docs/libp2p.md L63)."""

    def __init__(self, host: IHost, *, limits: RelayLimits | None, allow_hop: bool,
                 caps: CircuitRelayLimits | None) -> None:
        super().__init__(host, limits=limits, allow_hop=allow_hop)
        caps = caps or CircuitRelayLimits()
        self.resource_manager = _ReservationSlots(self.limits, host, caps)
        self.circuit_slots = Slots(SlotCaps(
            per_peer=caps.max_circuits_per_peer, per_address=caps.max_circuits_per_address,
            total=caps.max_reservations * caps.max_circuits))

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        source = stream.muxed_conn.peer_id
        key, address = source.to_base58(), _peer_address(self.host, source)
        refused = self.circuit_slots.acquire(key, address)
        if refused is not None:
            log.info("relayed connection from %s refused: its %s cap is reached", key, refused)
            await self._send_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED,
                                    f"too many relayed connections from this {refused}")
            await stream.reset()
            return
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self.circuit_slots.release(key, address)

    async def handle_incoming_connection(self, stream: INetStream, remote_peer_id: bytes) -> None:
        try:
            source = ID(remote_peer_id)
            relay = stream.muxed_conn.peer_id
            ma = multiaddr.Multiaddr(f"/p2p/{relay.to_base58()}/p2p-circuit/p2p/{source.to_base58()}")
            raw_conn = RawConnection(stream=stream, initiator=False,
                                     connection_type=ConnectionType.RELAYED, addresses=[ma])
            muxed_conn = await self.host.upgrade_inbound_connection(raw_conn, ma)
            # As libp2p does: the generic upgrade cannot derive a relayed connection's transport
            # info, so tag the swarm connection (get_connection_type() then says RELAYED), with
            # the source as Noise authenticated it rather than as the relay named it.
            ma = multiaddr.Multiaddr(f"/p2p/{relay.to_base58()}/p2p-circuit/p2p/{muxed_conn.peer_id}")
            for conn in _connections(self.host, muxed_conn.peer_id):
                if getattr(conn, "muxed_conn", None) is muxed_conn:
                    conn.set_transport_info([ma], ConnectionType.RELAYED)
                    break
            log.debug("relayed connection from %s via %s", muxed_conn.peer_id, relay)
        except Exception as exc:
            await stream.close()
            raise ConnectionError(f"Failed to handle incoming connection: {exc}") from exc


class _CircuitDialer(CircuitV2Transport):
    """CircuitV2Transport that does not write `/p2p-circuit` addresses into the peerstore: libp2p
    stores them with an infinite TTL and then tries them before the relay the caller named, on
    every later dial to that peer (docs/libp2p.md L41)."""

    def _store_multiaddrs(self, peer_info: Any, relay_peer_id: ID) -> None:
        return None


class _DialerDCUtR(DCUtRProtocol):
    """DCUtR that answers peers but never initiates on its own: libp2p's auto-drive loop runs on
    both ends and makes two direct connections (docs/libp2p.md L44). `CircuitClient` initiates,
    only on the side that dialed through the relay, after its own unilateral direct dial."""

    async def _auto_drive_loop(self) -> None:
        return None

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        # CircuitClient dialed the peer's known addresses itself just before (staggered, first
        # one wins), instead of libp2p's concurrent dial of all of them.
        return False

    async def _perform_hole_punch(self, peer_id: ID, addrs: list[multiaddr.Multiaddr],
                                  as_responder: bool = False) -> bool:
        # docs/libp2p.md L80: QUIC dials of the punch leave from the listen port.
        with hole_punching():
            return bool(await super()._perform_hole_punch(peer_id, addrs, as_responder))

    async def _dial_peer(self, peer_id: ID, addr: multiaddr.Multiaddr,
                         source: tuple[str, int] | None = None, as_responder: bool = False
                         ) -> None:
        # docs/libp2p.md L80: the DCUtR initiator dials "as responder" (for TCP's simultaneous
        # open), which the swarm refuses for QUIC after the handshake, closing a punched
        # connection. QUIC roles are fixed by each connection's own handshake: dial plainly.
        if _udp_endpoint(addr) is not None:
            as_responder = False
        await super()._dial_peer(peer_id, addr, source, as_responder)

    async def _spam_udp_for_hole_punch(self, addr: multiaddr.Multiaddr, stop: trio.Event) -> None:
        # docs/libp2p.md L80: libp2p sprays from a fresh socket, which opens no mapping of
        # the listen port; ours leaves from the QUIC listener's socket.
        parsed = _udp_endpoint(addr)
        if parsed is None or not await spray_from_listener(self.host, *parsed, stop):
            await super()._spam_udp_for_hole_punch(addr, stop)

    async def _get_observed_addrs(self) -> list[bytes]:
        """Our addresses for the CONNECT message: libp2p's TCP predictions, plus QUIC ones.

        libp2p 0.8.1 predicts our NAT-mapped addresses (the external IP that identify observers
        reported, with our listen port, as NATs tend to preserve ports) for TCP listeners only,
        and otherwise sends its listen addresses: a QUIC listener behind a NAT was never
        offered (docs/libp2p.md L54). `dcutr_addresses` pairs every TCP and QUIC listen port
        with every observed external IP, then adds the advertised (never unspecified) ones."""
        manager: Any = getattr(self.host, "_observed_addr_manager", None)
        observed: list[str] = []
        if manager is not None:
            try:
                observed = [str(a) for a in manager.addrs(min_observers=1)]
            except Exception:
                log.debug("reading observed addresses failed", exc_info=True)
        offered = dcutr_addresses(observed, [str(a) for a in self.host.get_transport_addrs()],
                                  [str(a) for a in self.host.get_addrs()])
        return [multiaddr.Multiaddr(a).to_bytes() for a in offered]


# --- the client ----------------------------------------------------------------------------------


DirectDialer = Callable[[ID, Sequence[str]], Awaitable[None]]
"""The transport's staggered direct dial: raises TransportError when no address connects."""


class CircuitClient:
    """Reservations, relayed dials and direct upgrades for one host (see `open_circuit`)."""

    def __init__(self, host: IHost, nursery: trio.Nursery, protocol: CircuitV2Protocol,
                 dcutr: _DialerDCUtR | None, dial_direct: DirectDialer, clock: Clock) -> None:
        self._host = host
        self._clock = clock  # Unix time, to read the relay's expiry against (timers use trio's)
        self._nursery = nursery
        # docs/libp2p.md L40: STOP only, so dialing never RESERVEs a slot for the dialer.
        self._dialer = _CircuitDialer(host, protocol, RelayConfig(roles=RelayRole.STOP))
        self._dcutr = dcutr
        self._dial_direct = dial_direct
        self._reservations: dict[str, Reservation] = {}
        self._refreshers: dict[str, trio.CancelScope] = {}
        self._lost_callbacks: list[ReservationLostCallback] = []
        self._upgrading: set[str] = set()
        # Peers we dialed through a relay: (relay address, relay id, when the circuit opened).
        self._circuits: dict[str, tuple[multiaddr.Multiaddr, ID, float]] = {}
        self._closed = False
        self.renewals = 0
        """Relayed connections redialed after the relay ended them (see `on_connection_change`)."""
        self.upgrade_times: list[float] = []
        """Seconds from a relayed dial to its direct connection, for each successful upgrade."""

    @property
    def dcutr_enabled(self) -> bool:
        return self._dcutr is not None

    def hop_reservations(self) -> int:
        """Reservations this host holds for others as a relay (0 unless it serves HOP)."""
        protocol: Any = self._dialer.protocol
        if not protocol.allow_hop:
            return 0
        manager = protocol.resource_manager
        manager._clean_expired()
        return sum(1 for p in manager._reservations if manager._is_peer_connected(p))

    def prioritize_reservations(self, is_member: ReservationPriority) -> None:
        """As a relay: reserve for peers `is_member` says are our users ahead of strangers."""
        manager: Any = self._dialer.protocol.resource_manager
        manager.is_member = is_member

    # -- reservations --

    def reservations(self) -> list[Reservation]:
        return [r for r in self._reservations.values() if r.active]

    def reservation(self, relay_peer_id: str) -> Reservation | None:
        res = self._reservations.get(relay_peer_id)
        return res if res is not None and res.active else None

    def on_reservation_lost(self, callback: ReservationLostCallback) -> Callable[[], None]:
        self._lost_callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._lost_callbacks:
                self._lost_callbacks.remove(callback)

        return unsubscribe

    async def reserve(self, relay_pid: ID, relay_addr: str) -> Reservation:
        """RESERVE on a relay we are connected to (directly); start refreshing. Reserving again
        on the same relay refreshes the existing reservation. Raises TransportError."""
        if self._closed:
            raise TransportError("transport is closing")
        key = relay_pid.to_base58()
        started = trio.current_time()
        expires_at, ttl, limit, relay_addrs = await self._reserve_once(relay_pid)
        if not _connections(self._host, relay_pid):
            raise TransportError(f"connection to relay {key} lost while reserving")
        our_id = self._host.get_id().to_base58()
        addrs = [circuit_address(relay_addr, our_id)]
        dialed_loopback = _is_loopback(relay_addr)
        for addr in relay_addrs:
            # The relay's own claims (authenticated as the relay's, but not checked): loopback
            # ones are useless to anyone else unless we reached the relay on loopback too.
            if len(addrs) >= MAX_RELAYED_ADDRS or (_is_loopback(addr) and not dialed_loopback):
                continue
            relayed = circuit_address(addr, our_id)
            if relayed not in addrs:
                addrs.append(relayed)
        res = self._reservations.get(key)
        if res is not None and res.active:
            res.addrs, res.expires_at, res.relay_addr = addrs, expires_at, relay_addr
            res.limit_duration_s, res.limit_data_bytes = limit
            res.refreshes += 1
        else:
            res = Reservation(relay_peer_id=key, relay_addr=relay_addr, addrs=addrs,
                              expires_at=expires_at, limit_duration_s=limit[0],
                              limit_data_bytes=limit[1])
            self._reservations[key] = res
        old = self._refreshers.pop(key, None)
        if old is not None:
            old.cancel()
        await self._nursery.start(self._refresh_loop, res, ttl)
        log.info("reserved a slot on relay %s in %.0f ms (expires in %.0f s by its clock)",
                 key, (trio.current_time() - started) * 1000, ttl)
        return res

    def drop_reservation(self, relay_peer_id: str) -> None:
        """Stop refreshing; the relay frees the slot at expiry or when we disconnect from it
        (circuit relay v2 has no cancel message). No lost callback is called."""
        res = self._reservations.pop(relay_peer_id, None)
        scope = self._refreshers.pop(relay_peer_id, None)
        if scope is not None:
            scope.cancel()
        if res is not None and res.active:
            res.lost_reason = "dropped"
            res.lost.set()

    async def _reserve_once(self, relay_pid: ID) -> tuple[float, float, tuple[int | None, int | None],
                                                          list[str]]:
        """One RESERVE exchange: (expires_at by the relay's clock, TTL by ours, the relay's
        per-circuit limits, the relay's addresses ending in /p2p/<relay>)."""
        key = relay_pid.to_base58()
        if not _connections(self._host, relay_pid):
            raise TransportError(f"not connected to relay {key}")
        stream: INetStream | None = None
        try:
            with trio.fail_after(RESERVE_TIMEOUT_SECONDS):
                stream = await self._host.new_stream(relay_pid, [HOP_PROTOCOL_ID])
                # The RESERVE request carries no field (spec); the relay reserves for the peer
                # the connection authenticated.
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                resp = await read_delimited_msg(stream, HopMessage)
        except trio.TooSlowError:
            raise TransportError(f"relay {key} did not answer the reservation in time") from None
        except Exception as exc:
            raise TransportError(f"reservation on relay {key} failed: {exc!r}") from exc
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await stream.close()
                    except Exception:
                        log.debug("closing the HOP stream failed", exc_info=True)
        received = self._clock.now_ms() / 1000
        if resp.type != HopMessage.STATUS:
            raise _Refused(f"relay {key} answered the reservation with an unexpected message")
        if resp.HasField("status") and resp.status != int(StatusCode.OK):
            try:
                reason = _status_reason(StatusCode(resp.status))
            except ValueError:
                reason = f"relay status {resp.status}"
            raise _Refused(f"relay {key} refused the reservation: {reason}")
        if not resp.HasField("reservation") or not resp.reservation.expire:
            raise TransportError(f"relay {key} answered without a reservation")
        expires_at = float(resp.reservation.expire)
        ttl = expires_at - received
        if ttl < 2 * MIN_REFRESH_SECONDS:
            log.warning("relay %s says its reservation expires %.0f s from now: the clocks "
                        "disagree; refreshing every %.0f s", key, ttl, SKEWED_TTL_REFRESH_SECONDS)
            ttl = SKEWED_TTL_REFRESH_SECONDS + REFRESH_MARGIN_SECONDS
        limit: tuple[int | None, int | None] = (None, None)
        if resp.HasField("limit"):
            limit = (resp.limit.duration or None, resp.limit.data or None)
        relay_addrs: list[str] = []
        for raw in resp.reservation.addrs:
            try:
                addr = multiaddr.Multiaddr(bytes(raw))
            except Exception:
                continue
            if is_circuit_address(addr):
                continue
            names = [p.name for p in addr.protocols()]
            if "p2p" in names:
                if names[-1] != "p2p" or addr.value_for_protocol("p2p") != key:
                    continue
            else:
                addr = addr.encapsulate(multiaddr.Multiaddr(f"/p2p/{key}"))
            relay_addrs.append(str(addr))
        return expires_at, ttl, limit, relay_addrs

    async def _refresh_loop(self, res: Reservation, ttl: float,
                            task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        key = res.relay_peer_id
        relay_pid = ID.from_base58(key)
        with trio.CancelScope() as scope:
            self._refreshers[key] = scope
            task_status.started()
            expires = trio.current_time() + ttl
            while True:
                margin = min(REFRESH_MARGIN_SECONDS, ttl / 4)
                await trio.sleep(min(max(ttl - margin, MIN_REFRESH_SECONDS), MAX_REFRESH_SECONDS))
                while True:  # bounded: ends by success, refusal, loss or expiry
                    if not res.active:
                        return
                    try:
                        expires_at, ttl, limit, _ = await self._reserve_once(relay_pid)
                    except TransportError as exc:
                        if isinstance(exc, _Refused) or trio.current_time() >= expires:
                            self._lose(res, f"refresh failed: {exc}")
                            return
                        log.info("refreshing the reservation on %s failed (%s); retrying", key, exc)
                        await trio.sleep(min(REFRESH_RETRY_SECONDS,
                                             max(expires - trio.current_time(), 0.1)))
                        continue
                    break
                res.expires_at = expires_at
                res.limit_duration_s, res.limit_data_bytes = limit
                res.refreshes += 1
                expires = trio.current_time() + ttl
                log.debug("refreshed the reservation on %s (expires in %.0f s)", key, ttl)
        if self._refreshers.get(key) is scope:
            del self._refreshers[key]

    def _lose(self, res: Reservation, reason: str) -> None:
        if not res.active:
            return
        key = res.relay_peer_id
        res.lost_reason = reason
        res.lost.set()
        if self._reservations.get(key) is res:
            del self._reservations[key]
            scope = self._refreshers.pop(key, None)
            if scope is not None:
                scope.cancel()
        log.info("reservation on relay %s lost: %s", key, reason)
        if self._closed:
            return
        for callback in list(self._lost_callbacks):
            try:
                callback(key, reason)
            except Exception:
                log.exception("reservation-lost callback failed")

    def on_connection_change(self, peer_id: str, connected: bool) -> None:
        """Hooked into the transport's connection events: a relay holds a reservation only while
        the client stays connected to it (libp2p's RelayResourceManager checks exactly that)."""
        if connected:
            return
        res = self._reservations.get(peer_id)
        if res is not None:
            self._lose(res, "connection to the relay closed")
        circuit = self._circuits.pop(peer_id, None)
        if circuit is not None and not self._closed \
                and trio.current_time() - circuit[2] >= RENEW_MIN_AGE_SECONDS:
            # The last connection to a peer we reached through a relay is gone, and it was not
            # a circuit that failed at once: most often the relay's time or data cap
            # (docs/libp2p.md L45). Open a new circuit right away, so the path is back before
            # anything is sent, and try the direct upgrade again.
            self._nursery.start_soon(self._renew, ID.from_base58(peer_id), circuit)

    def forget(self, peer_id: str) -> None:
        """We are closing our connections to `peer_id` ourselves: do not renew its circuit."""
        self._circuits.pop(peer_id, None)

    async def _renew(self, pid: ID, circuit: tuple[multiaddr.Multiaddr, ID, float]) -> None:
        relay_addr, relay_pid, _ = circuit
        key = pid.to_base58()
        if _connections(self._host, pid):
            log.debug("not renewing the relayed connection to %s: connected again", key)
            return
        if not any(not _is_relayed(c) for c in _connections(self._host, relay_pid)):
            log.info("not renewing the relayed connection to %s: the relay is gone", key)
            return
        with trio.move_on_after(RESERVE_TIMEOUT_SECONDS):
            try:
                await self.dial(relay_addr, relay_pid, pid)
            except TransportError as exc:
                log.info("renewing the relayed connection to %s failed: %s", key, exc)
                return
            self.renewals += 1
            log.info("renewed the relayed connection to %s through %s", key, relay_pid)
            self.schedule_upgrade(pid, [])

    # -- relayed dials and upgrades --

    async def dial(self, relay_addr: multiaddr.Multiaddr, relay_pid: ID, pid: ID) -> None:
        """Open a relayed connection to `pid` through a relay we are connected to (directly). It
        lands in the swarm like any other. Raises TransportError with a short reason."""
        circuit = multiaddr.Multiaddr(circuit_address(relay_addr, pid.to_base58()))
        try:
            await self._dialer.dial(circuit)
        except Exception as exc:
            code = _status_of(exc)
            reason = _status_reason(code) if code is not None else _short(exc)
            log.debug("relayed dial %s failed: %r", circuit, exc)
            raise TransportError(reason) from exc
        self._circuits[pid.to_base58()] = (relay_addr, relay_pid, trio.current_time())

    def schedule_upgrade(self, pid: ID, direct_addrs: Sequence[str]) -> None:
        """After a relayed dial: try to get a direct connection in the background and close the
        relayed one once it exists. No-op with DCUtR off or an upgrade already running."""
        key = pid.to_base58()
        if self._dcutr is None or self._closed or key in self._upgrading:
            return
        self._upgrading.add(key)
        self._nursery.start_soon(self._upgrade, pid, list(direct_addrs), trio.current_time())

    def has_direct(self, pid: ID) -> bool:
        return any(not _is_relayed(c) for c in _connections(self._host, pid))

    def relayed_connections(self, pid: ID) -> list[INetConn]:
        return [c for c in _connections(self._host, pid) if _is_relayed(c)]

    async def _upgrade(self, pid: ID, direct_addrs: list[str], started: float) -> None:
        key = pid.to_base58()
        try:
            with trio.move_on_after(UPGRADE_TIMEOUT_SECONDS):
                await self._wait_identified(pid)
                if not self.has_direct(pid):
                    # Unilateral upgrade (DCUtR spec step 0): the peer may simply be reachable at
                    # an address identify reported over the relayed connection. Staggered, so at
                    # most one direct connection comes out of it.
                    learned = [str(a) for a in self._host.get_peerstore().addrs(pid)]
                    candidates = list(direct_addrs)
                    for text in sorted(learned, key=_transport_rank):
                        if not is_circuit_address(text) and text not in candidates:
                            candidates.append(text)
                    if candidates:
                        try:
                            with trio.move_on_after(UNILATERAL_DIAL_SECONDS):
                                await self._dial_direct(pid, candidates)
                        except TransportError as exc:
                            log.debug("unilateral upgrade to %s failed: %s", key, exc)
                if not self.has_direct(pid) and self.relayed_connections(pid):
                    assert self._dcutr is not None
                    await self._dcutr.initiate_hole_punch(pid)  # CONNECT/SYNC over the relay
            if not self.has_direct(pid):
                log.info("no direct connection to %s: staying relayed", key)
                return
            elapsed = trio.current_time() - started
            self.upgrade_times.append(elapsed)
            log.info("connection to %s upgraded to direct in %.0f ms", key, elapsed * 1000)
            await self._close_relayed(pid)
        except Exception:
            log.exception("direct upgrade to %s failed", key)
        finally:
            self._upgrading.discard(key)

    async def _wait_identified(self, pid: ID) -> None:
        """Wait (bounded) for identify over the new relayed connection. libp2p skips identify
        when the peerstore still lists the peer's protocols from an earlier connection
        (docs/libp2p.md L47): then the addresses from that time are all there is, and we go on
        at once."""
        identified = getattr(self._host, "_identified_peers", None)
        inflight = getattr(self._host, "_identify_inflight", None)
        if identified is None or inflight is None:
            return

        def settled() -> bool:
            if pid in identified:
                return True
            if pid in inflight:
                return False
            return any(not is_circuit_address(a) for a in self._host.get_peerstore().addrs(pid))

        with trio.move_on_after(IDENTIFY_WAIT_SECONDS):
            while not settled():  # bounded by the move_on_after
                await trio.sleep(0.02)

    async def _close_relayed(self, pid: ID) -> None:
        deadline = trio.current_time() + RELAY_CLOSE_GRACE_SECONDS
        while True:  # bounded by the grace deadline
            relayed = self.relayed_connections(pid)
            if not relayed or not self.has_direct(pid):
                return  # never strand the peer: only close relayed legs while direct exists
            busy = [c for c in relayed if c.get_streams()]
            if not busy or trio.current_time() >= deadline:
                break
            await trio.sleep(0.1)
        for conn in relayed:
            log.debug("closing the relayed connection to %s (%d streams)", pid,
                      len(conn.get_streams()))
            try:
                await conn.close()
            except Exception:
                log.debug("closing a relayed connection failed", exc_info=True)

    def close(self) -> None:
        self._closed = True
        for scope in self._refreshers.values():
            scope.cancel()
        self._refreshers.clear()


def _short(exc: BaseException) -> str:
    text = str(exc).lower()
    if "timed out" in text or isinstance(exc, trio.TooSlowError):
        return "timed out"
    if "negotiate" in text or "handshake" in text:
        return "handshake failed"
    if "could not open stream to relay" in text:
        return "the relay does not serve circuit relay HOP"
    return type(exc).__name__


# --- lifetime --------------------------------------------------------------------------------------


@asynccontextmanager
async def open_circuit(host: IHost, *, hop: CircuitRelayLimits | None, dcutr: bool,
                       dial_direct: DirectDialer, clock: Clock) -> AsyncIterator[CircuitClient]:
    """Run the circuit relay services of one host for the body's duration: STOP (accept relayed
    connections) always, HOP when `hop` is given (a relay), DCUtR when `dcutr` is true, and the
    reservation refreshers and upgrade tasks in a nursery of our own.

    Each libp2p service runs under `background_trio_service`, which gives it a nursery of its
    own. Leaving the block first cancels our nursery (refreshers, upgrades: nothing in it eats
    `trio.Cancelled`), then stops DCUtR and the circuit protocol, which unregister their stream
    handlers, all before the host closes.
    """
    limits = None
    if hop is not None:
        limits = RelayLimits(
            duration=hop.duration_s,
            data=hop.data_bytes,
            max_circuit_conns=hop.max_circuits,
            max_reservations=hop.max_reservations,
            reservation_ttl=hop.reservation_ttl_s,
        )
    protocol = _CircuitProtocol(host, limits=limits, allow_hop=hop is not None, caps=hop)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(background_trio_service(protocol))
        dcutr_service: _DialerDCUtR | None = None
        if dcutr:
            dcutr_service = _DialerDCUtR(host, read_timeout=DCUTR_STREAM_TIMEOUT_SECONDS,
                                         write_timeout=DCUTR_STREAM_TIMEOUT_SECONDS,
                                         dial_timeout=DCUTR_DIAL_TIMEOUT_SECONDS)
            await stack.enter_async_context(background_trio_service(dcutr_service))
            install_listener_dials(host)  # docs/libp2p.md L80
        async with trio.open_nursery() as nursery:
            client = CircuitClient(host, nursery, protocol, dcutr_service, dial_direct, clock)
            try:
                yield client
            finally:
                client.close()
                nursery.cancel_scope.cancel()
