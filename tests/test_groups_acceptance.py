"""The groups acceptance (PROTOCOL.md section 27) with real `pigeon` processes on loopback, set up
and driven only through the command, with one `pigeon relay` holding every device's mailbox.

Five accounts a, b, c, d, e, every two of them contacts; a has two devices (a1, a2, linked with
`pigeon link` / `device add`). a1 creates the group. Then, in one run (the set-up is the
expensive part, so the phases share it):

1. `MESSAGES` (100) messages from random member devices: every member device shows each exactly
   once, each sender's in the order it sent them.
2. a1 removes e: e is told, receives nothing sent afterwards, and the sender chains e held before
   its removal do not open a message sent after it (its ciphertext taken from the sender, the
   bytes every member device got).
3. a1 makes b admin; then, while the two sides are stopped (partitioned), a removes b and b
   removes c. After they are back every member device shows the same membership: a, c, d (the
   removal of b wins over b's concurrent change).
4. d is stopped during `CATCH_UP` (50) messages and two changes (e added again, the group
   renamed); started again, it shows all of them exactly once, in order, with the right
   membership and name.
5. `CHAOS` messages (env PIGEON_GROUP_CHAOS_MESSAGES, default 500, the acceptance scale)
   while random member devices are killed with kill -9 and started again: nothing is lost
   or doubled on any member device.
6. c (a member, not an admin) runs a modified client on its data directory: it sends operations
   it may not make (an add by a non-admin, a rename whose signature it broke) and a group message
   whose sender-key signature it broke. Every other member device refuses them and changes
   nothing; c's genuine message after them arrives once everywhere.

Messages go in batches (`pigeon send GROUP --stdin`); queries run side by side.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from node import Config, Node, config_file
from node.device.datadir import DataDir
from node.errors import DecryptionFailed
from node.protocol.content import GroupOps
from node.protocol.groups import GroupOp
from node.protocol.keys import IdentityKeyPair
from node.protocol.senderkey import ReceiverChain
from tests.clitools import (
    FAST_RETRIES_TOML,
    LOOPBACK,
    DeviceSlot,
    Linking,
    pigeon,
    pigeon_json,
    stop_all,
    wait_until,
)
from tests.relaytools import RelayProcess

MESSAGES = 100
CATCH_UP = 50
CHAOS = int(os.environ.get("PIGEON_GROUP_CHAOS_MESSAGES", "500"))
KILLS = max(2, CHAOS // 50)
BATCH = 25
ACCOUNTS = ("a", "b", "c", "d", "e")
T = TypeVar("T")


class Device(DeviceSlot):
    """One device's data directory and, while it runs, its daemon."""

    def __init__(self, name: str, data_dir: Path, toml: str) -> None:
        super().__init__(data_dir)
        self.name, self.account, self.toml = name, name[0], toml
        self.sent = 0

    def send(self, group: str, count: int) -> list[str]:
        texts = [f"{self.name} {self.sent + i:05d}" for i in range(count)]
        self.sent += count
        pigeon(self.data_dir, "send", group, "--stdin", "--wait", "0", "--json",
               stdin="".join(t + "\n" for t in texts), timeout=120)
        return texts

    def history(self, group: str) -> list[dict[str, Any]]:
        value: list[dict[str, Any]] = pigeon_json(self.data_dir, "history", group, "--limit",
                                                  "5000")
        return value

    def info(self, group: str) -> dict[str, Any]:
        value: dict[str, Any] = pigeon_json(self.data_dir, "group", "info", group)
        return value

    def members(self, group: str) -> set[str]:
        return {m["account_id"] for m in self.info(group)["members"]}


def _each(devices: list[Device], query: Callable[[Device], T]) -> list[T]:
    """`query` on every device at once (each is a `pigeon` process, mostly start-up time)."""
    with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
        return list(pool.map(query, devices))


def _problems(device: Device, group: str, sent: list[str]) -> list[str]:
    """What is wrong with `device`'s history of `group` against `sent`: each exactly once, each
    sender's in its order."""
    try:
        history = device.history(group)
    except AssertionError as refused:
        # Not yet known there by this name: a device that was offline during a rename hears of
        # it with the rest of what it missed, after it starts (a side-by-side run asked first).
        return [f"{device.name}: {' '.join(str(refused).split())[:300]}"]
    texts = [e["text"] for e in history if e["kind"] == "text"]
    problems = []
    doubled = [t for t, n in Counter(texts).items() if n > 1]
    missing = sorted(set(sent) - set(texts))
    if doubled:
        problems.append(f"{device.name}: doubled {doubled[:5]}")
    if missing:
        problems.append(f"{device.name}: missing {len(missing)}, e.g. {missing[:5]}")
    by_sender: dict[str, list[int]] = {}
    for text in texts:
        parts = text.split()
        if len(parts) != 2 or not parts[1].isdigit():
            problems.append(f"{device.name}: a text nobody sent: {text!r}")
            continue
        by_sender.setdefault(parts[0], []).append(int(parts[1]))
    for sender, numbers in by_sender.items():
        if numbers != sorted(numbers):
            problems.append(f"{device.name}: {sender}'s messages out of order")
    return problems


def _wait_all(devices: list[Device], group: str, sent: list[str], *, timeout: float = 120
              ) -> None:
    last: list[str] = []

    def done() -> bool:
        nonlocal last
        last = [p for ps in _each(devices, lambda d: _problems(d, group, sent)) for p in ps]
        return not last

    try:
        wait_until(done, timeout=timeout, what="every message on every member device",
                   interval=1.0)
    except AssertionError:
        raise AssertionError("\n".join(last[:20])) from None


def _chains(device: Device, group_id: bytes) -> list[ReceiverChain]:
    """The sender chains `device` holds for the group (read from its database while it runs)."""
    db = sqlite3.connect(f"file:{DataDir(device.data_dir).database_file}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT state FROM peer_chains WHERE group_id=?", (group_id,)).fetchall()
    finally:
        db.close()
    return [ReceiverChain.from_bytes(bytes(r[0])) for r in rows]


def _payload(device: Device, text: str) -> bytes:
    """The sender-key message of a group text `device` sent: the bytes every member got."""
    db = sqlite3.connect(f"file:{DataDir(device.data_dir).database_file}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT p.payload FROM group_payloads p JOIN messages m ON"
                         " m.rowid = p.message_rowid WHERE m.body=?", (text,)).fetchone()
    finally:
        db.close()
    assert row is not None, text
    return bytes(row[0])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Device]]:
    relay = RelayProcess(tmp_path / "relay")
    devices: dict[str, Device] = {}
    linking: Linking | None = None
    try:
        address = str(relay.wait_ready()["addresses"][0])
        toml = FAST_RETRIES_TOML + f"relays = [{json.dumps(address)}]\n"
        devices = {n: Device(n, tmp_path / n, toml) for n in ("a1", "a2", "b", "c", "d", "e")}
        first = [devices[n] for n in ("a1", "b", "c", "d", "e")]

        def init(device: Device) -> None:
            pigeon(device.data_dir, "init", "--name", device.account)
            (device.data_dir / "config.toml").write_text(toml)
            device.start(wait=False)

        _each(first, init)
        _each(first, Device.wait_started)
        invites = dict(zip(ACCOUNTS, _each(first, lambda d: pigeon_json(d.data_dir, "invite")
                                            ["invite"]), strict=True))
        # Every later account adds every earlier one (10 `contact add`, side by side); both
        # sides then call each account by its letter (the joiner by its display name).
        pairs = [(j, i) for n, j in enumerate(ACCOUNTS) for i in ACCOUNTS[:n]]
        by_account = {d.account: d for d in first}
        with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
            list(pool.map(lambda p: pigeon_json(by_account[p[0]].data_dir, "contact", "add",
                                                p[1], invites[p[1]]), pairs))
        wait_until(lambda: all(len(c) == 4 for c in _each(
            first, lambda d: pigeon_json(d.data_dir, "contact", "list"))), timeout=60,
            what="every account has the four others")
        linking = Linking(devices["a2"].data_dir, toml)
        approved = pigeon_json(devices["a1"].data_dir, "device", "add", linking.code)
        assert linking.next("Linked", timeout=120)["confirmation"] == approved["confirmation"]
        assert linking.process.wait(timeout=30) == 0
        devices["a2"].start()
        others = [devices[n] for n in ("b", "c", "d", "e")]
        wait_until(lambda: all(len(next(c for c in contacts if c["name"] == "a")["peer_ids"]) == 2
                               for contacts in _each(others, lambda d: pigeon_json(
                                   d.data_dir, "contact", "list"))),
                   timeout=60, what="everyone knows a's second device")
        yield devices
    finally:
        if linking is not None:
            linking.stop()
        stop_all([d.daemon for d in devices.values() if d.daemon is not None])
        relay.kill()


@pytest.mark.slow(seconds=30)
def test_five_accounts_in_a_group_through_removal_partition_catch_up_and_kills(
        world: dict[str, Device]) -> None:
    rng = random.Random(0x6_0_0_D)
    a1, a2, b, c, d, e = (world[n] for n in ("a1", "a2", "b", "c", "d", "e"))
    everyone = [a1, a2, b, c, d, e]
    created = pigeon_json(a1.data_dir, "group", "create", "friends", "b", "c", "d", "e")
    assert len(created["members"]) == 5 and created["admin"]
    group_id = bytes.fromhex(created["group_id"])
    wait_until(lambda: all(any(g["name"] == "friends" for g in groups) for groups in _each(
        everyone, lambda dv: pigeon_json(dv.data_dir, "group", "list"))), timeout=60,
        what="every device knows the group")

    # 1. MESSAGES from member devices in a random order, each device sending some.
    sent: list[str] = []
    senders = [dv for dv in everyone for _ in range(2)]
    rng.shuffle(senders)
    share = MESSAGES // len(senders)
    for n, sender in enumerate(senders):
        sent += sender.send("friends", share + (MESSAGES % len(senders) if n == 0 else 0))
    _wait_all(everyone, "friends", sent)
    assert len(sent) == MESSAGES

    # 2. e is removed: its chains from before open nothing sent afterwards.
    kept = _chains(e, group_id)
    assert len(kept) == 5  # one per other member device
    pigeon_json(a1.data_dir, "group", "remove", "friends", "e")
    wait_until(lambda: not e.info("friends")["member"], timeout=60, what="e told")
    members = [a1, a2, b, c, d]
    e_before = len([x for x in e.history("friends") if x["kind"] == "text"])
    after = []
    for sender in (b, a2, c):
        after += sender.send("friends", 5)
    sent += after
    _wait_all(members, "friends", sent)
    assert len([x for x in e.history("friends") if x["kind"] == "text"]) == e_before
    for text in after:
        sender = next(dv for dv in members if dv.name == text.split()[0])
        payload = _payload(sender, text)
        for chain in kept:
            with pytest.raises(DecryptionFailed):
                chain.decrypt(payload)

    # 3. Partition: a removes b while b (an admin too) removes c; neither hears of the other.
    pigeon_json(a1.data_dir, "group", "promote", "friends", "b")
    wait_until(lambda: any(m["name"] == "(you)" and m["admin"]
                           for m in b.info("friends")["members"]), timeout=60,
               what="b is admin")
    _each([a1, a2, b], Device.stop)
    no_relays = FAST_RETRIES_TOML
    for device in (a1, b):  # each side's command runs its node without reaching the other
        (device.data_dir / "config.toml").write_text(no_relays)
    pigeon_json(a1.data_dir, "group", "remove", "friends", "b")
    pigeon_json(b.data_dir, "group", "remove", "friends", "c")
    for device in (a1, b):
        (device.data_dir / "config.toml").write_text(device.toml)
    for device in (a1, a2, b):
        device.start(wait=False)
    _each([a1, a2, b], Device.wait_started)
    ids = {dv.account: pigeon_json(dv.data_dir, "id")["account_id"] for dv in (a1, c, d)}
    want = {ids["a"], ids["c"], ids["d"]}
    wait_until(lambda: all(m == want for m in _each([a1, a2, b, c, d],
                                                   lambda dv: dv.members("friends"))),
               timeout=90, what="every device shows a, c and d")
    members = [a1, a2, c, d]

    # 4. d is offline during CATCH_UP messages and two changes.
    d.stop()
    caught: list[str] = []
    name = "friends"
    for step in range(CATCH_UP // 10):
        caught += rng.choice([a1, a2, c]).send(name, 10)
        if step == 1:
            pigeon_json(a1.data_dir, "group", "add", name, "e")
            # A device sends a group message to the members it knows (PROTOCOL.md 27.5): one
            # that has not yet heard of the add leaves e out, as it should. Under load a2 or c
            # heard of it only after sending the next 20 (a side-by-side run): wait, as for the
            # rename below.
            e_id = pigeon_json(e.data_dir, "id")["account_id"]
            wait_until(lambda e_id=e_id, name=name: all(e_id in dv.members(name)
                                                       for dv in (a2, c)),
                       timeout=60, what="the add reaches the running devices")
        if step == 3:  # the group's name changes on every member device, here at once
            assert pigeon_json(a1.data_dir, "group", "rename", name, "pals")["name"] == "pals"
            name = "pals"
            wait_until(lambda: all(any(g["name"] == "pals" for g in pigeon_json(
                dv.data_dir, "group", "list")) for dv in (a2, c)), timeout=60,
                what="the rename reaches the running devices")
    sent += caught
    d.start()
    members = [a1, a2, c, d, e]
    _wait_all([a1, a2, c, d], "pals", sent)
    _wait_all([e], "pals", caught[20:])  # e was added again after the first 20
    # The same membership notices everywhere (b's voided change shows nowhere), in order.
    # (A notice's id is its operation's: the lines differ only in who is "you".)
    notices = [[(x["message_id"], x["text"]) for x in dv.history("pals")
                if x["kind"] == "notice"] for dv in (c, d, a1)]
    assert [i for i, _ in notices[0]] == [i for i, _ in notices[1]] == \
        [i for i, _ in notices[2]]
    assert [t for _, t in notices[1][-2:]] == ["a added e", "a renamed the group to 'pals'"]
    assert not any(t == "b removed c" for _, t in notices[1])
    assert d.members("pals") == want | {pigeon_json(e.data_dir, "id")["account_id"]}

    # 5. kill -9 chaos on random member devices while CHAOS messages go out.
    chaos: list[str] = []
    kill_at = set(rng.sample(range(CHAOS // BATCH), min(KILLS, CHAOS // BATCH)))
    for step in range(CHAOS // BATCH):
        if step in kill_at:
            victim = rng.choice(members)
            victim.kill_hard()
            chaos += rng.choice([m for m in members if m is not victim]).send("pals", BATCH)
            victim.start()
        else:
            chaos += rng.choice(members).send("pals", BATCH)
    sent += chaos
    _wait_all([a1, a2, c, d], "pals", sent, timeout=180)
    _wait_all([e], "pals", caught[20:] + chaos, timeout=180)

    # 6. c's modified client: forged operations and a broken sender-key signature.
    others = [a1, a2, d, e]
    before = _each(others, lambda dv: (dv.members("pals"), dv.info("pals")["title"],
                                       [x["message_id"] for x in dv.history("pals")
                                        if x["kind"] == "notice"]))
    c.stop()
    genuine = "c 99999"
    trio.run(_modified_client, c, group_id, genuine)
    c.start()
    sent.append(genuine)
    _wait_all([a1, a2, d], "pals", sent)
    _wait_all([e], "pals", caught[20:] + chaos + [genuine])
    after_forgery = _each(others, lambda dv: (dv.members("pals"), dv.info("pals")["title"],
                                              [x["message_id"] for x in dv.history("pals")
                                               if x["kind"] == "notice"]))
    assert after_forgery == before
    for history in _each(others, lambda dv: dv.history("pals")):
        assert not any(FORGED_TEXT in x["text"] or FORGED_NAME in x["text"] for x in history)


FORGED_TEXT = "c forged signature"
FORGED_NAME = "forged name"


async def _modified_client(device: Device, group_id: bytes, genuine: str) -> None:
    """`device`'s own node, in this process, changed as a malicious member's client would be:
    its next copy of the group's log carries two forged operations, and its next group message
    a broken sender-key signature; then a genuine message. Returns once the member devices
    acknowledged all three (its outbox is empty)."""
    config = config_file.load(Config, device.data_dir / "config.toml",
                              listen=(LOOPBACK,)).replace(mdns=False)
    async with Node.open(device.data_dir, config) as node:
        def outbox_empty() -> bool:
            return not node._db._q("SELECT 1 FROM outbox")

        async def delivered(what: str) -> None:
            with trio.move_on_after(90):
                while not outbox_empty():
                    await trio.sleep(0.1)
                return
            raise AssertionError(f"{what}: not acknowledged by every member device")

        glog = node._groups._log(group_id)
        heads = glog.state.heads
        stranger = IdentityKeyPair.generate()
        non_admin = GroupOp.sign(node._identity, group_id=group_id, kind="add", prev=heads,
                                 sent_at_ms=1, who=[stranger.public.to_bytes()])
        rename = GroupOp.sign(node._identity, group_id=group_id, kind="rename", prev=heads,
                              sent_at_ms=2, name=FORGED_NAME)
        broken_rename = (rename.signed[:-3] + bytes([rename.signed[-3] ^ 1])
                         + rename.signed[-2:])
        real_ops = node._groups.group_ops_content

        def with_forgeries(gid: bytes, message_id: bytes, sent_at_ms: int) -> GroupOps:
            content = real_ops(gid, message_id, sent_at_ms)
            return GroupOps(id=content.id, sent_at_ms=content.sent_at_ms, group_id=gid,
                            ops=(*content.ops, non_admin.signed, broken_rename))

        node._groups.group_ops_content = with_forgeries  # type: ignore[method-assign]
        with node._db.transaction():
            contact = node._groups.find("pals")
            assert contact is not None
            node._groups._queue_log(contact, glog, glog.state.members)
        await delivered("the forged log")
        real_payload = node._db.group_payload

        def broken(rowid: int) -> bytes | None:
            payload = real_payload(rowid)
            return None if payload is None else payload[:-1] + bytes([payload[-1] ^ 1])

        node._db.group_payload = broken  # type: ignore[method-assign]
        await node.send("pals", FORGED_TEXT)
        await delivered("the message with a broken signature")
        node._db.group_payload = real_payload  # type: ignore[method-assign]
        await node.send("pals", genuine)
        await delivered("the genuine message")
