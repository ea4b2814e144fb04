"""libp2p transport: one host, authenticated streams, length-prefixed frames, dialing.

The `node.net` package is the ONLY place in Pigeon that imports libp2p (README.md,
"Layers"): the library's API has moved between releases, so everything that knows it lives here
and everything above sees only peer ids as text, multiaddrs as text, and `FrameStream`.

The libp2p release is pinned (0.8.1). What the workarounds below rely on is written up in
docs/libp2p.md and cited by section ("docs/libp2p.md L1"): what was observed, where it is in
libp2p's source, and what this module does about it.

Framing (PROTOCOL.md, "Transport"): every frame on a Pigeon stream is an unsigned LEB128 varint
length, minimally encoded and at most 4 bytes long, followed by exactly that many bytes.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, cast

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, IMuxedConn, INetConn, INetStream, INotifee
from libp2p.connection_types import ConnectionType
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair as ed25519_key_pair
from libp2p.crypto.keys import KeyType
from libp2p.crypto.x25519 import create_new_key_pair as x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.identify import _mk_identify_protobuf
from libp2p.io.peekable_stream import PeekableStream
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.rcmgr import new_resource_manager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.rcmgr.manager import ResourceLimits
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service.trio_tasks import FunctionTask
from libp2p.transport import cmux as libp2p_cmux
from libp2p.transport.quic.config import QUICTransportConfig

from node.clock import Clock, TrioClock
from node.errors import DecodeError, FrameTooLarge, RemoteError, TransportError
from node.net.addresses import dialable
from node.net.circuit import (
    CIRCUIT_HOP_PROTOCOL,
    CircuitClient,
    CircuitRelayLimits,
    Reservation,
    ReservationLostCallback,
    ReservationPriority,
    is_circuit_address,
    open_circuit,
    split_circuit_address,
)
from node.net.yamux_credit import use_half_window_updates
from node.protocol.multiaddrs import encode_uvarint
from node.protocol.slots import SlotCaps, Slots, address_key

__all__ = [
    "CIRCUIT_HOP_PROTOCOL",
    "DEFAULT_MAX_FRAME_BYTES",
    "MAX_PREFIX_BYTES",
    "MSG_PROTOCOL",
    "CircuitRelayLimits",
    "ConnectionCallback",
    "FrameDecoder",
    "FrameStream",
    "Reservation",
    "ReservationLostCallback",
    "StreamCaps",
    "StreamHandler",
    "Transport",
    "configure_libp2p_logging",
    "encode_frames",
    "libp2p_logging",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
]

log = logging.getLogger("pigeon.transport")

# --- protocol ids and limits -------------------------------------------------------------------

MSG_PROTOCOL = "/pigeon/msg/1.0.0"
"""Direct device-to-device messages (one long-lived stream per peer, frames in batches)."""

DEFAULT_MAX_FRAME_BYTES = 1024 * 1024
"""1 MiB: bounds what a peer can make us buffer per stream; big payloads go in chunks (docs/libp2p.md L19)."""

MAX_PREFIX_BYTES = 4
"""A length prefix longer than this is malformed: 4 LEB128 bytes already encode 2**28 - 1."""

_MAX_ENCODABLE_FRAME = (1 << (7 * MAX_PREFIX_BYTES)) - 1

READ_CHUNK_BYTES = 64 * 1024
"""One Yamux data frame at most (MAX_MESSAGE_SIZE); `stream.read(n)` returns up to n bytes."""

DIAL_STAGGER_SECONDS = 0.25
"""Start the next address if the previous one neither failed nor connected by then (RFC 8305)."""

CLOSE_TIMEOUT_SECONDS = 5.0
"""Upper bound on a graceful host shutdown; past it we give up waiting and let trio cancel."""

CLOSE_CONNECTIONS_SECONDS = 2.0
"""Part of CLOSE_TIMEOUT_SECONDS spent closing every connection at once before `host.close()`."""

HANDSHAKES_PER_ADDRESS = 16
"""Inbound TCP/WebSocket connections from one address (node/protocol/slots.py) that may be in
their handshake (Noise, Yamux) at once; a connection beyond it is closed as it arrives. Under a
flood of connections every handshake shares the CPU with every other, so with no bound they all
finish late together, after their dialers gave up, and none is served (docs/libp2p.md L87)."""

HANDSHAKES_TOTAL = 64
"""Inbound handshakes in progress at once from everyone together (libp2p's own pending-inbound
default): what one address cannot take, many addresses cannot exceed either."""

PING_PROTOCOL = "/ipfs/ping/1.0.0"
"""libp2p's ping protocol, which every py-libp2p host serves (docs/libp2p.md L56): keepalive."""

PING_BYTES = 32
"""A ping is 32 random bytes, echoed back (the libp2p ping specification)."""

RESET_TIMEOUT_SECONDS = 2.0
"""Upper bound on the shielded reset after an interrupted write: on a dead path the reset frame
may never leave, and a shielded wait without a bound would hang the caller."""

ConnectionCallback = Callable[[str, bool], None]
StreamHandler = Callable[["FrameStream"], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class StreamCaps:
    """Inbound streams of one protocol that may be open at once (`Transport.set_stream_handler`):
    `per_peer` for any peer id; strangers (peers the handler's `is_member` does not vouch for)
    share `strangers`, at most `per_address` from one address (IPv4 address, IPv6 /64, or the
    relay for relayed connections: node/protocol/slots.py); `total` for everyone. A stream
    beyond a cap is reset at once, so a stranger with many peer ids on one address cannot take
    the slots that contacts need."""

    per_peer: int
    per_address: int
    strangers: int
    total: int

    def __post_init__(self) -> None:
        if min(self.per_peer, self.per_address, self.strangers, self.total) < 1:
            raise ValueError("stream caps must be at least 1")


# --- logging -----------------------------------------------------------------------------------


def configure_libp2p_logging(level: int = logging.ERROR) -> None:
    """Quiet the libraries under the transport (docs/libp2p.md L27) and route what remains to our handlers.

    At import, libp2p sets its "libp2p" logger to WARNING with ``propagate=False`` and no handler,
    so its warnings reach stderr through logging's last-resort handler and never reach the
    application's handlers (docs/libp2p.md L27). We set the level and turn propagation back on, so an
    operator's logging configuration sees libp2p errors next to Pigeon's own "pigeon.*" records.
    aioquic logs under "quic". Some libp2p modules log on the root logger directly (e.g.
    "Error resetting stream" from swarm_connection.py); those cannot be told apart by name.
    """
    for name in _LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.propagate = True


_LIBRARY_LOGGERS = ("libp2p", "quic", "aioquic", "multiaddr")


@dataclass
class _LoggingHold:
    """How many `libp2p_logging` blocks are open, and the loggers as they were before the first."""

    holders: int = 0
    saved: dict[str, tuple[int, bool]] = field(default_factory=dict)


_LOGGING_HOLD = _LoggingHold()


@contextmanager
def libp2p_logging(level: int) -> Iterator[None]:
    """`configure_libp2p_logging(level)` while the block runs; once the last of the blocks open
    at the same time ends (in whatever order they end), the loggers are as they were before the
    first. A node opened while debugging set them to DEBUG for good, and every libp2p host made
    later in the process then built a log record for each address it parsed."""
    hold = _LOGGING_HOLD
    if hold.holders == 0:
        hold.saved = {name: (logging.getLogger(name).level, logging.getLogger(name).propagate)
                      for name in _LIBRARY_LOGGERS}
    hold.holders += 1
    configure_libp2p_logging(level)
    try:
        yield
    finally:
        hold.holders -= 1
        if hold.holders == 0:
            for name, (saved_level, propagate) in hold.saved.items():
                logging.getLogger(name).setLevel(saved_level)
                logging.getLogger(name).propagate = propagate


# --- identities --------------------------------------------------------------------------------


def peer_id_from_public_key(ed25519_public: bytes) -> str:
    """Return the base58 libp2p peer id ("12D3KooW...") of a 32-byte Ed25519 public key.

    Raises DecodeError if the bytes are not an Ed25519 public key.
    """
    if len(ed25519_public) != 32:
        raise DecodeError(f"an Ed25519 public key has 32 bytes, not {len(ed25519_public)}")
    try:
        key = Ed25519PublicKey.from_bytes(bytes(ed25519_public))
    except Exception as exc:  # pynacl raises its own ValueError/TypeError subclasses
        raise DecodeError("not an Ed25519 public key") from exc
    return ID.from_pubkey(key).to_base58()


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Return the 32-byte Ed25519 public key embedded in a libp2p peer id.

    Ed25519 peer ids inline the key (identity multihash), so no lookup is needed. Raises
    DecodeError for text that is not a canonical base58 Ed25519 peer id (RSA and other hashed
    ids carry no key, and Pigeon devices only use Ed25519: docs/libp2p.md L26).
    """
    try:
        pid = ID.from_base58(peer_id)
        key = pid.extract_public_key()
    except Exception as exc:
        raise DecodeError(f"not a peer id: {peer_id!r}") from exc
    if key is None or key.get_type() != KeyType.Ed25519:
        raise DecodeError(f"not an Ed25519 peer id: {peer_id!r}")
    raw = key.to_bytes()
    # Reject non-canonical spellings, so one device has exactly one peer id text.
    if len(raw) != 32 or peer_id_from_public_key(raw) != peer_id:
        raise DecodeError(f"not a canonical Ed25519 peer id: {peer_id!r}")
    return raw


def _parse_peer_id(peer_id: str) -> ID:
    public_key_from_peer_id(peer_id)  # validates: only Ed25519 peers are Pigeon devices
    return ID.from_base58(peer_id)


# --- framing (pure: no I/O) ----------------------------------------------------------------------


def encode_frames(frames: Sequence[bytes], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Concatenate frames, each behind its varint length, into one buffer for one write.

    Raises ValueError for a frame above `max_frame_bytes`: sending it is a local bug (the peer
    would refuse it with FrameTooLarge and reset the stream anyway).
    """
    parts: list[bytes] = []
    for frame in frames:
        if len(frame) > max_frame_bytes:
            raise ValueError(f"frame of {len(frame)} bytes exceeds the {max_frame_bytes} limit")
        parts.append(encode_uvarint(len(frame)))
        parts.append(frame)
    return b"".join(parts)


class FrameDecoder:
    """Incremental decoder for varint-length-prefixed frames (sans-IO, like h11).

    Feed it whatever chunks the stream returns (`stream.read(n)` gives any number of bytes up to
    n: docs/libp2p.md L20); `next_frame()` returns a complete frame or None when more bytes are needed. One
    chunk may hold several frames and they all come out without further reads.

    The size limit is checked as soon as the length prefix is complete, before any body byte is
    buffered or waited for: FrameTooLarge. A prefix that is longer than MAX_PREFIX_BYTES or not
    minimally encoded (a trailing 0x00 group) raises DecodeError. After either error the decoder
    is poisoned: the stream can no longer be trusted to be in sync.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if not 0 <= max_frame_bytes <= _MAX_ENCODABLE_FRAME:
            raise ValueError(f"max_frame_bytes must be within 0..{_MAX_ENCODABLE_FRAME}")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._pos = 0  # consumed bytes at the front of _buf (compacted lazily, not per frame)
        self._body_len: int | None = None  # length of the frame whose prefix was parsed
        self._error: Exception | None = None

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (0 at a frame boundary)."""
        return len(self._buf) - self._pos

    def next_frame(self) -> bytes | None:
        """Return the next complete frame, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        if self._body_len is None:
            self._body_len = self._parse_prefix()
            if self._body_len is None:
                return None
        end = self._pos + self._body_len
        if end > len(self._buf):
            return None
        frame = bytes(self._buf[self._pos : end])
        self._pos = end
        self._body_len = None
        return frame

    def _parse_prefix(self) -> int | None:
        value = 0
        for i in range(MAX_PREFIX_BYTES):
            at = self._pos + i
            if at >= len(self._buf):
                return None  # prefix incomplete
            byte = self._buf[at]
            value |= (byte & 0x7F) << (7 * i)
            if byte & 0x80:
                continue
            if byte == 0 and i > 0:
                raise self._poison(DecodeError("non-minimal frame length prefix"))
            if value > self.max_frame_bytes:
                raise self._poison(
                    FrameTooLarge("max_frame_bytes", f"{value} > {self.max_frame_bytes}")
                )
            self._pos = at + 1
            return value
        raise self._poison(DecodeError(f"frame length prefix longer than {MAX_PREFIX_BYTES} bytes"))

    def _poison(self, exc: Exception) -> Exception:
        self._error = exc
        return exc


# --- streams -----------------------------------------------------------------------------------


def _describe_connection(net_stream: INetStream) -> tuple[str | None, bool]:
    """Best-effort remote multiaddr of the stream's connection and whether it is relayed."""
    conn: Any = getattr(net_stream, "swarm_conn", None)
    addr: str | None = None
    relayed = False
    try:
        if conn is not None:
            relayed = conn.get_connection_type() == ConnectionType.RELAYED
            addrs = conn.get_transport_addresses()
            if addrs:
                addr = str(addrs[0])
        if addr is None:
            # QUIC and TCP report their transport address; WebSocket connections report none
            # and no socket address either in 0.8.1 (docs/libp2p.md L23), so remote_addr stays None.
            remote = net_stream.get_remote_address()
            if remote is not None:
                family = "ip6" if ":" in remote[0] else "ip4"
                addr = f"/{family}/{remote[0]}/tcp/{remote[1]}"
    except Exception:  # purely informational; never fail a stream over it
        log.debug("could not describe connection", exc_info=True)
    if addr is not None and "/p2p-circuit" in addr:
        relayed = True
    return addr, relayed


def _ended_abnormally(net_stream: INetStream) -> bool:
    """After a read returned EOF: was it really a reset or a lost connection?

    libp2p 0.8.1 reports both as a plain EOF on read (docs/libp2p.md L22): on Yamux a peer's RST removes
    the stream, and the next read says "Stream closed" (StreamEOF; only writes see StreamReset);
    on QUIC a closed connection reads as EOF. The muxer's own flags still tell them apart. A peer
    that sends FIN and closes the connection at once may be reported as lost: the safe side.
    """
    muxed: Any = cast(Any, net_stream).muxed_stream  # INetStream does not declare it
    if getattr(muxed, "reset_received", False):  # Yamux: RST received
        return True
    is_reset = getattr(muxed, "is_reset", None)  # QUIC stream
    if callable(is_reset) and is_reset():
        return True
    conn: Any = net_stream.muxed_conn
    # Yamux's close wakes the readers before it marks the connection closed, and a reader may
    # run in between (docs/libp2p.md L69): its shutdown flag is set before the wake-up.
    shutting_down = getattr(conn, "event_shutting_down", None)
    if shutting_down is not None and shutting_down.is_set():
        return True
    return bool(getattr(conn, "is_closed", False))


class FrameStream:
    """One libp2p stream carrying length-prefixed frames.

    `remote_peer_id` and `remote_public_key` come from the connection that Noise (or QUIC's TLS)
    authenticated: `stream.muxed_conn.peer_id` (docs/libp2p.md L2), never from anything the peer says.
    `remote_addr` is the peer's transport multiaddr as seen by this connection (None when libp2p
    cannot tell: WebSocket, and TCP over IPv6, in 0.8.1), and `relayed` says whether it goes
    through a circuit relay (from the connection's type, not its address); both are informational
    ("direct" vs "relayed" in the UI), never used for authentication. A stream keeps the
    connection it was opened on: after a DCUtR upgrade, new streams go direct, and a relayed one
    still open is closed with its connection (circuit.RELAY_CLOSE_GRACE_SECONDS), which its user
    sees as TransportError. A relay's time and data caps end a relayed stream the same way:
    TransportError("circuit closed by the relay ..."), never a clean end (docs/libp2p.md L45).

    Concurrency: `send` may be called from several tasks (batches are written under a lock, so
    they never interleave; Yamux itself splits a write above 64 KiB or above the send window into
    several data frames, and two unlocked writers interleave them: docs/libp2p.md L21). `receive` must
    only be used by one task at a time (trio.BusyResourceError otherwise).
    """

    def __init__(self, net_stream: INetStream, max_frame_bytes: int) -> None:
        self._stream = net_stream
        peer = net_stream.muxed_conn.peer_id
        self.remote_peer_id: str = peer.to_base58()
        key = peer.extract_public_key()
        if key is None or key.get_type() != KeyType.Ed25519:
            # Only Ed25519 devices exist in Pigeon; an RSA/secp256k1 peer is not one of us.
            raise TransportError(f"peer {self.remote_peer_id} does not use an Ed25519 key")
        self.remote_public_key: bytes = key.to_bytes()
        self.protocol: str = str(net_stream.get_protocol() or "")
        self.remote_addr, self.relayed = _describe_connection(net_stream)
        self._decoder = FrameDecoder(max_frame_bytes)
        self._send_lock = trio.Lock()
        self._receiving = False
        self._closed = False
        #: The read receive() waits in, cancelled by reset(): libp2p's Yamux does not wake a
        #: reader of a stream reset on this side (docs/libp2p.md L93).
        self._read_scope: trio.CancelScope | None = None

    @property
    def max_frame_bytes(self) -> int:
        return self._decoder.max_frame_bytes

    async def send(self, frames: Sequence[bytes]) -> None:
        """Write all frames in ONE stream write (per-write cost dominates: docs/libp2p.md L18).

        Raises TransportError if the stream is closed or reset. If the write is interrupted
        (cancelled or failed), the stream is reset: a half-written batch would desynchronise the
        peer's decoder. So cancelling a `send` costs the stream, never the framing.
        """
        if not frames:
            return
        data = encode_frames(frames, self._decoder.max_frame_bytes)
        async with self._send_lock:
            if self._closed:
                raise TransportError("stream already closed")
            try:
                await self._stream.write(data)
            except BaseException as exc:
                await self._reset_shielded()
                if isinstance(exc, Exception):
                    raise TransportError(self._lost_reason(f"send failed: {exc!r}")) from exc
                raise

    async def receive(self) -> bytes | None:
        """Return exactly one frame, or None at a clean end of stream (peer closed between frames).

        Raises FrameTooLarge (length prefix above the limit, checked before the body is read) or
        DecodeError (malformed prefix; stream ended inside a frame); the stream is reset first.
        Raises TransportError if the stream was reset or the connection broke. (On QUIC a remote
        host that shuts down FINs its streams first, so that reads as a clean end; the
        disconnected event follows about 2 s later.)
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            while True:
                try:
                    frame = self._decoder.next_frame()
                except (DecodeError, FrameTooLarge):
                    await self._reset_shielded()
                    raise
                if frame is not None:
                    return frame
                chunk = b""
                self._read_scope = read = trio.CancelScope()
                try:
                    with read:
                        chunk = await self._stream.read(READ_CHUNK_BYTES)
                except StreamEOF:
                    pass
                except StreamReset as exc:
                    raise TransportError(self._lost_reason("stream reset")) from exc
                except Exception as exc:
                    raise TransportError(self._lost_reason(f"stream broke: {exc!r}")) from exc
                if read.cancelled_caught:
                    raise TransportError(self._lost_reason("stream reset on this side"))
                if not chunk and _ended_abnormally(self._stream):
                    raise TransportError(self._lost_reason("stream reset or connection lost"))
                if not chunk:  # EOF: clean only at a frame boundary
                    if self._decoder.buffered:
                        await self._reset_shielded()
                        raise DecodeError("stream ended inside a frame")
                    return None
                self._decoder.feed(chunk)
        finally:
            self._receiving = False
            self._read_scope = None

    async def receive_batch(self, max_frames: int) -> list[bytes]:
        """Wait for one frame, then also return the frames already buffered behind it (up to
        `max_frames` in all) without reading further, so a receiver can process, commit and
        acknowledge a burst as one batch. An empty list means a clean end of stream."""
        first = await self.receive()
        if first is None:
            return []
        frames = [first]
        while len(frames) < max_frames:
            try:
                frame = self._decoder.next_frame()
            except (DecodeError, FrameTooLarge):
                break  # hand over the good frames; the decoder stays poisoned, so the next
                # receive() raises and resets the stream
            if frame is None:
                break
            frames.append(frame)
        return frames

    def __aiter__(self) -> AsyncIterator[bytes]:
        """`async for frame in stream:` until the peer closes cleanly."""
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while (frame := await self.receive()) is not None:
            yield frame

    async def aclose(self) -> None:
        """Finish sending: the peer's `receive` returns None once it has read every frame.

        Idempotent. On Yamux this is a half-close (FIN); on QUIC it closes both directions.
        """
        if self._closed:
            return
        self._closed = True
        try:
            await self._stream.close()
        except Exception:
            log.debug("close of stream to %s failed", self.remote_peer_id, exc_info=True)

    async def reset(self) -> None:
        """Abort the stream in both directions; the peer sees TransportError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._stream.reset()
        except Exception:
            log.debug("reset of stream to %s failed", self.remote_peer_id, exc_info=True)
        finally:
            if self._read_scope is not None:  # a receive() in another task: end it
                self._read_scope.cancel()

    def _lost_reason(self, reason: str) -> str:
        """Name the likely cause when a relayed stream breaks. A circuit relay enforces its time
        and byte caps (and ends circuits when it restarts) by resetting the circuit, which kills
        the whole relayed connection under the stream: the ends see a bare EOF or reset
        (docs/libp2p.md L45). The caller should redial, which may go direct or through a new circuit."""
        if self.relayed and bool(getattr(self._stream.muxed_conn, "is_closed", False)):
            return ("circuit closed by the relay (its time or data limit, or the relay went "
                    f"away): {reason}")
        return reason

    async def _reset_shielded(self) -> None:
        with trio.move_on_after(RESET_TIMEOUT_SECONDS) as scope:
            scope.shield = True
            await self.reset()

    def __repr__(self) -> str:
        return f"<FrameStream {self.protocol} peer={self.remote_peer_id} addr={self.remote_addr}>"


# --- connection events -------------------------------------------------------------------------


class _StreamAdmission:
    """The slots of one protocol's inbound streams under its StreamCaps."""

    def __init__(self, protocol: str, caps: StreamCaps,
                 is_member: Callable[[FrameStream], bool] | None) -> None:
        self.protocol = protocol
        self.is_member = is_member
        self.all = Slots(SlotCaps(per_peer=caps.per_peer, per_address=caps.total,
                                  total=caps.total))
        self.strangers = Slots(SlotCaps(per_peer=caps.per_peer, per_address=caps.per_address,
                                        total=caps.strangers))
        self.refused = 0

    def acquire(self, stream: FrameStream) -> bool | None:
        """False: refused. Otherwise whether the stream took a stranger's slot (True) or not
        (None), to hand back to `release`."""
        peer, address = stream.remote_peer_id, address_key(stream.remote_addr)
        member = False
        if self.is_member is not None:
            try:
                member = self.is_member(stream)
            except Exception:
                log.exception("is_member failed for a stream on %s", self.protocol)
        refused = self.all.refusal(peer, address)
        if refused is None and not member:
            refused = self.strangers.acquire(peer, address)
        if refused is not None:
            self.refused += 1
            log.info("refusing a stream on %s from %s: its %s cap is reached (%s)",
                     self.protocol, peer, refused, "member" if member else "stranger")
            return False
        self.all.acquire(peer, address)
        return None if member else True

    def release(self, stream: FrameStream, *, stranger: bool) -> None:
        peer, address = stream.remote_peer_id, address_key(stream.remote_addr)
        self.all.release(peer, address)
        if stranger:
            self.strangers.release(peer, address)


class _ConnectionWatcher(INotifee):
    """Turns libp2p's per-connection notifications into per-peer online/offline edges.

    The swarm calls `connected` after a connection is registered and `disconnected` after it is
    removed, awaiting every notifee inline (so this must not block). A peer may have several
    connections (simultaneous dials, several transports), and a deduplicated wrapper of an
    already-registered connection is closed (and reported "disconnected") without ever having
    been reported "connected" (docs/libp2p.md L11). Counting the connections we saw open
    gives exactly one True when a peer comes online and one False when its last connection goes.
    """

    def __init__(self) -> None:
        self.open_conns: dict[str, set[int]] = {}
        self.callbacks: list[ConnectionCallback] = []

    def _fire(self, peer_id: str, connected: bool) -> None:
        log.debug("peer %s %s", peer_id, "connected" if connected else "disconnected")
        for callback in list(self.callbacks):
            try:
                callback(peer_id, connected)
            except Exception:
                log.exception("connection callback failed")

    async def connected(self, network: Any, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id.to_base58()
        conns = self.open_conns.setdefault(peer_id, set())
        first = not conns
        conns.add(id(conn))
        if first:
            self._fire(peer_id, True)

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id.to_base58()
        conns = self.open_conns.get(peer_id)
        if not conns or id(conn) not in conns:
            return
        conns.discard(id(conn))
        if not conns:
            del self.open_conns[peer_id]
            self._fire(peer_id, False)

    async def opened_stream(self, network: Any, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: Any, stream: INetStream) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


# --- the host ----------------------------------------------------------------------------------


class _NoAutoConnect(AutoConnector):
    """libp2p's AutoConnector dials every peer in the peerstore (anyone we ever connected to or
    learned from identify) until it holds ~200 connections (docs/libp2p.md L8). A messenger must
    connect only to whom it means to: it would leak who we know and keep contacts "online".
    """

    async def maybe_connect(self) -> None:
        return None


def _is_quic(maddr: multiaddr.Multiaddr) -> bool:
    return any(p.name in ("quic", "quic-v1") for p in maddr.protocols())


class _FullPeekStream(PeekableStream):
    """libp2p's PeekableStream whose first read returns all the bytes asked for (or fewer only
    at the end of the stream).

    With TCP and WebSocket on one port, `PortDemultiplexer._classify_and_route`
    (transport/cmux.py) classifies a connection by its first 3 bytes but reads them with ONE
    `receive_some(3)`, which returns whatever arrived: a first segment of 1 or 2 bytes made the
    connection "unknown", and it was closed before the handshake (docs/libp2p.md L55). go-libp2p
    reads exactly 3 bytes (io.ReadFull). The demultiplexer bounds that read with its own
    timeout (`_IDENTIFY_TIMEOUT`)."""

    _first_read_done = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await super().receive_some(max_bytes)
        if self._first_read_done:
            return data
        self._first_read_done = True
        while data and max_bytes is not None and len(data) < max_bytes:
            more = await super().receive_some(max_bytes - len(data))
            if not more:
                break
            data += more
        return data


# docs/libp2p.md L55: the demultiplexer builds its PeekableStream by this module-level name.
libp2p_cmux.PeekableStream = _FullPeekStream  # type: ignore[attr-defined]


class _Advertised:
    """The addresses the host reports to peers (identify's listen addresses, DCUtR's fallback).

    libp2p 0.8.1 reports its listeners as bound, so a host listening on 0.0.0.0 told every peer
    to dial /ip4/0.0.0.0/...: the peer then connected to itself or failed the handshake
    (docs/libp2p.md L53). Each unspecified address becomes one per interface (`dialable`).

    libp2p asks twice for every connection's identify (the listen addresses, then again for the
    signed peer record), and listing the interfaces costs ~2 ms of CPU: a churn of connections
    from strangers paid it on every one (docs/libp2p.md L90). The answer is kept for
    `REUSE_SECONDS` of trio's clock (the node's one clock), so an interface that comes or goes
    is advertised within that long."""

    REUSE_SECONDS = 10.0

    def __init__(self) -> None:
        self._key: tuple[str, ...] | None = None
        self._value: list[multiaddr.Multiaddr] = []
        self._until = 0.0

    def __call__(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        texts = tuple(str(c) for c in candidates)
        try:
            now: float | None = trio.current_time()
        except RuntimeError:  # outside a trio run: nothing to measure reuse against
            now = None
        if now is not None and texts == self._key and now < self._until:
            return list(self._value)
        out: list[multiaddr.Multiaddr] = []
        for text in dialable(list(texts)):
            try:
                out.append(multiaddr.Multiaddr(text))
            except Exception:
                log.debug("not advertising %r", text)
        if now is not None:
            self._key, self._value, self._until = texts, out, now + self.REUSE_SECONDS
        return list(out)


def _check_port_free(maddr: multiaddr.Multiaddr) -> None:
    """Refuse to share a fixed port with another process (or another Pigeon node).

    libp2p 0.8.1 binds its TCP and QUIC listeners with SO_REUSEPORT (for hole punching), so a
    second node on the same port binds without error and the kernel then splits incoming
    connections (or, for QUIC, datagrams) between the two (docs/libp2p.md L7). A trial bind without
    SO_REUSEPORT fails exactly when a listener holds the port. Port 0 is always free.
    """
    protos = {p.name: maddr.value_for_protocol(p.name) for p in maddr.protocols()}
    host = protos.get("ip4") or protos.get("ip6")
    family = socket.AF_INET6 if "ip6" in protos else socket.AF_INET
    if "tcp" in protos:
        kind, port = socket.SOCK_STREAM, int(protos["tcp"])
    elif "udp" in protos:
        kind, port = socket.SOCK_DGRAM, int(protos["udp"])
    else:
        return
    if host is None or port == 0:
        return
    with socket.socket(family, kind) as probe:
        if kind == socket.SOCK_STREAM:
            # TIME_WAIT leftovers of an earlier run must not block a restart; a LISTEN socket
            # still makes this bind fail on Linux. (For UDP, SO_REUSEADDR would allow sharing.)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((str(host), port))
        except OSError as exc:
            raise TransportError(f"cannot listen on {maddr}: {exc.strerror}") from exc


async def _handle_inbound_connection(swarm: Any, handshakes: Slots, read_write_closer: Any,
                                     maddr: multiaddr.Multiaddr) -> None:
    """libp2p's inbound handler, holding its slot only while the connection lives.

    py-libp2p 0.8.1 releases the inbound slot (`Swarm._inbound_limiter`) when the handler
    returns, and after a successful upgrade the handler waits for the whole swarm to stop: every
    connection ever accepted keeps its slot (and its task, and the connection's objects) until
    the host shuts down, so a device refuses every inbound connection after ~250 short ones
    (docs/libp2p.md L13). This does what `Swarm._handle_inbound_connection` does (same slot, same
    connection gate, same upgrade and registration) and then waits for THIS connection to close.
    The handler must stay alive while the connection does: the listener closes the socket when
    the handler returns.

    A TCP or WebSocket connection also takes one of `handshakes` (per remote address and in
    total: HANDSHAKES_PER_ADDRESS, HANDSHAKES_TOTAL) until it is secured and multiplexed, and
    is closed at once when there is none: a flood of connections then gets quick refusals while
    the handshakes admitted finish in time, instead of every one finishing too late
    (docs/libp2p.md L87).
    """
    limiter: trio.CapacityLimiter = swarm._inbound_limiter
    try:
        limiter.acquire_nowait()
    except trio.WouldBlock:
        log.debug("inbound connection cap (%d) reached; refusing a connection",
                  int(limiter.total_tokens))
        with suppress(Exception):
            await read_write_closer.close()
        return
    raw_conn: RawConnection | None = None
    try:
        remote = swarm._build_remote_multiaddr(read_write_closer)
        if remote is not None and not await swarm.connection_gate.is_allowed(remote):
            await read_write_closer.close()
            return
        if isinstance(read_write_closer, IMuxedConn):  # QUIC: already secured and multiplexed
            muxed: IMuxedConn = read_write_closer
            await swarm.add_conn(muxed, direction="inbound")
        else:  # TCP, WebSocket: Noise and Yamux first
            address = address_key(str(remote) if remote is not None else None)
            refused = handshakes.acquire(address, address)
            if refused is not None:
                log.debug("inbound handshakes cap (%s) reached; refusing a connection", refused)
                await read_write_closer.close()
                return
            try:
                raw_conn = RawConnection(read_write_closer, False)
                muxed = await swarm.upgrade_inbound_raw_conn(raw_conn, maddr)
            finally:
                handshakes.release(address, address)
        for conn in list(swarm.connections.get(muxed.peer_id, [])):
            if conn.muxed_conn is muxed:
                await conn.event_closed.wait()
                break
    except Exception as exc:
        log.debug("inbound connection failed: %r", exc)
        with suppress(Exception):
            await (raw_conn if raw_conn is not None else read_write_closer).close()
    finally:
        limiter.release()


def _observed_addr(net_stream: INetStream) -> multiaddr.Multiaddr | None:
    """The peer's address as this connection sees it, with the connection's own transport.

    None on a relayed connection (the socket's far end is the relay, not the peer: libp2p's
    receivers ignore such observations too) and when the transport cannot tell (WebSocket:
    docs/libp2p.md L23)."""
    conn: Any = getattr(net_stream, "swarm_conn", None)
    if conn is None or _conn_relayed(conn):
        return None
    try:
        addrs = conn.get_transport_addresses()
    except Exception:
        return None
    if not addrs:
        return None
    addr = _strip_p2p(multiaddr.Multiaddr(str(addrs[0])))
    text = str(addr)
    if text.endswith("/quic"):
        # aioquic reports the connection as /quic; every Pigeon QUIC listener is QUIC v1
        # (RFC 9000), and the observation must match a listener to be used.
        addr = multiaddr.Multiaddr(text + "-v1")
    return addr


def _identify_handler(host: IHost) -> Callable[[INetStream], Awaitable[None]]:
    """libp2p's identify responder, with the observed address built from the connection.

    libp2p 0.8.1 builds the observed address from the socket's (host, port) and always writes
    /tcp/ (`_remote_address_to_multiaddr` in identity/identify/identify.py): a peer on QUIC
    learned /ip4/<ip>/tcp/<its UDP port>, and DCUtR then had no QUIC address to offer
    (docs/libp2p.md L54). The message is otherwise libp2p's (`_mk_identify_protobuf`), written
    as one varint-prefixed protobuf, as libp2p does."""

    async def handle(net_stream: INetStream) -> None:
        try:
            message = _mk_identify_protobuf(host, _observed_addr(net_stream)).SerializeToString()
            await net_stream.write(encode_uvarint(len(message)) + message)
        except Exception as exc:
            log.debug("identify answer failed: %r", exc)
            with suppress(Exception):
                await net_stream.reset()
            return
        with suppress(Exception):
            await net_stream.close()

    return handle


PEERSTORE_EVICT_TO = 0.9
"""When the peerstore's cap is crossed, evict down to this share of it: one pass over the store
then serves many additions (docs/libp2p.md L79)."""


def _pin_peerstore_entries(host: IHost) -> None:
    """Make the peerstore's size cap spare our own entry and every connected peer's.

    py-libp2p 0.8.1 keeps at most `max_peers` (1,000) peers and evicts address-less entries
    first, oldest first; our own entry (our keys, no addresses) is among the first to go, and
    a host that lost its own public key fails identify on every new connection (docs/libp2p.md
    L14). A connected peer's entry holds the key its connection is checked against. The cap
    bounds the entries of everyone else (disconnected peers): address-less ones go first, then
    the oldest. Connected peers come on top of the cap; their number is bounded by the
    connection limits.

    The library calls this on every address added once the store is over the cap, and a relay
    holding thousands of connections is always over it: a pass over the whole store per
    addition made every new connection cost O(connections) (docs/libp2p.md L79). So a cheap
    count first (our own entry and one per connected peer set aside), and a pass only when
    the others may exceed the cap, evicting them down to PEERSTORE_EVICT_TO of it.
    """
    store: Any = host.get_peerstore()
    own = host.get_id()
    swarm: Any = host.get_network()

    def enforce_peer_limit() -> None:
        data = store.peer_data_map
        if len(data) - len(swarm.connections) - 1 <= store.max_peers:
            return
        pinned = {own, *swarm.connections.keys()}
        candidates = [(pid, entry) for pid, entry in data.items() if pid not in pinned]
        if len(candidates) <= store.max_peers:
            return
        keep = int(store.max_peers * PEERSTORE_EVICT_TO)
        # Stable sort: address-less entries first, then by age (insertion order).
        candidates.sort(key=lambda item: bool(item[1].get_addrs()))
        for pid, _ in candidates[: len(candidates) - keep]:
            store.peer_record_map.pop(pid, None)
            del data[pid]

    store._enforce_peer_limit = enforce_peer_limit


def _index_service_tasks(manager: Any) -> None:
    """Make the swarm's service manager find a task's parent by lookup, not by a tree walk.

    py-libp2p 0.8.1's `TrioManager.run_task` looks for the calling task's `FunctionTask` by
    walking every task the manager runs (`_find_parent_task`); the swarm starts two such tasks
    per connection, each running for the connection's life, so a host holding n connections
    walked ~6n tasks for every new one, and our inbound handler is not a manager task, so every
    walk ran to the end (docs/libp2p.md L78). This indexes the manager's tasks by their trio
    task as they start and drops them as they end; the answer is the same `FunctionTask` (or
    None) the walk gave. Tasks that existed before the index are looked up among themselves.
    """
    index: dict[trio.lowlevel.Task, FunctionTask] = {}
    earlier = list(FunctionTask.iterate_tasks(*manager._root_tasks))
    run_and_manage = manager._run_and_manage_task

    async def run_and_manage_indexed(task: Any) -> None:
        me = trio.lowlevel.current_task()
        if isinstance(task, FunctionTask):
            index[me] = task
        try:
            await run_and_manage(task)
        finally:
            index.pop(me, None)

    def find_parent_task(trio_task: trio.lowlevel.Task) -> FunctionTask | None:
        task = index.get(trio_task)
        if task is not None:
            return task
        for early in earlier:
            if early.has_trio_task and early.trio_task is trio_task and not early.is_done:
                return early
        return None

    manager._run_and_manage_task = run_and_manage_indexed
    manager._find_parent_task = find_parent_task


async def _close_connections(host: IHost) -> None:
    """Close every connection concurrently: `host.close()` closes them one by one, ~200 ms each
    (docs/libp2p.md L10), which for a relay with hundreds of clients would
    outlast any shutdown budget. Best effort within CLOSE_CONNECTIONS_SECONDS."""
    swarm: Any = host.get_network()
    conns = [c for group in list(swarm.connections.values())
             for c in (group if isinstance(group, list) else [group])]
    if not conns:
        return

    async def close(conn: Any) -> None:
        try:
            await conn.close()
        except Exception:
            log.debug("closing a connection failed", exc_info=True)

    with trio.move_on_after(CLOSE_CONNECTIONS_SECONDS):
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(close, conn)


def _strip_p2p(maddr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    try:
        value = maddr.value_for_protocol("p2p")
    except Exception:
        value = None
    if value:
        return maddr.decapsulate(multiaddr.Multiaddr(f"/p2p/{value}"))
    return maddr


class Transport:
    """Owns one libp2p host: TCP, QUIC and WebSocket listeners, Noise only, Yamux.

    Create it with `async with Transport.open(seed, listen) as t:`; leaving the block closes the
    listeners and every connection and waits for libp2p's tasks (docs/libp2p.md L3, L4).

    Security: TCP and WebSocket connections offer Noise only (docs/libp2p.md L5: the default list also
    offers secio and plaintext); QUIC has its own TLS 1.3 handshake with the libp2p certificate
    extension, which authenticates the same Ed25519 peer id. Yamux is the only muxer offered.

    The host can dial only the transports it listens on (libp2p 0.8.1 builds the transport list
    from the listen addresses: docs/libp2p.md L6), so a node should listen on every kind it wants to
    dial, if only on loopback.
    """

    def __init__(self, host: IHost, listen: Sequence[multiaddr.Multiaddr], max_frame_bytes: int):
        self._host = host
        self._listen = list(listen)
        self._max_frame_bytes = max_frame_bytes
        self._watcher = _ConnectionWatcher()
        self._dials: dict[str, trio.Event] = {}
        self._circuit: CircuitClient | None = None  # set while open() runs
        self.peer_id: str = host.get_id().to_base58()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        device_seed: bytes,
        listen: Sequence[str],
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        circuit_relay: CircuitRelayLimits | None = None,
        max_connections: int | None = None,
        dcutr: bool = True,
        clock: Clock | None = None,
    ) -> AsyncIterator[Transport]:
        """Start a host with the Ed25519 key from `device_seed` listening on `listen`.

        `listen` holds multiaddrs such as /ip4/127.0.0.1/tcp/0, /ip4/127.0.0.1/udp/0/quic-v1 and
        /ip4/127.0.0.1/tcp/0/ws (any subset). A /tcp/0 and a /tcp/0/ws on the same IP share one
        port (libp2p demultiplexes them). Raises TransportError if any address cannot be bound.

        `circuit_relay`: also serve circuit relay v2 HOP (CIRCUIT_HOP_PROTOCOL) with these limits,
        so peers behind NATs can reserve a slot and be dialed through this host (relay service).
        Every host serves circuit relay STOP (accepts relayed connections), so it can be reached
        through a relay it holds a reservation on (`reserve`).

        `dcutr`: after this host dialed a peer through a relay, try to get a direct connection
        (DCUtR) and close the relayed one once it exists; the host also answers the DCUtR
        requests of peers that dialed it through a relay. False: relayed stays relayed.

        `max_connections`: accept up to this many connections (a service). By default libp2p
        0.8.1 accepts only 250 inbound connections (max_connections 300 minus min_connections
        50, held back for its auto-connector: the 251st client fails with "failed to negotiate
        the secure protocol"), and its resource manager then denies established inbound
        connections beyond 256 (docs/libp2p.md L12).

        `clock`: the Unix time that circuit relay reservations' expiries are read against (the
        node's or relay's one clock; trio's by default).
        """
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if len(device_seed) != 32:
            raise ValueError("device_seed must be 32 bytes")
        if not 0 < max_frame_bytes <= _MAX_ENCODABLE_FRAME:
            raise ValueError(f"max_frame_bytes must be within 1..{_MAX_ENCODABLE_FRAME}")
        if not listen:
            raise ValueError("listen needs at least one multiaddr")
        try:
            maddrs = [multiaddr.Multiaddr(a) for a in listen]
        except Exception as exc:
            raise ValueError(f"bad listen address in {list(listen)!r}: {exc}") from exc

        for maddr in maddrs:
            _check_port_free(maddr)
        key_pair = ed25519_key_pair(bytes(device_seed))
        # docs/libp2p.md L1: one connection per peer, so a dial does not wait 250 ms for a second one.
        connection_config = ConnectionConfig(max_connections_per_peer=1)
        resource_manager = None
        if max_connections is not None:
            # No connections held back for the auto-connector (disabled below) and no pruning
            # below the cap; the resource manager's own caps raised to match.
            connection_config = ConnectionConfig(
                max_connections_per_peer=1, max_connections=max_connections, min_connections=0,
                low_watermark=0, high_watermark=max_connections)
            resource_manager = new_resource_manager(
                limits=ResourceLimits(max_connections=max_connections,
                                      max_streams=max(10_000, 8 * max_connections)),
                connection_limits=ConnectionLimits(
                    max_pending_inbound=64,  # handshakes in progress: libp2p's default pacing
                    max_pending_outbound=64,
                    max_established_inbound=max_connections,
                    max_established_outbound=256,
                    max_established_per_peer=8,
                    max_established_total=max_connections + 256,
                ))
        quic_config: QUICTransportConfig | None = None
        if any(_is_quic(m) for m in maddrs):
            # docs/libp2p.md L24: a QUIC stream read with no data for STREAM_READ_TIMEOUT (30 s) fails and
            # RESETS the stream, which kills long-lived idle streams. trio cancellation bounds our
            # reads instead.
            quic_config = QUICTransportConfig(STREAM_READ_TIMEOUT=math.inf)
        use_half_window_updates()  # docs/libp2p.md L92: far fewer frames per request
        host = new_host(
            key_pair=key_pair,
            # docs/libp2p.md L5: Noise only. A fresh X25519 Noise static key per run, as libp2p does.
            sec_opt={
                NOISE_PROTOCOL_ID: NoiseTransport(
                    key_pair, noise_privkey=x25519_key_pair().private_key
                )
            },
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=maddrs,
            connection_config=connection_config,
            # enable_quic only with a QUIC address: with none, 0.8.1 would replace every other
            # transport by QUIC. It is needed to pass quic_transport_opt at all.
            enable_quic=quic_config is not None,
            quic_transport_opt=quic_config,
            resource_manager=resource_manager,
            # What identify and DCUtR tell peers: never an unspecified address
            # (docs/libp2p.md L53).
            addrs_factory=_Advertised(),
        )
        # Pigeon's delivery engine owns retries and backoff; libp2p's own (3 retries with
        # backoff per address) would only stretch a failing dial past the caller's timeout.
        swarm: Any = host.get_network()
        swarm.retry_config = RetryConfig(max_retries=0)
        # Replaced before run(): its first round runs while run() is still binding listeners.
        swarm.auto_connector = _NoAutoConnect(swarm, swarm.connection_config.auto_connect_interval)
        # docs/libp2p.md L54: identify reports a QUIC peer's observed address as QUIC.
        host.set_stream_handler(IDENTIFY_PROTOCOL, _identify_handler(host))
        # docs/libp2p.md L13: an inbound slot is held only while its connection lives.
        # docs/libp2p.md L87: handshakes in progress are capped per address and in total.
        swarm._handle_inbound_connection = functools.partial(
            _handle_inbound_connection, swarm,
            Slots(SlotCaps(per_peer=HANDSHAKES_PER_ADDRESS, per_address=HANDSHAKES_PER_ADDRESS,
                           total=HANDSHAKES_TOTAL)))
        # docs/libp2p.md L14: the peerstore's cap never evicts our own key or a connected peer.
        _pin_peerstore_entries(host)
        transport = cls(host, maddrs, max_frame_bytes)
        swarm.register_notifee(transport._watcher)

        # docs/libp2p.md L3, L4: run() entered and left here, in this task's cancel scope; host.close() is
        # the last thing inside run() (leaving run() alone does not close the TCP listener).
        body_error: BaseException | None = None
        try:
            async with host.run(listen_addrs=maddrs):
                # docs/libp2p.md L78: a new connection costs no walk over every task.
                _index_service_tasks(swarm.manager)
                try:
                    listeners = host.get_network().listeners
                    missing = [str(m) for m in maddrs if str(m) not in listeners]
                    if missing:
                        raise TransportError(f"could not listen on {missing}")
                    log.info("listening on %s", transport.listen_addrs())
                    async with open_circuit(host, hop=circuit_relay, dcutr=dcutr,
                                            dial_direct=transport._dial_direct,
                                            clock=clock or TrioClock()) as circuit:
                        transport._circuit = circuit
                        unhook = transport.on_connection_change(circuit.on_connection_change)
                        try:
                            yield transport
                        except BaseException as exc:
                            body_error = exc
                            raise
                        finally:
                            unhook()
                            transport._circuit = None
                except BaseException as exc:
                    if body_error is None:
                        body_error = exc
                    raise
                finally:
                    with trio.CancelScope(shield=True) as cs:
                        cs.deadline = trio.current_time() + CLOSE_TIMEOUT_SECONDS
                        await _close_connections(host)
                        await host.close()
                    if cs.cancelled_caught:
                        log.warning("libp2p host did not close within %ss", CLOSE_TIMEOUT_SECONDS)
        except BaseExceptionGroup as group:
            # libp2p's nurseries wrap whatever the body raised in (nested) exception groups
            # (docs/libp2p.md L17). Give the caller back its own exception when it is all there is.
            if body_error is None or group.split(lambda e: e is body_error)[1] is not None:
                raise
        if body_error is not None:
            raise body_error

    # -- addresses and handlers --

    def listen_addrs(self) -> list[str]:
        """Bound addresses (real ports), each ending in /p2p/<our peer id>, in `listen` order."""
        listeners = self._host.get_network().listeners
        out: list[str] = []
        for requested in self._listen:
            listener = listeners.get(str(requested))
            if listener is None:
                continue
            for addr in listener.get_addrs():
                out.append(f"{_strip_p2p(addr)}/p2p/{self.peer_id}")
        return out

    def set_stream_handler(self, protocol: str, handler: StreamHandler, *,
                           max_frame_bytes: int | None = None, caps: StreamCaps | None = None,
                           is_member: Callable[[FrameStream], bool] | None = None) -> None:
        """Run `handler(stream)` in a new task for each inbound stream negotiated on `protocol`.

        The stream is closed when the handler returns, and reset if it raises. An exception from
        the handler is logged, never propagated: in libp2p it would tear down the whole
        connection, every other stream of that peer included (docs/libp2p.md L16).

        `max_frame_bytes` overrides the transport's frame limit for this protocol's streams.
        `caps` bounds the streams open at once (StreamCaps); `is_member(stream)` says whether
        its peer is one we know (not a stranger), read once when the stream arrives.
        """
        if max_frame_bytes is None:
            max_frame_bytes = self._max_frame_bytes
        elif not 0 < max_frame_bytes <= _MAX_ENCODABLE_FRAME:
            raise ValueError(f"max_frame_bytes must be within 1..{_MAX_ENCODABLE_FRAME}")
        admit = _StreamAdmission(protocol, caps, is_member) if caps is not None else None

        async def on_stream(net_stream: INetStream) -> None:
            try:
                stream = FrameStream(net_stream, max_frame_bytes)
            except TransportError as exc:
                log.info("refusing stream on %s: %s", protocol, exc)
                await net_stream.reset()
                return
            held = admit.acquire(stream) if admit is not None else None
            if held is False:
                await stream.reset()
                return
            try:
                await handler(stream)
            except RemoteError as exc:  # the peer's fault or a broken link: no traceback
                log.info("stream %r ended: %s: %s", stream, type(exc).__name__, exc)
                await stream.reset()
            except Exception:
                log.exception("handler for %s failed on %r", protocol, stream)
                await stream.reset()
            else:
                await stream.aclose()
            finally:
                if admit is not None:
                    admit.release(stream, stranger=bool(held))

        self._host.set_stream_handler(protocol, on_stream)  # type: ignore[arg-type]

    def remove_stream_handler(self, protocol: str) -> None:
        """Stop accepting new streams on `protocol` (peers then get TransportError)."""

        async def refuse(net_stream: INetStream) -> None:
            await net_stream.reset()

        # Replaced, not deleted: a stream negotiating `protocol` right now would look the
        # handler up after deletion and take the host down (docs/libp2p.md L75).
        self._host.set_stream_handler(protocol, refuse)  # type: ignore[arg-type]

    # -- connections --

    def is_connected(self, peer_id: str) -> bool:
        """True between the connected and disconnected events of `on_connection_change`."""
        return peer_id in self._watcher.open_conns

    def connection_relayed(self, peer_id: str) -> bool:
        """Whether every live connection to `peer_id` goes through a circuit relay."""
        try:
            conns = [c for c in self._host.get_network().get_connections(_parse_peer_id(peer_id))
                     if not c.is_closed]
        except DecodeError:
            return False
        relayed = []
        for conn in conns:
            try:
                kind = conn.get_connection_type()
            except Exception:
                kind = None
            relayed.append(kind == ConnectionType.RELAYED)
        return bool(relayed) and all(relayed)

    def connected_peers(self) -> list[str]:
        return list(self._watcher.open_conns)

    def on_connection_change(self, callback: ConnectionCallback) -> Callable[[], None]:
        """Call `callback(peer_id, connected)` when a peer's first connection opens (True) or its
        last one closes (False). Returns a function that unsubscribes.

        The callback runs inside libp2p's connection bookkeeping: it must not block. Hand events
        to a task with `trio.MemorySendChannel.send_nowait`. Exceptions are logged and dropped.
        """
        self._watcher.callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._watcher.callbacks:
                self._watcher.callbacks.remove(callback)

        return unsubscribe

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to `peer_id` (its open streams are reset). Returns after the
        disconnected event has been delivered."""
        if self._circuit is not None:
            self._circuit.forget(peer_id)  # a deliberate close: no circuit renewal
        try:
            await self._host.disconnect(_parse_peer_id(peer_id))
        except DecodeError:
            raise
        except Exception as exc:
            raise TransportError(f"disconnect from {peer_id} failed: {exc!r}") from exc

    async def ping(self, peer_id: str, *, timeout: float) -> None:
        """One keepalive round trip to `peer_id` over the connection that exists (never dials),
        on libp2p's ping protocol (docs/libp2p.md L56). Raises TransportError when there is no
        connection, the ping fails, or no echo came within `timeout` seconds: the path is dead."""
        pid = _parse_peer_id(peer_id)
        if not self._has_live_connection(pid):
            raise TransportError(f"no connection to {peer_id} to ping")
        payload = secrets.token_bytes(PING_BYTES)
        net_stream: INetStream | None = None
        with trio.move_on_after(timeout):
            try:
                net_stream = await self._host.new_stream(pid, [PING_PROTOCOL])  # type: ignore[list-item]
                await net_stream.write(payload)
                echo = b""
                while len(echo) < PING_BYTES:
                    chunk = await net_stream.read(PING_BYTES - len(echo))
                    if not chunk:
                        raise TransportError("ping stream ended")
                    echo += chunk
            except Exception as exc:
                await self._abort_ping(net_stream)
                raise TransportError(f"ping to {peer_id} failed: {exc or type(exc).__name__}") from exc
            if echo != payload:
                await self._abort_ping(net_stream)
                raise TransportError(f"ping to {peer_id}: wrong echo")
            with trio.move_on_after(RESET_TIMEOUT_SECONDS) as scope:
                scope.shield = True
                await net_stream.close()
            return
        await self._abort_ping(net_stream)
        raise TransportError(f"no answer to a ping within {timeout:g} s")

    @staticmethod
    async def _abort_ping(net_stream: INetStream | None) -> None:
        if net_stream is None:
            return
        with trio.move_on_after(RESET_TIMEOUT_SECONDS) as scope:
            scope.shield = True
            try:
                await net_stream.reset()
            except Exception:
                log.debug("reset of a ping stream failed", exc_info=True)

    async def open_stream(
        self, peer_id: str, addrs: Sequence[str], protocol: str, *, timeout: float,
        max_frame_bytes: int | None = None,
    ) -> FrameStream:
        """Open a stream to `peer_id` on `protocol`, connecting first if needed.

        `addrs` are multiaddrs, with or without /p2p/...; relayed ones
        (`<relay addr>/p2p/<relay id>/p2p-circuit[/p2p/<peer id>]`) are dialed through that relay
        (circuit relay v2). Direct addresses are dialed first, in the given order, then the
        relayed ones; the next one is started when the previous fails or after
        DIAL_STAGGER_SECONDS, and the first to complete the Noise handshake as `peer_id` wins.
        Any /p2p/ component naming the destination is replaced by `peer_id`, so a stale address
        that now belongs to another device fails the handshake (through a relay too: the relay
        passes bytes, Noise authenticates the ends). An existing connection, direct or relayed,
        is used as is; `FrameStream.relayed` tells which. After a relayed dial the transport
        tries to upgrade to a direct connection in the background (`dcutr`).
        Raises TransportError on failure, a refused protocol, or after `timeout` seconds.
        `max_frame_bytes` overrides the transport's frame limit for this stream.
        """
        pid = _parse_peer_id(peer_id)
        if peer_id == self.peer_id:
            raise TransportError("cannot open a stream to ourselves")
        if max_frame_bytes is None:
            max_frame_bytes = self._max_frame_bytes
        elif not 0 < max_frame_bytes <= _MAX_ENCODABLE_FRAME:
            raise ValueError(f"max_frame_bytes must be within 1..{_MAX_ENCODABLE_FRAME}")
        with trio.move_on_after(timeout) as cs:
            try:
                if not self._has_live_connection(pid):
                    await self._connect(peer_id, pid, addrs)
                net_stream = await self._host.new_stream(pid, [protocol])  # type: ignore[list-item]
            except TransportError:
                raise
            except Exception as exc:
                raise TransportError(f"stream to {peer_id} on {protocol} failed: {exc!r}") from exc
            try:
                return FrameStream(net_stream, max_frame_bytes)
            except TransportError:
                with trio.CancelScope(shield=True):
                    await net_stream.reset()
                raise
        assert cs.cancelled_caught
        raise TransportError(f"no stream to {peer_id} on {protocol} within {timeout}s")

    async def connect(self, peer_id: str, addrs: Sequence[str], *, timeout: float) -> None:
        """Make sure a connection to `peer_id` exists (no stream is opened): both sides then get
        the connected event. `addrs` as for `open_stream` (relayed addresses included, dialed
        after the direct ones). TransportError on failure or after `timeout` seconds."""
        pid = _parse_peer_id(peer_id)
        if peer_id == self.peer_id:
            raise TransportError("cannot connect to ourselves")
        with trio.move_on_after(timeout):
            if not self._has_live_connection(pid):
                await self._connect(peer_id, pid, addrs)
            return
        raise TransportError(f"no connection to {peer_id} within {timeout}s")

    # -- circuit relay: reservations --

    async def reserve(self, relay_addr: str, *, timeout: float = 10.0) -> list[str]:
        """Reserve a slot on the relay at `relay_addr` (a multiaddr ending in /p2p/<relay id>,
        serving circuit relay v2 HOP) and return the relayed addresses to advertise:
        `<relay addr>/p2p/<relay id>/p2p-circuit/p2p/<our id>`, the one built from `relay_addr`
        first, then those built from the relay's other reported addresses.

        Connects to the relay first (directly; a reservation over a relayed connection is
        refused by the spec). The reservation is refreshed in the background before it expires;
        it is lost when the connection to the relay closes, or when a refresh is refused or keeps
        failing until expiry: `on_reservation_lost` callbacks are then called, and the node
        should reserve again (on this relay or another) and advertise the new addresses.
        Reserving again on the same relay refreshes the reservation. Raises TransportError
        (unreachable relay, refused: no HOP, limit reached) or ValueError (bad address).
        """
        try:
            maddr = multiaddr.Multiaddr(relay_addr)
        except Exception as exc:
            raise ValueError(f"bad relay address {relay_addr!r}: {exc}") from exc
        if is_circuit_address(maddr):
            raise ValueError(f"reserve through a relay's own address, not a relayed one: {relay_addr}")
        names = [p.name for p in maddr.protocols()]
        if names.count("p2p") != 1 or names[-1] != "p2p":
            raise ValueError(f"the relay address must end in /p2p/<relay peer id>: {relay_addr}")
        relay_id = str(maddr.value_for_protocol("p2p"))
        relay_pid = _parse_peer_id(relay_id)
        if relay_id == self.peer_id:
            raise ValueError("cannot reserve a slot on ourselves")
        circuit = self._circuit_client()
        with trio.move_on_after(timeout):
            if not any(not c.is_closed and not _conn_relayed(c)
                       for c in self._host.get_network().get_connections(relay_pid)):
                await self._connect(relay_id, relay_pid, [relay_addr])
            reservation = await circuit.reserve(relay_pid, str(maddr))
            return list(reservation.addrs)
        raise TransportError(f"no reservation on relay {relay_id} within {timeout}s")

    def reservations(self) -> list[Reservation]:
        """The reservations currently held (refreshed in the background)."""
        return self._circuit_client().reservations()

    def reservation(self, relay_peer_id: str) -> Reservation | None:
        """The reservation held on `relay_peer_id`, if any."""
        return self._circuit_client().reservation(relay_peer_id)

    def on_reservation_lost(self, callback: ReservationLostCallback) -> Callable[[], None]:
        """Call `callback(relay_peer_id, reason)` when a reservation is lost: the connection to
        the relay closed (the relay restarted, the network changed), or a refresh was refused or
        kept failing until the reservation expired. Not called for `drop_reservation` nor at
        shutdown. The callback must not block (as for `on_connection_change`). Returns a
        function that unsubscribes."""
        return self._circuit_client().on_reservation_lost(callback)

    def drop_reservation(self, relay_peer_id: str) -> None:
        """Stop refreshing the reservation on `relay_peer_id`. Circuit relay v2 has no cancel
        message: the relay frees the slot when it expires or when we disconnect from it."""
        self._circuit_client().drop_reservation(relay_peer_id)

    def hop_reservations(self) -> int:
        """As a relay (`circuit_relay`): how many peers hold a reservation here (0 otherwise)."""
        return self._circuit_client().hop_reservations()

    def prioritize_reservations(self, is_member: ReservationPriority) -> None:
        """As a relay (`circuit_relay`): `is_member(peer_id)` says which peers are this relay's
        own users; their reservations come before strangers', who share a smaller pool capped
        per address (`CircuitRelayLimits`). Without it every peer is a stranger."""
        self._circuit_client().prioritize_reservations(is_member)

    def _circuit_client(self) -> CircuitClient:
        if self._circuit is None:
            raise TransportError("transport is not running")
        return self._circuit

    # -- dialing --

    def _has_live_connection(self, pid: ID) -> bool:
        return any(not c.is_closed for c in self._host.get_network().get_connections(pid))

    async def _connect(self, peer_id: str, pid: ID, addrs: Sequence[str]) -> None:
        # Concurrent open_stream calls to one peer share a single dial.
        while (pending := self._dials.get(peer_id)) is not None:
            await pending.wait()
            if self._has_live_connection(pid):
                return
        done = self._dials[peer_id] = trio.Event()
        try:
            await self._dial_staggered(peer_id, pid, addrs)
        finally:
            del self._dials[peer_id]
            done.set()

    async def _dial_direct(self, pid: ID, addrs: Sequence[str]) -> None:
        """A fresh direct dial even while a (relayed) connection exists: the DCUtR upgrade."""
        # A hole punch: a NAT may answer the punched TCP SYN with a reset while the QUIC
        # punch gets through, so a refusal says nothing about QUIC here.
        await self._dial_staggered(pid.to_base58(), pid,
                                   [a for a in addrs if not is_circuit_address(a)],
                                   refusal_ends_quic=False)

    async def _dial_staggered(self, peer_id: str, pid: ID, addrs: Sequence[str], *,
                              refusal_ends_quic: bool = True) -> None:
        # swarm.dial_addr on the caller's addresses, not host.connect(): connect() dials whatever
        # the peerstore has accumulated (older addresses included, ranked QUIC > TCP > WS, loopback
        # dropped when any other address is known), a peer that failed once is refused for 60 s
        # by a negative cache, and it drops /p2p-circuit addresses (docs/libp2p.md L9).
        direct: list[multiaddr.Multiaddr] = []
        relayed: list[tuple[multiaddr.Multiaddr, ID]] = []
        for text in addrs:
            try:
                if is_circuit_address(text):
                    relay_maddr, relay_pid = split_circuit_address(text)
                    if relay_pid in (pid, self._host.get_id()):
                        raise ValueError("the relay is the peer itself, or us")
                    relayed.append((relay_maddr, relay_pid))
                else:
                    maddr = _strip_p2p(multiaddr.Multiaddr(text))
                    direct.append(maddr.encapsulate(multiaddr.Multiaddr(f"/p2p/{pid}")))
            except Exception:
                log.debug("skipping unparsable address %r for %s", text, peer_id)
        if not direct and not relayed:
            raise TransportError(f"no usable address for {peer_id}")
        swarm: Any = self._host.get_network()
        errors: list[str] = []
        connected = False

        # docs/libp2p.md L91: a host that refused TCP is not listening on QUIC either, and a
        # QUIC dial to a closed port would only time out.
        refused_hosts: set[str] = set()
        quic_dials: dict[str, list[trio.CancelScope]] = {}

        async def dial(maddr: multiaddr.Multiaddr, failed: trio.Event) -> None:
            nonlocal connected
            ip = _ip_of(maddr)
            quic = refusal_ends_quic and ip is not None and _is_quic(maddr)
            ended = f"{_strip_p2p(maddr)}: not tried further: TCP refused on the same host"
            if quic and ip in refused_hosts:
                errors.append(ended)
                failed.set()
                return
            with trio.CancelScope() as scope:
                if quic and ip is not None:
                    quic_dials.setdefault(ip, []).append(scope)
                try:
                    await swarm.dial_addr(maddr, pid)
                except Exception as exc:
                    cause = exc.__cause__ or exc
                    log.debug("dial %s failed: %r", maddr, cause)
                    errors.append(f"{_strip_p2p(maddr)}: {_short_reason(cause)}")
                    if not _is_quic(maddr) and ip is not None and _refused(exc):
                        refused_hosts.add(ip)
                        for other in quic_dials.pop(ip, []):
                            other.cancel()
                    failed.set()
                    return
                connected = True
                nursery.cancel_scope.cancel()
            if scope.cancelled_caught and not connected:
                errors.append(ended)
                failed.set()

        async def dial_relayed(relay_maddr: multiaddr.Multiaddr, relay_pid: ID,
                               failed: trio.Event) -> None:
            nonlocal connected
            try:
                # The relay first (directly, shared with any concurrent dial to it), then the
                # circuit through it.
                if not any(not _conn_relayed(c) for c in _live_connections(swarm, relay_pid)):
                    await self._connect(str(relay_pid), relay_pid, [str(relay_maddr)])
                await self._circuit_client().dial(relay_maddr, relay_pid, pid)
            except TransportError as exc:
                log.debug("relayed dial via %s failed: %s", relay_maddr, exc)
                errors.append(f"{relay_maddr}/p2p-circuit: {exc}")
                failed.set()
                return
            connected = True
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            # Direct first, relayed as the fallback: a relay costs its bandwidth and caps, and
            # adds a round trip through it.
            for maddr in direct:
                failed = trio.Event()
                nursery.start_soon(dial, maddr, failed)
                with trio.move_on_after(DIAL_STAGGER_SECONDS):
                    await failed.wait()
            for relay_maddr, relay_pid in relayed:
                failed = trio.Event()
                nursery.start_soon(dial_relayed, relay_maddr, relay_pid, failed)
                with trio.move_on_after(DIAL_STAGGER_SECONDS):
                    await failed.wait()
        if not connected:
            raise TransportError(f"could not connect to {peer_id}: {'; '.join(errors)}")
        circuit = self._circuit
        if circuit is not None and circuit.relayed_connections(pid):
            # Relayed (or a relayed dial won a race with a direct one): try to go direct, and
            # close the relayed connection once a direct one exists.
            circuit.schedule_upgrade(pid, [str(m) for m in direct])


def _live_connections(swarm: Any, pid: ID) -> list[Any]:
    return [c for c in swarm.get_connections(pid) if not c.is_closed]


def _conn_relayed(conn: Any) -> bool:
    try:
        return conn.get_connection_type() == ConnectionType.RELAYED  # type: ignore[no-any-return]
    except Exception:
        return False


def _ip_of(maddr: multiaddr.Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            return str(maddr.value_for_protocol(proto))
        except Exception:
            continue
    return None


def _refused(exc: BaseException) -> bool:
    """Whether a dial failed because the host answered that nothing listens on the port
    (ECONNREFUSED), looking through libp2p's wrapping (causes, contexts, exception groups)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return True
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def _short_reason(exc: BaseException) -> str:
    """A dial failure in a few words for users (libp2p's own messages repeat the address)."""
    text = str(exc)
    for marker, reason in (("all attempts to connect", "connection refused"),
                           ("timed out", "timed out"), ("negotiate", "handshake failed"),
                           ("peer id", "another device answered")):
        if marker in text.lower():
            return reason
    return type(exc).__name__
