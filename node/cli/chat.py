"""`pigeon chat`: recent history, then incoming messages as they arrive; each line typed is sent."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from node.cli.output import CommandError, format_entry
from node.device.datadir import DataDir
from node.errors import NodeError
from node.rpc import Client, LineTooLong, RpcError, SocketClient, read_lines

__all__ = ["chat"]


async def chat(args: argparse.Namespace, client: Client) -> int:
    """Print recent history, then incoming messages as they arrive; each line typed is sent."""
    history = await client.call("history", {"contact": args.contact, "limit": 20})
    for entry in history:
        print(format_entry(args.contact, entry))
    print(f"-- chatting with {args.contact}; Ctrl-D to leave --", file=sys.stderr)
    async with _event_client(args, client) as events_client, trio.open_nursery() as nursery:

        async def show_events() -> None:
            async for event in events_client.events():
                if event.get("contact") != args.contact:
                    continue
                if event["type"] == "MessageReceived":
                    print(f"{args.contact}: {event['text']}")
                elif event["type"] == "MessageFailed":
                    print(f"(not delivered: {event['reason']})")

        nursery.start_soon(show_events)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        try:
            async for line in read_lines(stdin):
                text = line.decode("utf-8", "replace").strip()
                try:
                    await client.call("send", {"contact": args.contact, "text": text})
                except (RpcError, NodeError) as exc:
                    # One bad line (too long, say) is reported; the chat goes on.
                    print(f"(not sent: {exc})", file=sys.stderr)
        except LineTooLong:
            print("(input line too long; chat ended)", file=sys.stderr)
            return 1
        finally:
            nursery.cancel_scope.cancel()
    return 0


@asynccontextmanager
async def _event_client(args: argparse.Namespace, client: Client) -> AsyncIterator[Client]:
    """A client for events: a second daemon connection (the first one carries requests)."""
    if isinstance(client, SocketClient):
        second = await SocketClient.connect(DataDir(args.data_dir).socket_file)
        if second is None:
            raise CommandError("the daemon went away")
        try:
            yield second
        finally:
            await second.aclose()
    else:
        yield client
