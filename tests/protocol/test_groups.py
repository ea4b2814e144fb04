"""Group membership: signed operations and deterministic convergence (PROTOCOL.md section 27)."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import DecodeError, GroupError, InvalidRecord
from node.protocol import codec
from node.protocol.groups import (
    MAX_GROUP_MEMBERS,
    OP_SIGNATURE_CONTEXT,
    GroupLog,
    GroupOp,
)
from node.protocol.keys import IdentityKeyPair

GID = bytes(range(32))
TS = 1_900_000_000_000


def accounts(n: int) -> list[IdentityKeyPair]:
    return [IdentityKeyPair(bytes([i + 1]) * 32) for i in range(n)]


def k(identity: IdentityKeyPair) -> bytes:
    return identity.public.to_bytes()


def group(n: int = 4) -> tuple[list[IdentityKeyPair], GroupLog]:
    people = accounts(n)
    log = GroupLog.create(people[0], group_id=GID, name="family",
                          members=[k(p) for p in people[1:]], sent_at_ms=TS)
    return people, log


def copy(log: GroupLog) -> GroupLog:
    return GroupLog.from_signed(log.group_id, [op.signed for op in log.ops])


def test_create_add_remove_promote_rename_leave() -> None:
    people, log = group(3)
    a, b, c = people
    extra = IdentityKeyPair.generate()
    assert log.state.name == "family" and log.state.admins == {k(a)}
    assert log.state.members == {k(a), k(b), k(c)}
    log.make(a, "add", who=[k(extra)], sent_at_ms=TS + 1)
    log.make(a, "promote", who=[k(b)], sent_at_ms=TS + 2)
    log.make(b, "rename", name="fam", sent_at_ms=TS + 3)
    log.make(b, "remove", who=[k(c)], sent_at_ms=TS + 4)
    log.make(a, "leave", sent_at_ms=TS + 5)
    s = log.state
    assert s.name == "fam" and s.members == {k(b), k(extra)} and s.admins == {k(b)}
    assert [op.kind for op in s.applied] == ["create", "add", "promote", "rename", "remove",
                                             "leave"]
    # Another device holding the same operations, received in reverse, computes the same.
    other = GroupLog.from_signed(GID, [op.signed for op in reversed(log.ops)])
    assert other.state == s


def test_local_changes_that_the_rule_refuses_are_clear_errors_and_change_nothing() -> None:
    people, log = group(3)
    a, b, _ = people
    before = log.state
    with pytest.raises(GroupError, match="only an admin"):
        log.make(b, "add", who=[k(IdentityKeyPair.generate())], sent_at_ms=TS)
    with pytest.raises(GroupError, match="already a member"):
        log.make(a, "add", who=[k(b)], sent_at_ms=TS)
    with pytest.raises(GroupError, match="not a member"):
        log.make(a, "remove", who=[k(IdentityKeyPair.generate())], sent_at_ms=TS)
    with pytest.raises(GroupError, match="leaves"):
        log.make(a, "remove", who=[k(a)], sent_at_ms=TS)
    with pytest.raises(GroupError, match="only a member"):
        log.make(IdentityKeyPair.generate(), "leave", sent_at_ms=TS)
    assert log.state == before


def test_a_group_holds_at_most_1000_members() -> None:
    people = accounts(2)
    others = [bytes([1]) + i.to_bytes(31, "big") for i in range(MAX_GROUP_MEMBERS - 1)]
    with pytest.raises(GroupError, match="at most"):
        GroupLog.create(people[0], group_id=GID, name="big", members=[*others, bytes(32)],
                        sent_at_ms=TS)
    log = GroupLog.create(people[0], group_id=GID, name="big", members=others, sent_at_ms=TS)
    assert len(log.state.members) == MAX_GROUP_MEMBERS
    with pytest.raises(GroupError, match="full"):
        log.make(people[0], "add", who=[k(people[1])], sent_at_ms=TS + 1)
    # A received add past the limit is refused by the rule too.
    assert GroupLog.from_signed(GID, [op.signed for op in log.ops]).state == log.state


def test_forged_operations_are_refused_and_change_nothing() -> None:
    people, log = group(3)
    a, b, _ = people
    before = log.state
    # Wrong signature: b's op with a's key id swapped in.
    op = GroupOp.sign(b, group_id=GID, kind="rename", prev=log.state.heads, sent_at_ms=TS,
                      name="pwned")
    outer = codec.decode(op.signed, limit=10_000, what="t")
    body = codec.decode(outer["body"], limit=10_000, what="t")
    body["by"] = k(a)
    forged = codec.encode({"body": codec.encode(body), "sig": outer["sig"]})
    with pytest.raises(InvalidRecord):
        log.receive(forged)
    # Tampered body, valid encoding.
    body["by"] = k(b)
    body["name"] = "changed"
    with pytest.raises(InvalidRecord):
        log.receive(codec.encode({"body": codec.encode(body), "sig": outer["sig"]}))
    # Non-admin (validly signed by a member): held, refused by the rule.
    log.receive(op.signed)
    assert log.state.name == "family" and op.hash in log.state.refused
    assert log.state.members == before.members and log.state.admins == before.admins
    # A stranger's op is not even held.
    stranger = IdentityKeyPair.generate()
    strange = GroupOp.sign(stranger, group_id=GID, kind="add", prev=log.state.heads,
                           sent_at_ms=TS, who=[k(stranger)])
    with pytest.raises(InvalidRecord, match="never a member"):
        log.receive(strange.signed)
    # A second create is refused.
    with pytest.raises(InvalidRecord, match="exactly one create"):
        log.receive(GroupOp.sign(a, group_id=GID, kind="create", prev=(), sent_at_ms=TS,
                                 name="x").signed)
    # Another group's op.
    with pytest.raises(InvalidRecord, match="another group"):
        log.receive(GroupOp.sign(a, group_id=bytes(32), kind="leave", prev=log.state.heads,
                                 sent_at_ms=TS).signed)


def test_a_stale_operation_of_a_removed_admin_is_refused() -> None:
    people, log = group(3)
    a, b, c = people
    log.make(a, "promote", who=[k(b)], sent_at_ms=TS + 1)
    stale_heads = log.state.heads
    log.make(a, "remove", who=[k(b)], sent_at_ms=TS + 2)
    # b, removed, signs on the state before its removal (its stale view): refused.
    stale = GroupOp.sign(b, group_id=GID, kind="remove", prev=stale_heads, sent_at_ms=TS + 3,
                         who=[k(c)])
    log.receive(stale.signed)
    assert stale.hash in log.state.refused and k(c) in log.state.members


def test_an_operation_waits_for_its_parents() -> None:
    people, log = group(3)
    a, b, _ = people
    first = copy(log)
    op1 = log.make(a, "promote", who=[k(b)], sent_at_ms=TS + 1)
    op2 = log.make(b, "rename", name="later", sent_at_ms=TS + 2)
    assert first.receive(op2.signed) == [] and first.pending == 1
    assert first.state.name == "family"
    assert [o.hash for o in first.receive(op1.signed)] == [op1.hash, op2.hash]
    assert first.state == log.state and first.pending == 0


def test_concurrent_mutual_removals_converge_one_way() -> None:
    people, log = group(3)
    a, b, c = people
    log.make(a, "promote", who=[k(b)], sent_at_ms=TS + 1)
    left, right = copy(log), copy(log)
    r1 = left.make(a, "remove", who=[k(b)], sent_at_ms=TS + 2)
    r2 = right.make(b, "remove", who=[k(a)], sent_at_ms=TS + 2)
    left.receive(r2.signed)
    right.receive(r1.signed)
    assert left.state == right.state
    assert len(left.state.members) == 2 and k(c) in left.state.members
    assert len(left.state.refused) == 1


def test_a_removal_wins_over_concurrent_changes_by_the_removed() -> None:
    people, log = group(4)
    a, b, c, d = people
    log.make(a, "promote", who=[k(b)], sent_at_ms=TS + 1)
    left, right = copy(log), copy(log)
    left.make(a, "rename", name="a's", sent_at_ms=TS + 2)
    left.make(a, "remove", who=[k(b)], sent_at_ms=TS + 3)
    newcomer = IdentityKeyPair.generate()
    right.make(b, "add", who=[k(newcomer)], sent_at_ms=TS + 2)
    right.make(b, "remove", who=[k(d)], sent_at_ms=TS + 3)
    for op in right.ops:
        left.receive(op.signed)
    for op in left.ops:
        right.receive(op.signed)
    assert left.state == right.state
    assert left.state.members == {k(a), k(c), k(d)}


def test_the_last_admin_leaving_makes_the_smallest_member_admin() -> None:
    people, log = group(3)
    log.make(people[0], "leave", sent_at_ms=TS + 1)
    assert log.state.admins == {min(k(p) for p in people[1:])}


def test_malformed_operations_are_decode_errors() -> None:
    people, log = group(2)
    op = log.ops[0]
    for bad in (b"", b"\xa0", op.signed[:-1], op.signed + b"\x00",
                codec.encode({"body": b"\xa0", "sig": bytes(64)})):
        with pytest.raises((DecodeError, InvalidRecord)):
            log.receive(bad)
    # A body signed correctly but not canonically encoded (unsorted prev) is refused.
    body = op.body()
    body["prev"] = [b"\x02" * 32, b"\x01" * 32]
    body["op"] = "leave"
    del body["name"]
    del body["who"]
    raw = codec.encode(body)
    with pytest.raises(DecodeError, match="sorted"):
        GroupOp.verify(codec.encode({"body": raw,
                                     "sig": people[0].sign(OP_SIGNATURE_CONTEXT + raw)}))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(2, 4))
def test_random_concurrent_changes_converge_whatever_the_delivery_order(seed: int,
                                                                      replicas: int) -> None:
    """Several replicas make random changes while partitioned, in rounds, then exchange every
    operation in random orders: all compute the same state."""
    rng = random.Random(seed)
    people = accounts(6)
    base = GroupLog.create(people[0], group_id=GID, name="g",
                           members=[k(p) for p in people[1:4]], sent_at_ms=TS)
    base.make(people[0], "promote", who=[k(people[1]), k(people[2])], sent_at_ms=TS + 1)
    logs = [copy(base) for _ in range(replicas)]
    ts = TS + 2
    for _ in range(3):  # rounds: partitioned changes, then a partial exchange
        for log in logs:
            for _ in range(rng.randint(0, 3)):
                actor = rng.choice(people)
                kind = rng.choice(["add", "remove", "leave", "promote", "rename"])
                who = [k(p) for p in rng.sample(people, rng.randint(1, 2))]
                ts += 1
                with contextlib.suppress(GroupError):
                    log.make(actor, kind, sent_at_ms=ts,  # type: ignore[arg-type]
                             name=f"n{ts}" if kind == "rename" else None,
                             who=who if kind in ("add", "remove", "promote") else ())
        src, dst = rng.sample(logs, 2)
        for op in src.ops:
            dst.receive(op.signed)
    everything = {op.hash: op.signed for log in logs for op in log.ops}
    finals = []
    for _ in range(replicas):
        ops = list(everything.values())
        rng.shuffle(ops)
        finals.append(GroupLog.from_signed(GID, ops).state)
    for log in logs:
        for signed in everything.values():
            log.receive(signed)
        finals.append(log.state)
    assert all(s == finals[0] for s in finals)
    assert finals[0].admins <= finals[0].members
