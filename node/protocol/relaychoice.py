"""Which relays a device with `relays = "auto"` holds its mailbox at (PROTOCOL.md section 28.2).

Pure: the shell (node/device/relay_fleet.py) measures, this module decides. In: the relays the
device holds now with their health, the candidates found in the relay directory with their
measured round-trip time and announced load, and a source of randomness. Out: a `Plan` of which
to keep, which to drop (with the reason) and which to add.

The rules:

1. A held relay that refused us `relay-full` is dropped; one unreachable for `down_after_s` is
   dropped when another relay can take its place (a lone dead relay may come back).
2. At most one held relay per plan is dropped for being slow: its round-trip time is more than
   `slower_factor` times, and `slower_margin_ms` more than, the best candidate's.
3. Free places are filled from the candidates that answered, are not full and are not held:
   among those whose round-trip time is acceptable (within `acceptable_factor` of the best, or
   `acceptable_margin_ms` of it), preferring ones of another operator and another host than
   those kept, two are drawn at random with weight their free share of capacity and the less
   loaded of the two is taken. Drawing, rather than taking the least loaded, keeps devices
   that decide at the same moment on the same (announced, minutes old) loads from all landing
   on one relay; taking the less loaded of two evens out what plain draws leave uneven.
4. Places still free after that (every round-trip probe timed out: a slow network or a loaded
   device) are filled from the candidates that did not answer, not full and not held, drawn the
   same way: a relay whose speed is unknown serves better than none.
5. Places still free after that are filled from the relays the device left lately for being
   down or slow (passed as `fallback`; never one that refused it `relay-full`), the fastest
   first: under load a device may have left every other relay one after another, and a relay
   it left serves better than an empty place.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = ["Candidate", "ChoiceRules", "Held", "Plan", "host_of", "plan"]

#: Reasons a held relay is dropped (what `pigeon status` and the logs show).
DOWN: Final = "down"
FULL: Final = "full"
SLOWER: Final = "slower"

#: Weight of a candidate that announced no free capacity but did not refuse us yet: kept
#: above zero so a stale full load does not make the last relay standing unpickable.
_MIN_WEIGHT: Final = 0.01


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """A relay from the directory: its record's facts and the round-trip time measured to it
    (None: it did not answer)."""

    peer_id: str
    address: str  # a dial address ending in /p2p/<peer_id>
    operator: str = ""
    capacity: int = 1
    load: int = 0
    rtt_ms: float | None = None

    @property
    def free(self) -> float:
        """The share of its capacity still free (0..1), by its announced load."""
        if self.capacity <= 0:
            return 0.0
        return max(0.0, (self.capacity - self.load) / self.capacity)


@dataclass(frozen=True, kw_only=True, slots=True)
class Held:
    """A relay the device holds its mailbox at now, and its health as the device saw it."""

    peer_id: str
    address: str
    down_s: float = 0.0  # how long it has been unreachable (0: reachable)
    full: bool = False  # it refused our mailbox `relay-full`
    rtt_ms: float | None = None
    operator: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class ChoiceRules:
    """The thresholds of the rules above (PROTOCOL.md section 28.2 gives the defaults)."""

    want: int = 2
    down_after_s: float = 20.0
    slower_factor: float = 4.0
    slower_margin_ms: float = 50.0
    acceptable_factor: float = 2.0
    acceptable_margin_ms: float = 20.0


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do: keep these (addresses), drop these (address, reason), add these."""

    keep: tuple[str, ...]
    drop: tuple[tuple[str, str], ...] = ()
    add: tuple[Candidate, ...] = ()
    changed: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "changed", bool(self.drop or self.add))

    @property
    def relays(self) -> tuple[str, ...]:
        """The relays after the plan: those kept, then those added."""
        return (*self.keep, *(c.address for c in self.add))


def host_of(address: str) -> str:
    """The host part of a multiaddr (the value after /ip4/, /ip6/, /dns*/), or "" if none:
    relays on one host share its fate (a machine, a data centre address)."""
    parts = address.split("/")
    for i, part in enumerate(parts[:-1]):
        if part in ("ip4", "ip6", "dns", "dns4", "dns6"):
            return parts[i + 1]
    return ""


def plan(held: Sequence[Held], candidates: Iterable[Candidate], rng: random.Random,
         rules: ChoiceRules = ChoiceRules(), avoid: Iterable[str] = (),
         fallback: Iterable[str] = ()) -> Plan:
    """Decide which relays to hold (module docstring). `avoid`: peer ids not to add now (ones
    just dropped, or that refused us); `fallback`: those of them left for being down or slow,
    which may still fill a place nothing else can (rule 5)."""
    candidates = list(candidates)
    held_ids = {h.peer_id for h in held}
    avoided = set(avoid)
    free = [c for c in candidates if c.peer_id not in held_ids and c.peer_id not in avoided
            and c.load < c.capacity]
    pool = [c for c in free if c.rtt_ms is not None]
    # Relays that did not answer the round-trip probe in time: taken only to fill places no
    # measured relay can (every probe may time out on a slow network), never to replace one.
    unmeasured = [c for c in free if c.rtt_ms is None]
    best = min((c.rtt_ms for c in pool if c.rtt_ms is not None), default=None)
    keep: list[Held] = []
    drop: list[tuple[str, str]] = []
    spare = len(pool)
    for h in held:
        if h.full:
            drop.append((h.address, FULL))
        elif h.down_s >= rules.down_after_s and spare > 0:
            drop.append((h.address, DOWN))
            spare -= 1
        else:
            keep.append(h)
    if best is not None and spare > 0:
        slow = [h for h in keep if h.rtt_ms is not None
                and h.rtt_ms > rules.slower_factor * best
                and h.rtt_ms - best > rules.slower_margin_ms]
        if slow:
            worst = max(slow, key=lambda h: h.rtt_ms or 0.0)
            keep.remove(worst)
            drop.append((worst.address, SLOWER))
    keep = keep[:rules.want]
    add: list[Candidate] = []
    while len(keep) + len(add) < rules.want and pool:
        chosen = _draw(pool, keep, add, rng, rules)
        add.append(chosen)
        pool = [c for c in pool if c.peer_id != chosen.peer_id]
    while len(keep) + len(add) < rules.want and unmeasured:
        chosen = _two_choices(unmeasured, rng)
        add.append(chosen)
        unmeasured = [c for c in unmeasured if c.peer_id != chosen.peer_id]
    # Rule 5: a relay left lately for being down or slow serves better than an empty place
    # (under load a device may have left every other one); the fastest measured first.
    again = set(fallback)
    last_resort = sorted((c for c in candidates if c.peer_id in again and c.peer_id not in
                          held_ids and c.load < c.capacity and c not in add),
                         key=lambda c: (c.rtt_ms is None, c.rtt_ms or 0.0))
    while len(keep) + len(add) < rules.want and last_resort:
        add.append(last_resort.pop(0))
    return Plan(keep=tuple(h.address for h in keep), drop=tuple(drop), add=tuple(add))


def _draw(pool: Sequence[Candidate], keep: Sequence[Held], add: Sequence[Candidate],
          rng: random.Random, rules: ChoiceRules) -> Candidate:
    best = min(c.rtt_ms for c in pool if c.rtt_ms is not None)
    limit = max(best * rules.acceptable_factor, best + rules.acceptable_margin_ms)
    acceptable = [c for c in pool if c.rtt_ms is not None and c.rtt_ms <= limit]
    operators = {h.operator for h in keep} | {c.operator for c in add}
    operators.discard("")
    hosts = {host_of(h.address) for h in keep} | {host_of(c.address) for c in add}
    for spread in (
            [c for c in acceptable if c.operator not in operators and host_of(c.address) not in hosts],
            [c for c in acceptable if c.operator not in operators],
            acceptable):
        if spread:
            break
    return _two_choices(spread, rng)


def _two_choices(relays: Sequence[Candidate], rng: random.Random) -> Candidate:
    """Two relays drawn at random with weight their free share, and the one with more of its
    capacity free taken (the first drawn when equal): "the power of two choices" (Mitzenmacher,
    "The Power of Two Choices in Randomized Load Balancing"). Loads equal (all relays new): a
    plain draw. Loads unequal (announced a minute ago, by relays whose capacities are far from
    reached): the emptier relay wins most draws, without every device herding to one."""
    weights = [max(c.free, _MIN_WEIGHT) for c in relays]
    first = rng.choices(range(len(relays)), weights=weights)[0]
    if len(relays) == 1:
        return relays[first]
    others = [i for i in range(len(relays)) if i != first]
    second = rng.choices(others, weights=[weights[i] for i in others])[0]
    a, b = relays[first], relays[second]
    return b if b.load * a.capacity < a.load * b.capacity else a
