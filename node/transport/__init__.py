"""The only package of Pigeon that imports libp2p (DESIGN.md, "Layers").

libp2p's API has moved between releases, so everything that knows it lives here: `host` (the
host, streams, framing, dialing, circuit relay HOP), and the modules added next to it for the DHT
and circuit relay clients. Everything above sees peer ids and multiaddrs as text and `FrameStream`.
"""

from node.transport.host import (
    CIRCUIT_HOP_PROTOCOL,
    DEFAULT_MAX_FRAME_BYTES,
    MAX_PREFIX_BYTES,
    MSG_PROTOCOL,
    CircuitRelayLimits,
    ConnectionCallback,
    FrameDecoder,
    FrameStream,
    StreamHandler,
    Transport,
    configure_libp2p_logging,
    encode_frames,
    peer_id_from_public_key,
    public_key_from_peer_id,
)

__all__ = [
    "CIRCUIT_HOP_PROTOCOL",
    "DEFAULT_MAX_FRAME_BYTES",
    "MAX_PREFIX_BYTES",
    "MSG_PROTOCOL",
    "CircuitRelayLimits",
    "ConnectionCallback",
    "FrameDecoder",
    "FrameStream",
    "StreamHandler",
    "Transport",
    "configure_libp2p_logging",
    "encode_frames",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
]
