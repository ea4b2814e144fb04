"""The slot counter behind every per-peer and per-address cap (node/protocol/slots.py)."""

from __future__ import annotations

import pytest

from node.protocol.slots import (
    ADDRESS_LIMIT,
    PEER_LIMIT,
    TOTAL_LIMIT,
    UNKNOWN_ADDRESS,
    SlotCaps,
    Slots,
    address_key,
)


def test_address_keys_group_what_one_party_controls() -> None:
    assert address_key("/ip4/192.0.2.7/tcp/4040") == "192.0.2.7"
    assert address_key("/ip4/192.0.2.7/udp/9/quic-v1") == address_key("/ip4/192.0.2.7/tcp/1")
    # Every address of one IPv6 /64 counts as one; the next /64 is another.
    a = address_key("/ip6/2001:db8:1:2::1/tcp/4040")
    assert a == address_key("/ip6/2001:db8:1:2:ffff:1:2:3/udp/5/quic-v1") == "2001:db8:1:2::/64"
    assert address_key("/ip6/2001:db8:1:3::1/tcp/4040") != a
    # Relayed connections count per relay; nothing known shares one key.
    relayed = "/p2p/12D3KooWRelay/p2p-circuit/p2p/12D3KooWPeer"
    assert address_key(relayed) == "relay:12D3KooWRelay"
    for unknown in (None, "", "/dns4/example.org/tcp/1", "/ip4/not-an-ip/tcp/1", "/ip4"):
        assert address_key(unknown) == UNKNOWN_ADDRESS


def test_each_cap_refuses_without_taking_and_release_gives_back() -> None:
    slots = Slots(SlotCaps(per_peer=2, per_address=3, total=5))
    assert [slots.acquire("p1", "a") for _ in range(3)] == [None, None, PEER_LIMIT]
    assert slots.acquire("p2", "a") is None
    assert slots.acquire("p3", "a") == ADDRESS_LIMIT  # three on address a already
    assert [slots.acquire(f"q{i}", "b") for i in range(3)] == [None, None, TOTAL_LIMIT]
    assert (slots.held, slots.by_peer["p1"], slots.by_address["a"]) == (5, 2, 3)
    slots.release("p1", "a")
    assert slots.acquire("p3", "a") is None  # the address has room again
    for peer, address in (("p1", "a"), ("p2", "a"), ("p3", "a"), ("q0", "b"), ("q1", "b")):
        slots.release(peer, address)
    assert (slots.held, dict(slots.by_peer), dict(slots.by_address)) == (0, {}, {})
    with pytest.raises(ValueError):
        slots.release("p1", "a")
    with pytest.raises(ValueError):
        SlotCaps(per_peer=0, per_address=1, total=1)
