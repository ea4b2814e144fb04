"""Full disk: how soon delivery resumes once space returns, with the sender's, then the
receiver's, then the relay's data directory on a small tmpfs that is filled up and then freed.

In-process nodes and relay (real libp2p on loopback, real SQLite on the tmpfs) with the
production Config (only the listen address, mDNS off and durability are set). Per case:
`--messages` texts of 60 KB (big enough that storing them needs new pages) are sent while the
disk is full, which it stays for `--full-s` seconds; the clock starts when the filler is
deleted and stops when the last of them is delivered (sender, receiver) or held by the relay
(relay: the recipient is offline).

Goal: delivery resumes within 5 s of space returning. Needs root (it mounts a tmpfs in
a temporary directory, unmounted at the end, always). Every wait is bounded by `--timeout`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from benchmarks._report import emit, parse_args

GOAL_S = 5.0
LISTEN = ("/ip4/127.0.0.1/tcp/0",)
TEXT = "x" * 60_000


class Disk:
    """A tmpfs at `path`: `fill()` takes every free byte, `free()` gives it back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        with open(self.filler, "ab", buffering=0) as f:
            for size in (65536, 4096, 512, 1):
                while True:
                    try:
                        f.write(b"\0" * size)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break

    def free(self) -> None:
        self.filler.unlink()


@asynccontextmanager
async def _nodes(a_dir: Path, b_dir: Path, relays: tuple[str, ...] = ()
                 ) -> AsyncIterator[tuple[Any, Any]]:
    from node import Config, ContactAdded, Node

    def config(name: str) -> Config:
        return Config(listen=LISTEN, mdns=False, durability="normal", display_name=name,
                      relays=relays if name == "bob" else ())

    async with Node.open(a_dir, config("alice"), create=True) as alice, \
            Node.open(b_dir, config("bob"), create=True) as bob:
        with alice.events() as events:
            bob.add_contact("alice", alice.invite())
            async for event in events:
                if isinstance(event, ContactAdded):
                    break
        yield alice, bob


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


async def _case_direct(disk: Disk, where: str, root: Path, count: int, full_s: float) -> float:
    a_dir = disk.path / "alice" if where == "sender" else root / "alice"
    b_dir = disk.path / "bob" if where == "receiver" else root / "bob"
    async with _nodes(a_dir, b_dir) as (alice, _):
        ids: list[str] = []
        disk.fill()
        if where == "sender":
            from node.errors import StorageError
            try:
                await alice.send_many("bob", [TEXT] * count)
                raise AssertionError("the send was accepted on a full disk")
            except StorageError:
                pass
        else:
            ids = await alice.send_many("bob", [TEXT] * count)
            await trio.sleep(full_s)  # the receiver refuses meanwhile
        disk.free()
        start = trio.current_time()
        if where == "sender":
            ids = await alice.send_many("bob", [TEXT] * count)
        await _until(lambda: all(alice.message_state(i) == "delivered" for i in ids))
        return float(trio.current_time() - start)


async def _case_relay(disk: Disk, root: Path, count: int, full_s: float) -> float:
    from node.relay.config import RelayConfig
    from node.relay.service import open_relay

    async with open_relay(RelayConfig(data_dir=disk.path / "relay", listen=LISTEN,
                                      circuit_relay=False)) as relay:
        async with _nodes(root / "alice", root / "bob", (relay.addresses()[0],)):
            pass  # Bob goes away: only his relay can take Alice's messages
        from node import Config, Node
        async with Node.open(root / "alice", Config(listen=LISTEN, mdns=False,
                                                    durability="normal"), create=False) as alice:
            disk.fill()
            ids = await alice.send_many("bob", [TEXT] * count)
            await trio.sleep(full_s)  # refused storage-full meanwhile
            disk.free()
            start = trio.current_time()
            await _until(lambda: all(alice.message_state(i) == "relayed" for i in ids))
            return float(trio.current_time() - start)


def _mount(path: Path) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(path)],
                   check=True, capture_output=True)


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=False)


def main() -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--messages", type=int, default=4, help="texts per case")
        parser.add_argument("--timeout", type=float, default=180.0, help="bound per case (s)")
        parser.add_argument("--full-s", type=float, default=1.0,
                            help="how long the disk stays full while messages wait (s)")

    args = parse_args(__doc__.splitlines()[0], extra=extra)
    if os.geteuid() != 0:
        print("benchmarks/full_disk.py needs root (it mounts a tmpfs)", file=sys.stderr)
        return 2
    # The refusals while the disk is full are logged as warnings by design: not in the table.
    logging.getLogger("pigeon").setLevel(logging.CRITICAL)
    figures: dict[str, Any] = {"goal_resume_s": GOAL_S, "messages": args.messages,
                               "full_s": args.full_s}
    rows: list[tuple[str, Any, str]] = []
    for where in ("sender", "receiver", "relay"):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            mount = root / "disk"
            mount.mkdir()
            _mount(mount)
            try:
                disk = Disk(mount)

                async def run(where: str = where, disk: Disk = disk, root: Path = root) -> float:
                    with trio.fail_after(args.timeout):
                        if where == "relay":
                            return await _case_relay(disk, root, args.messages, args.full_s)
                        return await _case_direct(disk, where, root, args.messages,
                                                  args.full_s)

                started = time.monotonic()
                seconds = trio.run(run)
                figures[f"{where}_resume_s"] = round(seconds, 3)
                figures[f"{where}_case_s"] = round(time.monotonic() - started, 3)
                rows.append((f"{where}: space back -> delivered" if where != "relay"
                             else "relay: space back -> held by the relay", seconds, "s"))
            finally:
                _umount(mount)
    rows.append(("goal", GOAL_S, "s"))
    emit("Full disk: resumption after space returns", rows, figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
