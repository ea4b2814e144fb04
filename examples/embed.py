"""Embedding Pigeon: two nodes in one program, in temporary data directories on loopback.

Alice invites Bob, Bob writes, Alice's program answers every message automatically (an "echo
bot"), and Bob prints the replies. Run it: `python examples/embed.py`.
"""

from __future__ import annotations

import tempfile

import trio

from node import Config, ContactAdded, MessageReceived, Node

# Loopback only, and LAN discovery pinned to it: an example must not announce itself on a network.
LOOPBACK = Config(listen=("/ip4/127.0.0.1/tcp/0",), mdns_interfaces=("127.0.0.1",))


async def echo_bot(alice: Node) -> None:
    """Answer every message Alice receives."""
    async for event in alice.events():
        if isinstance(event, MessageReceived):
            await alice.send(event.contact, f"echo: {event.text}")


async def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        async with (
            Node.open(f"{root}/alice", LOOPBACK.replace(display_name="Alice"), create=True) as alice,
            Node.open(f"{root}/bob", LOOPBACK.replace(display_name="Bob"), create=True) as bob,
            trio.open_nursery() as nursery,
        ):
            joined = alice.events()
            bob.add_contact("alice", alice.invite())
            with trio.fail_after(10):
                async for event in joined:
                    if isinstance(event, ContactAdded):
                        print(f"alice: {event.contact} joined ({event.account_id[:16]}...)")
                        break
            nursery.start_soon(echo_bot, alice)
            replies = bob.events()
            for text in ["hello", "how are you?", "bye"]:
                await bob.send("alice", text)
                print(f"bob -> alice: {text}")
                with trio.fail_after(10):
                    async for event in replies:
                        if isinstance(event, MessageReceived):
                            print(f"alice -> bob: {event.text}")
                            break
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
