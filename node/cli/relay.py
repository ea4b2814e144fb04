"""`pigeon relay` (run the relay service) and `pigeon relay status`. The relay has no default data
directory: it is a service of its own, not the user's node. `relay status` (which operators and
tests run again and again) asks the running relay through `node.rpc_wire.BlockingClient` and loads
neither trio nor the relay's network stack."""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

from node.cli.output import CommandError, out, print_error
from node.errors import NodeError
from node.rpc_wire import BlockingClient, RpcError, run_to_completion

__all__ = ["relay_main"]


def relay_main(args: argparse.Namespace) -> int:
    """`pigeon relay` (run) and `pigeon relay status`. The relay has no default data directory:
    it is a service of its own, not the user's node."""
    from node.relay.config import load_relay_config

    status = getattr(args, "relay_command", None) == "status"
    if status:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        from node.relay.log import configure_relay_logging

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
            return _relay_status(args, config.data_dir)
        import trio

        from node.relay.service import run_relay

        logging.getLogger().setLevel(getattr(logging, config.log_level))
        return trio.run(partial(run_relay, config, as_json=args.json))
    except NodeError as exc:
        kind = (exc.type or "Error") if isinstance(exc, RpcError) else type(exc).__name__
        if status or args.json:
            print_error(args, kind, str(exc))
        if not status:  # stderr holds JSON lines only while the relay runs
            from node.relay.log import event

            event(logging.ERROR, "relay.failed", type=kind, message=str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


def _relay_status(args: argparse.Namespace, data_dir: Path) -> int:
    from node.relay.datadir import RelayDir

    socket_file = RelayDir(data_dir).socket_file
    client = BlockingClient.connect(socket_file)
    if client is None:
        raise CommandError(f"no relay is running on {data_dir} (no control socket {socket_file})")
    try:
        value = run_to_completion(client.call("status"))
    finally:
        client.close()

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
            f"strangers'     {v['open_messages']} messages, {v['open_bytes']} bytes "
            f"(deposits without a capability)",
            f"registered     {v['registered_mailboxes']} mailboxes (moved in "
            f"{v['mailboxes_moved'].get('in', 0)}, out {v['mailboxes_moved'].get('out', 0)})",
            f"deposits       {v['deposits']} (+{v['duplicate_deposits']} duplicates)",
            f"fetches        {v['fetches']}, pushed {v['pushes']}, acked {v['acked']}, "
            f"expired {v['expired']}",
            f"rejects        {rejects}",
            *([f"storage        {v['storage_error']['error']}"] if v.get("storage_error") else []),
        ])

    out(args, value, human)
    return 0
