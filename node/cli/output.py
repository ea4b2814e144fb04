"""What every command family shares: how results and errors are printed, and the defaults the
argument parser names."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from node.errors import NodeError

__all__ = ["CONFIG_FILE", "DEFAULT_SEND_WAIT_S", "CommandError", "format_entry", "out", "print_error"]

#: The node's settings file in its data directory (keys: the fields of node.device.config.Config).
CONFIG_FILE = "config.toml"

#: Seconds `pigeon send` waits for the end-to-end ack before returning (the message stays queued).
DEFAULT_SEND_WAIT_S = 5.0


class CommandError(NodeError):
    """A command cannot be carried out as asked (shown to the user as is)."""


def print_error(args: argparse.Namespace, kind: str, message: str) -> None:
    """Report an error: a JSON object on stdout with `--json`, else a line on stderr."""
    if args.json:
        print(json.dumps({"error": {"type": kind, "message": message}}))
    else:
        print(f"pigeon: {message}", file=sys.stderr)


def out(args: argparse.Namespace, value: Any, human: Callable[[Any], str]) -> None:
    """Print a command's result: `value` as JSON with `--json`, else `human(value)`."""
    print(json.dumps(value) if args.json else human(value))


def format_entry(contact: str, entry: dict[str, Any]) -> str:
    """One history entry (as the control API returns it) as a line for people."""
    import datetime

    when = datetime.datetime.fromtimestamp(entry["sent_at_ms"] / 1000).strftime("%Y-%m-%d %H:%M")
    who = "me" if entry["direction"] == "out" else contact
    state = f"  [{entry['state']}]" if entry["direction"] == "out" else ""
    error = f" ({entry['error']})" if entry.get("error") else ""
    return f"{when} {who}: {entry['text']}{state}{error}"
