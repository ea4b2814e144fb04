"""`pigeon` device commands: init, id, invite, contact, device, send, history, read, status,
fetch, push, and `pigeon run`
(the daemon that serves them over the control socket).

A command that a running daemon serves loads neither libp2p nor sqlite3: the node stack
(`node.device.node`, `node.device.control`) is imported only when this process opens the node
itself (no daemon) or runs it (`pigeon run`); the node's settings and the protocol's modules only
by the commands that use them (most of a served command's time is its start-up). A command that
makes its calls one after another (ONE_SHOT) does not load trio either: it talks to the daemon
through `node.rpc_wire.BlockingClient`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node import config_file
from node.cli.output import (
    CONFIG_FILE,
    EXIT_INTERRUPTED,
    CommandError,
    format_entry,
    out,
    sanitize,
)
from node.device.datadir import DataDir, default_data_dir
from node.rpc_wire import BlockingClient, Client, run_to_completion

if TYPE_CHECKING:
    import trio

    # trio-typing's stubs (a libp2p dependency) hide trio's own `trio.TaskStatus`: see node/rpc.py.
    from trio_typing import TaskStatus

    from node.device.config import Config

log = logging.getLogger("pigeon.cli")

__all__ = ["device_main", "open_client"]


def device_main(args: argparse.Namespace) -> int:
    """Run a device command (everything but `pigeon relay`); returns the exit status. Errors are
    raised to the caller (`node.cli.output.guarded` prints them)."""
    try:
        args.data_dir = getattr(args, "data_dir", None) or default_data_dir()
    except RuntimeError:  # $PIGEON_HOME=~nosuchuser/...
        raise CommandError("cannot expand $PIGEON_HOME: no such user or no home directory "
                           "(give the data directory with --data-dir)") from None
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _check_data_dir(Path(args.data_dir))
    if _one_shot(args):
        daemon = BlockingClient.connect(DataDir(args.data_dir).socket_file)
        if daemon is not None:
            try:
                return int(run_to_completion(COMMANDS[args.command](args, daemon)))
            finally:
                daemon.close()
    import trio

    return trio.run(_run_command, args)


def _one_shot(args: argparse.Namespace) -> bool:
    """Whether the command only makes calls one after another (no events, no waiting of its
    own), so that a running daemon serves it through a BlockingClient, without trio."""
    if args.command == "send":
        return not args.file  # a file's send follows the upload's events (node.cli.files)
    return args.command in ONE_SHOT


def _check_data_dir(path: Path) -> None:
    """Clear words for a data directory that cannot be one (before anything tries to use it)."""
    if path.exists() and not path.is_dir():
        raise CommandError(f"the data directory {path} is a file, not a directory "
                           "(give another one with --data-dir)")
    if path.is_dir() and not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise CommandError(f"the data directory {path} is not readable and writable by this "
                           "user (check its owner and permissions)")


async def _run_command(args: argparse.Namespace) -> int:
    command = args.command
    if command == "init":
        from node.device.setup import init_data_dir

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
    if command == "link":
        return await _link(args)
    if command == "id" and not DataDir(args.data_dir).socket_file.exists():
        return _offline_id(args)
    async with open_client(args) as client:
        return await COMMANDS[command](args, client)


@asynccontextmanager
async def open_client(args: argparse.Namespace) -> AsyncIterator[Client]:
    """The running daemon if there is one, else a node opened for this command."""
    from node.rpc import SocketClient

    daemon = await SocketClient.connect(DataDir(args.data_dir).socket_file)
    if daemon is not None:
        try:
            yield daemon
        finally:
            await daemon.aclose()
        return
    # A broken config is refused before the network stack is loaded (~1 s of CPU).
    config = _config(args)
    from node.device.control import LocalClient
    from node.device.node import Node

    async with Node.open(args.data_dir, config) as node:
        yield LocalClient(node)


def _config(args: argparse.Namespace) -> Config:
    """Defaults, then `config.toml` in the data directory (or `--config FILE`), then the flags."""
    from node.device.config import Config

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
    _config(args)  # a broken config is refused here as by every other command
    identity, device = DataDir(args.data_dir).load_keys()
    value = {"account_id": identity.public.account_id(), "peer_id": device.public.peer_id(),
             "daemon": False}
    out(args, value, lambda v: f"account {v['account_id']}\ndevice  {v['peer_id']}\n"
                                "(not running: `pigeon run` to go online)")
    return 0


async def _cmd_id(args: argparse.Namespace, client: Client) -> int:
    value = await client.call("id") | {"daemon": client.daemon}
    out(args, value, lambda v: "\n".join(
        [f"account {v['account_id']}", f"device  {v['peer_id']}",
         *[f"address {a}" for a in v["addresses"]]]))
    return 0


async def _cmd_invite(args: argparse.Namespace, client: Client) -> int:
    # A short invite (PROTOCOL.md section 14.1) needs this device online and findable when it
    # is used: handed out by the daemon with addresses, else the long form (works offline).
    short = client.daemon and not args.no_addresses
    result = await client.call("invite", {"addresses": not args.no_addresses, "short": short})
    if args.json:
        print(json.dumps(result))
        return 0
    print(result["invite"])
    _print_qr(result["invite"])
    print("Give this invite to someone; they add you with: pigeon contact add NAME INVITE",
          file=sys.stderr)
    return 0


#: The widest QR code `pigeon invite` prints: an 80-column terminal shows it whole.
QR_MAX_COLUMNS = 80
#: Light modules around the code: the quiet zone a scanner needs, as wide as still fits the
#: largest short invite's version 14 code (73 modules) in 80 columns.
QR_BORDER = 3


def _print_qr(text: str, out: Any = None) -> bool:
    """The invite as a QR code holding its text, printed to stderr (or `out`) so stdout stays
    the one-line invite. Half-block characters put two module rows in one line, so the code is
    (modules + 2 * border) columns wide; a short invite (PROTOCOL.md section 14.1) is a version
    14 code at most, 79 columns. Returns False, saying so, when the text would not fit 80
    columns (a long invite)."""
    import qrcode

    out = out or sys.stderr
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_L, border=QR_BORDER)
    qr.add_data(text)
    try:
        qr.make(fit=True)
    except ValueError:  # DataOverflowError, or "Invalid version" past version 40
        qr = None
    if qr is None or qr.modules_count + 2 * QR_BORDER > QR_MAX_COLUMNS:
        print("(this invite is too long for a QR code; share the text, or run `pigeon run`"
              " first for a short invite)", file=out)
        return False
    qr.print_ascii(out=out, invert=True)
    return True


async def _cmd_contact(args: argparse.Namespace, client: Client) -> int:
    action = args.contact_command
    if action == "add":
        from node.protocol.keys import IdentityKey

        is_account = args.invite.strip().startswith(IdentityKey.ACCOUNT_ID_PREFIX)
        key = "account_id" if is_account else "invite"
        value = await client.call("contact.add", {"name": args.name, key: args.invite.strip()})
        out(args, value, lambda v: f"added {v['name']} ({v['account_id']})")
    elif action == "list":
        value = await client.call("contact.list")
        out(args, value, lambda v: "\n".join(
            f"{c['name']:<20} {'online ' if c['online'] else 'offline'} {c['account_id']}\n"
            f"{'':<20} safety number {c['safety_number']}" for c in v) or "no contacts yet")
    elif action == "rename":
        value = await client.call("contact.rename", {"name": args.name, "new_name": args.new_name})
        out(args, value, lambda v: f"renamed {v['old_name']} to {v['name']}")
    else:
        contact = await client.call("contact.get", {"name": args.name})
        if not args.yes and not _confirm(
                f"Remove {contact['name']} ({contact['account_id']}) and your whole history "
                f"with them? This cannot be undone. [y/N] "):
            raise CommandError(f"{contact['name']} was not removed (--yes skips this question)")
        value = await client.call("contact.remove", {"name": contact["name"]})
        out(args, value, lambda v: f"removed {v['removed']} and the history with them")
    return 0


async def _cmd_device(args: argparse.Namespace, client: Client) -> int:
    if args.device_command == "add":
        value = await client.call("device.add", {"code": args.code.strip()})
        out(args, value, lambda v: f"linked device {v['peer_id']}; the account has"
                                   f" {v['devices']} devices\nconfirmation {v['confirmation']}"
                                   " (the new device shows the same: if it does not, remove it)")
    elif args.device_command == "list":
        value = await client.call("device.list")
        out(args, value, lambda v: "\n".join(_device_line(d) for d in v))
    else:
        value = await client.call("device.remove", {"device": args.device})
        out(args, value, lambda v: f"removed {v['removed']}; this account's devices now:\n"
                                   + "\n".join(_device_line(d) for d in v["devices"]))
    return 0


async def _cmd_group(args: argparse.Namespace, client: Client) -> int:
    action = args.group_command
    if action == "create":
        value = await client.call("group.create", {"name": args.name, "members": args.members})
    elif action in ("add", "remove", "promote"):
        value = await client.call(f"group.{action}", {"group": args.group,
                                                      "members": args.members})
    elif action == "rename":
        value = await client.call("group.rename", {"group": args.group,
                                                   "new_name": args.new_name})
    elif action == "list":
        value = await client.call("group.list")
        out(args, value, lambda v: "\n".join(_group_line(g) for g in v) or "no groups yet")
        return 0
    else:  # leave, info
        value = await client.call(f"group.{action}", {"group": args.group})
    out(args, value, _group_text)
    return 0


def _group_line(group: dict[str, Any]) -> str:
    state = "" if group["member"] else " (not a member)"
    return f"{sanitize(group['name'])}  {len(group['members'])} members{state}"


def _group_text(group: dict[str, Any]) -> str:
    lines = [_group_line(group)]
    if group["title"] != group["name"]:
        lines.append(f"  named {sanitize(group['title'])!r} by its members")
    for m in group["members"]:
        marks = [w for w, on in (("admin", m["admin"]), ("unreachable", not m["reachable"]))
                 if on]
        lines.append(f"  {sanitize(m['name'])}" + (f" ({', '.join(marks)})" if marks else ""))
    return "\n".join(lines)


async def _cmd_relays(args: argparse.Namespace, client: Client) -> int:
    value = await client.call("relays")

    def human(v: list[dict[str, Any]]) -> str:
        if not v:
            return "no relays found in the DHT's relay directory"
        lines = []
        for r in v:
            rtt = "no answer" if r["rtt_ms"] is None else f"{r['rtt_ms']:.1f} ms"
            mark = "*" if r["chosen"] else " "
            operator = f"  operator {sanitize(r['operator'])}" if r["operator"] else ""
            lines.append(f"{mark} {r['peer_id']}  rtt {rtt}, load {r['load']}/{r['capacity']}"
                         f"{operator}")
            lines.extend(f"    {a}" for a in r["addresses"])
        if any(r["chosen"] for r in v):
            lines.append("(* this device's relays)")
        return "\n".join(lines)

    out(args, value, human)
    return 0


def _device_status(d: dict[str, Any]) -> str:
    state = "online" if d["online"] else "offline"
    return (f"    device {d['peer_id']} {state}: pending {d['pending']}, awaiting ack"
            f" {d['sent']}, at relays {d['relayed']}")


def _device_line(device: dict[str, Any]) -> str:
    this = "  (this device)" if device["this_device"] else ""
    return f"{device['number']:>2}. {device['peer_id']}{this}"


def _confirm(question: str) -> bool:
    """Ask on the terminal; without one (a script, a pipe) there is nobody to say yes, so the
    answer is no and the caller says how to confirm (`--yes`)."""
    if not sys.stdin.isatty():
        return False
    print(question, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


async def _cmd_send(args: argparse.Namespace, client: Client) -> int:
    from node.protocol.content import MAX_TEXT_BYTES

    if args.file:
        from node.cli.files import send_files

        return await send_files(args, client)

    if args.stdin == (args.text is not None):
        raise CommandError("give the message text, or --stdin to send each line of stdin")
    texts = _stdin_lines() if args.stdin else [args.text]
    for number, text in enumerate(texts, 1):
        # Refused before anything is sent, so a bad line never leaves half the input queued.
        size = len(text.encode("utf-8"))
        if size > MAX_TEXT_BYTES:
            where = f"line {number} of stdin" if args.stdin else "the message"
            raise CommandError(f"{where} is {size} bytes; a message holds at most "
                               f"{MAX_TEXT_BYTES} bytes of UTF-8")
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


def _stdin_lines() -> list[str]:
    """The non-blank lines of stdin, as text; CommandError naming the first that is not UTF-8."""
    lines = []
    for number, raw in enumerate(sys.stdin.buffer, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise CommandError(f"line {number} of stdin is not valid UTF-8 text") from None
        if line.strip():
            lines.append(line)
    return lines


async def _cmd_history(args: argparse.Namespace, client: Client) -> int:
    value = await client.call("history", {"contact": args.contact, "limit": args.limit})
    out(args, value, lambda v: "\n".join(format_entry(args.contact, e) for e in v)
         or "no messages yet")
    return 0


async def _cmd_read(args: argparse.Namespace, client: Client) -> int:
    params = {"contact": args.contact}
    if args.up_to is not None:
        params["up_to"] = args.up_to
    value = await client.call("read", params)
    out(args, value, lambda v: f"{v['read']} read; {v['unread']} unread from"
                               f" {sanitize(v['contact'])}")
    return 0


async def _cmd_status(args: argparse.Namespace, client: Client) -> int:
    value = await client.call("status") | {"daemon": client.daemon}

    def human(v: dict[str, Any]) -> str:
        lines = [f"account {v['account_id']}", f"device  {v['peer_id']}",
                 f"daemon  {'running' if v['daemon'] else 'not running'}"]
        if v.get("storage_error"):
            lines.append(f"storage {v['storage_error']}")
        for c in v["contacts"]:
            path = c["path"] or "offline"
            line = (f"  {c['name']:<20} {path:<8} pending {c['pending']}, awaiting ack"
                    f" {c['sent']}, at relays {c['relayed']}")
            if c.get("unread"):
                line += f", unread {c['unread']}"
            if c.get("path_down") and c["path_down"] != c["last_error"]:
                line += f"  path down: {c['path_down']}"
            if c["last_error"]:
                line += f"  last error: {sanitize(c['last_error'])}"
            lines.append(line)
            if len(c.get("devices", ())) > 1:
                lines.extend(_device_status(d) for d in c["devices"])
        for d in v.get("own_devices", ()):
            lines.append("  my other device" + _device_status(d).strip().removeprefix("device"))
        for t in v.get("transfers", ()):
            verb = "receiving" if t["direction"] == "in" else "sending"
            lines.append(f"  {verb} {sanitize(t['name'])} ({t['message_id'][:8]}) with"
                         f" {sanitize(t['contact'])}: {t['done_bytes']:,} of"
                         f" {t['total_bytes']:,} bytes")
        for r in v["relays"]:
            state = "subscribed" if r["connected"] else "not connected"
            line = f"  relay {r['address']}: {state}, {r['received']} received"
            if r.get("draining"):
                line += " (left: drained until contacts moved too)"
            if r.get("refused"):
                line += f"  refused: {sanitize(r['refused'])}"
            if r["last_error"]:
                line += f"  last error: {sanitize(r['last_error'])}"
            lines.append(line)
        return "\n".join(lines)

    out(args, value, human)
    return 0


async def _cmd_fetch(args: argparse.Namespace, client: Client) -> int:
    value = await client.call("fetch", {"timeout": args.timeout}) \
        | {"daemon": client.daemon}
    out(args, value, lambda v: (
        f"{v['received']} received, {v['acked']} acknowledged to relays, "
        f"{v['relays_drained']} of {v['relays']} relays drained in {v['time_s']:.2f} s"
        + (f", {v['receipts_waiting']} receipts still waiting" if v["receipts_waiting"] else "")))
    return 0 if _fetched_everything(value) else 1


def _fetched_everything(value: dict[str, Any]) -> bool:
    """Whether a fetch got everything: every relay drained and no receipt left behind."""
    return bool(value["relays_drained"] == value["relays"] and not value["receipts_waiting"])


async def _cmd_push(args: argparse.Namespace, client: Client) -> int:
    if args.push_command == "remove":
        removed = await client.call("push.remove", {"wait": args.wait})
        out(args, removed, lambda v: "push URL removed" if v["removed"] else "no push URL was set")
        return 0
    value = await client.call("push.register", {"url": args.url, "wait": args.wait})

    def human(v: dict[str, Any]) -> str:
        lines = [f"push URL {v['url']}", f"p256dh   {v['p256dh']}", f"auth     {v['auth']}"]
        lines += [f"  relay {r['address']}: {r['wake'] or 'no answer yet'}" for r in v["relays"]]
        return "\n".join(lines)

    out(args, value, human)
    refused = [r for r in value["relays"] if (r["wake"] or "").startswith("refused")]
    if refused and not args.json:
        print(f"pigeon: {len(refused)} relay(s) refused the push URL", file=sys.stderr)
    return 1 if refused else 0


async def _daemon(args: argparse.Namespace) -> int:
    """`pigeon run`: stay online, serve the control socket, print incoming messages. Exits 0 on
    SIGTERM, EXIT_INTERRUPTED on SIGINT (Ctrl-C)."""
    import trio

    from node.device.control import NODE_STREAMS, OPERATIONS, event_to_json
    from node.device.node import Node
    from node.net.addresses import dialable
    from node.rpc import serve

    if not DataDir(args.data_dir).is_initialized():
        raise CommandError(f"{args.data_dir} is not initialised: run `pigeon init` first")
    config = _config(args)
    stopped_by: list[int] = []
    async with Node.open(args.data_dir, config) as node:
        with node.events() as events:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(serve, node, node.data_dir.socket_file,
                                            operations=OPERATIONS, streams=NODE_STREAMS))
                # Started (the receiver open) before "Listening" is printed: a supervisor that
                # stops the daemon as soon as it says it is up gets a graceful stop.
                await nursery.start(_stop_on_signals, nursery.cancel_scope, stopped_by)
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
    return EXIT_INTERRUPTED if stopped_by == [signal.SIGINT] else 0


def _describe_event(event: dict[str, Any]) -> str | None:
    """A line for the daemon's output, or None for events only --json shows (sent, delivered).
    Everything from peers in it is sanitized."""
    kind = event["type"]
    contact = sanitize(event.get("contact") or "")  # None: this account's own devices
    if kind == "MessageReceived":
        sender = f"{sanitize(event['sender'])} in " if event.get("sender") else ""
        attachment = event.get("attachment")
        if attachment:
            caption = f" {sanitize(event['text'])}" if event["text"] else ""
            return (f"{sender}{contact}: [file {sanitize(attachment['name'])},"
                    f" {attachment['size']:,} bytes, id {event['message_id']}]{caption}")
        return f"{sender}{contact}: {sanitize(event['text'])}"
    if kind == "GroupChanged":
        return f"({sanitize(event['group'])}: {sanitize(event['change'])})"
    if kind == "AttachmentSaved":
        return f"(file {event['message_id'][:8]} from {contact} saved: {event['path']})"
    if kind == "AttachmentFailed":
        return (f"(file {event['message_id'][:8]} from {contact} not downloaded: "
                f"{sanitize(event['reason'])})")
    if kind == "MessageFailed":
        return (f"(message {event['message_id'][:8]} to {contact} failed: "
                f"{sanitize(event['reason'])})")
    if kind == "ContactAdded":
        return f"({contact} joined through your invite)"
    if kind in ("ContactOnline", "ContactOffline"):
        return f"({contact} is {'online' if kind == 'ContactOnline' else 'offline'})"
    if kind in ("DeviceAdded", "DeviceRemoved"):
        whose = contact or "this account"
        verb = "added" if kind == "DeviceAdded" else "removed"
        return f"({whose}: device {event['peer_id']} {verb})"
    if kind == "EventsDropped":
        return f"({event['count']} events skipped)"
    return None


async def _stop_on_signals(scope: trio.CancelScope, stopped_by: list[int], *,
                           task_status: TaskStatus[None]) -> None:
    """Cancel `scope` on SIGTERM or SIGINT, noting which one in `stopped_by`; started once the
    signals are caught."""
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("stopping")
            stopped_by.append(signum)
            scope.cancel()
            return


async def _link(args: argparse.Namespace) -> int:
    """`pigeon link`: make this empty data directory a device of an account. Prints the link
    code (and its QR code on stderr), waits for `pigeon device add` on a device of the account,
    then takes the history. With --json, one JSON object per line: LinkCode, Confirmation,
    HistoryProgress (per chunk), then Linked."""
    import trio

    from node.device.linking import HistoryProgress, link_new_device
    from node.device.node import Node

    config = _config(args)

    def line(value: dict[str, Any]) -> None:
        print(json.dumps(value), flush=True)

    def on_code(code: str) -> None:
        if args.json:
            line({"type": "LinkCode", "code": code})
            return
        print(code, flush=True)
        _print_qr(code)
        print("On a device of your account run: pigeon device add CODE  (the code works once,"
              " for 10 minutes)", file=sys.stderr, flush=True)

    def on_confirmation(confirmation: str) -> None:
        if args.json:
            line({"type": "Confirmation", "confirmation": confirmation})
        else:
            print(f"confirmation {confirmation} (the approving device shows the same)",
                  file=sys.stderr, flush=True)

    result = await link_new_device(args.data_dir, config, on_code=on_code,
                                   on_confirmation=on_confirmation)

    def on_progress(progress: HistoryProgress) -> None:
        if args.json:
            line({"type": "HistoryProgress", "received": progress.received,
                  "total": progress.total})
        elif progress.total:
            print(f"\rhistory {progress.received}/{progress.total} messages", end="",
                  file=sys.stderr, flush=True)

    async with Node.open(args.data_dir, config.replace(mdns=False)) as node:
        with trio.move_on_after(max(0.0, args.history_wait)):
            await node.wait_history_transfer(on_progress=on_progress)
        history = node.history_transfer()
    value = {"type": "Linked", "account_id": result.account_id, "peer_id": result.peer_id,
             "confirmation": result.confirmation, "devices": result.devices,
             "history": {"received": history.received, "total": history.total,
                         "done": history.done}}
    if args.json:
        line(value)
    else:
        if history.total:
            print(file=sys.stderr)
        rest = "" if history.done else \
            " (the rest of the history comes when this device runs: `pigeon run`)"
        print(f"linked to account {result.account_id} as device {result.peer_id}"
              f" ({result.devices} devices){rest}")
    return 0


async def _cmd_save(args: argparse.Namespace, client: Client) -> int:
    from node.cli.files import cmd_save

    return await cmd_save(args, client)


async def _chat(args: argparse.Namespace, client: Client) -> int:
    from node.cli.chat import chat

    return await chat(args, client)


#: A device command run against a client: the parsed arguments in, the exit status out.
Command = Callable[[argparse.Namespace, Client], Awaitable[int]]

#: The commands that only make calls one after another: served by a daemon without trio.
ONE_SHOT: frozenset[str] = frozenset({"id", "invite", "contact", "device", "group", "history",
                                      "read", "status", "fetch", "push", "relays"})

COMMANDS: dict[str, Command] = {
    "id": _cmd_id,
    "invite": _cmd_invite,
    "contact": _cmd_contact,
    "device": _cmd_device,
    "group": _cmd_group,
    "send": _cmd_send,
    "history": _cmd_history,
    "read": _cmd_read,
    "status": _cmd_status,
    "fetch": _cmd_fetch,
    "push": _cmd_push,
    "save": _cmd_save,
    "relays": _cmd_relays,
    "chat": _chat,
}
