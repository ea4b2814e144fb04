"""QUIC hole punching from the listen port (docs/libp2p.md L80).

A NAT in front of a device maps the UDP port that packets leave from; a hole punch reaches the
device only at the mapping of its QUIC listen port (that is the address DCUtR offers). libp2p
0.8.1 dials QUIC from a fresh socket bound to port 0 (`QUICConnection._initiate_connection` in
transport/quic/connection.py) and sprays DCUtR's UDP packets from yet another fresh socket
(`DCUtRProtocol._spam_udp_for_hole_punch` in relay/circuit_v2/dcutr.py), so no packet of the
punch left from the listen port and through two NATs the punch never met.

Here, while a DCUtR hole punch runs (`hole_punching`), a QUIC dial leaves from the QUIC
listener's own socket: the client connection is registered in the listener's connection-id
registry under its own connection id, and the listener's receive loop, which already
demultiplexes datagrams by connection id for its inbound connections, routes the peer's answers
to it. `spray_from_listener` sends DCUtR's UDP spray from the same socket. Every other dial is
left to libp2p.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any

import multiaddr
import trio
from aioquic.quic.connection import QuicConnection as NativeQUICConnection
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.transport.quic.connection import QUICConnection
from libp2p.transport.quic.exceptions import QUICDialError
from libp2p.transport.quic.listener import QUICListener
from libp2p.transport.quic.transport import QUICTransport
from libp2p.transport.quic.utils import multiaddr_to_quic_version, quic_multiaddr_to_endpoint

__all__ = ["hole_punching", "install_listener_dials", "spray_from_listener"]

log = logging.getLogger("pigeon.transport.quic")

_HOLE_PUNCHING: ContextVar[bool] = ContextVar("pigeon_quic_hole_punching", default=False)

SPRAY_BYTES = 8
"""Size of one spray datagram. The datagrams only open the NAT mapping: shorter than any QUIC
packet and without the long-header bit, the peer's listener drops them as unparseable
(`QUICListener.parse_quic_packet` needs 9 bytes for a short header) instead of answering a
random long header with version negotiation or routing a random short one by address."""


@contextlib.contextmanager
def hole_punching() -> Iterator[None]:
    """Within this block (and the tasks started from it), QUIC dials leave from the listen
    port. trio tasks inherit the context of the task that started them, so the dials DCUtR
    starts in its own nurseries see it."""
    token = _HOLE_PUNCHING.set(True)
    try:
        yield
    finally:
        _HOLE_PUNCHING.reset(token)


class _ListenerSocketConnection(QUICConnection):
    """A client QUIC connection that sends from its listener's socket and receives what the
    listener's loop routes to it (by connection id), instead of owning a socket of its own."""

    async def _initiate_connection(self) -> None:
        # Upstream creates and binds a fresh socket here (and fails on a given one: `family`
        # is only set when it creates one); ours is the listener's, already bound.
        self._quic.connect(self._remote_addr, now=time.time())
        await self._transmit()

    async def _client_packet_receiver(self) -> None:
        # The listener's `_handle_incoming_packets` reads the shared socket; a second reader
        # would steal the datagrams of the listener's other connections.
        return None


def _listener_for(transport: QUICTransport, ip: str) -> QUICListener | None:
    """A listening QUIC listener of `ip`'s address family, or None."""
    family = 6 if ":" in ip else 4
    for listener in transport._listeners:
        sock = listener._socket
        if not listener.is_listening() or sock is None:
            continue
        if (6 if sock.family == trio.socket.AF_INET6 else 4) == family:
            return listener
    return None


async def _dial_from_listener(transport: QUICTransport, listener: QUICListener,
                              maddr: multiaddr.Multiaddr) -> QUICConnection:
    """What `QUICTransport.dial` does, with the connection on the listener's socket."""
    host, port = quic_multiaddr_to_endpoint(maddr)
    peer = maddr.get_peer_id()
    if peer is None:
        raise QUICDialError("Unable to derive peer id from multiaddr")
    base = transport._quic_configs.get(TProtocol(f"{multiaddr_to_quic_version(maddr)}_client"))
    nursery = transport._background_nursery
    if base is None or nursery is None or listener._socket is None:
        raise QUICDialError(f"cannot dial {maddr} from the listen port")
    log.debug("hole punch: QUIC dial to %s from the listen port %s", maddr,
              listener._socket.getsockname())
    config = copy.copy(base)
    config.is_client = True
    native = NativeQUICConnection(configuration=config)
    connection = _ListenerSocketConnection(
        quic_connection=native, remote_addr=(host, port), remote_peer_id=ID.from_string(peer),
        local_peer_id=transport._peer_id, is_initiator=True, maddr=maddr, transport=transport,
        security_manager=transport._security_manager, listener_socket=listener._socket,
        listener=listener, listener_connection_id=native.host_cid)
    # Before the first packet leaves: the answer carries our connection id.
    await listener._registry.register_connection(native.host_cid, connection, (host, port))
    try:
        await connection.connect(nursery)
    except BaseException as error:
        with trio.CancelScope(shield=True):
            await listener._remove_connection_by_object(connection)
        if isinstance(error, Exception):
            raise QUICDialError(f"Dial failed: {error}") from error
        raise
    transport._connections[f"{host}:{port}"] = connection
    return connection


def install_listener_dials(host: IHost) -> None:
    """Make the host's QUIC transport (if any) dial from its listen port during a hole punch
    (`hole_punching`); every other dial is libp2p's own."""
    swarm: Any = host.get_network()
    for transport in swarm.transport_manager.get_transports():
        if not isinstance(transport, QUICTransport):
            continue
        upstream: Callable[[multiaddr.Multiaddr], Awaitable[QUICConnection]] = transport.dial

        async def dial(maddr: multiaddr.Multiaddr, transport: QUICTransport = transport,
                       upstream: Callable[[multiaddr.Multiaddr],
                                          Awaitable[QUICConnection]] = upstream
                       ) -> QUICConnection:
            if _HOLE_PUNCHING.get() and not transport._closed:
                listener = _listener_for(transport, quic_multiaddr_to_endpoint(maddr)[0])
                if listener is not None:
                    return await _dial_from_listener(transport, listener, maddr)
            return await upstream(maddr)

        transport.dial = dial  # type: ignore[method-assign]


async def spray_from_listener(host: IHost, ip: str, port: int, stop: trio.Event) -> bool:
    """DCUtR's UDP spray (random datagrams at random 10-200 ms intervals until `stop`) from the
    QUIC listen port towards (ip, port). Returns False at once when there is no QUIC listener
    of that address family (the caller falls back to libp2p's spray)."""
    swarm: Any = host.get_network()
    listener = next((found for t in swarm.transport_manager.get_transports()
                     if isinstance(t, QUICTransport)
                     and (found := _listener_for(t, ip)) is not None), None)
    if listener is None:
        return False
    while not stop.is_set():
        sock = listener._socket
        if sock is None:
            break
        try:
            payload = os.urandom(SPRAY_BYTES)
            await sock.sendto(bytes([payload[0] & 0x7F]) + payload[1:], (ip, port))
        except OSError as error:
            log.debug("QUIC hole-punch spray to %s:%d failed: %s", ip, port, error)
        with trio.move_on_after(random.uniform(0.01, 0.2)):
            await stop.wait()
    return True
