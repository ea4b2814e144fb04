"""Helpers for wake-up tests (PROTOCOL.md section 29): the stand-in push distributor of
examples/push_distributor.py, and waiting for its POSTs from trio code."""

from __future__ import annotations

import importlib.util
import queue
import sys
from pathlib import Path

import trio


def _load_example() -> object:
    """examples/push_distributor.py, loaded from its file: the examples are scripts, not a
    package (and another distribution installs a top-level `examples`)."""
    name = "pigeon_example_push_distributor"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "examples" / "push_distributor.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


_example = _load_example()
Distributor = _example.Distributor  # type: ignore[attr-defined]
Post = _example.Post  # type: ignore[attr-defined]

__all__ = ["Distributor", "Post", "next_post", "no_post"]


async def next_post(distributor: Distributor, timeout: float) -> Post:  # type: ignore[valid-type]
    """The distributor's next POST, waited for in a thread (it blocks on a queue, not a sleep)."""
    return await trio.to_thread.run_sync(distributor.wait_post, timeout)


def no_post(distributor: Distributor) -> bool:
    """True if no POST is waiting to be taken now."""
    try:
        post = distributor.wait_post(0)
    except queue.Empty:
        return True
    raise AssertionError(f"unexpected POST to {post.path}")
