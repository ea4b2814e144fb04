"""`pigeon` device commands: init, id, invite, contact, send, history, status, and `pigeon run`
(the daemon that serves them over the control socket)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from node import config_file
from node.cli.output import CONFIG_FILE, CommandError, format_entry, out, print_error
from node.device.config import Config
from node.device.control import NODE_STREAMS, OPERATIONS, LocalClient, event_to_json
from node.device.datadir import DataDir, default_data_dir
from node.device.node import Node, init_data_dir
from node.errors import NodeError
from node.net.addresses import dialable
from node.protocol.keys import IdentityKey
from node.rpc import Client, RpcError, SocketClient, serve

log = logging.getLogger("pigeon.cli")

__all__ = ["device_main", "open_client"]


def device_main(args: argparse.Namespace) -> int:
    """Run a device command (everything but `pigeon relay`); returns the exit status."""
    args.data_dir = getattr(args, "data_dir", None) or default_data_dir()
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return trio.run(_run_command, args)
    except NodeError as exc:
        print_error(args, type(exc).__name__ if not isinstance(exc, RpcError) else exc.type or "Error",
              str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


async def _run_command(args: argparse.Namespace) -> int:
    command = args.command
    if command == "init":
        account, peer = init_data_dir(args.data_dir, display_name=args.name)
        out(args, {"account_id": account, "peer_id": peer, "data_dir": str(args.data_dir)},
             lambda v: f"account {v['account_id']}\ndevice  {v['peer_id']}\n"
                       f"data    {v['data_dir']}")
        return 0
    if command == "demo":
        from node.cli.demo import run_demo

        summary = await run_demo(say=(lambda _: None) if args.json else print)
        if args.json:
            print(json.dumps(summary))
        return 0 if summary.get("exactly_once") else 1
    if command == "run":
        return await _daemon(args)
    if command == "id" and not DataDir(args.data_dir).socket_file.exists():
        return _offline_id(args)
    async with open_client(args) as client:
        return await COMMANDS[command](args, client)


@asynccontextmanager
async def open_client(args: argparse.Namespace) -> AsyncIterator[Client]:
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


# --- commands --------------------------------------------------------------------------------------


def _offline_id(args: argparse.Namespace) -> int:
    identity, device = DataDir(args.data_dir).load_keys()
    value = {"account_id": identity.public.account_id(), "peer_id": device.public.peer_id(),
             "running": False}
    out(args, value, lambda v: f"account {v['account_id']}\ndevice  {v['peer_id']}\n"
                                "(not running: `pigeon run` to go online)")
    return 0


async def _cmd_id(args: argparse.Namespace, client: Client) -> int:
    value = await client.call("id") | {"running": isinstance(client, SocketClient)}
    out(args, value, lambda v: "\n".join(
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
        out(args, value, lambda v: f"added {v['name']} ({v['account_id']})")
    elif action == "list":
        value = await client.call("contact.list")
        out(args, value, lambda v: "\n".join(
            f"{c['name']:<20} {'online ' if c['online'] else 'offline'} {c['account_id']}\n"
            f"{'':<20} safety number {c['safety_number']}" for c in v) or "no contacts yet")
    else:
        value = await client.call("contact.remove", {"name": args.name})
        out(args, value, lambda v: f"removed {v['removed']}")
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
    out(args, value, lambda v: "\n".join(
        f"{r['message_id']} {r['state']}" for r in (v if isinstance(v, list) else [v])))
    return 0


async def _cmd_history(args: argparse.Namespace, client: Client) -> int:
    value = await client.call("history", {"contact": args.contact, "limit": args.limit})
    out(args, value, lambda v: "\n".join(format_entry(args.contact, e) for e in v)
         or "no messages yet")
    return 0


async def _cmd_status(args: argparse.Namespace, client: Client) -> int:
    value = await client.call("status") | {"daemon": isinstance(client, SocketClient)}

    def human(v: dict[str, Any]) -> str:
        lines = [f"account {v['account_id']}", f"device  {v['peer_id']}",
                 f"daemon  {'running' if v['daemon'] else 'not running'}"]
        for c in v["contacts"]:
            path = c["path"] or "offline"
            line = (f"  {c['name']:<20} {path:<8} pending {c['pending']}, awaiting ack"
                    f" {c['sent']}, at relays {c['relayed']}")
            if c.get("path_down") and c["path_down"] != c["last_error"]:
                line += f"  path down: {c['path_down']}"
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

    out(args, value, human)
    return 0


async def _daemon(args: argparse.Namespace) -> int:
    """`pigeon run`: stay online, serve the control socket, print incoming messages."""
    if not DataDir(args.data_dir).is_initialized():
        raise CommandError(f"{args.data_dir} is not initialised: run `pigeon init` first")
    config = _config(args)
    async with Node.open(args.data_dir, config) as node:
        with node.events() as events:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(serve, node, node.data_dir.socket_file,
                                            operations=OPERATIONS, streams=NODE_STREAMS))
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


async def _chat(args: argparse.Namespace, client: Client) -> int:
    from node.cli.chat import chat

    return await chat(args, client)


#: A device command run against a client: the parsed arguments in, the exit status out.
Command = Callable[[argparse.Namespace, Client], Awaitable[int]]

COMMANDS: dict[str, Command] = {
    "id": _cmd_id,
    "invite": _cmd_invite,
    "contact": _cmd_contact,
    "send": _cmd_send,
    "history": _cmd_history,
    "status": _cmd_status,
    "chat": _chat,
}
