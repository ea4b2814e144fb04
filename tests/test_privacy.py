"""No plaintext crosses the wire or reaches disk outside the message store."""

from __future__ import annotations

from pathlib import Path

import trio

from node import Config, MessageDelivered, MessageReceived, Node
from node.net import FrameStream

LOOPBACK = Config(listen=("/ip4/127.0.0.1/tcp/0",), retry_initial_s=0.1, retry_max_s=0.5,
                  mdns=False)
MARKER_A = "MARKER-8f3a1c-from-alice"
MARKER_B = "MARKER-77d2e9-from-bob"


async def _proxy(listen_port_holder: list[int], target_port: int, captured: bytearray,
                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A TCP proxy on loopback that records every byte in both directions."""

    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while chunk := await src.receive_some(65536):
                captured.extend(chunk)
                await dst.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await dst.aclose()

    async def handle(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", target_port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listen_port_holder.append(listeners[0].socket.getsockname()[1])
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started()


async def test_plaintext_never_on_the_wire_nor_outside_the_message_store(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    frames: list[bytes] = []
    real_send = FrameStream.send

    async def recording_send(self: FrameStream, batch: list[bytes]) -> None:
        frames.extend(batch)
        await real_send(self, batch)

    monkeypatch.setattr(FrameStream, "send", recording_send)
    captured = bytearray()
    async with (
        Node.open(tmp_path / "a", LOOPBACK.replace(display_name="Alice"), create=True) as a,
        Node.open(tmp_path / "b", LOOPBACK.replace(display_name="Bob"), create=True) as b,
        trio.open_nursery() as nursery,
    ):
        b_port = int(b.addresses()[0].split("/tcp/")[1].split("/")[0])
        proxy_port: list[int] = []
        await nursery.start(_proxy, proxy_port, b_port, captured)
        a_events, b_events = a.events(), b.events()
        a.add_contact("bob", b.invite())
        # Route Alice's traffic to Bob through the recording proxy.
        device = a._db.devices()[0]
        a._db.put_device(device.contact_id, device.device, device.peer_id,
                         [f"/ip4/127.0.0.1/tcp/{proxy_port[0]}"],
                         seen_at_ms=device.seen_at_ms, now_ms=0)
        with trio.fail_after(20):
            await a.send("bob", MARKER_A)
            async for event in b_events:
                if isinstance(event, MessageReceived) and event.text == MARKER_A:
                    break
            await b.send("Alice", MARKER_B)
            async for event in a_events:
                if isinstance(event, MessageReceived) and event.text == MARKER_B:
                    break
            async for event in b_events:
                if isinstance(event, MessageDelivered):
                    break
        nursery.cancel_scope.cancel()

    markers = [MARKER_A.encode(), MARKER_B.encode()]
    assert len(captured) > 1000 and frames, "the capture must have seen the exchange"
    for marker in markers:
        assert marker not in captured
        assert not any(marker in frame for frame in frames)
    store_files = {"pigeon.db", "pigeon.db-wal", "pigeon.db-shm"}
    found_in_store = False
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        content = path.read_bytes()
        hit = any(marker in content for marker in markers)
        if path.name in store_files:
            found_in_store |= hit
        else:
            assert not hit, f"plaintext found in {path}"
    assert found_in_store, "the history itself must hold the messages (the search works)"
