"""The `pigeon` command, one module per command family: `device` (the device's commands and
`pigeon run`), `chat`, `relay` (`pigeon relay`), `demo`. No protocol logic lives here: device
commands are `node.device.control.OPERATIONS`, run by the daemon when one is running on the data
directory (over its control socket) and otherwise by a node this process opens for the duration
of the command.

Every command that prints data takes `--json` and then prints exactly one JSON value on stdout
(`pigeon run --json` prints one JSON object per line, one per event). Errors go to stderr, or
with `--json` as {"error": {"type", "message"}} on stdout; the exit status is 1 (2 for usage).

This module only parses arguments; a command's module is imported when it runs, so `pigeon
--help` loads neither trio nor libp2p.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from node.cli.output import CONFIG_FILE, DEFAULT_SEND_WAIT_S

__all__ = ["main"]


# --- argument parsing -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                        help="data directory (default: $PIGEON_HOME or the user data dir)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print machine-readable JSON only")
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help=f"node settings (TOML; default: {CONFIG_FILE} in the data directory)")
    parser = argparse.ArgumentParser(
        prog="pigeon", parents=[common],
        description="Peer-to-peer, end-to-end encrypted messenger.")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create this device's identity")
    p.add_argument("--name", default="", help="display name offered to people you invite")
    sub.add_parser("id", parents=[common], help="show this account and device")
    p = sub.add_parser("invite", parents=[common], help="print an invite for someone to add you")
    p.add_argument("--no-addresses", action="store_true",
                   help="leave this device's addresses out (it is then found by discovery)")

    contact = sub.add_parser("contact", parents=[common], help="manage contacts")
    csub = contact.add_subparsers(dest="contact_command", required=True, metavar="ACTION")
    p = csub.add_parser("add", parents=[common],
                        help="add a contact from their invite, or by account id (via the DHT)")
    p.add_argument("name")
    p.add_argument("invite", metavar="INVITE_OR_ACCOUNT_ID",
                   help="an invite (pigeon:...) or an account id (pg...)")
    csub.add_parser("list", parents=[common], help="list contacts")
    p = csub.add_parser("remove", parents=[common], help="forget a contact and its history")
    p.add_argument("name")

    p = sub.add_parser("send", parents=[common], help="send a message")
    p.add_argument("contact")
    p.add_argument("text", nargs="?", help="the message (omit with --stdin)")
    p.add_argument("--stdin", action="store_true", help="send each line of stdin as a message")
    p.add_argument("--wait", type=float, default=DEFAULT_SEND_WAIT_S,
                   help="seconds to wait for delivery (default %(default)s; 0: do not wait)")

    p = sub.add_parser("run", parents=[common], help="stay online: receive and deliver")
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="address to listen on (repeatable); default: all interfaces, TCP+QUIC+WS")
    p.add_argument("--relay", action="append", metavar="MULTIADDR",
                   help="a relay holding this device's mailbox, /.../p2p/<relay id> (repeatable)")
    p.add_argument("--name", dest="display_name", default=None,
                   help="display name offered in invites")
    p.add_argument("--mdns-interface", action="append", metavar="ADDR",
                   help="IPv4 address of an interface for LAN discovery (repeatable; default all)")
    p.add_argument("--no-mdns", action="store_true", help="no LAN discovery at all")
    p.add_argument("--no-mdns-announce", action="store_true",
                   help="look for contacts on the LAN without announcing this device")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                   help="a DHT peer to start from, /.../p2p/<peer id> (repeatable; none built in)")
    p.add_argument("--dht-server", action="store_true",
                   help="serve DHT requests (for always-on nodes; devices are clients)")

    p = sub.add_parser("chat", parents=[common], help="interactive chat with a contact")
    p.add_argument("contact")
    p = sub.add_parser("history", parents=[common], help="show messages with a contact")
    p.add_argument("contact")
    p.add_argument("--limit", type=int, default=50)
    sub.add_parser("status", parents=[common], help="outbox and connection state")
    sub.add_parser("demo", parents=[common], help="two local nodes exchange messages")

    relay_options = argparse.ArgumentParser(add_help=False)
    relay_options.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                               help="the relay's data directory (required, here or in --config)")
    relay_options.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                               help="print machine-readable JSON only")
    relay_options.add_argument("--config", type=Path, default=None, metavar="FILE",
                               help="TOML file with any of the flags' settings and every limit")
    p = sub.add_parser(
        "relay", parents=[relay_options],
        help="run a store-and-forward relay for others (`relay status`: its figures)",
        description="Run a relay: mailboxes for offline devices and circuit relay v2. Flags "
                    "override the config file. Logs are JSON lines on stderr.")
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="address to listen on (repeatable); default: TCP and QUIC on port 4040")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                   help="another DHT server to join through, /.../p2p/<peer id> (repeatable)")
    p.add_argument("--no-dht", action="store_true", help="do not serve the Pigeon DHT")
    p.add_argument("--log-level", dest="relay_log_level", default=None,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: INFO")
    rsub = p.add_subparsers(dest="relay_command", metavar="ACTION")
    rsub.add_parser("status", parents=[relay_options],
                    help="figures of the relay running on the data directory")
    return parser


# --- entry point -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `pigeon` command with `argv` (default: the process's arguments); returns the exit
    status."""
    args = _parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    if args.command == "relay":
        from node.cli.relay import relay_main

        return relay_main(args)
    from node.cli.device import device_main

    return device_main(args)


if __name__ == "__main__":
    sys.exit(main())
