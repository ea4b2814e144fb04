"""Shared helpers for the node-layer tests: real nodes on 127.0.0.1 in tmp_path data dirs.

Everything here uses the real pieces (libp2p hosts on loopback, SQLite files, real crypto); the
only thing tuned is the configuration, with short timeouts so failures and retries happen in
milliseconds instead of minutes. Every wait on the network sits under `trio.fail_after(WAIT)`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing

from node import Config, ContactAdded, Event, Node
from node.device.eventbus import Subscription
from node.net import MSG_PROTOCOL, FrameStream, Transport
from node.protocol.wire import Ack, Frame, Nack, decode_frame
from tests import forkserver

LOOPBACK = "/ip4/127.0.0.1/tcp/0"

#: Upper bound of any single network wait in these tests: generous for a loaded CI machine,
#: short enough that a hang fails fast.
WAIT = 10.0

#: Short timeouts so that retries and failures happen quickly on loopback. durability="normal"
#: keeps commits cheap (no fsync per batch); restarts in these tests are clean closes.
FAST = Config(
    listen=(LOOPBACK,),
    connect_timeout_s=2.0,
    ack_timeout_s=2.0,
    retry_initial_s=0.05,
    retry_max_s=0.25,
    durability="normal",
    receipt_jitter_s=0.5,  # the product waits up to 10 s (PROTOCOL.md section 21)
    mdns=False,  # tests that use mDNS pin it to 127.0.0.1 themselves: never a real interface
)

E = TypeVar("E", bound=Event)


# --- scheduling: the long tests first, side by side ---------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """With xdist, hand tests to the workers one at a time (xdist's `--maxschedchunk 1`, unless
    given): by default each worker first gets a quarter of the suite in one contiguous block, so
    the long tests put first below would all land on the first worker."""
    if hasattr(config.option, "maxschedchunk") and config.option.maxschedchunk is None:
        config.option.maxschedchunk = 1
    if not hasattr(config, "workerinput"):  # once, in the process that runs the session
        _compile_the_package()
        if getattr(config.option, "numprocesses", None):
            ready = _share_a_fork_server(config)  # it starts while the tests are collected
            _rewrite_the_tests_once(config)
            ready()


def _compile_the_package() -> None:
    """Write the bytecode of `node/` before any test starts a process. The suite starts hundreds
    of `pigeon` processes; where PYTHONDONTWRITEBYTECODE is set (as on machines that keep source
    trees clean) and the package is installed editable, each of them would compile the package
    from source again (~0.15-0.3 s of CPU each). Python still reads bytecode it finds under that
    setting ("PYTHONDONTWRITEBYTECODE" in the Python documentation, Command line and
    environment); `__pycache__/` is in .gitignore."""
    import compileall

    import node

    compileall.compile_dir(Path(node.__file__).parent, quiet=1)


def _share_a_fork_server(config: pytest.Config) -> Callable[[], None]:
    """One fork server (tests/forkserver.py) for all the xdist workers, started before them:
    each would otherwise start its own, ~1.2 s of CPU to import the node (docs/testing.md T4).
    It ends with this process. Returns what to call, before the workers start, to wait until it
    serves. Only a saving: if it fails to start, each worker starts its own as before."""
    if not forkserver.enabled():
        return lambda: None
    process, path = forkserver.start_server()
    config.add_cleanup(process.kill)

    def ready() -> None:
        with contextlib.suppress(RuntimeError):
            forkserver.wait_ready(process)
            os.environ[forkserver.SHARED_SERVER_ENV] = path  # the workers inherit it

    return ready


def _rewrite_the_tests_once(config: pytest.Config) -> None:
    """Before xdist starts its workers, collect the suite once in a process that may write
    bytecode, so that each worker loads the test modules (and the plugins' modules) with their
    assertions already rewritten. pytest rewrites the asserts of every test module and of every
    module of a plugin's package (hypothesis, anyio, xdist...) as it imports them and caches the
    result in `__pycache__` ("Assertion rewriting" in pytest's documentation, "Disabling
    rewrite caching") — but not where PYTHONDONTWRITEBYTECODE is set, and on a fresh checkout
    all workers start at once with nothing cached: every worker then rewrote ~220 modules, 2.8 s
    of its 4.4 s of CPU to collect (docs/testing.md T4)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # Only a cache: if this fails, the workers rewrite as before (and report any error).
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                        "no:xdist", "-p", "no:cacheprovider", *config.args],
                       cwd=config.invocation_params.dir, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False, timeout=300)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what the imports and the collection made (~150,000 objects: the node, libp2p,
    hypothesis, the test modules) to the garbage collector's permanent generation ("gc.freeze"
    in the Python documentation): they live as long as the process, and each full collection
    during the tests walked them all again (docs/testing.md T4)."""
    gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests marked `slow` first, the longest (`slow(seconds=...)`: what the test takes
    on the 2-core machine beside one other test, docs/testing.md T4) before the others, so
    that they run side by side while the short tests fill in around them instead of one after
    another at the end of the run. A test that waits on real time (a relay's restart, a
    process's exit) needs its mark as much as one that computes: left to the end, its waits
    leave the machine idle. xdist (with `--maxschedchunk 1`) hands each of its N workers two
    consecutive tests to begin with, so the first 2N are interleaved: the N longest begin at
    once, one on each worker, and each worker's second is one of the next N. Without xdist it
    is just an order (every test is independent)."""

    def seconds(item: pytest.Item) -> float:
        marker = item.get_closest_marker("slow")
        return -1.0 if marker is None else float(marker.kwargs.get("seconds", 0.0))

    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    slow = sorted((i for i in items if seconds(i) >= 0), key=seconds, reverse=True)
    if workers > 1 and len(slow) >= 2 * workers:
        firsts, seconds_ = slow[:workers], slow[workers:2 * workers]
        slow[:2 * workers] = [item for pair in zip(firsts, seconds_, strict=True)
                              for item in pair]
    items[:] = slow + [i for i in items if seconds(i) < 0]


@pytest.fixture
def jump_clock() -> trio.testing.MockClock:
    """trio's clock for a test with real sockets: it runs at wall speed, so I/O waits and
    timeouts behave as in production, and the test moves it ahead with `jump(seconds)` to make
    a product timer (an expiry, a retry, a TTL) come due at once. Every `node.clock.TrioClock`
    of the test reads it, so Unix time (invite and record expiries) jumps too. (trio's
    `autojump_clock` would jump whenever every task waits on a socket, firing timeouts early.)"""
    return trio.testing.MockClock(rate=1.0)


def config(name: str, **changes: object) -> Config:
    return FAST.replace(display_name=name, **changes)


@asynccontextmanager
async def open_node(path: Path, name: str, **changes: object) -> AsyncIterator[Node]:
    """A node in `path` (created on first use) with display name `name`."""
    async with Node.open(path, config(name, **changes), create=True) as node:
        yield node


async def next_event(events: Subscription, kind: type[E],
                     where: Callable[[E], bool] = lambda e: True) -> E:
    """The next event of `kind` (matching `where`) from a subscription; others are skipped.
    Callers bound the wait with trio.fail_after."""
    async for event in events:
        if isinstance(event, kind) and where(event):
            return event
    raise AssertionError(f"event stream ended before a {kind.__name__} arrived")


async def befriend(inviter: Node, joiner: Node, name: str) -> ContactAdded:
    """`joiner` adds `inviter` as contact `name` from a fresh invite; returns the ContactAdded
    the inviter publishes once the joiner's introduction arrived."""
    with inviter.events() as events:
        joiner.add_contact(name, inviter.invite())
        with trio.fail_after(WAIT):
            added = await next_event(events, ContactAdded)
            # The inviter introduces itself back (its deposit capability and mailbox, PROTOCOL.md
            # section 21): settled before the test goes on, so that it cannot race what the
            # test does to the paths between the two.
            inviter_key = inviter._device.public.to_bytes()
            while True:
                known = joiner._db.device(inviter_key)
                if known is not None and known.box is not None:
                    break
                await trio.sleep(0.02)
    await wait_registered(inviter, joiner)
    return added


async def wait_registered(*nodes: Node) -> None:
    """Until each relay of `nodes` holds its mailbox with its current deposit capabilities
    (PROTOCOL.md section 21), or failed to (a relay that is down): a node closed before that
    leaves its contacts' deposits refused ("unknown-mailbox") or counted as a stranger's."""
    with trio.fail_after(WAIT):
        while not all(r.registered or r.last_error for node in nodes
                      for r in node.status().relays):
            await trio.sleep(0.02)


@pytest.fixture
async def two_nodes(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    """Alice and Bob, running, not contacts yet."""
    async with open_node(tmp_path / "alice", "alice") as alice, \
            open_node(tmp_path / "bob", "bob") as bob:
        yield alice, bob


@pytest.fixture
async def node_pair(two_nodes: tuple[Node, Node]) -> tuple[Node, Node]:
    """Alice and Bob as contacts: Bob used Alice's invite. Alice knows him as "bob" (his display
    name), he knows her as "alice"."""
    alice, bob = two_nodes
    added = await befriend(alice, bob, "alice")
    assert added.contact == "bob"
    return alice, bob


# --- raw peers (for hostile and low-level tests) ----------------------------------------------------


@asynccontextmanager
async def raw_peer(seed: bytes) -> AsyncIterator[Transport]:
    """A bare libp2p host with the device key from `seed`: no Pigeon logic at all."""
    async with Transport.open(seed, (LOOPBACK,)) as transport:
        yield transport


async def raw_stream(transport: Transport, node: Node) -> FrameStream:
    """A /pigeon/msg stream from a raw peer to a running node."""
    with trio.fail_after(WAIT):
        return await transport.open_stream(node.peer_id, node.addresses(), MSG_PROTOCOL,
                                           timeout=WAIT)


async def replies(stream: FrameStream, count: int) -> list[Ack | Nack]:
    """Read reply frames until `count` message ids were answered (acked or nacked)."""
    out: list[Ack | Nack] = []
    answered = 0
    with trio.fail_after(WAIT):
        while answered < count:
            raw = await stream.receive()
            assert raw is not None, f"stream ended after {answered} of {count} replies"
            frame: Frame = decode_frame(raw)
            assert isinstance(frame, Ack | Nack), frame
            out.append(frame)
            answered += len(frame.ids) if isinstance(frame, Ack) else 1
    return out
