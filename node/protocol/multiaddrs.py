"""The binary form of multiaddrs (the multiformats multiaddr specification), for short invites.

A short invite (PROTOCOL.md section 14.1) must fit a QR code, and a relayed address in text is
about 100 bytes (the relay's peer id alone is 52 base58 characters); in binary it is about 51.
This module converts the few protocols Pigeon advertises between text and binary, without the
multiaddr library (node.protocol stays pure, README.md "Layers"):

    binary = 1*(varint(code) || value)
    value  = fixed bytes (ip4 4, ip6 16, tcp/udp 2 big-endian), or varint(length) || bytes
             (dns, dns4, dns6, dnsaddr, sni: UTF-8 names; p2p: the peer id's multihash bytes),
             or nothing (quic, quic-v1, ws, wss, tls, webtransport, p2p-circuit)

Codes are those of the multicodec table. Any other protocol is refused (`UnsupportedAddress`):
such an address is simply left out of a short invite.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from node.errors import DecodeError
from node.protocol.keys import b58decode, b58encode

__all__ = ["UnsupportedAddress", "encode_uvarint", "from_binary", "to_binary"]

#: Longest binary multiaddr accepted (PROTOCOL.md's MAX_ADDR_BYTES is for text; binary is shorter).
MAX_BINARY_ADDR_BYTES: Final = 512
_MAX_NAME_BYTES: Final = 255  # a DNS name

# name -> (multicodec code, kind): "ip4", "ip6", "port", "name", "p2p" or "none"
_PROTOCOLS: Final[dict[str, tuple[int, str]]] = {
    "ip4": (0x04, "ip4"),
    "tcp": (0x06, "port"),
    "udp": (0x0111, "port"),
    "ip6": (0x29, "ip6"),
    "dns": (0x35, "name"),
    "dns4": (0x36, "name"),
    "dns6": (0x37, "name"),
    "dnsaddr": (0x38, "name"),
    "p2p-circuit": (0x0122, "none"),
    "p2p": (0x01A5, "p2p"),
    "tls": (0x01C0, "none"),
    "sni": (0x01C1, "name"),
    "quic": (0x01CC, "none"),
    "quic-v1": (0x01CD, "none"),
    "webtransport": (0x01D1, "none"),
    "ws": (0x01DD, "none"),
    "wss": (0x01DE, "none"),
}
_BY_CODE: Final = {code: (name, kind) for name, (code, kind) in _PROTOCOLS.items()}


class UnsupportedAddress(ValueError):
    """A multiaddr this module cannot put in binary form (an unknown protocol or a bad value)."""


def encode_uvarint(n: int) -> bytes:
    """`n` as an unsigned LEB128 varint (the multiformats unsigned-varint spec): multiaddr codes
    and lengths here, and the length prefix of every libp2p frame (`node.net.host`)."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + 4, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > pos:
                raise DecodeError("multiaddr: non-minimal varint")
            return value, i + 1
        shift += 7
    raise DecodeError("multiaddr: bad varint")


def to_binary(text: str) -> bytes:
    """The binary form of multiaddr `text`; UnsupportedAddress if it cannot be encoded."""
    parts = text.split("/")
    if len(parts) < 2 or parts[0] != "":
        raise UnsupportedAddress("a multiaddr starts with '/'")
    out = bytearray()
    i = 1
    while i < len(parts):
        name = parts[i]
        if name not in _PROTOCOLS:
            raise UnsupportedAddress(f"protocol {name!r} is not supported in binary form")
        code, kind = _PROTOCOLS[name]
        out += encode_uvarint(code)
        i += 1
        if kind == "none":
            continue
        if i >= len(parts):
            raise UnsupportedAddress(f"{name} needs a value")
        value = parts[i]
        i += 1
        try:
            if kind == "ip4":
                out += ipaddress.IPv4Address(value).packed
            elif kind == "ip6":
                out += ipaddress.IPv6Address(value).packed
            elif kind == "port":
                if not value.isdigit() or not 0 <= int(value) <= 65535:
                    raise ValueError("bad port")
                out += int(value).to_bytes(2, "big")
            else:
                raw = value.encode("utf-8") if kind == "name" else b58decode(value)
                if not raw or len(raw) > _MAX_NAME_BYTES:
                    raise ValueError("bad length")
                out += encode_uvarint(len(raw)) + raw
        except (ValueError, DecodeError) as exc:
            raise UnsupportedAddress(f"bad {name} value {value!r:.60}") from exc
    if len(out) > MAX_BINARY_ADDR_BYTES:
        raise UnsupportedAddress("multiaddr too long")
    return bytes(out)


def from_binary(data: bytes) -> str:
    """The text of a binary multiaddr; DecodeError for anything malformed or unsupported."""
    if not data or len(data) > MAX_BINARY_ADDR_BYTES:
        raise DecodeError("multiaddr: empty or too long")
    out: list[str] = []
    pos = 0
    while pos < len(data):
        code, pos = _read_varint(data, pos)
        if code not in _BY_CODE:
            raise DecodeError(f"multiaddr: unsupported protocol code {code:#x}")
        name, kind = _BY_CODE[code]
        out.append(name)
        if kind == "none":
            continue
        size = {"ip4": 4, "ip6": 16, "port": 2}.get(kind)
        if size is None:
            size, pos = _read_varint(data, pos)
            if not 0 < size <= _MAX_NAME_BYTES:
                raise DecodeError(f"multiaddr: bad {name} length")
        value = data[pos:pos + size]
        if len(value) != size:
            raise DecodeError("multiaddr: truncated")
        pos += size
        if kind == "ip4":
            out.append(str(ipaddress.IPv4Address(value)))
        elif kind == "ip6":
            out.append(str(ipaddress.IPv6Address(value)))
        elif kind == "port":
            out.append(str(int.from_bytes(value, "big")))
        elif kind == "name":
            try:
                name_text = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DecodeError("multiaddr: a name is not UTF-8") from exc
            if "/" in name_text:
                raise DecodeError("multiaddr: a name contains '/'")
            out.append(name_text)
        else:
            out.append(b58encode(value))
    return "/" + "/".join(out)
