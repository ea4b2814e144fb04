"""The relay's announcement in the DHT's relay directory (PROTOCOL.md section 28.1).

While it runs, the relay keeps a signed relay record (node/protocol/relayrecord.py) under its
own DHT key and itself among the providers of the directory key, so devices with `relays =
"auto"` find it: at start, every `announce_interval_s`, and within `announce_min_interval_s`
when the number of mailboxes it holds (its load) changed. A failed put is retried at the next
turn; nothing here can stop the relay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import cache

import trio

from node.clock import Clock
from node.errors import InvalidRecord
from node.net.addresses import dialable
from node.net.dht import Dht
from node.protocol.directory import next_seq
from node.protocol.keys import DeviceKeyPair, IdentityKeyPair
from node.protocol.relayrecord import (
    DIRECTORY_KEY,
    RELAY_RECORD_LIFETIME_S,
    RelayLimits,
    RelayRecord,
)
from node.relay.config import RelayConfig
from node.relay.log import event

__all__ = ["Announcer", "software_version"]

log = logging.getLogger("pigeon.relay")

#: Seconds between checks of the load (a cheap read of a counter held in memory).
_LOAD_CHECK_S = 1.0


@cache
def software_version() -> str:
    """The installed pigeon version ("unknown" when run from a source tree never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pigeon")[:32]
    except PackageNotFoundError:
        return "unknown"


class Announcer:
    """Keeps the relay's record and provider entry in the DHT (section 28.1)."""

    def __init__(self, *, dht: Dht, config: RelayConfig, key: DeviceKeyPair, clock: Clock,
                 addresses: Callable[[], Sequence[str]], load: Callable[[], int]) -> None:
        self.dht = dht
        self.config = config
        # The record is signed by the relay's host key: the key of its peer id (section 28.1).
        self._signer = IdentityKeyPair.from_bytes(key.to_bytes())
        self.clock = clock
        self._addresses = addresses
        self._load = load
        self._seq = 0
        self.announced = 0  # records put (for status and tests)
        self.last_load: int | None = None
        self.last_error: str | None = None

    def record(self) -> RelayRecord:
        """The record as it stands now (a new seq and expiry each time)."""
        now = self.clock.now_s()
        self._seq = next_seq(self.clock.now_ms(), self._seq)
        announced = self.config.announce_addresses or tuple(
            a.rpartition("/p2p/")[0] or a for a in dialable(list(self._addresses())))
        c = self.config
        return RelayRecord(
            relay=self._signer.public, addrs=tuple(announced)[:16],
            capacity=c.max_mailboxes, load=self._load(),
            limits=RelayLimits(messages=c.mailbox_max_messages, bytes=c.mailbox_max_bytes,
                               ttl_s=c.max_ttl_s, envelope_bytes=c.max_envelope_bytes),
            version=software_version(), operator=c.operator, seq=self._seq,
            expires=now + RELAY_RECORD_LIFETIME_S)

    async def announce_once(self) -> bool:
        """Put the record and provide the directory key; whether any peer took the record."""
        record = self.record()
        try:
            stored = await self.dht.put(record.key, record.sign(self._signer))
            await self.dht.provide(DIRECTORY_KEY)
        except InvalidRecord as exc:  # our own record refused: a bug or a clock gone wrong
            self.last_error = str(exc)
            log.error("relay record refused", extra={"pigeon_fields": {"error": str(exc)}})
            return False
        self.announced += 1
        self.last_load = record.load
        self.last_error = None if stored else "no DHT server took the record"
        event(logging.DEBUG, "relay.announced", load=record.load, peers=stored)
        return stored > 0

    async def run(self) -> None:
        """Announce now, then whenever the load changed or no DHT server took the last record
        (at most every `announce_min_interval_s`), or `announce_interval_s` passed."""
        while True:
            reached = False
            try:
                reached = await self.announce_once()
            except Exception:  # a bug must not stop the relay: announce again next turn
                log.exception("announcing the relay failed", extra={"pigeon_fields": {}})
            last = self.clock.monotonic()
            await trio.sleep(self.config.announce_min_interval_s)
            # No server took it (the routing table was still empty at start): again soon.
            while (reached and self._load() == self.last_load and
                   self.clock.monotonic() - last < self.config.announce_interval_s):
                await trio.sleep(_LOAD_CHECK_S)
