"""What every command family shares: how results and errors are printed (one line per error,
the exit status), how text from peers is made safe for a terminal, and the defaults the argument
parser names."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import unicodedata
from collections.abc import Callable
from typing import Any, Final

from node.errors import NodeError

__all__ = ["CONFIG_FILE", "DEFAULT_SEND_WAIT_S", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK",
           "EXIT_USAGE", "CommandError", "format_entry", "format_time", "guarded", "out", "print_error",
           "root_causes", "sanitize"]

#: Exit statuses of every `pigeon` command (argparse itself exits 2 on a usage error).
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, what shells report for Ctrl-C

#: The node's settings file in its data directory (keys: the fields of node.device.config.Config).
CONFIG_FILE = "config.toml"

#: Seconds `pigeon send` waits for the end-to-end ack before returning (the message stays queued).
DEFAULT_SEND_WAIT_S = 5.0


class CommandError(NodeError):
    """A command cannot be carried out as asked (shown to the user as is)."""


def root_causes(exc: BaseException) -> list[BaseException]:
    """The exceptions at the leaves of `exc`'s exception groups (trio wraps a task's error in one
    group per nursery it crosses): what actually went wrong."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in root_causes(inner)]
    return [exc]


def guarded(args: argparse.Namespace, body: Callable[[], int]) -> int:
    """Run a command's `body` and turn whatever it raises into one line naming the root cause
    and the exit status (EXIT_*); with `--log-level DEBUG` the trace is logged as well."""
    try:
        return body()
    except BaseException as exc:  # the one place every error of a command ends up
        causes = root_causes(exc)
        if any(isinstance(c, KeyboardInterrupt) for c in causes):
            return EXIT_INTERRUPTED
        if any(isinstance(c, SystemExit) for c in causes):
            raise
        if any(isinstance(c, BrokenPipeError) for c in causes):
            # The reader went away (`pigeon invite --json | head`): nothing left to tell anyone.
            # stdout is pointed at /dev/null so the interpreter's final flush stays quiet too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        cause = next((c for c in causes if isinstance(c, NodeError)), causes[0])
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            logging.getLogger("pigeon.cli").error("command failed", exc_info=exc)
        print_error(args, _error_type(cause), _error_message(cause))
        return EXIT_ERROR


def _error_type(exc: BaseException) -> str:
    kind = getattr(exc, "type", None)  # an RpcError names the daemon's error class
    return kind if isinstance(kind, str) and kind else type(exc).__name__


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, NodeError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    # Not an error Pigeon raises on purpose: name it, so a bug report says what failed.
    return f"unexpected {type(exc).__name__}: {exc} (--log-level DEBUG shows where)"


def print_error(args: argparse.Namespace, kind: str, message: str) -> None:
    """Report an error: a JSON object on stdout with `--json`, else a line on stderr."""
    if getattr(args, "json", False):
        print(json.dumps({"error": {"type": kind, "message": message}}))
    else:
        print(f"pigeon: {sanitize(message)}", file=sys.stderr)


def out(args: argparse.Namespace, value: Any, human: Callable[[Any], str]) -> None:
    """Print a command's result: `value` as JSON with `--json`, else `human(value)`."""
    print(json.dumps(value) if args.json else human(value))


_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Format characters that only join what is around them (emoji sequences, some scripts): shown.
_JOINERS: Final = frozenset("\u200c\u200d")


def sanitize(text: str) -> str:
    """`text` (from a peer, or anything else a terminal will show) as one safe line: newlines
    and tabs escaped as `\\n`, `\\r`, `\\t`, and every other control or format character (ESC,
    C0 and C1 controls, bidi overrides and isolates, line separators) as `\\xXX` / `\\uXXXX`, so
    no text can move the cursor, fake a line, retitle the window or reorder what is shown. JSON
    output needs none of this: JSON escapes control characters itself."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char not in _JOINERS and unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def format_time(ms: int) -> str:
    """A timestamp (milliseconds since the epoch) as local time, for people."""
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def format_entry(contact: str, entry: dict[str, Any]) -> str:
    """One history entry (as the control API returns it) as a line for people; the text is
    sanitized (it came from a peer, or may have)."""
    if entry.get("kind") == "notice":  # a line no one wrote: a device added, say
        return f"{format_time(entry['sent_at_ms'])} -- {sanitize(entry['text'])}"
    # In a group, the member who wrote it (PROTOCOL.md section 27).
    who = "me" if entry["direction"] == "out" else sanitize(entry.get("sender") or contact)
    state = f"  [{entry['state']}]" if entry["direction"] == "out" else ""
    error = f" ({sanitize(entry['error'])})" if entry.get("error") else ""
    text = sanitize(entry["text"])
    attachment = entry.get("attachment")
    if attachment:  # a file message (PROTOCOL.md section 26.4): its name, size and state
        text = (f"[file {sanitize(attachment['name'])}, {attachment['size']:,} bytes,"
                f" {attachment['state']}]" + (f" {text}" if text else ""))
    return f"{format_time(entry['sent_at_ms'])} {who}: {text}{state}{error}"
