"""Multi-device accounts on loopback: linking a new device with its history (PROTOCOL.md sections
25.2 and 25.3).

`link_time`: Alice's first device A1 has Bob as a contact and `--history` messages with him (the
contact is made through a real invite and session; the history rows are then written straight
into A1's database, in one transaction, so the set-up does not dominate the run). A new device
runs `link_new_device` (as `pigeon link` does) and A1 approves its code (`Node.approve_link`, as
`pigeon device add`); then the new device opens its node and pulls the history. Figures:

- link: from the code shown until the new device is a member (keys, contacts, device list
  written; the provisioning stream of section 25.2);
- history: from the new device's node opening until every message is committed there, and the
  rate in messages per second;
- total: both;
- baseline: copying the same rows between two SQLite databases in this process with the same
  statements (read a chunk, insert it with its cursor, commit), i.e. the transfer without the
  network, the frames and the second process's work; the ratio is history / baseline.

Every wait is bounded by `--timeout` seconds. `--json` prints one JSON object.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._report import emit, parse_args

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
HISTORY_MESSAGES = 10_000
MESSAGE_BYTES = 200


def _config(name: str) -> Any:
    from node import Config

    return Config(listen=(LOOPBACK,), display_name=name, mdns=False, durability="normal")


def _fill_history(node: Any, contact: str, count: int) -> None:
    """`count` messages with `contact` in `node`'s history, half each way, in one transaction."""
    db = node._db  # the benchmark's set-up writes rows directly (see the module docstring)
    bob = db.contact_by_name(contact)
    now = node._clock.now_ms()
    incoming = [(os.urandom(16), "text", f"in {i:06d} ".ljust(MESSAGE_BYTES, "x"), now - count + i)
                for i in range(0, count, 2)]
    with db.transaction():
        db.insert_incoming(contact=bob, messages=incoming, received_at_ms=now)
        outgoing = [(os.urandom(16), "text", f"out {i:06d} ".ljust(MESSAGE_BYTES, "x"),
                     now - count + i) for i in range(1, count, 2)]
        rowids = db.insert_outgoing(contact=bob, messages=outgoing, devices=[], now_ms=now)
        db._many("UPDATE messages SET state='delivered' WHERE rowid=?", [(r,) for r in rowids])


def _baseline(source: Path, target: Path, count: int) -> float:
    """Seconds to copy the history rows between two databases with the transfer's statements."""
    from node.device.storage import Database
    from node.protocol.history import HISTORY_CHUNK_ROWS

    src = Database.open(source, durability="normal")
    dst = Database.open(target, durability="normal", create=True)
    try:
        contact = dst.add_contact("bob", src.contacts()[0].account, now_ms=0)
        started = time.perf_counter()
        after, until, total = src.history_range(since_ms=0, cap=count)
        while True:
            rows = src.history_chunk(after=after, until=until, since_ms=0,
                                     limit=HISTORY_CHUNK_ROWS)
            if not rows:
                break
            after = rows[-1][0]
            with dst.transaction():
                dst.insert_history([(contact.id, m.id, m.direction, m.body, m.sent_at_ms,
                                     m.received_at_ms, m.state) for _, _, m in rows], now_ms=0)
                dst.set_meta("cursor", after)
        elapsed = time.perf_counter() - started
        assert total == count
        return elapsed
    finally:
        src.close()
        dst.close()


async def link_time(base: Path, *, messages: int, timeout: float) -> dict[str, float]:
    """Link a new device to an account whose first device has `messages` of history (module
    docstring); returns the figures."""
    from node import Node
    from node.device.linking import link_new_device

    figures: dict[str, float] = {}
    with trio.fail_after(timeout):
        async with Node.open(base / "a1", _config("alice"), create=True) as a1, \
                Node.open(base / "bob", _config("bob"), create=True) as bob:
            with a1.events() as events:
                bob.add_contact("alice", a1.invite())
                async for event in events:
                    if type(event).__name__ == "ContactAdded":
                        break
            name = a1.contacts()[0].name
            _fill_history(a1, name, messages)
            codes, received = trio.open_memory_channel[str](1)
            done: list[float] = []

            async def new_device() -> None:
                await link_new_device(base / "a2", _config(""), on_code=codes.send_nowait)
                done.append(time.perf_counter())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(new_device)
                code = await received.receive()
                started = time.perf_counter()
                await a1.approve_link(code)
            figures["link_s"] = done[0] - started
            opened = time.perf_counter()
            async with Node.open(base / "a2", _config("")) as a2:
                progress = await a2.wait_history_transfer()
                figures["history_s"] = time.perf_counter() - opened
                assert progress.done and progress.received == messages, progress
                assert len(a2.history(name, limit=messages + 10)) == messages
    figures["total_s"] = figures["link_s"] + figures["history_s"]
    figures["history_messages_per_s"] = messages / figures["history_s"]
    figures["baseline_copy_s"] = _baseline(base / "a1" / "pigeon.db", base / "copy.db", messages)
    figures["history_vs_baseline_ratio"] = figures["history_s"] / figures["baseline_copy_s"]
    return figures


def main(argv: list[str] | None = None) -> int:
    def extra(parser: Any) -> None:
        parser.add_argument("--history", type=int, default=HISTORY_MESSAGES,
                            help="messages of history on the first device (default %(default)s)")
        parser.add_argument("--timeout", type=float, default=600.0,
                            help="bound of the whole run in seconds (default %(default)s)")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-devices-") as tmp:
        figures = trio.run(lambda: link_time(Path(tmp), messages=args.history,
                                             timeout=args.timeout))
    rows = [
        ("link (code shown to member)", figures["link_s"] * 1000, "ms"),
        (f"history of {args.history:,} messages", figures["history_s"] * 1000, "ms"),
        ("total", figures["total_s"] * 1000, "ms"),
        ("history rate", figures["history_messages_per_s"], "messages/s"),
        ("baseline: SQLite to SQLite copy", figures["baseline_copy_s"] * 1000, "ms"),
        ("history / baseline", figures["history_vs_baseline_ratio"], "x"),
    ]
    link_figures = {"link_" + k if not k.startswith("link_") else k: v
                    for k, v in figures.items()}
    link_figures["link_history_messages"] = args.history
    emit("Linking a new device with its history (loopback, one process)", rows, link_figures,
         args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

