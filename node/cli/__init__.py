"""The `pigeon` command, one module per command family: `device` (the device's commands and
`pigeon run`), `chat`, `relay` (`pigeon relay`), `demo`. No protocol logic lives here: device
commands are `node.device.control.OPERATIONS`, run by the daemon when one is running on the data
directory (over its control socket) and otherwise by a node this process opens for the duration
of the command.

Every command that prints data takes `--json` and then prints exactly one JSON value on stdout
(`pigeon run --json` prints one JSON object per line, one per event). Errors go to stderr, or
with `--json` as {"error": {"type", "message"}} on stdout, as one line naming the root cause
(`--log-level DEBUG` adds the trace). Exit status: 0 ok, 1 error, 2 usage, 130 interrupted.

This module only parses arguments; a command's module is imported when it runs, so `pigeon
--help` loads neither trio nor libp2p.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.cli.output import CONFIG_FILE, DEFAULT_SEND_WAIT_S, EXIT_USAGE, guarded

__all__ = ["main"]

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _path(value: str) -> Path:
    """A path argument, with `~` and `~user` expanded (a usage error if there is no such user)."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"cannot expand {value!r}: no such user or no home directory") from None


def _multiaddr(value: str) -> str:
    """A multiaddr argument: only its shape is checked here (the node checks the rest when it
    starts), so `127.0.0.1:4001` gets a usage error that shows the form expected."""
    if not value.startswith("/"):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a multiaddr (e.g. /ip4/127.0.0.1/tcp/4001)")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pigeon")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


# --- argument parsing -----------------------------------------------------------------------------


class _VersionAction(argparse.Action):
    """`--version`: prints `pigeon VERSION` and exits. The version is looked up only then, not
    for every command (importlib.metadata and the lookup are about 30 ms, a tenth of a command
    that a running daemon serves)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS,
                 help: str = "show the program's version number and exit") -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        print(f"pigeon {_version()}")
        parser.exit()



def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=_path, default=argparse.SUPPRESS,
                        help="data directory (default: $PIGEON_HOME or the user data dir)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print machine-readable JSON only")
    common.add_argument("--config", type=_path, default=argparse.SUPPRESS,
                        help=f"node settings (TOML; default: {CONFIG_FILE} in the data directory)")
    parser = argparse.ArgumentParser(
        prog="pigeon", parents=[common],
        description="Peer-to-peer, end-to-end encrypted messenger.")
    parser.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                        help="DEBUG also prints the trace of an error (any case)")
    parser.add_argument("--version", action=_VersionAction)
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
    p.add_argument("--yes", action="store_true",
                   help="do not ask for confirmation (for scripts; the history goes too)")
    p = csub.add_parser("rename", parents=[common], help="give a contact another name")
    p.add_argument("name")
    p.add_argument("new_name")

    group = sub.add_parser("group", parents=[common],
                           help="group chats: create, add, remove, leave, rename, info, list")
    gsub = group.add_subparsers(dest="group_command", required=True, metavar="ACTION")
    p = gsub.add_parser("create", parents=[common], help="create a group with contacts")
    p.add_argument("name")
    p.add_argument("members", nargs="+", metavar="MEMBER", help="a contact's name")
    for action, what in (("add", "add contacts to a group (admins)"),
                         ("remove", "remove members from a group (admins)"),
                         ("promote", "make members admins (admins)")):
        p = gsub.add_parser(action, parents=[common], help=what)
        p.add_argument("group")
        p.add_argument("members", nargs="+", metavar="MEMBER",
                       help="a contact's name, or a member as `group info` shows it")
    p = gsub.add_parser("leave", parents=[common], help="leave a group")
    p.add_argument("group")
    p = gsub.add_parser("rename", parents=[common], help="rename a group for everyone (admins)")
    p.add_argument("group")
    p.add_argument("new_name")
    p = gsub.add_parser("info", parents=[common], help="a group's members and admins")
    p.add_argument("group")
    gsub.add_parser("list", parents=[common], help="list groups")

    p = sub.add_parser("link", parents=[common],
                       help="make this (new, empty) data directory a device of your account")
    p.add_argument("--listen", action="append", metavar="MULTIADDR", type=_multiaddr,
                   help="address to listen on while linking (repeatable); default as `run`")
    p.add_argument("--relay", action="append", metavar="MULTIADDR", type=_multiaddr,
                   help="a relay to be reached through while linking, /.../p2p/<relay id>")
    p.add_argument("--history-wait", type=float, default=600.0, metavar="SECONDS",
                   help="seconds to wait for the history after linking (default %(default)s;"
                        " the rest comes when this device runs)")
    device = sub.add_parser("device", parents=[common], help="this account's devices")
    dsub = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    p = dsub.add_parser("add", parents=[common],
                        help="approve a new device showing a link code (`pigeon link` there)")
    p.add_argument("code", metavar="CODE", help="the link code (pigeon-link:...)")
    dsub.add_parser("list", parents=[common], help="list this account's devices")
    p = dsub.add_parser("remove", parents=[common],
                        help="remove a device from this account (from any of its devices)")
    p.add_argument("device", metavar="DEVICE",
                   help="its peer id, a unique start of it, or its number in `device list`")

    p = sub.add_parser("send", parents=[common], help="send a message")
    p.add_argument("contact", help="a contact's or a group's name")
    p.add_argument("text", nargs="?", help="the message (omit with --stdin)")
    p.add_argument("--stdin", action="store_true", help="send each line of stdin as a message")
    p.add_argument("--wait", type=float, default=DEFAULT_SEND_WAIT_S,
                   help="seconds to wait for delivery (default %(default)s; 0: do not wait)")
    p.add_argument("--file", action="append", metavar="PATH", type=_path,
                   help="send this file (repeatable); images are sent without their metadata")
    p.add_argument("--caption", default=None, help="with --file: a caption for the first file")
    p.add_argument("--original", action="store_true",
                   help="with --file: send images as they are (metadata and all)")
    p = sub.add_parser("save", parents=[common],
                       help="download a file someone sent (if not already) and save it")
    p.add_argument("message_id", metavar="MESSAGE_ID", help="its id in `history --json`")
    p.add_argument("path", metavar="PATH", nargs="?", type=_path, default=None,
                   help="where to save it (a directory: under its name); default: only show"
                        " where it is stored")

    p = sub.add_parser("run", parents=[common], help="stay online: receive and deliver")
    p.add_argument("--listen", action="append", metavar="MULTIADDR", type=_multiaddr,
                   help="address to listen on (repeatable); default: all interfaces, TCP+QUIC+WS")
    p.add_argument("--relay", action="append", metavar="MULTIADDR", type=_multiaddr,
                   help="a relay holding this device's mailbox, /.../p2p/<relay id> (repeatable)")
    p.add_argument("--name", dest="display_name", default=None,
                   help="display name offered in invites")
    p.add_argument("--mdns-interface", action="append", metavar="ADDR",
                   help="IPv4 address of an interface for LAN discovery (repeatable; default all)")
    p.add_argument("--no-mdns", action="store_true", help="no LAN discovery at all")
    p.add_argument("--no-mdns-announce", action="store_true",
                   help="look for contacts on the LAN without announcing this device")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR", type=_multiaddr,
                   help="a DHT peer to start from, /.../p2p/<peer id> (repeatable; none built in)")
    p.add_argument("--dht-server", action="store_true",
                   help="serve DHT requests (for always-on nodes; devices are clients)")

    p = sub.add_parser("chat", parents=[common], help="interactive chat with a contact")
    p.add_argument("contact")
    p = sub.add_parser("history", parents=[common], help="show messages with a contact")
    p.add_argument("contact")
    p.add_argument("--limit", type=int, default=50)
    p = sub.add_parser("read", parents=[common],
                       help="mark a contact's messages read (on all your devices)")
    p.add_argument("contact")
    p.add_argument("--up-to", metavar="MESSAGE_ID", default=None,
                   help="only up to this message (its id in `history --json`); default: all")
    sub.add_parser("status", parents=[common], help="outbox and connection state")
    p = sub.add_parser("fetch", parents=[common],
                       help="one-shot: connect, drain the relays, deliver receipts, exit "
                            "(what a wake-up asks for)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up waiting after this long (default %(default)s)")
    push = sub.add_parser("push", parents=[common],
                          help="wake-ups: a push URL the relays POST to when messages wait")
    psub = push.add_subparsers(dest="push_command", required=True, metavar="ACTION")
    p = psub.add_parser("register", parents=[common],
                        help="set this device's push URL and register it at its relays")
    p.add_argument("url", metavar="URL", help="the push service's URL for this device (http(s))")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="seconds to wait for the relays' answers (default %(default)s)")
    p = psub.add_parser("remove", parents=[common],
                        help="forget the push URL and keys, and tell the relays")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="seconds to wait for the relays' answers (default %(default)s)")
    p = sub.add_parser("relays", parents=[common],
                       help="relays listed in the DHT, with round-trip time and load")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR", type=_multiaddr,
                   help="a DHT peer to find them through, /.../p2p/<peer id> (repeatable;"
                        " default: the config's)")
    sub.add_parser("demo", parents=[common], help="two local nodes exchange messages")

    relay_options = argparse.ArgumentParser(add_help=False)
    relay_options.add_argument("--data-dir", type=_path, default=argparse.SUPPRESS,
                               help="the relay's data directory (required, here or in --config)")
    relay_options.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                               help="print machine-readable JSON only")
    relay_options.add_argument("--config", type=_path, default=None, metavar="FILE",
                               help="TOML file with any of the flags' settings and every limit")
    p = sub.add_parser(
        "relay", parents=[relay_options],
        help="run a store-and-forward relay for others (`relay status`: its figures)",
        description="Run a relay: mailboxes for offline devices and circuit relay v2. Flags "
                    "override the config file. Logs are JSON lines on stderr.")
    p.add_argument("--listen", action="append", metavar="MULTIADDR", type=_multiaddr,
                   help="address to listen on (repeatable); default: TCP and QUIC on port 4040")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR", type=_multiaddr,
                   help="another DHT server to join through, /.../p2p/<peer id> (repeatable)")
    p.add_argument("--no-dht", action="store_true", help="do not serve the Pigeon DHT")
    p.add_argument("--log-level", dest="relay_log_level", default=None, type=str.upper,
                   choices=LOG_LEVELS, help="default: INFO (any case)")
    rsub = p.add_subparsers(dest="relay_command", metavar="ACTION")
    rsub.add_parser("status", parents=[relay_options],
                    help="figures of the relay running on the data directory")
    return parser


# --- entry point -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `pigeon` command with `argv` (default: the process's arguments); returns the exit
    status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
            shown = arg.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
            print(f"pigeon: argument '{shown}' is not valid UTF-8 (check the terminal's encoding)",
                  file=sys.stderr)
            return EXIT_USAGE
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)

    def run() -> int:
        if args.command == "relay":
            from node.cli.relay import relay_main

            return relay_main(args)
        from node.cli.device import device_main

        return device_main(args)

    return guarded(args, run)


if __name__ == "__main__":
    sys.exit(main())
