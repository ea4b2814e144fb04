"""Group membership: signed operations and the state every member computes from them
(PROTOCOL.md section 27.1 to 27.3).

A group is named by 32 random bytes. Its state (name, members, admins) is not stored as such:
it is what a fixed rule computes from the set of **operations** the device holds, so two devices
holding the same operations hold the same state, whatever order they received them in.

    signed-op = {"body": bstr, "sig": bstr .size 64}
    body      = {"v": 1, "g": group id, "op": kind, "by": actor IK, "prev": [* op hash],
                 "ts": uint, ? "name": tstr, ? "who": [+ account IK]}
    sig       = Ed25519(actor IK, "pigeon-group-op-v1" || 0x00 || body)
    op hash   = SHA-256(body)

`prev` names the heads of the operation graph the actor held when it signed (the state it
applies to). The operations form a DAG; the state is computed by applying them in one
deterministic total order (`linear_order`), each one only if its actor is allowed to make it at
that point, and refused otherwise (refused ones stay in the graph and change nothing):

1. The order is Kahn's topological order of the DAG, ties broken by op hash (bytewise).
2. `create` (empty `prev`, exactly one per group) makes the actor member and admin, and `who`
   members. `add`, `remove`, `promote` and `rename` need an admin; `leave` a member. `add`
   names non-members, `remove` and `promote` members (`remove` never the actor itself, who
   leaves instead; `promote` non-admins). An operation breaking any rule, or making the group
   exceed MAX_GROUP_MEMBERS, is refused as a whole.
3. When the last admin leaves or is removed, the remaining member with the smallest identity
   key (bytewise) becomes admin, so a group never stays without one while it has members.
4. Removals win: an applied operation whose actor an applied `remove` or `leave` removes, and
   that is concurrent with that removal (neither its ancestor nor its descendant), is voided
   (refused), and the state is computed again; this repeats until nothing more is voided (a
   voided operation stays voided). So a member removed while partitioned cannot add, remove or
   rename on its side of the partition.

Operations are authenticated by the acting account's identity key (as a device list is, section
25.1); they reveal membership only to members, inside pairwise sessions.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal, Self

from node.errors import DecodeError, GroupError, InvalidRecord, LimitExceeded
from node.protocol import codec
from node.protocol.keys import KEY_BYTES, SIGNATURE_BYTES, IdentityKey, IdentityKeyPair

__all__ = [
    "GROUP_ID_BYTES",
    "GROUP_OPS",
    "MAX_GROUP_MEMBERS",
    "MAX_GROUP_OPS",
    "GroupLog",
    "GroupOp",
    "GroupOpKind",
    "GroupState",
]

GROUP_ID_BYTES: Final = 32
OP_HASH_BYTES: Final = 32
OP_VERSION: Final = 1
#: Domain separation of the operation signature from every other signature by IK.
OP_SIGNATURE_CONTEXT: Final = b"pigeon-group-op-v1\x00"
#: Most members of one group (Signal's limit is 1,000, WhatsApp's 1,024).
MAX_GROUP_MEMBERS: Final = 1000
#: Most operations one group's log holds: the whole log goes to a member who is added, in one
#: message (MAX_PLAINTEXT_BYTES), so it must stay bounded; a creation with 1,000 members is ~33 KB.
MAX_GROUP_OPS: Final = 1000
#: Most heads an operation names: concurrent branches beyond this are merged by later ops.
MAX_PREV: Final = 64
#: Largest encoded signed operation: a 1,000-account `who` list and a name, with room.
MAX_OP_BYTES: Final = 36 * 1024
MAX_GROUP_NAME_BYTES: Final = 256
MAX_TIMESTAMP_MS: Final = 2**53

GroupOpKind = Literal["create", "add", "remove", "leave", "promote", "rename"]
GROUP_OPS: Final = ("create", "add", "remove", "leave", "promote", "rename")
_REMOVALS: Final = frozenset({"remove", "leave"})


def _op_hash(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupOp:
    """One verified, signed membership operation. `signed` is its wire form, `hash` its id."""

    group_id: bytes
    kind: GroupOpKind
    actor: bytes  # identity key of the account that signed it
    prev: tuple[bytes, ...]
    sent_at_ms: int
    name: str | None = None
    who: tuple[bytes, ...] = ()
    signed: bytes = b""
    hash: bytes = b""

    def __post_init__(self) -> None:
        if len(self.group_id) != GROUP_ID_BYTES or len(self.actor) != KEY_BYTES:
            raise ValueError("a group operation names a 32-byte group and a 32-byte actor")
        if self.kind not in GROUP_OPS:
            raise ValueError(f"unknown group operation {self.kind!r}")
        if (self.kind == "create") != (not self.prev):
            raise ValueError("exactly the create operation has no previous state")
        if len(self.prev) > MAX_PREV or len(set(self.prev)) != len(self.prev) or any(
                len(p) != OP_HASH_BYTES for p in self.prev):
            raise ValueError(f"prev names 1 to {MAX_PREV} distinct 32-byte op hashes")
        named = self.kind in ("create", "rename")
        if named != (self.name is not None):
            raise ValueError("a name goes with create and rename only")
        if self.name is not None and (
                not self.name.strip() or len(self.name.encode("utf-8")) > MAX_GROUP_NAME_BYTES):
            raise ValueError(f"a group name is 1 to {MAX_GROUP_NAME_BYTES} bytes, not blank")
        if self.kind in ("add", "remove", "promote") and not self.who:
            raise ValueError(f"{self.kind} names at least one account")
        if self.kind in ("leave", "rename") and self.who:
            raise ValueError(f"{self.kind} names no accounts")
        if len(self.who) > MAX_GROUP_MEMBERS or len(set(self.who)) != len(self.who) or any(
                len(w) != KEY_BYTES for w in self.who):
            raise ValueError(f"who names up to {MAX_GROUP_MEMBERS} distinct 32-byte keys")
        if not 0 <= self.sent_at_ms <= MAX_TIMESTAMP_MS:
            raise ValueError("timestamp out of range")

    def body(self) -> dict[str, object]:
        """The body map that is signed."""
        body: dict[str, object] = {"v": OP_VERSION, "g": self.group_id, "op": self.kind,
                                   "by": self.actor, "prev": sorted(self.prev),
                                   "ts": self.sent_at_ms}
        if self.name is not None:
            body["name"] = self.name
        if self.who:
            body["who"] = list(self.who)
        return body

    @classmethod
    def sign(cls, identity: IdentityKeyPair, *, group_id: bytes, kind: GroupOpKind,
             prev: Iterable[bytes], sent_at_ms: int, name: str | None = None,
             who: Iterable[bytes] = ()) -> Self:
        """A new operation signed by `identity` (ValueError for a malformed one)."""
        unsigned = cls(group_id=group_id, kind=kind, actor=identity.public.to_bytes(),
                       prev=tuple(sorted(prev)), sent_at_ms=sent_at_ms, name=name,
                       who=tuple(who))
        body = codec.encode(unsigned.body())
        signed = codec.encode({"body": body, "sig": identity.sign(OP_SIGNATURE_CONTEXT + body)})
        if len(signed) > MAX_OP_BYTES:
            raise ValueError(f"a group operation is at most {MAX_OP_BYTES} bytes")
        return cls(group_id=group_id, kind=kind, actor=unsigned.actor, prev=unsigned.prev,
                   sent_at_ms=sent_at_ms, name=name, who=unsigned.who, signed=signed,
                   hash=_op_hash(body))

    @classmethod
    def verify(cls, data: bytes) -> Self:
        """Decode a signed operation and check its signature by its actor; InvalidRecord for a
        bad signature, DecodeError (or LimitExceeded) for anything malformed."""
        outer = codec.decode_map(data, limit=MAX_OP_BYTES, what="group operation")
        body_bytes = outer.bytes("body", max_size=MAX_OP_BYTES)
        sig = outer.bytes("sig", SIGNATURE_BYTES)
        outer.done()
        f = codec.decode_map(body_bytes, limit=MAX_OP_BYTES, what="group operation body",
                             version=OP_VERSION)
        group_id = f.bytes("g", GROUP_ID_BYTES)
        kind = f.text("op", max_size=16)
        actor = f.bytes("by", KEY_BYTES)
        prev = f.list("prev", max_items=MAX_PREV)
        sent_at = f.int("ts", 0, MAX_TIMESTAMP_MS)
        name = f.text("name", max_size=MAX_GROUP_NAME_BYTES, optional=True)
        who = f.list("who", max_items=MAX_GROUP_MEMBERS, optional=True)
        f.done()
        if kind not in GROUP_OPS:
            raise DecodeError(f"group operation: unknown kind {kind!r}")
        if not all(isinstance(p, bytes) for p in prev) or (
                who is not None and (not who or not all(isinstance(w, bytes) for w in who))):
            raise DecodeError("group operation: prev and who hold byte strings")
        if list(prev) != sorted(prev):
            raise DecodeError("group operation: prev must be sorted")
        try:
            op = cls(group_id=group_id, kind=kind,  # type: ignore[arg-type]
                     actor=actor, prev=tuple(prev), sent_at_ms=sent_at, name=name,
                     who=tuple(who or ()), signed=bytes(data), hash=_op_hash(body_bytes))
        except ValueError as exc:
            raise DecodeError(f"group operation: {exc}") from exc
        if codec.encode(op.body()) != body_bytes:
            raise DecodeError("group operation: body is not canonically encoded")
        IdentityKey.from_bytes(actor).verify(sig, OP_SIGNATURE_CONTEXT + body_bytes)
        return op


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupState:
    """A group as computed from a set of operations (module docstring)."""

    group_id: bytes
    name: str
    members: frozenset[bytes]
    admins: frozenset[bytes]
    heads: tuple[bytes, ...]
    #: Operations applied, in the order applied (the history's membership notices).
    applied: tuple[GroupOp, ...] = ()
    #: Hashes of operations held but refused by the rule (unauthorized, stale).
    refused: frozenset[bytes] = field(default_factory=frozenset)

    @property
    def state_hash(self) -> bytes:
        """SHA-256 of the sorted heads: the state an operation made now applies to."""
        return hashlib.sha256(b"".join(sorted(self.heads))).digest()

    def is_admin(self, account: bytes) -> bool:
        """Whether `account` (identity key bytes) is an admin now."""
        return account in self.admins


class GroupLog:
    """The operations of one group held by a device, and the state they give.

    `receive` takes a signed operation from anyone; it is kept only if it verifies, belongs to
    this group, and is signed by an account that a create or add among its ancestors names
    (others cannot make a member store anything). An operation whose parents are not all held
    waits (`pending`) until they arrive. `state` is recomputed from all held operations by the
    rule of the module docstring.
    """

    def __init__(self, group_id: bytes) -> None:
        if len(group_id) != GROUP_ID_BYTES:
            raise ValueError("a group id is 32 bytes")
        self.group_id = group_id
        self._ops: dict[bytes, GroupOp] = {}
        self._pending: dict[bytes, GroupOp] = {}
        self._state = GroupState(group_id=group_id, name="", members=frozenset(),
                                 admins=frozenset(), heads=())
        # Recomputed on first read after a change: taking a whole log (up to MAX_GROUP_OPS
        # operations) computes the state once, not once per operation.
        self._dirty = False

    @classmethod
    def from_signed(cls, group_id: bytes, ops: Iterable[bytes]) -> Self:
        """A log from stored or received signed operations (any order)."""
        log = cls(group_id)
        log.receive_all(ops)
        return log

    @property
    def state(self) -> GroupState:
        """The state computed from every held operation."""
        if self._dirty:
            self._state = compute_state(self.group_id, self._ops)
            self._dirty = False
        return self._state

    @property
    def ops(self) -> tuple[GroupOp, ...]:
        """Held operations (pending ones excluded), in the order they are applied."""
        return tuple(self._ops[h] for h in linear_order(self._ops))

    @property
    def pending(self) -> int:
        """How many operations wait for a parent this device does not hold yet."""
        return len(self._pending)

    def __contains__(self, op_hash: object) -> bool:
        return op_hash in self._ops or op_hash in self._pending

    def receive_all(self, ops: Iterable[bytes]) -> list[GroupOp]:
        """`receive` each; returns the operations newly held. A malformed one is skipped (the
        others still count) and the first error is raised after all were tried."""
        added: list[GroupOp] = []
        error: Exception | None = None
        for data in ops:
            try:
                added.extend(self.receive(data))
            except (DecodeError, InvalidRecord, LimitExceeded) as exc:
                error = error or exc
        if error is not None:
            raise error
        return added

    def receive(self, data: bytes) -> list[GroupOp]:
        """Take one signed operation; returns the operations that became held (it, and pending
        ones it completed), [] for a duplicate or one still waiting for its parents. Raises
        InvalidRecord (bad signature, another group, a second create, an actor that no create or
        add among the op's ancestors names: never a member) or DecodeError. A waiting op whose
        actor turns out never a member is dropped when its parents arrive."""
        op = GroupOp.verify(data)
        if op.group_id != self.group_id:
            raise InvalidRecord("group operation of another group")
        if op.hash in self:
            return []
        if len(self._ops) + len(self._pending) >= MAX_GROUP_OPS:
            raise LimitExceeded("MAX_GROUP_OPS", f"a group holds at most {MAX_GROUP_OPS}")
        if op.kind == "create" and any(o.kind == "create" for o in self._ops.values()):
            raise InvalidRecord("a group has exactly one create operation")
        self._pending[op.hash] = op
        added = self._settle()
        if op.hash not in self:
            raise InvalidRecord("group operation by an account that was never a member")
        return added

    def _named_before(self, op: GroupOp) -> bool:
        """Whether a create or add among `op`'s ancestors names its actor (or made it): only
        then can the actor have signed it as a member, whatever became of that add later."""
        stack, seen = list(op.prev), set()
        while stack:
            h = stack.pop()
            if h in seen:
                continue
            seen.add(h)
            parent = self._ops[h]
            if parent.kind in ("create", "add") and (
                    op.actor in parent.who or (parent.kind == "create" and op.actor == parent.actor)):
                return True
            stack.extend(parent.prev)
        return False

    def _settle(self) -> list[GroupOp]:
        added: list[GroupOp] = []
        progress = True
        while progress:
            progress = False
            for h, op in list(self._pending.items()):
                if op.kind == "create" or all(p in self._ops for p in op.prev):
                    del self._pending[h]
                    progress = True
                    if op.kind != "create" and not self._named_before(op):
                        # Someone never a member signed it: not even held (it is no one's
                        # ancestor in a genuine member's log).
                        continue
                    self._ops[h] = op
                    added.append(op)
        if added:
            self._dirty = True
        return added

    def make(self, identity: IdentityKeyPair, kind: GroupOpKind, *, sent_at_ms: int,
             name: str | None = None, who: Iterable[bytes] = ()) -> GroupOp:
        """Sign an operation on the current state and hold it; GroupError (nothing changes)
        when the rule would refuse it: not a member or not an admin, a member already (add), not
        a member (remove, promote), removing oneself, a full group."""
        who = tuple(who)
        state = self.state
        me = identity.public.to_bytes()
        problem = check_op(state, kind, me, who)
        if problem:
            raise GroupError(problem)
        try:
            op = GroupOp.sign(identity, group_id=self.group_id, kind=kind, prev=state.heads,
                              sent_at_ms=sent_at_ms, name=name, who=who)
        except ValueError as exc:
            raise GroupError(str(exc)) from exc
        self.receive(op.signed)
        return op

    @classmethod
    def create(cls, identity: IdentityKeyPair, *, group_id: bytes, name: str,
               members: Iterable[bytes], sent_at_ms: int) -> Self:
        """A new group whose creator is its first admin, with `members` (identity keys, the
        creator not among them)."""
        members = tuple(members)
        me = identity.public.to_bytes()
        if me in members:
            raise GroupError("the creator is a member already; name the others")
        if len(members) + 1 > MAX_GROUP_MEMBERS:
            raise GroupError(f"a group has at most {MAX_GROUP_MEMBERS} members")
        try:
            op = GroupOp.sign(identity, group_id=group_id, kind="create", prev=(),
                              sent_at_ms=sent_at_ms, name=name, who=members)
        except ValueError as exc:
            raise GroupError(str(exc)) from exc
        log = cls(group_id)
        log.receive(op.signed)
        return log


def check_op(state: GroupState, kind: str, actor: bytes, who: tuple[bytes, ...]) -> str:
    """Why `actor` may not make this operation on `state` ("" if it may): rule 2 of the module
    docstring, shared by the state computation and by `GroupLog.make`."""
    if kind == "create":
        return "a group is created once" if state.members or state.heads else ""
    if actor not in state.members:
        return "only a member of the group can change it"
    if kind == "leave":
        return ""
    if actor not in state.admins:
        return "only an admin of the group can do that"
    if kind == "add":
        already = [w for w in who if w in state.members]
        if already:
            return "already a member of the group"
        if len(state.members) + len(who) > MAX_GROUP_MEMBERS:
            return f"the group is full ({MAX_GROUP_MEMBERS} members at most)"
    elif kind in ("remove", "promote"):
        if any(w not in state.members for w in who):
            return "not a member of the group"
        if kind == "remove" and actor in who:
            return "an admin leaves the group instead of removing itself"
        if kind == "promote" and any(w in state.admins for w in who):
            return "already an admin of the group"
    return ""


def linear_order(ops: dict[bytes, GroupOp]) -> list[bytes]:
    """Rule 1 of the module docstring: Kahn's topological order, ties by op hash (bytewise)."""
    children: dict[bytes, list[bytes]] = {h: [] for h in ops}
    waiting: dict[bytes, int] = {}
    for h, op in ops.items():
        parents = [p for p in op.prev if p in ops]
        waiting[h] = len(parents)
        for p in parents:
            children[p].append(h)
    ready = [h for h, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[bytes] = []
    while ready:
        h = heapq.heappop(ready)
        order.append(h)
        for child in children[h]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, child)
    return order


def _closure(start: bytes, edges: dict[bytes, list[bytes]]) -> set[bytes]:
    seen: set[bytes] = set()
    stack = list(edges.get(start, ()))
    while stack:
        h = stack.pop()
        if h not in seen:
            seen.add(h)
            stack.extend(edges.get(h, ()))
    return seen


def compute_state(group_id: bytes, ops: dict[bytes, GroupOp]) -> GroupState:
    """The state of rules 2 to 4: apply `ops` in `linear_order`, refusing what is not allowed,
    voiding operations concurrent with the removal of their actor until none is left."""
    order = linear_order(ops)
    parents = {h: [p for p in op.prev if p in ops] for h, op in ops.items()}
    children: dict[bytes, list[bytes]] = {h: [] for h in ops}
    for h, ps in parents.items():
        for p in ps:
            children[p].append(h)
    void: set[bytes] = set()
    while True:
        state = _apply(group_id, ops, order, void)
        more: set[bytes] = set()
        for removal in state.applied:
            if removal.kind not in _REMOVALS:
                continue
            gone = set(removal.who) if removal.kind == "remove" else {removal.actor}
            related = _closure(removal.hash, parents) | _closure(removal.hash, children)
            more.update(op.hash for op in state.applied
                        if op.actor in gone and op.hash != removal.hash
                        and op.hash not in related)
        if more <= void:
            return state
        void |= more


def _apply(group_id: bytes, ops: dict[bytes, GroupOp], order: list[bytes],
           void: set[bytes]) -> GroupState:
    name = ""
    members: set[bytes] = set()
    admins: set[bytes] = set()
    applied: list[GroupOp] = []
    refused: set[bytes] = set(void)
    created = False
    for h in order:
        op = ops[h]
        if h in void:
            continue
        state = GroupState(group_id=group_id, name=name, members=frozenset(members),
                           admins=frozenset(admins), heads=(h,) if created else ())
        if check_op(state, op.kind, op.actor, op.who):
            refused.add(h)
            continue
        if op.kind == "create":
            if len(op.who) + 1 > MAX_GROUP_MEMBERS or op.actor in op.who:
                refused.add(h)
                continue
            created = True
            name = op.name or ""
            members = {op.actor, *op.who}
            admins = {op.actor}
        elif op.kind == "add":
            members.update(op.who)
        elif op.kind in _REMOVALS:
            gone = set(op.who) if op.kind == "remove" else {op.actor}
            members -= gone
            admins -= gone
            if members and not admins:
                admins = {min(members)}
        elif op.kind == "promote":
            admins.update(op.who)
        elif op.kind == "rename":
            name = op.name or name
        applied.append(op)
    all_parents = {p for op in ops.values() for p in op.prev}
    heads = tuple(sorted(h for h in ops if h not in all_parents))
    return GroupState(group_id=group_id, name=name, members=frozenset(members),
                      admins=frozenset(admins), heads=heads, applied=tuple(applied),
                      refused=frozenset(refused))
