"""A device's private prekeys: the responder's side of PQXDH (PROTOCOL.md "Prekeys").

The store holds signed prekeys (the current one and, for PREKEY_GRACE_S after their
replacement, the old ones, so that first messages in flight still open), classical and
post-quantum one-time prekeys (each used once, then deleted), the last-resort PQ prekey (reused
until rotated; old ones kept for the same grace) and, per signed prekey, the base keys of first
messages that used no one-time prekey, so their replay is refused (PQXDH section 4.2).

`maintain` is the schedule (PROTOCOL.md section 6, "Rotation"): the signed and the last-resort
PQ prekey are replaced every SIGNED_PREKEY_ROTATION_S, replaced keys are deleted once the grace
has passed (then a recorded first message made with them cannot be decrypted from a stolen
store), and the one-time pools are refilled when few keys are left to hand out.

It is a plain object with versioned serialization; the node keeps it in SQLite and writes it in
the same transaction as the session a first message created, so a prekey is consumed exactly
when the session that used it is stored (`commit_use` is only called after decryption succeeded).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from itertools import pairwise
from typing import Final, Self

from node.errors import DecodeError, LocalError
from node.protocol import codec
from node.protocol.binding import sign_binding
from node.protocol.keys import (
    KEM_SEED_BYTES,
    KEY_BYTES,
    DeviceKeyPair,
    DHKeyPair,
    IdentityKeyPair,
    KEMKeyPair,
    Random,
)
from node.protocol.limits import (
    MAX_OLD_SIGNED_PREKEYS,
    MAX_ONE_TIME_PREKEYS,
    MAX_SEEN_BASE_KEYS,
    ONE_TIME_PREKEYS_LOW,
    PREKEY_GRACE_S,
    SIGNED_PREKEY_ROTATION_S,
)
from node.protocol.records import MAX_PREKEY_ID, PreKeyBundle

__all__ = ["Maintenance", "PreKeyStore", "PreKeyUse"]

STORE_VERSION: Final = 1
#: One-time prekeys (each kind) created at once; a device hands them out in invites and on request.
DEFAULT_ONE_TIME_PREKEYS: Final = 20
#: Largest serialized store accepted from disk: every limit at its maximum, with room to spare.
MAX_STORE_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class PreKeyUse:
    """Which prekeys a first message used; handed to `commit_use` once its session is stored."""

    signed_prekey_id: int
    one_time_prekey_id: int | None
    kem_prekey_id: int
    kem_last_resort: bool
    base_key: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Maintenance:
    """What one `PreKeyStore.maintain` did: the caller saves the store if `changed`, clears the
    deleted keys from its files if `deleted` (node/files.py `truncate_wal`) and republishes its
    bundle if `rotated`."""

    rotated: bool = False
    deleted: int = 0
    refilled: int = 0

    @property
    def changed(self) -> bool:
        """Whether the store differs from before (it must be saved)."""
        return self.rotated or bool(self.deleted) or bool(self.refilled)


class PreKeyStore:
    """Private prekeys of one device. Create with `PreKeyStore.create()`."""

    def __init__(self) -> None:
        self._next_id = 1
        # id -> (private scalar, created unix time); the highest id is the current one
        self._signed: dict[int, tuple[bytes, int]] = {}
        self._one_time: dict[int, bytes] = {}
        # id -> (64-byte seed, last_resort, created); the newest last-resort key is the current
        # one, older last-resort keys are replaced ones kept for their grace
        self._kem: dict[int, tuple[bytes, bool, int]] = {}
        # id -> when it was put into a bundle (unix s): bundles take keys nobody was given yet,
        # and a key handed out is kept for PREKEY_GRACE_S, then deleted (its first message, if
        # any, came long ago) rather than evicted to make room while it may still be used
        self._offered: dict[int, int] = {}
        self._seen: dict[int, OrderedDict[bytes, None]] = {}

    # --- creation and rotation ----------------------------------------------------------------

    @classmethod
    def create(
        cls, *, now: int, rng: Random = os.urandom, one_time: int = DEFAULT_ONE_TIME_PREKEYS
    ) -> Self:
        """A new store: a signed prekey, a last-resort PQ prekey and `one_time` one-time prekeys
        of each kind."""
        store = cls()
        store.rotate_signed_prekey(now=now, rng=rng)
        store.rotate_last_resort(now=now, rng=rng)
        store.replenish(count=one_time, now=now, rng=rng)
        return store

    def _new_id(self) -> int:
        if self._next_id > MAX_PREKEY_ID:
            raise LocalError("prekey ids exhausted")
        self._next_id += 1
        return self._next_id - 1

    def rotate_signed_prekey(self, *, now: int, rng: Random = os.urandom) -> int:
        """Make a new current signed prekey; keep MAX_OLD_SIGNED_PREKEYS older ones."""
        new_id = self._new_id()
        self._signed[new_id] = (rng(KEY_BYTES), now)
        for old in sorted(self._signed)[: -MAX_OLD_SIGNED_PREKEYS - 1]:
            del self._signed[old]
            self._seen.pop(old, None)
        return new_id

    def rotate_last_resort(self, *, now: int, rng: Random = os.urandom) -> int:
        """Make a new last-resort PQ prekey; keep MAX_OLD_SIGNED_PREKEYS older ones (deleted by
        `maintain` once their grace has passed)."""
        new_id = self._new_id()
        self._kem[new_id] = (rng(KEM_SEED_BYTES), True, now)
        for old in self._last_resort_ids()[: -MAX_OLD_SIGNED_PREKEYS - 1]:
            del self._kem[old]
        return new_id

    def _last_resort_ids(self) -> list[int]:
        """Ids of the last-resort PQ prekeys, oldest first (the last one is current)."""
        return sorted(k for k, (_, last, _) in self._kem.items() if last)

    def maintain(
        self,
        *,
        now: int,
        rng: Random = os.urandom,
        rotate_after: int = SIGNED_PREKEY_ROTATION_S,
        grace: int = PREKEY_GRACE_S,
    ) -> Maintenance:
        """Do what is due at `now` (unix seconds): rotate the signed and the last-resort PQ
        prekey when older than `rotate_after`; delete replaced ones `grace` seconds after their
        replacement was made, and one-time keys handed out `grace` seconds ago and never used;
        refill the one-time pools when fewer than ONE_TIME_PREKEYS_LOW are left to hand out. A
        key dated more than `rotate_after` in the future (the clock was wrong when it was made)
        is rotated too, so a clock set back cannot stop rotation."""
        rotated = False
        created = self.signed_prekey_created()
        if now - created >= rotate_after or created - now > rotate_after:
            self.rotate_signed_prekey(now=now, rng=rng)
            rotated = True
        created = self._kem[self._last_resort_ids()[-1]][2]
        if now - created >= rotate_after or created - now > rotate_after:
            self.rotate_last_resort(now=now, rng=rng)
            rotated = True
        deleted = 0
        for key_id, offered_at in list(self._offered.items()):
            if now - offered_at >= grace:  # handed out long ago and never used
                del self._offered[key_id]
                deleted += int(self._one_time.pop(key_id, None) is not None)
                deleted += int(self._kem.pop(key_id, None) is not None)
        for old, retired in self._retired(now):
            if now - retired >= grace:
                if old in self._signed:
                    del self._signed[old]
                    self._seen.pop(old, None)
                else:
                    del self._kem[old]
                deleted += 1
        refilled = self.refill(now=now, rng=rng)
        return Maintenance(rotated=rotated, deleted=deleted, refilled=refilled)

    def refill(self, *, now: int, rng: Random = os.urandom) -> int:
        """Add up to DEFAULT_ONE_TIME_PREKEYS of each kind when fewer than ONE_TIME_PREKEYS_LOW
        of either kind are left to hand out; returns how many were added. It never evicts a key
        already handed out (its first message may be on its way): with MAX_ONE_TIME_PREKEYS
        handed out and unused, bundles go without one-time keys until some are used or expire."""
        if min(self.unoffered_one_time_count(), self._unoffered_kem_count()) >= ONE_TIME_PREKEYS_LOW:
            return 0
        kem_one_time = sum(1 for _, last, _ in self._kem.values() if not last)
        count = min(DEFAULT_ONE_TIME_PREKEYS,
                    MAX_ONE_TIME_PREKEYS - max(len(self._one_time), kem_one_time))
        if count > 0:
            self.replenish(count=count, now=now, rng=rng)
        return max(count, 0)

    def _retired(self, now: int) -> list[tuple[int, int]]:
        """(id, when it was replaced) of every replaced signed and last-resort PQ prekey: the
        time its successor was made, or `now` if that lies in the future (a wrong clock then)."""
        out = []
        signed = sorted(self._signed)
        for old, successor in pairwise(signed):
            out.append((old, min(self._signed[successor][1], now)))
        last_resort = self._last_resort_ids()
        for old, successor in pairwise(last_resort):
            out.append((old, min(self._kem[successor][2], now)))
        return out

    def next_due(self, *, rotate_after: int = SIGNED_PREKEY_ROTATION_S,
                 grace: int = PREKEY_GRACE_S) -> int:
        """When (unix seconds) `maintain` has something to do next, refills aside (those
        follow a bundle being handed out): a rotation, or the end of a grace (of a replaced
        key, or of a one-time key handed out and not used)."""
        due = [self.signed_prekey_created() + rotate_after,
               self._kem[self._last_resort_ids()[-1]][2] + rotate_after]
        due += [retired + grace for _, retired in self._retired(2**62)]
        due += [offered_at + grace for offered_at in self._offered.values()]
        return min(due)

    def replenish(self, *, count: int, now: int, rng: Random = os.urandom) -> None:
        """Add up to `count` classical and PQ one-time prekeys, within MAX_ONE_TIME_PREKEYS;
        when full, the oldest keys already offered make room."""
        for _ in range(count):
            self._make_room()
            self._one_time[self._new_id()] = rng(KEY_BYTES)
            self._kem[self._new_id()] = (rng(KEM_SEED_BYTES), False, now)

    def _make_room(self) -> None:
        while len(self._one_time) >= MAX_ONE_TIME_PREKEYS:
            victim = next((k for k in self._one_time if k in self._offered), next(iter(self._one_time)))
            del self._one_time[victim]
            self._offered.pop(victim, None)
        kem_one_time = [k for k, (_, last, _) in self._kem.items() if not last]
        while len(kem_one_time) >= MAX_ONE_TIME_PREKEYS:
            victim = next((k for k in kem_one_time if k in self._offered), kem_one_time[0])
            kem_one_time.remove(victim)
            del self._kem[victim]
            self._offered.pop(victim, None)

    # --- public bundle ----------------------------------------------------------------------------

    @property
    def current_signed_prekey_id(self) -> int:
        """The id of the newest signed prekey, the one bundles offer."""
        return max(self._signed)

    def signed_prekey_created(self) -> int:
        """When (unix seconds) the current signed prekey was made: it is rotated by age."""
        return self._signed[self.current_signed_prekey_id][1]

    def unoffered_one_time_count(self) -> int:
        """Classical one-time prekeys not yet put in any bundle."""
        return sum(1 for k in self._one_time if k not in self._offered)

    def private_key_count(self) -> int:
        """How many private prekeys of any kind are held: fewer than before means some were
        deleted, and the caller clears them from its files too."""
        return len(self._signed) + len(self._one_time) + len(self._kem)

    def _unoffered_kem_count(self) -> int:
        return sum(1 for k, (_, last, _) in self._kem.items()
                   if not last and k not in self._offered)

    def bundle(
        self,
        identity: IdentityKeyPair,
        device: DeviceKeyPair,
        *,
        seq: int,
        expires: int,
        one_time: bool = True,
        now: int | None = None,
    ) -> PreKeyBundle:
        """A bundle for one initiator, with `device`'s binding to `identity` (PROTOCOL.md
        section 4 "Binding": the device key signs, so the pair, not the public key, is needed).
        With `one_time`, it carries a classical and a PQ one-time prekey nobody was offered yet
        (marked offered at `now`, by default when the current signed prekey was made: persist the
        store afterwards); otherwise, or when none is left, only the signed and last-resort keys
        (for records many can read, like the DHT, where a one-time key would be used by several
        initiators)."""
        spk_id = self.current_signed_prekey_id
        opk_id = kem_id = None
        if one_time:
            opk_id = next((k for k in self._one_time if k not in self._offered), None)
            kem_id = next(
                (k for k, (_, last, _) in self._kem.items() if not last and k not in self._offered),
                None,
            )
        last_resort = kem_id is None
        if kem_id is None:
            kem_id = self._last_resort_ids()[-1]
        offered_at = self.signed_prekey_created() if now is None else now
        if opk_id is not None:
            self._offered[opk_id] = offered_at
        if not last_resort:
            self._offered[kem_id] = offered_at
        opk = DHKeyPair(self._one_time[opk_id]).public if opk_id is not None else None
        return PreKeyBundle(
            identity=identity.public,
            device=device.public,
            binding=sign_binding(device, identity.public),
            seq=seq,
            expires=expires,
            signed_prekey_id=spk_id,
            signed_prekey=DHKeyPair(self._signed[spk_id][0]).public,
            one_time_prekey_id=opk_id,
            one_time_prekey=opk,
            kem_prekey_id=kem_id,
            kem_prekey=KEMKeyPair(self._kem[kem_id][0]).public,
            kem_last_resort=last_resort,
        )

    # --- lookups used by PQXDH respond (read only) --------------------------------------------------

    def signed_prekey(self, key_id: int) -> DHKeyPair | None:
        """The signed prekey with this id, or None if it was rotated out (or never existed)."""
        entry = self._signed.get(key_id)
        return DHKeyPair(entry[0]) if entry else None

    def one_time_prekey(self, key_id: int) -> DHKeyPair | None:
        """The one-time prekey with this id, or None if it was used or dropped."""
        raw = self._one_time.get(key_id)
        return DHKeyPair(raw) if raw else None

    def kem_prekey(self, key_id: int) -> tuple[KEMKeyPair, bool] | None:
        """The PQ prekey with this id and whether it is the last-resort one, or None."""
        entry = self._kem.get(key_id)
        return (KEMKeyPair(entry[0]), entry[1]) if entry else None

    def is_replay(self, signed_prekey_id: int, base_key: bytes) -> bool:
        """Whether a first message with this base key (and no one-time prekey) was accepted before."""
        seen = self._seen.get(signed_prekey_id)
        return seen is not None and base_key in seen

    def commit_use(self, use: PreKeyUse) -> None:
        """Consume what a successfully decrypted first message used: one-time keys are deleted;
        without a classical one-time key the base key is remembered against replay."""
        if use.one_time_prekey_id is not None:
            self._one_time.pop(use.one_time_prekey_id, None)
            self._offered.pop(use.one_time_prekey_id, None)
        else:
            seen = self._seen.setdefault(use.signed_prekey_id, OrderedDict())
            seen[use.base_key] = None
            while len(seen) > MAX_SEEN_BASE_KEYS:
                seen.popitem(last=False)
        if not use.kem_last_resort:
            self._kem.pop(use.kem_prekey_id, None)
            self._offered.pop(use.kem_prekey_id, None)

    # --- serialization ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The store's serialized form (PROTOCOL.md section 17); secret, stored only locally."""
        return codec.encode(
            {
                "v": STORE_VERSION,
                "next": self._next_id,
                "spk": [[k, key, created] for k, (key, created) in self._signed.items()],
                "opk": [[k, key] for k, key in self._one_time.items()],
                "pq": [[k, seed, last, created] for k, (seed, last, created) in self._kem.items()],
                "offered": [[k, at] for k, at in sorted(self._offered.items())],
                "seen": [[k, list(v)] for k, v in self._seen.items()],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Read back `to_bytes`; DecodeError if malformed."""
        f = codec.decode_map(data, limit=MAX_STORE_BYTES, what="prekey store", version=STORE_VERSION)
        store = cls()
        store._next_id = f.int("next", 1, MAX_PREKEY_ID + 1)
        try:
            for k, key, created in f.list("spk", max_items=MAX_OLD_SIGNED_PREKEYS + 1):
                store._signed[_id(k)] = (_raw(key, KEY_BYTES), _time(created))
            for k, key in f.list("opk", max_items=MAX_ONE_TIME_PREKEYS):
                store._one_time[_id(k)] = _raw(key, KEY_BYTES)
            max_pq = MAX_ONE_TIME_PREKEYS + MAX_OLD_SIGNED_PREKEYS + 1
            for k, seed, last, created in f.list("pq", max_items=max_pq):
                if not isinstance(last, bool):
                    raise DecodeError("prekey store: bad last-resort flag")
                store._kem[_id(k)] = (_raw(seed, KEM_SEED_BYTES), last, _time(created))
            for entry in f.list("offered", max_items=2 * MAX_ONE_TIME_PREKEYS):
                if isinstance(entry, list):
                    k, at = entry
                    store._offered[_id(k)] = _time(at)
                else:  # stored before offers were dated: count from the load
                    store._offered[_id(entry)] = -1
            for k, keys in f.list("seen", max_items=MAX_OLD_SIGNED_PREKEYS + 1):
                if not isinstance(keys, list) or len(keys) > MAX_SEEN_BASE_KEYS:
                    raise DecodeError("prekey store: bad seen list")
                store._seen[_id(k)] = OrderedDict((_raw(b, KEY_BYTES), None) for b in keys)
        except (TypeError, ValueError) as exc:  # wrong shapes while unpacking
            raise DecodeError(f"prekey store: malformed entry ({exc})") from exc
        f.done()
        if not store._signed or not any(last for _, last, _ in store._kem.values()):
            raise DecodeError("prekey store: no signed or last-resort prekey")
        for k, at in store._offered.items():
            if at < 0:
                store._offered[k] = store.signed_prekey_created()
        return store


def _id(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PREKEY_ID:
        raise DecodeError("prekey store: bad key id")
    return value


def _time(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DecodeError("prekey store: bad time")
    return value


def _raw(value: object, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise DecodeError("prekey store: bad key bytes")
    return value
