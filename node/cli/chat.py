"""`pigeon chat`: recent history, then the conversation as it happens: incoming messages, and each
line typed is sent and shown with its delivery state as it changes (pending, sent, delivered,
failed), all with timestamps; a line `/file PATH` sends that file. What it shows of the
contact's messages is marked read (on every device of the account, PROTOCOL.md section 25.6).
With `--json` every one of these is a JSON object on its own line: history entries as
`{"type": "History", ...}` (the fields `history` returns), lines sent as
`{"type": "MessageQueued", message_id, contact, text, state}`, and the node's events about the
contact (README.md "Control socket")."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from node.cli.output import CommandError, format_entry, format_time, sanitize
from node.device.datadir import DataDir
from node.errors import NodeError
from node.rpc import Client, LineTooLong, RpcError, SocketClient, read_lines

__all__ = ["chat", "event_client"]

#: Events that change the state of a message we sent, and the state each one means.
_STATES = {"MessageSent": "sent", "MessageDelivered": "delivered", "MessageFailed": "failed"}


async def chat(args: argparse.Namespace, client: Client) -> int:
    """Print recent history, then incoming messages and our own lines with their delivery state
    as they change; each line typed is sent."""
    try:
        name = (await client.call("contact.get", {"name": args.contact}))["name"]
    except (RpcError, NodeError):  # a group's name works wherever a contact's does
        name = (await client.call("group.info", {"group": args.contact}))["name"]
    history = await client.call("history", {"contact": name, "limit": 20})
    for entry in history:
        _show(args, {"type": "History", **entry}, partial(format_entry, name, entry))
    # One request at a time on the connection: lines typed and the reads of messages shown.
    calls = trio.Lock()

    async def mark_read(up_to: str | None) -> None:
        params = {"contact": name} if up_to is None else {"contact": name, "up_to": up_to}
        try:
            async with calls:
                await client.call("read", params)
        except (RpcError, NodeError) as exc:  # the contact was removed meanwhile, say
            print(f"(not marked read: {sanitize(str(exc))})", file=sys.stderr)

    await mark_read(None)  # everything shown so far
    print(f"-- chatting with {sanitize(name)}; Ctrl-D to leave --", file=sys.stderr)
    mine: dict[str, list[str]] = {}  # message id -> [text, state shown], lines sent here
    async with event_client(args, client) as events_client, trio.open_nursery() as nursery:
        subscribed = trio.Event()

        async def show_events() -> None:
            async for event in events_client.events(subscribed=subscribed):
                if event.get("contact") == name:
                    _show_event(args, name, event, mine)
                    if event["type"] == "MessageReceived":
                        await mark_read(event["message_id"])

        nursery.start_soon(show_events)
        await subscribed.wait()  # no state change of a line sent from here on can be missed
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        try:
            async for line in read_lines(stdin):
                text = line.decode("utf-8", "replace").strip()
                try:
                    async with calls:
                        if text.startswith("/file "):  # a file (PROTOCOL.md section 26)
                            path = os.path.abspath(os.path.expanduser(text[6:].strip()))
                            sent = await client.call("send.file", {"contact": name,
                                                                   "path": path})
                            text = f"[file {sent['attachment']['name']}]"
                        else:
                            sent = await client.call("send", {"contact": name, "text": text})
                except (RpcError, NodeError) as exc:
                    # One bad line (too long, say) is reported; the chat goes on.
                    print(f"(not sent: {sanitize(str(exc))})", file=sys.stderr)
                    continue
                mine[sent["message_id"]] = [text, sent["state"]]
                _show(args, {"type": "MessageQueued", "message_id": sent["message_id"],
                             "contact": name, "text": text, "state": sent["state"]},
                      partial(_own_line, text, sent["state"]))
        except LineTooLong:
            print("(input line too long; chat ended)", file=sys.stderr)
            return 1
        finally:
            nursery.cancel_scope.cancel()
    return 0


def _show_event(args: argparse.Namespace, name: str, event: dict[str, Any],
                mine: dict[str, list[str]]) -> None:
    kind = event["type"]
    if kind == "MessageReceived":
        who = event.get("sender") or name  # in a group, the member who wrote it
        attachment = event.get("attachment")
        text = sanitize(event["text"])
        if attachment:
            text = (f"[file {sanitize(attachment['name'])}, {attachment['size']:,} bytes, id"
                    f" {event['message_id']}]" + (f" {text}" if text else ""))
        _show(args, event, lambda: f"{format_time(event['sent_at_ms'])} {sanitize(who)}: "
                                   f"{text}")
    elif kind in _STATES and event["message_id"] in mine:
        text, shown = mine[event["message_id"]]
        mine[event["message_id"]][1] = _STATES[kind]
        reason = f" ({sanitize(event['reason'])})" if kind == "MessageFailed" else ""
        # A line per change of state: `send` may already have answered "sent".
        _show(args, event, lambda: None if shown == _STATES[kind]
              else _own_line(text, _STATES[kind]) + reason)
    elif kind in _STATES or kind in ("ContactOnline", "ContactOffline"):
        _show(args, event, lambda: None)  # JSON only: a line of someone else's, or presence


def _own_line(text: str, state: str) -> str:
    return f"{format_time(int(time.time() * 1000))} me: {sanitize(text)}  [{state}]"


def _show(args: argparse.Namespace, value: dict[str, Any], human: Any) -> None:
    """One item of the chat: a JSON line with --json, else `human()` (if it gives a line)."""
    if args.json:
        print(json.dumps(value), flush=True)
    elif (line := human()) is not None:
        print(line, flush=True)


@asynccontextmanager
async def event_client(args: argparse.Namespace, client: Client) -> AsyncIterator[Client]:
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
