"""Relays chosen by the device itself (`relays = "auto"`, PROTOCOL.md section 28.2).

- `find_relays` reads the DHT's relay directory: the providers of the directory key and the
  relays known from before (listed at the last read), then each one's signed relay
  record (refused unless valid), then the round-trip time to each, measured over a throwaway
  identity (a relay learns nothing about who is shopping for relays).
- `RelayFleet` holds the chosen relays: at start it takes the ones chosen before (kept in the
  database) or chooses; then every `relay_check_s` it looks at their health (the node's relay
  inboxes: connected, refused `relay-full`) and lets the pure rules of
  node/protocol/relaychoice.py decide whether to drop and add. What it decides, the node
  carries out (`apply`): new inboxes, old relays drained, contacts and own devices told.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from node.clock import Clock
from node.device.config import Config
from node.device.relay_client import OpenTransport, split_relay_address
from node.device.storage import Database
from node.errors import DecodeError, InvalidRecord, StorageError, TransportError
from node.net.dht import Dht
from node.protocol.keys import DeviceKey
from node.protocol.mailbox import RELAY_FULL
from node.protocol.relaychoice import FULL, Candidate, ChoiceRules, Held, Plan, plan
from node.protocol.relayrecord import DIRECTORY_KEY, RelayRecord, open_relay_record, relay_key

__all__ = ["AUTO_RELAYS_KEY", "KNOWN_RELAYS_KEY", "FoundRelay", "RelayFleet", "RelayHealth", "find_relays"]

log = logging.getLogger("pigeon.relays")

#: The `meta` key holding the relays "auto" chose (JSON list of addresses), so a restart keeps
#: them instead of moving every time.
AUTO_RELAYS_KEY = "auto_relays"

#: The `meta` key holding the relays listed at the last directory read (JSON object: peer id ->
#: addresses), asked directly at every read after it, restarts included (section 28.2).
KNOWN_RELAYS_KEY = "known_relays"
#: Relays kept there at most (each read asks every one of them).
MAX_KNOWN_RELAYS = 32

#: Bound on each step of a directory read (the provider lookup, each record lookup, each
#: round trip): a dead relay or DHT server costs at most this.
FIND_TIMEOUT_S = 10.0
#: Longest wait between two reads of the directory while the device lacks relays: a busy DHT
#: that answered only in part must not keep it short of relays for long.
DISCOVER_BACKOFF_MAX_S = 30.0
#: Least time between two joins of the DHT through its bootstrap peers by the relay choice,
#: while the DHT knows no peer and the device needs the directory.
REJOIN_INTERVAL_S = 10.0
#: Round-trip measurements at once (each a connection from the throwaway identity).
_PROBES_AT_ONCE = 16
#: Pings per relay; its round-trip time is the least of them. One ping from a busy device (or
#: to a busy relay) can take several times the path's time, and rule 3 of PROTOCOL.md section
#: 28.2 keeps only the relays within twice the best: with one sample, devices measuring at the
#: same moment all found the same relay fast and most of them chose it.
RTT_PINGS = 3


@dataclass(frozen=True, slots=True)
class FoundRelay:
    """A relay from the directory: its verified record and the round-trip time measured to it
    in milliseconds (None: it did not answer)."""

    record: RelayRecord
    rtt_ms: float | None

    @property
    def address(self) -> str:
        """The address a device puts in its relays: the record's first, with /p2p/<id>."""
        return self.record.dial_addresses()[0]

    def candidate(self) -> Candidate:
        r = self.record
        return Candidate(peer_id=r.peer_id, address=self.address, operator=r.operator,
                         capacity=r.capacity, load=r.load, rtt_ms=self.rtt_ms)

    def to_json(self) -> dict[str, object]:
        """What `pigeon relays --json` prints for it."""
        r = self.record
        return {"peer_id": r.peer_id, "addresses": r.dial_addresses(),
                "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 2),
                "load": r.load, "capacity": r.capacity, "operator": r.operator,
                "version": r.version, "expires": r.expires,
                "limits": {"messages": r.limits.messages, "bytes": r.limits.bytes,
                           "ttl_s": r.limits.ttl_s, "envelope_bytes": r.limits.envelope_bytes}}


async def find_relays(dht: Dht, open_transport: OpenTransport, clock: Clock, *,
                      known: Mapping[str, Sequence[str]] | None = None,
                      timeout: float = FIND_TIMEOUT_S) -> list[FoundRelay]:
    """The relays the directory lists now, each with a valid record, fastest first (those that
    did not answer last). `known` (peer id -> addresses) are relays known from before: each is
    asked for its record directly while the provider lookup runs (PROTOCOL.md section 28.2),
    so a lookup that finds nothing (a busy DHT drops its streams) still leaves them."""
    records: dict[str, RelayRecord] = {}
    asked: set[str] = set()

    async def read(peer_id: str, addrs: list[str], lookup: bool) -> None:
        try:
            key = relay_key(DeviceKey.from_peer_id(peer_id))
        except DecodeError:  # a provider that is not an Ed25519 peer: no relay of ours
            return
        # The relay holds its own record: one request to it; for a provider, a lookup if that
        # fails (another server may still hold its record).
        value = await dht.get_from(peer_id, addrs, key, timeout=timeout)
        if value is None and lookup:
            value = await dht.get(key, timeout=timeout)
        if value is None:
            return
        try:
            records[peer_id] = open_relay_record(key, value, clock.now_s())
        except InvalidRecord as exc:  # the DHT validated it, but it may have expired since
            log.debug("relay record of %s refused: %s", peer_id, exc)

    async with trio.open_nursery() as nursery:
        def ask(peer_id: str, addrs: Sequence[str], *, lookup: bool) -> None:
            if peer_id not in asked:
                asked.add(peer_id)
                nursery.start_soon(read, peer_id, list(addrs), lookup)

        for peer_id, addrs in (known or {}).items():
            ask(peer_id, addrs, lookup=False)
        providers = await dht.find_providers(DIRECTORY_KEY, timeout=timeout)
        for peer_id, addrs in providers.items():
            ask(peer_id, addrs, lookup=True)
    rtts = await measure([(r.peer_id, r.dial_addresses()) for r in records.values()],
                         open_transport, clock, timeout=timeout) if records else {}
    found = [FoundRelay(r, rtts.get(r.peer_id)) for r in records.values()]
    return sorted(found, key=lambda f: (f.rtt_ms is None, f.rtt_ms or 0.0))


async def measure(relays: Sequence[tuple[str, Sequence[str]]], open_transport: OpenTransport,
                  clock: Clock, *, timeout: float) -> dict[str, float]:
    """Round-trip times (ms) to each (peer id, addresses) that answers, over one throwaway
    identity: the least of `RTT_PINGS` libp2p pings, one after another (connecting first; the
    handshake is not counted)."""
    out: dict[str, float] = {}
    limit = trio.CapacityLimiter(_PROBES_AT_ONCE)
    async with open_transport() as transport:

        async def one(peer_id: str, addrs: Sequence[str]) -> None:
            async with limit:
                try:
                    await transport.connect(peer_id, addrs, timeout=timeout)
                    for _ in range(RTT_PINGS):
                        start = clock.monotonic()
                        await transport.ping(peer_id, timeout=timeout)
                        rtt_ms = (clock.monotonic() - start) * 1000
                        out[peer_id] = min(rtt_ms, out.get(peer_id, rtt_ms))
                except TransportError as exc:
                    log.debug("relay %s did not answer: %s", peer_id, exc)

        async with trio.open_nursery() as nursery:
            for peer_id, addrs in relays:
                nursery.start_soon(one, peer_id, addrs)
    return out


@dataclass(frozen=True, slots=True)
class RelayHealth:
    """How one of our relays is doing, as the node's inboxes see it."""

    connected: bool
    refused: str | None = None  # the code it refused our mailbox with, if it did
    #: A try to reach it failed (not merely "still connecting"): the down timer runs from then.
    failing: bool = False


class RelayFleet:
    """Chooses and watches this device's relays (module docstring)."""

    def __init__(self, *, dht: Dht, open_transport: OpenTransport, clock: Clock, config: Config,
                 db: Database, health: Callable[[str], RelayHealth],
                 apply: Callable[[Plan], None], rng: random.Random | None = None) -> None:
        self.dht = dht
        self.open_transport = open_transport
        self.clock = clock
        self.config = config
        self.db = db
        self.health = health
        self.apply = apply
        self.rng = rng or random.Random(os.urandom(16))
        self.rules = ChoiceRules(want=config.auto_relays, down_after_s=config.relay_down_after_s)
        self.current: tuple[str, ...] = self._load()
        self.known: dict[str, tuple[str, ...]] = self._load_known()
        self.found: dict[str, FoundRelay] = {}
        self.discovered_at: float | None = None
        self._down_since: dict[str, float] = {}
        self._avoid: dict[str, float] = {}  # peer id -> until (monotonic): refused or dropped
        self._refused: set[str] = set()  # those of them that refused us `relay-full`
        self.moves = 0  # relays replaced (for status and tests)
        self._next_discovery = 0.0
        self._next_rejoin = 0.0
        self._discover_delay = 0.0

    def _load(self) -> tuple[str, ...]:
        stored = self.db.get_meta_json(AUTO_RELAYS_KEY)
        if not isinstance(stored, list):
            return ()
        return tuple(a for a in stored if isinstance(a, str) and "/p2p/" in a)

    def _load_known(self) -> dict[str, tuple[str, ...]]:
        stored = self.db.get_meta_json(KNOWN_RELAYS_KEY)
        if not isinstance(stored, dict):
            return {}
        return {p: tuple(a for a in addrs if isinstance(a, str))
                for p, addrs in list(stored.items())[:MAX_KNOWN_RELAYS]
                if isinstance(p, str) and isinstance(addrs, list)}

    async def run(self) -> None:
        """Check, then again every `relay_check_s`, forever. Nothing here ends the node: a
        failed round is logged and the next one tries again."""
        while True:
            try:
                await self.check()
            except (StorageError, TransportError, InvalidRecord) as exc:
                log.info("relay choice: %s", exc)
            except Exception:
                log.exception("relay choice failed")
            await trio.sleep(self.config.relay_check_s)

    def held(self) -> list[Held]:
        """Our relays with their health now."""
        now = self.clock.monotonic()
        out = []
        for address in self.current:
            peer_id, _ = split_relay_address(address)
            health = self.health(address)
            if health.connected or not health.failing:
                # Connected, or still connecting for the first time (a relay just chosen is
                # not judged before a try has failed).
                self._down_since.pop(peer_id, None)
            else:
                self._down_since.setdefault(peer_id, now)
            found = self.found.get(peer_id)
            out.append(Held(peer_id=peer_id, address=address,
                            down_s=now - self._down_since.get(peer_id, now),
                            full=health.refused == RELAY_FULL,
                            rtt_ms=found.rtt_ms if found else None,
                            operator=found.record.operator if found else ""))
        return out

    async def check(self) -> Plan | None:
        """One round: read the health, refresh what is known of the directory when needed, and
        apply a plan that changes something. Returns that plan (None: nothing changed)."""
        now = self.clock.monotonic()
        held = self.held()
        trouble = len(held) < self.rules.want or any(
            h.full or h.down_s >= self.rules.down_after_s for h in held)
        stale = self.discovered_at is None or \
            now - self.discovered_at >= self.config.relay_discover_s
        if not trouble and not stale:
            return None
        due = stale or (not self._spare() and now >= self._next_discovery)
        if due and self.dht.routing_table_size() == 0 and now >= self._next_rejoin:
            # Every DHT peer is gone (on a small network the relays that died may have been
            # most of the table): join again through the bootstrap peers now. The DHT's own
            # upkeep does so only after its backoff, which grows to minutes (node/net/dht.py).
            self._next_rejoin = now + REJOIN_INTERVAL_S
            await self.dht.bootstrap(refresh=False)
        # Not bootstrapped (just started, or every peer gone): a read now would find nothing
        # and push the next one back by the backoff below. Read once a peer is known.
        if due and self.dht.routing_table_size() > 0:
            await self.discover()
            # Nothing to move to: read the directory again later, backing off (it costs DHT
            # lookups), up to `relay_discover_s`.
            self._discover_delay = self.config.relay_check_s if self._spare() else min(
                self.config.relay_discover_s, DISCOVER_BACKOFF_MAX_S,
                max(self.config.relay_check_s, self._discover_delay * 2))
            self._next_discovery = now + self._discover_delay
        elif trouble and self._spare():
            # The directory was read lately: measure again only the relays it listed.
            rtts = await measure([(p, f.record.dial_addresses()) for p, f in self.found.items()],
                                 self.open_transport, self.clock,
                                 timeout=self.config.connect_timeout_s)
            self.found = {p: FoundRelay(f.record, rtts.get(p)) for p, f in self.found.items()}
        self._avoid = {p: t for p, t in self._avoid.items() if t > now}
        self._refused &= set(self._avoid)
        held, candidates = self.held(), [f.candidate() for f in self.found.values()]
        result = plan(held, candidates, self.rng, self.rules, avoid=self._avoid,
                      fallback=[p for p in self._avoid if p not in self._refused])
        if not result.changed:
            return None
        log.debug("relay plan: held %s, candidates %s, avoiding %s: %s",
                  [(h.peer_id[-6:], round(h.down_s, 1), h.full) for h in held],
                  [(c.peer_id[-6:], c.rtt_ms and round(c.rtt_ms, 1), c.load) for c in candidates],
                  [p[-6:] for p in self._avoid], [(a[-6:], r) for a, r in result.drop] +
                  [c.peer_id[-6:] for c in result.add])
        for address, reason in result.drop:
            peer_id, _ = split_relay_address(address)
            # Not back to it soon: a relay that refused us or went away is avoided for a while.
            self._avoid[peer_id] = now + self.config.relay_discover_s
            if reason == FULL:
                self._refused.add(peer_id)
            else:
                self._refused.discard(peer_id)
            self._down_since.pop(peer_id, None)
            log.info("leaving relay %s (%s)", peer_id, reason)
        for c in result.add:
            log.info("choosing relay %s (rtt %.1f ms, load %d/%d)", c.peer_id, c.rtt_ms or 0.0,
                     c.load, c.capacity)
        self.moves += len(result.drop)
        self.current = result.relays
        self.db.set_meta(AUTO_RELAYS_KEY, json.dumps(list(self.current)))
        self.apply(result)
        return result

    def _spare(self) -> bool:
        held = {split_relay_address(a)[0] for a in self.current}
        return any(p not in held and p not in self._avoid and f.rtt_ms is not None
                   and not f.record.full for p, f in self.found.items())

    async def discover(self) -> list[FoundRelay]:
        """Read the directory again (providers, records, round trips)."""
        began = self.clock.monotonic()
        # The relays listed at the last read are asked directly besides the lookup. Not the
        # bootstrap peers as well: a first read whose lookup failed would find only them, and
        # every device that started then would hold both (PROTOCOL.md section 28.2).
        found = await find_relays(self.dht, self.open_transport, self.clock,
                                  known={p: list(a) for p, a in self.known.items()},
                                  timeout=FIND_TIMEOUT_S)
        if found:
            self.known = {f.record.peer_id: tuple(f.record.dial_addresses())
                          for f in found[:MAX_KNOWN_RELAYS]}
            self.db.set_meta(KNOWN_RELAYS_KEY, json.dumps(
                {p: list(a) for p, a in self.known.items()}))
        if log.isEnabledFor(logging.DEBUG):
            seen = ", ".join(f"{f.record.peer_id[-6:]} rtt {f.rtt_ms and round(f.rtt_ms, 1)} ms "
                             f"load {f.record.load}/{f.record.capacity}" for f in found)
            log.debug("relay directory read in %.1f s: %d relays (%s)",
                      self.clock.monotonic() - began, len(found), seen)
        self.found = {f.record.peer_id: f for f in found}
        self.discovered_at = self.clock.monotonic()
        return found
