"""The network: the only package of Pigeon that imports libp2p, multiaddr or zeroconf.

libp2p's API has moved between releases, so everything that knows it lives here: `host` (the
host, streams, framing, dialing), `circuit` (circuit relay v2: HOP on relays, STOP everywhere,
reservations, relayed dials, DCUtR upgrades), `quicpunch` (QUIC hole punches from the listen
port), `dht` (Kademlia with Pigeon's record rules),
`mdns` (LAN discovery through zeroconf) and `addresses` (this machine's interfaces, which
addresses are dialable). Everything above sees peer ids and multiaddrs as text and
`FrameStream`. May import: `node.protocol`, `node.errors`; never `node.device` or `node.relay`.
tests/test_layers.py enforces it.

The names below are loaded on first use (PEP 562 module `__getattr__`, as in `node`): a command
that only needs `node.net.addresses` (every `pigeon` command checks its configuration's
addresses) does not pay for importing libp2p.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.net.circuit import (
        CIRCUIT_HOP_PROTOCOL,
        CIRCUIT_STOP_PROTOCOL,
        DCUTR_PROTOCOL,
        CircuitRelayLimits,
        Reservation,
        ReservationLostCallback,
        ReservationPriority,
        circuit_address,
        is_circuit_address,
    )
    from node.net.dht import KAD_PROTOCOL, Dht, DhtSelector, DhtValidator, open_pigeon_dht
    from node.net.host import (
        DEFAULT_MAX_FRAME_BYTES,
        MAX_PREFIX_BYTES,
        MSG_PROTOCOL,
        ConnectionCallback,
        FrameDecoder,
        FrameStream,
        StreamCaps,
        StreamHandler,
        Transport,
        configure_libp2p_logging,
        encode_frames,
        libp2p_logging,
        peer_id_from_public_key,
        public_key_from_peer_id,
    )

#: Where each public name lives.
_HOMES: dict[str, str] = {
    **dict.fromkeys(
        ["CIRCUIT_HOP_PROTOCOL", "CIRCUIT_STOP_PROTOCOL", "DCUTR_PROTOCOL", "CircuitRelayLimits",
         "Reservation", "ReservationLostCallback", "ReservationPriority", "circuit_address",
         "is_circuit_address"],
        "node.net.circuit"),
    **dict.fromkeys(
        ["KAD_PROTOCOL", "Dht", "DhtSelector", "DhtValidator", "open_pigeon_dht"],
        "node.net.dht"),
    **dict.fromkeys(
        ["DEFAULT_MAX_FRAME_BYTES", "MAX_PREFIX_BYTES", "MSG_PROTOCOL", "ConnectionCallback",
         "FrameDecoder", "FrameStream", "StreamCaps", "StreamHandler", "Transport",
         "configure_libp2p_logging", "encode_frames", "libp2p_logging", "peer_id_from_public_key",
         "public_key_from_peer_id"],
        "node.net.host"),
}

__all__ = [
    "CIRCUIT_HOP_PROTOCOL",
    "CIRCUIT_STOP_PROTOCOL",
    "DCUTR_PROTOCOL",
    "DEFAULT_MAX_FRAME_BYTES",
    "KAD_PROTOCOL",
    "MAX_PREFIX_BYTES",
    "MSG_PROTOCOL",
    "CircuitRelayLimits",
    "ConnectionCallback",
    "Dht",
    "DhtSelector",
    "DhtValidator",
    "FrameDecoder",
    "FrameStream",
    "Reservation",
    "ReservationLostCallback",
    "ReservationPriority",
    "StreamCaps",
    "StreamHandler",
    "Transport",
    "circuit_address",
    "configure_libp2p_logging",
    "encode_frames",
    "is_circuit_address",
    "libp2p_logging",
    "open_pigeon_dht",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'node.net' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
