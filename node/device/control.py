"""The device's control operations: what `pigeon` commands do, served over the daemon's control
socket (`node.rpc.serve` on `pigeon.sock`, wire format in README.md "Control socket").

`OPERATIONS` is the one implementation of every command: the daemon serves it over the socket and
the CLI runs it in-process when no daemon is running (`LocalClient`), so both behave the same.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import AsyncIterator
from typing import Any

import trio

from node.device.events import Event
from node.device.node import ContactInfo, Node
from node.rpc import (
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    Client,
    InvalidParams,
    Operation,
    RpcError,
    StreamOperation,
    encode_line,
)

__all__ = ["NODE_STREAMS", "OPERATIONS", "LocalClient", "event_to_json"]


def event_to_json(event: Event) -> dict[str, Any]:
    """An event as the control socket sends it: its fields plus `"type"`, the class name."""
    return {"type": type(event).__name__, **dataclasses.asdict(event)}


def _to_json(value: Any) -> Any:
    """Dataclasses as dicts of their fields, tuples as lists, all the way down. Not
    `dataclasses.asdict`: it deep-copies every value, and a `history` of thousands of entries
    spent most of its time there."""
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _to_json(getattr(value, name)) for name in _field_names(type(value))}
    return value


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _param(params: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    if name not in params:
        if default is ...:
            raise InvalidParams(f"missing parameter {name!r}")
        return default
    value = params[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidParams(f"parameter {name!r} must be {kind.__name__}")
    return value


async def _id(node: Node, params: dict[str, Any]) -> Any:
    return {"account_id": node.account_id, "peer_id": node.peer_id,
            "display_name": node.display_name, "addresses": node.addresses()}


async def _invite(node: Node, params: dict[str, Any]) -> Any:
    addresses = _param(params, "addresses", bool, True)
    return {"invite": node.invite(addresses=addresses, short=_param(params, "short", bool, False))}


def _contact_json(contact: ContactInfo) -> dict[str, Any]:
    """A contact as the control API shows it (`addresses`, the one name for addresses in JSON)."""
    value: dict[str, Any] = _to_json(contact)
    value["addresses"] = value.pop("addrs")
    return value


async def _contact_add(node: Node, params: dict[str, Any]) -> Any:
    name = _param(params, "name", str)
    if "account_id" in params:
        return _contact_json(await node.add_contact_by_id(name, _param(params, "account_id", str)))
    return _contact_json(await node.add_contact_from_invite(name, _param(params, "invite", str)))


async def _contact_get(node: Node, params: dict[str, Any]) -> Any:
    return _contact_json(node.contact(_param(params, "name", str)))


async def _contact_list(node: Node, params: dict[str, Any]) -> Any:
    return [_contact_json(c) | {"safety_number": node.safety_number(c.name)}
            for c in node.contacts()]


async def _contact_rename(node: Node, params: dict[str, Any]) -> Any:
    old = node.contact(_param(params, "name", str))
    renamed = node.rename_contact(old.name, _param(params, "new_name", str))
    return _contact_json(renamed) | {"old_name": old.name}


async def _contact_remove(node: Node, params: dict[str, Any]) -> Any:
    contact = node.contact(_param(params, "name", str))
    node.remove_contact(contact.name)
    return {"removed": contact.name}


async def _send(node: Node, params: dict[str, Any]) -> Any:
    contact, text = _param(params, "contact", str), _param(params, "text", str)
    wait = params.get("wait", 0)
    if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 3600:
        raise InvalidParams("parameter 'wait' must be a number of seconds within 0..3600")
    message_id = await node.send(contact, text)
    state = await node.wait_delivered(message_id, timeout=wait) if wait > 0 \
        else node.message_state(message_id)
    return {"message_id": message_id, "state": state}


async def _send_file(node: Node, params: dict[str, Any]) -> Any:
    contact, path = _param(params, "contact", str), _param(params, "path", str)
    if not os.path.isabs(path):
        # The daemon's working directory is not the caller's: the CLI sends absolute paths.
        raise InvalidParams("parameter 'path' must be an absolute path")
    caption = params.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise InvalidParams("parameter 'caption' must be a string or null")
    wait = params.get("wait", 0)
    if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 3600:
        raise InvalidParams("parameter 'wait' must be a number of seconds within 0..3600")
    message_id = await node.send_file(contact, path, caption=caption,
                                      original=_param(params, "original", bool, False))
    state = await node.wait_delivered(message_id, timeout=wait) if wait > 0 \
        else node.message_state(message_id)
    entry = next((e for e in node.history(contact, limit=50) if e.message_id == message_id),
                 None)
    return {"message_id": message_id, "state": state,
            "attachment": _to_json(entry.attachment) if entry is not None else None}


async def _save(node: Node, params: dict[str, Any]) -> Any:
    message_id = _param(params, "message_id", str)
    path = params.get("path")
    if path is not None and (not isinstance(path, str) or not os.path.isabs(path)):
        raise InvalidParams("parameter 'path' must be an absolute path or null")
    saved = await node.save(message_id, path)
    return {"message_id": message_id, "path": str(saved), "size": saved.stat().st_size}


async def _history(node: Node, params: dict[str, Any]) -> Any:
    limit = _param(params, "limit", int, 50)
    if not 1 <= limit <= 100_000:
        raise InvalidParams("limit must be within 1..100000")
    return _to_json(node.history(_param(params, "contact", str), limit=limit))


async def _read(node: Node, params: dict[str, Any]) -> Any:
    name = _param(params, "contact", str)
    up_to = params.get("up_to")  # null: all so far, as when it is left out
    if up_to is not None and not isinstance(up_to, str):
        raise InvalidParams("parameter 'up_to' must be a message id (32 hex digits) or null")
    if node.is_group(name):  # a group's conversation reads like a contact's (section 27)
        count = node.mark_read(name, up_to)
        unread = sum(1 for e in node.history(name, limit=100_000) if e.read is False)
        return {"contact": name, "read": count, "unread": unread}
    contact = node.contact(name)
    count = node.mark_read(contact.name, up_to)
    return {"contact": contact.name, "read": count, "unread": node.contact(contact.name).unread}


def _members_param(params: dict[str, Any]) -> list[str]:
    members: list[Any] = _param(params, "members", list)
    if not members or not all(isinstance(m, str) for m in members):
        raise InvalidParams("parameter 'members' must be a non-empty list of names")
    return [str(m) for m in members]


async def _group_create(node: Node, params: dict[str, Any]) -> Any:
    return _to_json(node.create_group(_param(params, "name", str), _members_param(params)))


async def _group_add(node: Node, params: dict[str, Any]) -> Any:
    return _to_json(node.group_add(_param(params, "group", str), _members_param(params)))


async def _group_remove(node: Node, params: dict[str, Any]) -> Any:
    return _to_json(node.group_remove(_param(params, "group", str), _members_param(params)))


async def _group_promote(node: Node, params: dict[str, Any]) -> Any:
    return _to_json(node.group_promote(_param(params, "group", str), _members_param(params)))


async def _group_leave(node: Node, params: dict[str, Any]) -> Any:
    return _to_json(node.group_leave(_param(params, "group", str)))


async def _group_rename(node: Node, params: dict[str, Any]) -> Any:
    return _to_json(node.group_rename(_param(params, "group", str),
                                      _param(params, "new_name", str)))


async def _group_info(node: Node, params: dict[str, Any]) -> Any:
    return _to_json(node.group_info(_param(params, "group", str)))


async def _group_list(node: Node, params: dict[str, Any]) -> Any:
    return _to_json(node.groups())


async def _status(node: Node, params: dict[str, Any]) -> Any:
    return _to_json(node.status())


async def _device_add(node: Node, params: dict[str, Any]) -> Any:
    return _to_json(await node.approve_link(_param(params, "code", str)))


async def _device_history(node: Node, params: dict[str, Any]) -> Any:
    return _to_json(node.history_transfer())


async def _device_list(node: Node, params: dict[str, Any]) -> Any:
    return [dict(_to_json(d), number=i) for i, d in enumerate(node.devices(), start=1)]


async def _device_remove(node: Node, params: dict[str, Any]) -> Any:
    removed = node.remove_device(_param(params, "device", str))
    return {"removed": removed.peer_id, "devices": await _device_list(node, {})}


async def _push_register(node: Node, params: dict[str, Any]) -> Any:
    wait = params.get("wait", 10)
    if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 600:
        raise InvalidParams("parameter 'wait' must be a number of seconds within 0..600")
    registration = await node.register_push(_param(params, "url", str), timeout=wait)
    value: dict[str, Any] = _to_json(registration)
    value["relays"] = [{"address": a, "wake": w} for a, w in registration.relays]
    return value


async def _push_remove(node: Node, params: dict[str, Any]) -> Any:
    wait = params.get("wait", 10)
    if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 600:
        raise InvalidParams("parameter 'wait' must be a number of seconds within 0..600")
    return {"removed": await node.remove_push(timeout=wait)}


async def _fetch(node: Node, params: dict[str, Any]) -> Any:
    timeout = params.get("timeout", 30)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) \
            or not 0 < timeout <= 3600:
        raise InvalidParams("parameter 'timeout' must be a number of seconds within 0..3600")
    return _to_json(await node.fetch(timeout=timeout))
async def _relays(node: Node, params: dict[str, Any]) -> Any:
    chosen = {a.rpartition("/p2p/")[2] for a in node.relays}
    return [dict(f.to_json(), chosen=f.record.peer_id in chosen) for f in await node.find_relays()]


#: Every device command, by JSON-RPC method name (README.md "Control socket").
OPERATIONS: dict[str, Operation] = {
    "id": _id,
    "invite": _invite,
    "contact.add": _contact_add,
    "contact.get": _contact_get,
    "contact.list": _contact_list,
    "contact.rename": _contact_rename,
    "contact.remove": _contact_remove,
    "send": _send,
    "send.file": _send_file,
    "save": _save,
    "history": _history,
    "read": _read,
    "status": _status,
    "device.add": _device_add,
    "device.history": _device_history,
    "device.list": _device_list,
    "device.remove": _device_remove,
    "push.register": _push_register,
    "push.remove": _push_remove,
    "fetch": _fetch,
    "group.create": _group_create,
    "group.add": _group_add,
    "group.remove": _group_remove,
    "group.promote": _group_promote,
    "group.leave": _group_leave,
    "group.rename": _group_rename,
    "group.info": _group_info,
    "group.list": _group_list,
    "relays": _relays,
}


async def _stream_events(node: Node, request_id: Any, stream: trio.SocketStream) -> None:
    with node.events() as events:
        await stream.send_all(encode_line(
            {"jsonrpc": "2.0", "id": request_id, "result": {"subscribed": True}}))
        async for event in events:
            note = {"jsonrpc": "2.0", "method": "event", "params": event_to_json(event)}
            await stream.send_all(encode_line(note))


#: The streaming methods: `subscribe` turns the connection into a stream of event notifications.
NODE_STREAMS: dict[str, StreamOperation] = {"subscribe": _stream_events}


class LocalClient(Client):
    """Runs the operations on a node opened in this process (the CLI when no daemon runs)."""

    daemon = False

    def __init__(self, node: Node) -> None:
        self.node = node

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        operation = OPERATIONS.get(method)
        if operation is None:
            raise RpcError(METHOD_NOT_FOUND, f"no method {method!r}")
        try:
            return await operation(self.node, params or {})
        except InvalidParams as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from exc

    async def events(self, *, subscribed: trio.Event | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        with self.node.events() as events:
            if subscribed is not None:
                subscribed.set()
            async for event in events:
                yield event_to_json(event)
