"""`pigeon send --file` and `pigeon save`: attachments from the command line (PROTOCOL.md
section 26).

On a terminal (and without `--json`) a progress bar on stderr follows the transfer from the
node's `TransferProgress` events, with rate and time left (rich); with `--json` nothing but the
final JSON is printed. Paths are made absolute here: a running daemon has its own working
directory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from node.cli.chat import event_client
from node.cli.output import CommandError, out, sanitize
from node.rpc import Client

__all__ = ["cmd_save", "send_files"]


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.json and sys.stderr.isatty()


async def _with_progress(args: argparse.Namespace, client: Client, label: str, direction: str,
                         call: Callable[[Callable[[str], None]], Awaitable[Any]]) -> Any:
    """Run `call(track)` while a progress bar shows the transfers of the message ids it hands
    to `track`, in `direction` ("in": our download, "out": the recipient's)."""
    if not _show_progress(args):
        return await call(lambda _: None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    tracked: dict[str, Any] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:

        def track(message_id: str) -> None:
            tracked[message_id] = progress.add_task(f"{label} {message_id[:8]}", total=None)

        async def follow(source: Client, subscribed: trio.Event) -> None:
            async for event in source.events(subscribed=subscribed):
                task = tracked.get(event.get("message_id", ""))
                if (event.get("type") == "TransferProgress" and task is not None
                        and event.get("direction") == direction):
                    progress.update(task, completed=event["done_bytes"],
                                    total=event["total_bytes"])

        async with event_client(args, client) as source, trio.open_nursery() as nursery:
            subscribed = trio.Event()
            nursery.start_soon(follow, source, subscribed)
            await subscribed.wait()
            result = await call(track)
            nursery.cancel_scope.cancel()
    return result


async def send_files(args: argparse.Namespace, client: Client) -> int:
    """`pigeon send CONTACT --file PATH [--file PATH ...] [--caption T] [--original]`."""
    if args.text is not None or args.stdin:
        raise CommandError("with --file, give the text as --caption")
    paths = [Path(p).absolute() for p in args.file]
    for path in paths:  # refused before any is sent, like a bad line of `send --stdin`
        if not path.exists():
            raise CommandError(f"{path}: no such file")
        if path.is_dir():
            raise CommandError(f"{path}: is a directory, not a file")

    async def call(track: Callable[[str], None]) -> list[Any]:
        results = []
        for i, path in enumerate(paths):
            params = {"contact": args.contact, "path": str(path), "original": args.original,
                      "wait": 0}
            if args.caption is not None and i == 0:
                params["caption"] = args.caption
            result = await client.call("send.file", params)
            track(result["message_id"])
            results.append(result)
        if args.wait > 0:  # the delivery (and the recipient's download, shown) for a while
            with trio.move_on_after(args.wait):
                for result in results:
                    while result["state"] not in ("delivered", "failed"):
                        await trio.sleep(0.2)
                        entry = await _entry(client, args.contact, result["message_id"])
                        if entry is not None:
                            result["state"] = entry["state"]
                            result["attachment"] = entry.get("attachment")
        return results

    results = await _with_progress(args, client, "sending", "out", call)
    value: Any = results if len(results) > 1 else results[0]
    out(args, value, lambda v: "\n".join(
        f"{r['message_id']} {r['state']} {sanitize((r.get('attachment') or {}).get('name', ''))}"
        for r in (v if isinstance(v, list) else [v])))
    return 0


async def _entry(client: Client, contact: str, message_id: str) -> dict[str, Any] | None:
    history = await client.call("history", {"contact": contact, "limit": 200})
    return next((e for e in history if e["message_id"] == message_id), None)


async def cmd_save(args: argparse.Namespace, client: Client) -> int:
    """`pigeon save MESSAGE_ID [PATH]`: download the file (if needed) and copy it to PATH."""
    params: dict[str, Any] = {"message_id": args.message_id}
    if args.path is not None:
        params["path"] = str(Path(args.path).absolute())

    async def call(track: Callable[[str], None]) -> Any:
        track(args.message_id)
        return await client.call("save", params)

    value = await _with_progress(args, client, "receiving", "in", call)
    out(args, value, lambda v: f"{v['path']} ({v['size']:,} bytes)")
    return 0
