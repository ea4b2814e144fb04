"""Devices of a relay fleet in worker processes, so that a fleet of a hundred devices is not one
overloaded event loop (each device is a full node with its DHT client and its connections).

A worker (`python -m tests.fleetworker DIR --bootstrap ADDR...`) hosts devices of
tests/fleettools.py (`Device`, `DEVICE_SETTINGS`, data directories under DIR) and obeys
requests, one JSON object a line on stdin: `{"id": N, "op": OP, ...arguments}`. It answers each
with one JSON line on stdout, `{"id": N, ...result}` or `{"id": N, "error": "..."}`, in the order
they finish: requests run side by side, so one waiting for a contact does not hold up the
others. The operations are the methods `op_*` of `Devices` below.

`Worker` is the parent's side (tests/test_fleet_acceptance.py, benchmarks/relays.py): it
starts the process (which dies with its parent: tests/childproc.py) and `ask`s it.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import trio

from tests.childproc import die_with_parent
from tests.conftest import WAIT, wait_registered
from tests.fleettools import DEVICE_SETTINGS, Device, registered_relays, wait_chosen

#: Devices starting side by side in one worker (each binds sockets and opens a database).
START_AT_ONCE = 8
#: The device a task works for, for the worker's log lines ("-": none).
DEVICE_NAME: contextvars.ContextVar[str] = contextvars.ContextVar("device", default="-")


def peer_of(address: str) -> str:
    """The relay's peer id at the end of a relay multiaddr."""
    return address.rpartition("/p2p/")[2]


# --- the worker process -------------------------------------------------------------------------


class Devices:
    """The devices of one worker, by name, and what the parent may ask of them."""

    def __init__(self, root: Path, settings: dict[str, Any], nursery: trio.Nursery) -> None:
        self.root, self.settings, self.nursery = root, settings, nursery
        self.devices: dict[str, Device] = {}
        self.exit = trio.Event()

    def _device(self, name: str) -> Device:
        if name not in self.devices:
            self.devices[name] = Device(self.root / name, name, **self.settings)
        return self.devices[name]

    def _running(self, names: Sequence[str] | None) -> list[Device]:
        chosen = self.devices.values() if names is None else (self.devices[n] for n in names)
        return [d for d in chosen if d.node is not None]

    async def op_start(self, devices: list[str]) -> dict[str, Any]:
        """Start these devices (created on first start), a few at a time as `start_all` does;
        their peer ids."""
        started = [self._device(n) for n in devices]
        limit = trio.CapacityLimiter(START_AT_ONCE)

        async def one(device: Device) -> None:
            async with limit:
                DEVICE_NAME.set(device.name)  # the node's tasks inherit it: its log lines
                await device.start(self.nursery)

        async with trio.open_nursery() as starters:
            for device in started:
                starters.start_soon(one, device)
        return {"peer_ids": {d.name: d.running.peer_id for d in started}}

    async def op_stop(self, devices: list[str]) -> dict[str, Any]:
        for name in devices:
            await self.devices[name].stop()
        return {}

    async def op_invite(self, device: str) -> dict[str, Any]:
        return {"invite": self.devices[device].running.invite()}

    async def op_add_contact(self, device: str, name: str, invite: str) -> dict[str, Any]:
        """`device` adds the person behind `invite` as contact `name` (and introduces itself)."""
        self.devices[device].running.add_contact(name, invite)
        return {}

    async def op_befriended(self, device: str, contact: str, timeout: float = WAIT
                            ) -> dict[str, Any]:
        """Until `device` has `contact`, knows the mailbox of each of its devices (their
        introduction arrived, PROTOCOL.md section 21) and its own relays hold its mailbox with
        the new deposit capabilities: what tests/conftest.py `befriend` waits for, on one side."""
        node = self.devices[device].running
        with trio.fail_after(timeout):
            while True:
                known = [c for c in node.contacts() if c.name == contact]
                if known and known[0].peer_ids and all(
                        (d := node._db.device_by_peer_id(p)) is not None and d.box is not None
                        for p in known[0].peer_ids):
                    break
                await trio.sleep(0.05)
            await wait_registered(node)
        return {}

    async def op_send(self, device: str, contact: str, text: str) -> dict[str, Any]:
        return {"message_id": await self.devices[device].running.send(contact, text)}

    async def op_history(self, device: str, contact: str, limit: int = 100) -> dict[str, Any]:
        """The texts with `contact`, oldest first."""
        entries = self.devices[device].running.history(contact, limit=limit)
        return {"texts": [e.text for e in entries if e.kind == "text"]}

    async def op_state(self, devices: list[str] | None = None) -> dict[str, Any]:
        """Per running device: the relays it chose, those holding its mailbox now (registered),
        and how many relays it replaced (`RelayFleet.moves`)."""
        return {"devices": {d.name: {
            "relays": list(d.running.relays),
            "registered": list(registered_relays(d.running)),
            "moves": d.running.relay_fleet.moves if d.running.relay_fleet else 0,
        } for d in self._running(devices)}}

    async def op_wait_chosen(self, want: int, timeout: float, avoid: list[str] | None = None,
                             devices: list[str] | None = None) -> dict[str, Any]:
        """tests/fleettools.py `wait_chosen` over these (or all) running devices."""
        began = trio.current_time()
        await wait_chosen(self._running(devices), want, avoid=avoid or (), timeout=timeout)
        return {"seconds": trio.current_time() - began}

    async def op_move_times(self, dead: str, timeout: float) -> dict[str, Any]:
        """Seconds until each device that held relay `dead` (a peer id) holds two live
        registered relays again, sorted (benchmarks/relays.py)."""
        began = trio.current_time()
        affected = [d for d in self._running(None)
                    if dead in {peer_of(a) for a in d.running.relays}]
        moved: dict[str, float] = {}
        with trio.fail_after(timeout):
            while len(moved) < len(affected):
                for d in affected:
                    held = registered_relays(d.running)
                    if d.name not in moved and len(held) == 2 and \
                            dead not in {peer_of(a) for a in held}:
                        moved[d.name] = trio.current_time() - began
                await trio.sleep(0.1)
        return {"moved_s": sorted(moved.values())}

    async def op_exit(self) -> dict[str, Any]:
        """Stop every running device; the worker ends after this answer."""
        for d in self._running(None):
            await d.stop()
        self.exit.set()
        return {}

    async def serve(self, request: dict[str, Any]) -> None:
        ident, op = request.pop("id"), request.pop("op")
        handler: Callable[..., Awaitable[dict[str, Any]]] | None = getattr(self, f"op_{op}", None)
        try:
            if handler is None:
                raise ValueError(f"unknown op {op!r}")
            reply = {"id": ident, **await handler(**request)}
        except Exception as exc:  # the parent sees it as the answer; the worker goes on
            traceback.print_exc()
            reply = {"id": ident, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


async def work(root: Path, bootstrap: Sequence[str]) -> None:
    settings = dict(DEVICE_SETTINGS, bootstrap=tuple(bootstrap))
    async with trio.open_nursery() as nursery:
        devices = Devices(root, settings, nursery)
        async with trio.open_nursery() as requests:
            while not devices.exit.is_set():
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                if not line:  # the parent closed our stdin: stop everything
                    requests.start_soon(devices.op_exit)
                    break
                request = json.loads(line)
                last = request.get("op") == "exit"
                requests.start_soon(devices.serve, request)
                if last:
                    break
        nursery.cancel_scope.cancel()


def _log_with_device_names() -> None:
    """Log lines on stderr (the parent sends it to DIR/worker.stderr), each with the device
    whose task wrote it. `PIGEON_FLEET_LOG` sets levels, "LOGGER=LEVEL,..." (by default
    "pigeon.relays=DEBUG": each directory read with its round-trip times, each relay chosen or
    left, and each failed try to reach a relay, so that a failed spread or move shows why; the
    rest at WARNING. A "pigeon" logger at DEBUG turns on libp2p's debug lines too: millions)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(device)s %(name)s %(message)s"))

    def name_the_device(record: logging.LogRecord) -> bool:
        record.device = DEVICE_NAME.get()
        return True

    handler.addFilter(name_the_device)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    for setting in filter(None, os.environ.get("PIGEON_FLEET_LOG", "pigeon.relays=DEBUG").split(",")):
        name, _, level = setting.rpartition("=")
        logging.getLogger(name or "pigeon").setLevel(level.strip().upper())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="where the devices' data directories go")
    parser.add_argument("--bootstrap", action="append", default=[], help="a relay's address")
    args = parser.parse_args()
    _log_with_device_names()
    trio.run(work, args.root, args.bootstrap)


# --- the parent's side --------------------------------------------------------------------------


class WorkerError(Exception):
    """A request the worker answered with an error, or a worker that ended."""


class Worker:
    """One worker process and its requests in flight."""

    def __init__(self, root: Path, bootstrap: Sequence[str]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        flags = [f for b in bootstrap for f in ("--bootstrap", b)]
        with open(root / "worker.stderr", "wb") as stderr:
            # From this (the main) thread, so that die_with_parent applies.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.fleetworker", str(root), *flags],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                cwd=Path(__file__).resolve().parent.parent, preexec_fn=die_with_parent())
        assert self.process.stdin is not None and self.process.stdout is not None
        self._send = trio.lowlevel.FdStream(os.dup(self.process.stdin.fileno()))
        self._receive = trio.lowlevel.FdStream(os.dup(self.process.stdout.fileno()))
        self._next_id = 0
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._ended: str | None = None
        self._write_lock = trio.Lock()

    @property
    def pid(self) -> int:
        return self.process.pid

    async def read_replies(self) -> None:
        """Hand each reply line to its request (run in a nursery while the worker is used)."""
        buffer = b""
        try:
            while True:
                chunk = await self._receive.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    reply: dict[str, Any] = json.loads(line)
                    channel = self._waiting.pop(reply.pop("id"), None)
                    if channel is not None:
                        channel.send_nowait(reply)
        finally:
            self._ended = f"worker {self.pid} ended (see {self.root / 'worker.stderr'})"
            for channel in self._waiting.values():
                channel.close()
            self._waiting.clear()

    async def ask(self, op: str, **arguments: Any) -> dict[str, Any]:
        """Send one request and wait for its answer (WorkerError if it failed)."""
        if self._ended is not None:
            raise WorkerError(self._ended)
        ident, self._next_id = self._next_id, self._next_id + 1
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[ident] = send
        try:
            async with self._write_lock:
                await self._send.send_all(json.dumps({"id": ident, "op": op, **arguments})
                                          .encode() + b"\n")
        except trio.BrokenResourceError:  # its stdin is closed: it ended
            self._waiting.pop(ident, None)
            raise WorkerError(f"{op}: worker {self.pid} ended") from None
        try:
            reply = await receive.receive()
        except trio.EndOfChannel:
            raise WorkerError(f"{op}: {self._ended}") from None
        if "error" in reply:
            raise WorkerError(f"{op} {arguments}: {reply['error']} "
                              f"(see {self.root / 'worker.stderr'})")
        return reply

    async def stop(self, timeout: float = 60.0) -> None:
        """End the process (after an `exit` request, or without one: the end of its stdin
        tells it to stop its devices): wait, then kill -9 by its pid if it does not end."""
        with trio.CancelScope(shield=True):
            await self._send.aclose()
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    stream.close()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, 9)
                self.process.wait()
            await self._receive.aclose()


@asynccontextmanager
async def open_workers(root: Path, count: int, bootstrap: Sequence[str]
                       ) -> AsyncIterator[list[Worker]]:
    """`count` workers in `root/w<i>`, reading replies while in use; on the way out each stops
    its devices and ends (killed by its pid if it does not end within a minute)."""
    workers: list[Worker] = []
    try:
        for i in range(count):
            workers.append(Worker(root / f"w{i}", bootstrap))
        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(worker.read_replies)
            try:
                yield workers
            finally:
                with trio.move_on_after(60) as cleanup:
                    cleanup.shield = True
                    async with trio.open_nursery() as exits:
                        for worker in workers:
                            exits.start_soon(_exit_quietly, worker)
                nursery.cancel_scope.cancel()
    finally:
        for worker in workers:
            await worker.stop(timeout=10)


async def _exit_quietly(worker: Worker) -> None:
    # one that ended already (or whose pipe broke) is reaped by stop()
    with suppress(WorkerError, trio.ClosedResourceError):
        await worker.ask("exit")


if __name__ == "__main__":
    main()
