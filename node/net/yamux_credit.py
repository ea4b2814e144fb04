"""Yamux receive credit given back once half the window is read, as go-yamux does
(docs/libp2p.md L92).

libp2p 0.8.1's `YamuxStream` writes a WINDOW_UPDATE frame after every read that returned data,
however little: multistream-select reads each protocol line a varint at a time, so a request and
its reply on a new stream cost 10 window updates (benchmarks/streams.py), each encrypted, written,
read and decrypted like a data frame. Yamux leaves to the receiver when to give credit back
(hashicorp/yamux spec.md, "Flow Control"); go-yamux and rust-yamux give it once half the window
is read, so a writer never waits while the reader keeps reading, and a short exchange sends none.

`use_half_window_updates()` makes every Yamux stream of this process do the same: libp2p builds
its streams itself, so the method is replaced on its class, once, and only on the release it was
written for (pyproject.toml pins it). The wire format is unchanged: fewer frames of the same kind.
"""

from __future__ import annotations

import logging

import libp2p
from libp2p.stream_muxer.yamux.yamux import YamuxStream

__all__ = ["use_half_window_updates"]

log = logging.getLogger(__name__)

#: The libp2p release whose `YamuxStream` internals this module relies on.
WRITTEN_FOR = "0.8.1"


async def _give_credit_once_half_read(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """libp2p's `_auto_tune_and_send_window_update` without its per-read updates: credit is
    given back when what was read (the window less what the peer may still send and what waits
    unread) reaches half the target window, which also grows the window as libp2p does."""
    del bytes_read  # what was read shows in recv_window and the buffer
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        read_since_update = self.target_recv_window - (self.recv_window + buffered)
        if read_since_update <= 0 or read_since_update < self._grow_threshold():
            return
        increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
    # Never under window_lock: libp2p's handler of inbound window updates takes it too.
    await self.send_window_update(increment, skip_lock=True)


def use_half_window_updates() -> bool:
    """Install the go-yamux credit rule on libp2p's `YamuxStream`; idempotent. False (and a
    warning) on another libp2p release, whose internals may differ: its own rule stays."""
    current = YamuxStream._auto_tune_and_send_window_update
    if current is _give_credit_once_half_read:
        return True
    if libp2p.__version__ != WRITTEN_FOR:
        log.warning("libp2p %s, not %s: Yamux keeps its own window updates",
                    libp2p.__version__, WRITTEN_FOR)
        return False
    YamuxStream._auto_tune_and_send_window_update = _give_credit_once_half_read  # type: ignore[method-assign]
    return True
