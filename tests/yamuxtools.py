"""Counting the Yamux window updates a process writes (docs/libp2p.md L92), for
tests/test_transport.py and benchmarks/streams.py."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from libp2p.stream_muxer.yamux import yamux


def count_window_updates(set_attribute: Callable[[Any, str, Any], None] = setattr) -> list[int]:
    """From now on, the increment of every WINDOW_UPDATE frame without flags (not the SYN, ACK
    or FIN that Yamux also sends as window updates) written by any Yamux connection of this
    process is appended to the returned list. `set_attribute` installs the counting writer:
    pytest's `monkeypatch.setattr` undoes it after the test."""
    sent: list[int] = []
    write_frame = yamux.Yamux._write_frame

    async def counted(self: yamux.Yamux, data: bytes) -> None:
        _, kind, flags, _, length = struct.unpack(yamux.YAMUX_HEADER_FORMAT,
                                                  data[:yamux.HEADER_SIZE])
        if kind == yamux.TYPE_WINDOW_UPDATE and flags == 0:
            sent.append(length)
        await write_frame(self, data)

    set_attribute(yamux.Yamux, "_write_frame", counted)
    return sent
