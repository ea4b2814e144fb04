"""Turning the addresses a node listens on into addresses others can dial.

A node listening on 0.0.0.0 (every interface) must not hand out 0.0.0.0 in invites; it hands out
the address of each interface instead. Interfaces are read from the kernel (no packet is sent).
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct

__all__ = ["dialable", "interface_ipv4_addresses"]

_SIOCGIFADDR = 0x8915  # Linux: get an interface's IPv4 address


def interface_ipv4_addresses() -> list[str]:
    """IPv4 addresses of the machine's interfaces, loopback last."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR,
                                     struct.pack("256s", name.encode()[:15]))
                found.append(socket.inet_ntoa(packed[20:24]))
    found = sorted(set(found), key=lambda a: (a.startswith("127."), a))
    return found or ["127.0.0.1"]


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
