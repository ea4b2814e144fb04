"""The one slot counter, for every cap on what peers may hold at once (streams, reservations,
relayed connections): per peer id, per network address, and in total.

A peer id costs nothing to make, so a cap per peer id alone stops no one: one machine makes
thousands. An address costs more, so the caps that bound a stranger are per address
(`address_key`), with a total on top. Pure: keys are plain strings the shell derives from the
connection, nothing here reads a socket or the clock.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass

__all__ = ["ADDRESS_LIMIT", "PEER_LIMIT", "TOTAL_LIMIT", "UNKNOWN_ADDRESS", "SlotCaps", "Slots",
           "address_key"]

#: What `Slots.acquire` answers when a cap is reached: which one.
PEER_LIMIT = "peer"
ADDRESS_LIMIT = "address"
TOTAL_LIMIT = "total"

#: The address key of connections whose remote address the transport cannot tell (WebSocket in
#: libp2p 0.8.1, docs/libp2p.md L23): they all share one, so not knowing an address never buys
#: a peer a fresh allowance.
UNKNOWN_ADDRESS = "unknown"

#: IPv6 addresses count per /64: one subscriber line usually gets a whole /64 (or more), so
#: counting single IPv6 addresses would let one machine take any number of slots.
IPV6_PREFIX = 64


def address_key(addr: str | None) -> str:
    """The key that the per-address caps count under, from a remote multiaddr as text:
    the IPv4 address, the IPv6 /64 network, `relay:<id>` for a connection through a circuit
    relay (every peer behind one relay shares its key), UNKNOWN_ADDRESS otherwise."""
    if not addr:
        return UNKNOWN_ADDRESS
    if "/p2p-circuit" in addr:
        relay = addr.split("/p2p-circuit", 1)[0].rsplit("/p2p/", 1)
        return f"relay:{relay[1]}" if len(relay) == 2 and relay[1] else UNKNOWN_ADDRESS
    parts = addr.split("/")
    if len(parts) < 3:
        return UNKNOWN_ADDRESS
    try:
        if parts[1] == "ip4":
            return str(ipaddress.IPv4Address(parts[2]))
        if parts[1] == "ip6":
            network = ipaddress.IPv6Network(f"{parts[2].split('%')[0]}/{IPV6_PREFIX}",
                                            strict=False)
            return str(network)
    except ValueError:
        return UNKNOWN_ADDRESS
    return UNKNOWN_ADDRESS


@dataclass(frozen=True, kw_only=True, slots=True)
class SlotCaps:
    """How many slots one peer id, one address key and everyone together may hold."""

    per_peer: int
    per_address: int
    total: int

    def __post_init__(self) -> None:
        if min(self.per_peer, self.per_address, self.total) < 1:
            raise ValueError("slot caps must be at least 1")


class Slots:
    """Slots held, counted by peer id and by address key, admitted under `caps`."""

    __slots__ = ("by_address", "by_peer", "caps", "held")

    def __init__(self, caps: SlotCaps) -> None:
        self.caps = caps
        self.held = 0
        self.by_peer: Counter[str] = Counter()
        self.by_address: Counter[str] = Counter()

    def refusal(self, peer: str, address: str) -> str | None:
        """Which cap one more slot for (`peer`, `address`) would cross, or None."""
        if self.held >= self.caps.total:
            return TOTAL_LIMIT
        if self.by_peer[peer] >= self.caps.per_peer:
            return PEER_LIMIT
        if self.by_address[address] >= self.caps.per_address:
            return ADDRESS_LIMIT
        return None

    def acquire(self, peer: str, address: str) -> str | None:
        """Take a slot: None when taken, else the cap that refused it (nothing taken)."""
        refused = self.refusal(peer, address)
        if refused is None:
            self.held += 1
            self.by_peer[peer] += 1
            self.by_address[address] += 1
        return refused

    def release(self, peer: str, address: str) -> None:
        """Give back a slot taken with the same `peer` and `address`."""
        if self.by_peer[peer] <= 0 or self.by_address[address] <= 0:
            raise ValueError("releasing a slot that was not held")
        self.held -= 1
        for counter, key in ((self.by_peer, peer), (self.by_address, address)):
            counter[key] -= 1
            if counter[key] == 0:
                del counter[key]
