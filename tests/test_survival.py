"""No exception that is not a NodeError ends a node or a relay: an unexpected error (a bug),
injected once into each inbound handler, delivery lane and relay request handler, is logged with
its reason, and the work it interrupted is done afterwards (real nodes and relays on loopback)."""

from __future__ import annotations

import inspect
import logging
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import node.device.outbound as outbound_module
import node.device.relay_client as relay_client_module
from node import MessageReceived, Node
from node.device.inbound import Inbound
from node.device.outbound import Lane
from node.errors import TransportError
from node.protocol.keys import DeviceKeyPair
from node.relay.store import RelayStore
from tests.conftest import WAIT, befriend, next_event, open_node
from tests.relaytools import box_of, client, peer, register_at, running_relay
from tests.test_relay_delivery import _close_direct_path, address, relay


class Injected(RuntimeError):
    """The unexpected error: not a NodeError."""


def fail_once(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[int]:
    """Make `owner.name` raise Injected on its first call, then behave; returns the call count
    (one item per call)."""
    original: Callable[..., Any] = getattr(owner, name)
    calls: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise Injected(f"injected into {owner.__name__}.{name}")
        return original(*args, **kwargs)

    async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise Injected(f"injected into {owner.__name__}.{name}")
        return await original(*args, **kwargs)

    monkeypatch.setattr(owner, name,
                        async_wrapper if inspect.iscoroutinefunction(original) else wrapper)
    return calls


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """Records naming the injected error (in the message or the logged traceback)."""
    return [r for r in caplog.records
            if text in r.getMessage()
            or (r.exc_info and text in "".join(traceback.format_exception(r.exc_info[1])))]


async def _delivered(sender: Node, receiver: Node, to: str, text: str) -> None:
    with receiver.events() as events, trio.fail_after(WAIT):
        sent = await sender.send(to, text)
        assert await sender.wait_delivered(sent, timeout=WAIT) == "delivered"
        assert (await next_event(events, MessageReceived)).text == text


async def test_the_direct_inbound_handler_survives_an_unexpected_error(
        node_pair: tuple[Node, Node], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = node_pair
    caplog.set_level(logging.INFO)
    calls = fail_once(monkeypatch, Inbound, "_commit")
    await _delivered(bob, alice, "alice", "through a failing handler")
    assert len(calls) >= 2  # failed once, then the resend was committed
    assert logged(caplog, "injected into Inbound._commit")
    await _delivered(alice, bob, "bob", "and back")


async def test_a_delivery_lane_survives_an_unexpected_error(
        node_pair: tuple[Node, Node], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = node_pair
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(outbound_module, "RESTART_AFTER_FAILURE_S", 0.05)
    calls = fail_once(monkeypatch, Lane, "_write")
    await _delivered(alice, bob, "bob", "through a failing lane")
    assert len(calls) >= 2
    (record,) = logged(caplog, "injected into Lane._write")
    assert "crashed" in record.getMessage()


@pytest.mark.slow(seconds=2)
async def test_a_relay_inbox_survives_an_unexpected_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(relay_client_module, "RESTART_AFTER_FAILURE_S", 0.05)
    async with relay(tmp_path / "r1") as r1:
        relays = (address(r1),)
        async with open_node(tmp_path / "alice", "alice", relays=relays) as alice, \
                open_node(tmp_path / "bob", "bob", relays=relays) as bob:
            await befriend(bob, alice, "bob")
            _close_direct_path(alice, "bob")
            _close_direct_path(bob, "alice")
            await alice._disconnect_quietly(bob.peer_id)
            calls = fail_once(monkeypatch, Inbound, "process")
            await _delivered(alice, bob, "bob", "through a failing relay inbox")
            assert len(calls) >= 2
            assert logged(caplog, "injected into Inbound.process")


async def test_a_relay_request_handler_survives_an_unexpected_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    bob = DeviceKeyPair.generate()
    box = box_of(bob.public)
    async with running_relay(tmp_path / "relay") as service, peer() as alice_t, \
            peer(bob.to_bytes()) as bob_t:
        addrs = service.addresses()
        await register_at(service.peer_id, addrs, bob)
        async with client(alice_t, service.peer_id, addrs) as alice:
            message_id = os.urandom(16)
            await alice.deposit(box, message_id, b"envelope", ttl=3600)
        calls = fail_once(monkeypatch, RelayStore, "fetch")
        async with client(bob_t, service.peer_id, addrs) as inbox:
            await inbox.authenticate(bob)
            with pytest.raises(TransportError):  # the one stream is reset, nothing else
                await inbox.fetch()
        assert logged(caplog, "injected into RelayStore.fetch")
        assert service.relay.status()["messages"] == 1
        async with client(bob_t, service.peer_id, addrs) as inbox:
            await inbox.authenticate(bob)
            items, _ = await inbox.fetch()
            assert [i.id for i in items] == [message_id]
        assert len(calls) == 2
