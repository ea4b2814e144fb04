"""The `pigeon` command. No protocol logic lives here: commands are `rpc.OPERATIONS`, run by the
daemon when one is running on the data directory (over its control socket) and otherwise by a
node this process opens for the duration of the command.

Every command that prints data takes `--json` and then prints exactly one JSON value on stdout
(`pigeon run --json` prints one JSON object per line, one per event). Errors go to stderr, or
with `--json` as {"error": {"type", "message"}} on stdout; the exit status is 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from node import config_file
from node.config import Config
from node.datadir import DataDir, default_data_dir
from node.errors import NodeError
from node.netaddrs import dialable
from node.node import Node, init_data_dir
from node.protocol.keys import IdentityKey
from node.rpc import (
    Client,
    LineTooLong,
    LocalClient,
    RpcError,
    SocketClient,
    event_to_json,
    read_lines,
    serve,
)

log = logging.getLogger("pigeon.cli")

#: The node's settings file in its data directory (keys: the fields of node.config.Config).
CONFIG_FILE = "config.toml"

#: Seconds `pigeon send` waits for the end-to-end ack before returning (the message stays queued).
DEFAULT_SEND_WAIT_S = 5.0


class CommandError(NodeError):
    """A command cannot be carried out as asked (shown to the user as is)."""


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
    args = _parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    if args.command == "relay":
        return _relay_main(args)
    args.data_dir = getattr(args, "data_dir", None) or default_data_dir()
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return trio.run(_run_command, args)
    except NodeError as exc:
        _fail(args, type(exc).__name__ if not isinstance(exc, RpcError) else exc.type or "Error",
              str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


def _fail(args: argparse.Namespace, kind: str, message: str) -> None:
    if args.json:
        print(json.dumps({"error": {"type": kind, "message": message}}))
    else:
        print(f"pigeon: {message}", file=sys.stderr)


def _out(args: argparse.Namespace, value: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(value) if args.json else human(value))


async def _run_command(args: argparse.Namespace) -> int:
    command = args.command
    if command == "init":
        account, peer = init_data_dir(args.data_dir, display_name=args.name)
        _out(args, {"account_id": account, "peer_id": peer, "data_dir": str(args.data_dir)},
             lambda v: f"account {v['account_id']}\ndevice  {v['peer_id']}\n"
                       f"data    {v['data_dir']}")
        return 0
    if command == "demo":
        from node.demo import run_demo

        summary = await run_demo(say=(lambda _: None) if args.json else print)
        if args.json:
            print(json.dumps(summary))
        return 0 if summary.get("exactly_once") else 1
    if command == "run":
        return await _daemon(args)
    if command == "id" and not DataDir(args.data_dir).socket_file.exists():
        return _offline_id(args)
    async with _client(args) as client:
        return await COMMANDS[command](args, client)


@asynccontextmanager
async def _client(args: argparse.Namespace) -> AsyncIterator[Client]:
    """The running daemon if there is one, else a node opened for this command."""
    daemon = await SocketClient.connect(DataDir(args.data_dir).socket_file)
    if daemon is not None:
        try:
            yield daemon
        finally:
            await daemon.aclose()
        return
    async with Node.open(args.data_dir, _config(args)) as node:
        yield LocalClient(node)


def _config(args: argparse.Namespace) -> Config:
    """Defaults, then `config.toml` in the data directory (or `--config FILE`), then the flags."""
    path = getattr(args, "config", None)
    if path is None and (Path(args.data_dir) / CONFIG_FILE).exists():
        path = Path(args.data_dir) / CONFIG_FILE
    def flag_tuple(name: str) -> tuple[str, ...] | None:
        values = getattr(args, name, None)
        return tuple(values) if values else None

    config = config_file.load(
        Config, path,
        listen=flag_tuple("listen"),
        relays=flag_tuple("relay"),
        display_name=getattr(args, "display_name", None) or None,
        mdns_interfaces=flag_tuple("mdns_interface"),
        bootstrap=flag_tuple("bootstrap"),
        mdns=False if getattr(args, "no_mdns", False) else None,
        mdns_announce=False if getattr(args, "no_mdns_announce", False) else None,
        dht_server=True if getattr(args, "dht_server", False) else None,
    )
    if args.command != "run":
        # A command that opens the node for a moment (no daemon running) does its job and
        # leaves: it has no business announcing this device on the LAN.
        config = config.replace(mdns=False)
    return config


# --- commands ----------------------------------------------------------------------------------------


def _offline_id(args: argparse.Namespace) -> int:
    identity, device = DataDir(args.data_dir).load_keys()
    value = {"account_id": identity.public.account_id(), "peer_id": device.public.peer_id(),
             "running": False}
    _out(args, value, lambda v: f"account {v['account_id']}\ndevice  {v['peer_id']}\n"
                                "(not running: `pigeon run` to go online)")
    return 0


async def _cmd_id(args: argparse.Namespace, client: Client) -> int:
    value = await client.call("id") | {"running": isinstance(client, SocketClient)}
    _out(args, value, lambda v: "\n".join(
        [f"account {v['account_id']}", f"device  {v['peer_id']}",
         *[f"address {a}" for a in v["addresses"]]]))
    return 0


async def _cmd_invite(args: argparse.Namespace, client: Client) -> int:
    result = await client.call("invite", {"addresses": not args.no_addresses})
    if args.json:
        print(json.dumps(result))
        return 0
    print(result["invite"])
    _print_qr(result["invite"])
    print("Give this invite to someone; they add you with: pigeon contact add NAME INVITE",
          file=sys.stderr)
    return 0


def _print_qr(text: str) -> None:
    """The invite as a QR code (byte mode, holding the signed record itself: PROTOCOL.md
    "Invites"), printed to stderr so stdout stays the one-line invite."""
    import qrcode

    from node.protocol.invite import invite_record

    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_L, border=1)
    qr.add_data(invite_record(text))
    try:
        qr.make(fit=True)
    except ValueError:  # DataOverflowError, or "Invalid version" past version 40
        print("(the invite is too long for a QR code; share the text)", file=sys.stderr)
        return
    qr.print_ascii(out=sys.stderr, invert=True)


async def _cmd_contact(args: argparse.Namespace, client: Client) -> int:
    action = args.contact_command
    if action == "add":
        is_account = args.invite.strip().startswith(IdentityKey.ACCOUNT_ID_PREFIX)
        key = "account_id" if is_account else "invite"
        value = await client.call("contact.add", {"name": args.name, key: args.invite.strip()})
        _out(args, value, lambda v: f"added {v['name']} ({v['account_id']})")
    elif action == "list":
        value = await client.call("contact.list")
        _out(args, value, lambda v: "\n".join(
            f"{c['name']:<20} {'online ' if c['online'] else 'offline'} {c['account_id']}\n"
            f"{'':<20} safety number {c['safety_number']}" for c in v) or "no contacts yet")
    else:
        value = await client.call("contact.remove", {"name": args.name})
        _out(args, value, lambda v: f"removed {v['removed']}")
    return 0


async def _cmd_send(args: argparse.Namespace, client: Client) -> int:
    if args.stdin == (args.text is not None):
        raise CommandError("give the message text, or --stdin to send each line of stdin")
    texts = [line.rstrip("\n") for line in sys.stdin if line.strip()] if args.stdin \
        else [args.text]
    results = []
    for i, text in enumerate(texts):
        wait = args.wait if i == len(texts) - 1 else 0
        results.append(await client.call("send", {"contact": args.contact, "text": text,
                                                   "wait": wait}))
    if args.stdin and args.wait > 0:  # report final states of all of them
        states = {r["message_id"]: r for r in results}
        history = await client.call("history", {"contact": args.contact,
                                                "limit": max(50, 2 * len(results))})
        for entry in history:
            if entry["message_id"] in states:
                states[entry["message_id"]]["state"] = entry["state"]
    value: Any = results if args.stdin else results[0]
    _out(args, value, lambda v: "\n".join(
        f"{r['message_id']} {r['state']}" for r in (v if isinstance(v, list) else [v])))
    return 0


async def _cmd_history(args: argparse.Namespace, client: Client) -> int:
    value = await client.call("history", {"contact": args.contact, "limit": args.limit})
    _out(args, value, lambda v: "\n".join(_format_entry(args.contact, e) for e in v)
         or "no messages yet")
    return 0


def _format_entry(contact: str, entry: dict[str, Any]) -> str:
    import datetime

    when = datetime.datetime.fromtimestamp(entry["sent_at_ms"] / 1000).strftime("%Y-%m-%d %H:%M")
    who = "me" if entry["direction"] == "out" else contact
    state = f"  [{entry['state']}]" if entry["direction"] == "out" else ""
    error = f" ({entry['error']})" if entry.get("error") else ""
    return f"{when} {who}: {entry['text']}{state}{error}"


async def _cmd_status(args: argparse.Namespace, client: Client) -> int:
    value = await client.call("status") | {"daemon": isinstance(client, SocketClient)}

    def human(v: dict[str, Any]) -> str:
        lines = [f"account {v['account_id']}", f"device  {v['peer_id']}",
                 f"daemon  {'running' if v['daemon'] else 'not running'}"]
        for c in v["contacts"]:
            path = c["path"] or "offline"
            line = (f"  {c['name']:<20} {path:<8} pending {c['pending']}, awaiting ack"
                    f" {c['sent']}, at relays {c['relayed']}")
            if c["last_error"]:
                line += f"  last error: {c['last_error']}"
            lines.append(line)
        for r in v["relays"]:
            state = "subscribed" if r["connected"] else "not connected"
            line = f"  relay {r['address']}: {state}, {r['received']} received"
            if r["last_error"]:
                line += f"  last error: {r['last_error']}"
            lines.append(line)
        return "\n".join(lines)

    _out(args, value, human)
    return 0


async def _cmd_chat(args: argparse.Namespace, client: Client) -> int:
    """Print recent history, then incoming messages as they arrive; each line typed is sent."""
    history = await client.call("history", {"contact": args.contact, "limit": 20})
    for entry in history:
        print(_format_entry(args.contact, entry))
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


async def _daemon(args: argparse.Namespace) -> int:
    """`pigeon run`: stay online, serve the control socket, print incoming messages."""
    if not DataDir(args.data_dir).is_initialized():
        raise CommandError(f"{args.data_dir} is not initialised: run `pigeon init` first")
    config = _config(args)
    async with Node.open(args.data_dir, config) as node:
        with node.events() as events:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, node, node.data_dir.socket_file)
                nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
                listening = {"type": "Listening", "account_id": node.account_id,
                             "peer_id": node.peer_id, "addresses": dialable(node.addresses())}
                if args.json:
                    print(json.dumps(listening), flush=True)
                else:
                    print(f"pigeon running as {node.account_id}", flush=True)
                    for address in listening["addresses"]:
                        print(f"listening on {address}", flush=True)
                async for event in events:
                    if args.json:
                        print(json.dumps(event_to_json(event)), flush=True)
                    elif (line := _describe_event(event_to_json(event))) is not None:
                        print(line, flush=True)
    return 0


def _describe_event(event: dict[str, Any]) -> str | None:
    """A line for the daemon's output, or None for events only --json shows (sent, delivered)."""
    kind = event["type"]
    if kind == "MessageReceived":
        return f"{event['contact']}: {event['text']}"
    if kind == "MessageFailed":
        return f"(message {event['message_id'][:8]} to {event['contact']} failed: {event['reason']})"
    if kind == "ContactAdded":
        return f"({event['contact']} joined through your invite)"
    if kind in ("ContactOnline", "ContactOffline"):
        return f"({event['contact']} is {'online' if kind == 'ContactOnline' else 'offline'})"
    if kind == "EventsDropped":
        return f"({event['count']} events skipped)"
    return None


async def _stop_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("stopping")
            scope.cancel()
            return


# --- relay --------------------------------------------------------------------------------------------


def _relay_main(args: argparse.Namespace) -> int:
    """`pigeon relay` (run) and `pigeon relay status`. The relay has no default data directory:
    it is a service of its own, not the user's node."""
    from node.relay import run_relay
    from node.relay_config import load_relay_config
    from node.relay_log import configure_relay_logging, event

    status = getattr(args, "relay_command", None) == "status"
    if status:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        configure_relay_logging(getattr(args, "relay_log_level", None) or "INFO")
    try:
        config = load_relay_config(
            args.config, data_dir=getattr(args, "data_dir", None),
            listen=tuple(args.listen) if getattr(args, "listen", None) else None,
            metrics_listen=getattr(args, "metrics_listen", None),
            log_level=getattr(args, "relay_log_level", None),
            bootstrap=tuple(args.bootstrap) if getattr(args, "bootstrap", None) else None,
            dht=False if getattr(args, "no_dht", False) else None)
        if config.data_dir is None:
            raise CommandError("give the relay a data directory: --data-dir DIR "
                               "(or data_dir in the --config file)")
        if status:
            return trio.run(_relay_status, args, config.data_dir)
        logging.getLogger().setLevel(getattr(logging, config.log_level))
        return trio.run(partial(run_relay, config, as_json=args.json))
    except NodeError as exc:
        kind = (exc.type or "Error") if isinstance(exc, RpcError) else type(exc).__name__
        if status or args.json:
            _fail(args, kind, str(exc))
        if not status:  # stderr holds JSON lines only while the relay runs
            event(logging.ERROR, "relay.failed", type=kind, message=str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


async def _relay_status(args: argparse.Namespace, data_dir: Path) -> int:
    from node.relay import RelayDir

    socket_file = RelayDir(data_dir).socket_file
    client = await SocketClient.connect(socket_file)
    if client is None:
        raise CommandError(f"no relay is running on {data_dir} (no control socket {socket_file})")
    try:
        value = await client.call("status")
    finally:
        await client.aclose()

    def human(v: dict[str, Any]) -> str:
        rejects = ", ".join(f"{k} {n}" for k, n in v["rejects"].items() if n) or "none"
        return "\n".join([
            f"relay          {v['peer_id']}",
            f"uptime         {v['uptime_s']:.0f} s",
            *[f"address        {a}" for a in v["addresses"]],
            f"peers          {v['connected_peers']} connected, {v['streams']} mailbox streams, "
            f"{v['subscriptions']} subscribed",
            f"stored         {v['messages']} messages, {v['bytes']} bytes, "
            f"{v['mailboxes']} mailboxes",
            f"deposits       {v['deposits']} (+{v['duplicate_deposits']} duplicates)",
            f"fetches        {v['fetches']}, pushed {v['pushes']}, acked {v['acked']}, "
            f"expired {v['expired']}",
            f"rejects        {rejects}",
        ])

    _out(args, value, human)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Client], Any]] = {
    "id": _cmd_id,
    "invite": _cmd_invite,
    "contact": _cmd_contact,
    "send": _cmd_send,
    "history": _cmd_history,
    "status": _cmd_status,
    "chat": _cmd_chat,
}


if __name__ == "__main__":
    sys.exit(main())
