"""Turning the addresses a node listens on into addresses others can dial.

A node listening on 0.0.0.0 (every interface) must not hand out 0.0.0.0 in invites; it hands out
the address of each interface instead. Interfaces are listed by ifaddr (getifaddrs on Linux and
macOS, GetAdaptersAddresses on Windows; no packet is sent).
"""

from __future__ import annotations

import ifaddr

__all__ = ["check_listen_address", "check_peer_address", "dialable", "interface_ipv4_addresses"]


def interface_ipv4_addresses() -> list[str]:
    """IPv4 addresses of the machine's interfaces, loopback last."""
    found = {ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
             if isinstance(ip.ip, str)}  # IPv6 addresses come as (address, flowinfo, scope_id)
    return sorted(found, key=lambda a: (a.startswith("127."), a)) or ["127.0.0.1"]


def dialable(addrs: list[str]) -> list[str]:
    """Replace each /ip4/0.0.0.0/ address by one per interface address (loopback only when the
    machine has no other interface: these addresses are for other devices); keep the others."""
    out: list[str] = []
    outward: list[str] | None = None  # listed only when an address needs it: it costs ~2 ms
    for addr in addrs:
        if addr.startswith("/ip4/0.0.0.0/"):
            if outward is None:
                interfaces = interface_ipv4_addresses()
                outward = [ip for ip in interfaces if not ip.startswith("127.")] or interfaces
            rest = addr[len("/ip4/0.0.0.0"):]
            out.extend(f"/ip4/{ip}{rest}" for ip in outward)
        elif addr.startswith("/ip6/::/"):
            out.append("/ip6/::1/" + addr[len("/ip6/::/"):])
        else:
            out.append(addr)
    return list(dict.fromkeys(out))


# --- validating addresses given by a person (config files, command-line options) ------------------

_TRANSPORTS = (("tcp",), ("tcp", "ws"), ("udp", "quic-v1"))
"""What a Pigeon host listens on and dials: TCP, WebSocket over TCP, QUIC v1 over UDP."""


def _parts(text: str, what: str) -> list[tuple[str, str | None]]:
    import multiaddr

    try:
        maddr = multiaddr.Multiaddr(text)
        parts = [(p.name, maddr.value_for_protocol(p.code) if p.size else None)
                 for p in maddr.protocols()]
    except Exception as exc:
        raise ValueError(f"{what} {text!r} is not a multiaddr: {exc}") from None
    return [(name, None if value is None else str(value)) for name, value in parts]


def _check_transport(text: str, what: str, parts: list[tuple[str, str | None]], *,
                     listening: bool) -> None:
    if not parts or parts[0][0] not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        raise ValueError(f"{what} {text!r} must start with /ip4/, /ip6/ or /dns*/")
    if listening and parts[0][0].startswith("dns"):
        raise ValueError(f"{what} {text!r}: listen on an IP address, not a name")
    kinds = tuple(name for name, _ in parts[1:])
    if kinds not in _TRANSPORTS:
        raise ValueError(f"{what} {text!r}: the transport must be /tcp/<port>, "
                         "/tcp/<port>/ws or /udp/<port>/quic-v1")
    if not listening:
        if parts[0][1] in ("0.0.0.0", "::"):
            raise ValueError(f"{what} {text!r}: an unspecified address cannot be dialed")
        if parts[1][1] == "0":
            raise ValueError(f"{what} {text!r}: port 0 cannot be dialed")


def check_listen_address(text: str) -> str:
    """Validate a listen multiaddr fully (at start-up, before anything binds) and return it.

    ValueError with a message for a person: not a multiaddr, not an IP, a transport Pigeon does
    not serve, or a /p2p/ part (a listener's id is the device's own)."""
    parts = _parts(text, "listen address")
    if any(name in ("p2p", "p2p-circuit") for name, _ in parts):
        raise ValueError(f"listen address {text!r} must not name a peer (/p2p/)")
    _check_transport(text, "listen address", parts, listening=True)
    return text


def check_peer_address(text: str, what: str = "peer address") -> str:
    """Validate the address of a relay or bootstrap peer fully and return it.

    It must be `<transport address>/p2p/<peer id>`: exactly one /p2p/ part, last, with a peer id
    that parses; a transport Pigeon dials (TCP, WebSocket, QUIC v1) on a dialable IP and port;
    no /p2p-circuit. A doubled /p2p/ passed the old check ("/p2p/" in the text) and failed
    only later, inside the running node. ValueError with a message for a person."""
    from libp2p.peer.id import ID

    parts = _parts(text, what)
    names = [name for name, _ in parts]
    if "p2p-circuit" in names:
        raise ValueError(f"{what} {text!r} must be the peer's own address, not a relayed one")
    if names.count("p2p") != 1 or names[-1] != "p2p":
        raise ValueError(f"{what} {text!r} must end in exactly one /p2p/<peer id>")
    try:
        ID.from_base58(str(parts[-1][1]))
    except Exception:
        raise ValueError(f"{what} {text!r}: {parts[-1][1]!r} is not a peer id") from None
    _check_transport(text, what, parts[:-1], listening=False)
    return text
