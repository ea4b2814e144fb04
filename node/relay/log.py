"""The relay's logs: JSON lines on stderr, one object per event, nothing that identifies a sender.

    {"ts": "2026-01-02T03:04:05.678Z", "level": "info", "event": "relay.started", ...fields}

The relay's own events are written with `event(level, name, **fields)`: the code that logs
decides the fields, and none of it passes a peer id or an address; mailbox ids only appear
truncated (`box_tag`). Records from everything else (libp2p, the transport, the standard library)
become {"event": "log", "logger", "msg"} with peer ids and IP addresses masked (`scrub`): their
text is not ours to vet, and a libp2p error may name the peer it happened with.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import IO, Any, Final

from node.net import configure_libp2p_logging
from node.relay.config import LogLevel

__all__ = ["JsonLogFormatter", "box_tag", "configure_relay_logging", "event", "scrub"]

log = logging.getLogger("pigeon.relay")

#: Hex digits of a mailbox id that may appear in logs: enough to tell mailboxes apart when
#: debugging, too few to name a device.
LOGGED_BOX_HEX: Final = 8

_PEER_ID = re.compile(r"\b(?:12D3KooW|16Uiu2HA|Qm)[1-9A-HJ-NP-Za-km-z]{20,}|[1-9A-HJ-NP-Za-km-z]{40,}")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_IP_COMPONENT = re.compile(r"/(ip6|ip6zone|dns|dns4|dns6|dnsaddr)/[^/\s'\"\]\),]+")
_IPV6_BARE = re.compile(r"\b(?:[0-9a-fA-F]{1,4}:){2,7}[0-9a-fA-F]{0,4}\b|::1\b")


def scrub(text: str) -> str:
    """Mask peer ids and IP addresses in text the relay did not write itself (library messages,
    exception text): they could identify a depositor."""
    text = _PEER_ID.sub("<peer>", text)
    text = _IP_COMPONENT.sub(lambda m: f"/{m.group(1)}/<ip>", text)
    text = _IPV4.sub("<ip>", text)
    return _IPV6_BARE.sub("<ip>", text)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: {"ts", "level", "event", ...fields}.

    Records logged with `event` carry their fields and are written as they are (the relay's own
    code decides what goes in them). Every other record (libp2p, the transport, the standard
    library) becomes {"event": "log", "logger", "msg"} with its text scrubbed.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
        }
        fields = getattr(record, "pigeon_fields", None)
        if isinstance(fields, dict):
            out["event"] = str(record.msg)
            out.update(fields)
        else:
            out["event"] = "log"
            out["logger"] = record.name
            try:
                message = record.getMessage()
            except Exception:  # a library's bad format string must not kill logging
                message = str(record.msg)
            out["msg"] = scrub(message)
        if record.exc_info:
            out["error"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class _LibraryLevel(logging.Filter):
    """Pigeon's records at the configured level; everyone else's from WARNING up. Some libp2p
    modules log on the root logger (node/net.py), so a DEBUG relay would otherwise print
    every yamux frame."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("pigeon") or record.levelno >= logging.WARNING


def configure_relay_logging(level: LogLevel, stream: IO[str] | None = None) -> logging.Handler:
    """JSON lines on `stream` (stderr) for every logger; libp2p's own loggers at ERROR."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    handler.addFilter(_LibraryLevel())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    configure_libp2p_logging(logging.ERROR)
    return handler


def event(level: int, name: str, **fields: Any) -> None:
    """Log the relay event `name` at `level` (a `logging` level) with `fields` (JSON values
    chosen by the caller: never a peer id or an address)."""
    if log.isEnabledFor(level):
        log.log(level, name, extra={"pigeon_fields": fields})


def box_tag(box: bytes) -> str:
    """The first LOGGED_BOX_HEX hex digits of a mailbox id, all of it that logs may show."""
    return box.hex()[:LOGGED_BOX_HEX]
