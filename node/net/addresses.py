"""Turning the addresses a node listens on into addresses others can dial.

A node listening on 0.0.0.0 (every interface) must not hand out 0.0.0.0 in invites; it hands out
the address of each interface instead. Interfaces are listed by ifaddr (getifaddrs on Linux and
macOS, GetAdaptersAddresses on Windows; no packet is sent).
"""

from __future__ import annotations

import ifaddr

__all__ = ["dialable", "interface_ipv4_addresses"]


def interface_ipv4_addresses() -> list[str]:
    """IPv4 addresses of the machine's interfaces, loopback last."""
    found = {ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
             if isinstance(ip.ip, str)}  # IPv6 addresses come as (address, flowinfo, scope_id)
    return sorted(found, key=lambda a: (a.startswith("127."), a)) or ["127.0.0.1"]


def dialable(addrs: list[str]) -> list[str]:
    """Replace each /ip4/0.0.0.0/ address by one per interface address (loopback only when the
    machine has no other interface: these addresses are for other devices); keep the others."""
    interfaces = interface_ipv4_addresses()
    outward = [ip for ip in interfaces if not ip.startswith("127.")] or interfaces
    out: list[str] = []
    for addr in addrs:
        if addr.startswith("/ip4/0.0.0.0/"):
            rest = addr[len("/ip4/0.0.0.0"):]
            out.extend(f"/ip4/{ip}{rest}" for ip in outward)
        elif addr.startswith("/ip6/::/"):
            out.append("/ip6/::1/" + addr[len("/ip6/::/"):])
        else:
            out.append(addr)
    return list(dict.fromkeys(out))
