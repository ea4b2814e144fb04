"""The node's side of store-and-forward relays (PROTOCOL.md "Relay mailbox").

- `RelayInbox` keeps one of our mailboxes at one of our relays drained (a device has two there,
  PROTOCOL.md section 21 "Two mailboxes"): connect (from a fresh throwaway identity per
  connection, so the relay does not see our device's peer id on it), prove we own our mailbox
  (which registers it), register the deposit capabilities of our contacts and open invites (again
  whenever they change), subscribe, fetch the backlog page by page, then take pushes as they come;
  and register this device's push endpoint there, if it has one (PROTOCOL.md section 29), so the
  relay wakes it when it is not connected. Each page is unsealed and handed to `Inbound.process`
  in slices of RELAY_SLICE envelopes (one transaction each), letting the node's other tasks run
  between slices, and acknowledged to the relay only after the commits. Envelopes that can never
  be accepted are acknowledged too, so a relay does not hand them out forever. The same message
  held by two relays is accepted once: the second copy is a duplicate, acknowledged and forgotten.
- `Depositor` seals messages for a contact's device and deposits them at up to two of its relays,
  presenting the capability that device gave us, under deposit ids the relay cannot link to the
  message ids, over a transport with a throwaway identity made for that one batch (PROTOCOL.md
  section 21 "What a relay learns"), so a relay cannot link deposits to the sending device nor
  batches to each other by peer id.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Final

import trio

from node.device.config import RESTART_AFTER_FAILURE_S, Config
from node.device.inbound import Inbound, Incoming
from node.device.mailbox_client import DepositRequest, Item, MailboxClient, mailbox_id
from node.device.push import PushEndpoint
from node.errors import DecryptionFailed, LimitExceeded, RelayRefused, RemoteError, StorageError
from node.net import Transport
from node.protocol.keys import DeviceKey, DeviceKeyPair, IdentityKeyPair
from node.protocol.mailbox import MAX_ITEMS_PER_FRAME, STORAGE_FULL, UNKNOWN_REQUEST, deposit_id
from node.protocol.sealed import SealedContent, seal, unseal

log = logging.getLogger("pigeon.relays")

__all__ = ["Depositor", "OpenTransport", "RelayInbox", "RelayState", "split_relay_address"]

OpenTransport = Callable[[], AbstractAsyncContextManager[Transport]]
"""Opens a transport with a fresh throwaway identity (closed when the block ends)."""

#: Relays a message is deposited at: two survive one relay being down or losing its disk.
DEPOSIT_COPIES: Final = 2
#: Longest TTL a deposit asks for: Pigeon relays refuse more than 30 days.
MAX_DEPOSIT_TTL_S: Final = 30 * 24 * 3600
#: Envelopes unsealed and decided in one step before the node's other tasks get a turn. Anyone
#: can deposit in our mailbox, and an envelope holding a first message costs a PQXDH agreement
#: (~1.5 ms), so a slice blocks the node for at most ~25 ms (PROTOCOL.md section 20 "Work a
#: stranger can cause"); a page of MAX_ITEMS_PER_FRAME at once blocked it for a second.
RELAY_SLICE: Final = 16


def split_relay_address(address: str) -> tuple[str, str]:
    """(relay peer id, address to dial) from a multiaddr ending in /p2p/<peer id>."""
    dial, _, peer_id = address.rpartition("/p2p/")
    return peer_id, dial


@dataclass
class RelayState:
    """What `pigeon status` shows about one of our relays."""

    address: str
    connected: bool = False
    #: The mailbox is registered there with our current deposit capabilities (contacts' and
    #: open invites'): until then a new contact's deposits count as a stranger's.
    registered: bool = False
    pending: int = 0  # messages fetched or pushed and being processed
    received: int = 0
    last_error: str | None = None
    #: Our push endpoint there (PROTOCOL.md section 29): "registered", "refused: CODE: why",
    #: "unsupported" (a relay without wake-ups), or None (no endpoint, or not tried yet).
    wake: str | None = None
    #: The code the relay refused our mailbox with (`relay-full`, ...), until it takes it.
    refused: str | None = None
    #: A relay this device left (PROTOCOL.md section 28.3): drained until contacts moved too.
    draining: bool = False


class RelayInbox:
    """Drains one relay into the node, forever (reconnecting with backoff)."""

    def __init__(self, address: str, *, open_transport: OpenTransport, device: DeviceKeyPair,
                 inbound: Inbound, config: Config,
                 caps: Callable[[], list[bytes]] | None = None,
                 mailbox: DeviceKeyPair | None = None,
                 push: Callable[[], PushEndpoint | None] | None = None) -> None:
        self.state = RelayState(address)
        self.peer_id, self.dial = split_relay_address(address)
        self.open_transport = open_transport
        self.device = device  # opens the envelopes
        #: The key of the mailbox drained (PROTOCOL.md section 21 "Two mailboxes"): the device
        #: key for the mailbox anyone can compute, `mailbox_key(device)` for the contacts' one.
        self.mailbox = mailbox or device
        self.inbound = inbound
        self.config = config
        #: The capability hashes to register (None: register none, every deposit is a
        #: stranger's); `caps_changed` sends them again on the open stream.
        self.caps = caps
        self._caps_changed = trio.Event()
        #: Our push endpoint (None: none), registered after the capabilities.
        self.push = push
        #: The endpoint was removed: tell the relay (once) at the next registration.
        self.push_removed = False
        #: Registrations of the push endpoint asked for (`register_wake_again`) and the last
        #: one answered (or refused) by the relay, and the event set at each answer.
        self._wake_asked = 0
        self._wake_answered = 0
        self._wake_tried = trio.Event()
        #: The backlog has been fetched (and acknowledged) on the current connection: from then
        #: on messages come as pushes (`pigeon fetch` waits for this, `wait_drained`).
        self.drained = False
        self._drained = trio.Event()
        #: Messages acknowledged to the relay (committed, or refused for good).
        self.acked = 0

    def caps_changed(self) -> None:
        """Our contacts or open invites changed: register the new set of capabilities."""
        self.state.registered = False
        self._caps_changed.set()

    async def run(self) -> None:
        attempts = 0
        while True:
            local = False
            try:
                await self._session()
                attempts = 0
            except (RemoteError, StorageError) as exc:
                attempts += 1
                self.state.last_error = str(exc)
                log.info("relay %s: %s", self.peer_id, exc)
                # Our disk, or the relay's (it refused an ack or fetch `storage-full`,
                # PROTOCOL.md section 21): either clears without notice, and a long backoff
                # would then keep us off the relay (no pushes) for up to retry_max_s.
                local = isinstance(exc, StorageError) or (
                    isinstance(exc, RelayRefused) and exc.code == STORAGE_FULL)
                if isinstance(exc, RelayRefused):
                    self.state.refused = exc.code
            except Exception as exc:
                # A bug must not end the node: logged with its traceback, retried like a failure
                # (the relay keeps what was not acknowledged).
                attempts += 1
                self.state.last_error = f"internal error: {exc!r}"
                log.exception("relay %s: receiving failed", self.peer_id)
                local = True
            finally:
                self.state.connected = self.state.registered = False
                self.drained = False
            delay = min(self.config.retry_max_s, self.config.retry_initial_s * 2 ** min(attempts, 30))
            if local:  # our disk or our bug, not the relay: no reason to wait out a long backoff
                delay = min(delay, RESTART_AFTER_FAILURE_S)
            await trio.sleep(delay * random.uniform(0.5, 1.0))

    async def _session(self) -> None:
        async with self.open_transport() as transport, \
                MailboxClient.connect(transport, self.peer_id, [self.dial],
                                      timeout=self.config.connect_timeout_s) as relay:
            await relay.authenticate(self.mailbox)
            await self._register_caps(relay)
            # Subscribe before fetching: nothing deposited in between is missed (it may come both
            # ways; duplicates are dropped).
            await relay.subscribe()
            # Two tasks on the one stream: draining, and registering the capabilities again when
            # they change. The first to fail ends both, with its own exception.
            failed: list[BaseException] = []

            async def guarded(job: Callable[[MailboxClient], Awaitable[None]],
                              scope: trio.CancelScope) -> None:
                try:
                    await job(relay)
                except Exception as exc:
                    failed.append(exc)
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(guarded, self._drain, nursery.cancel_scope)
                nursery.start_soon(guarded, self._keep_caps, nursery.cancel_scope)
            if failed:
                raise failed[0]

    async def _register_caps(self, relay: MailboxClient) -> None:
        self._caps_changed = trio.Event()
        if self.caps is not None:
            try:
                await relay.set_caps(self.caps())
            except RelayRefused as exc:
                if exc.code != UNKNOWN_REQUEST:
                    raise
                # A relay from before capabilities: every deposit there is anyone's, as it was.
        await self._register_wake(relay)
        self.state.registered = not self._caps_changed.is_set()

    async def _register_wake(self, relay: MailboxClient) -> None:
        """Register our push endpoint on the stream's mailbox (PROTOCOL.md section 29). A
        refusal is shown in the relay's state, not raised: the mailbox works without it."""
        asked = self._wake_asked
        endpoint = self.push() if self.push is not None else None
        if endpoint is None and not self.push_removed:
            self._wake_done(asked)
            return
        try:
            if endpoint is None:
                await relay.set_wake(None)
                self.push_removed = False
                self.state.wake = None
            else:
                await relay.set_wake(endpoint.url, endpoint.keys.p256dh, endpoint.keys.auth)
                self.state.wake = "registered"
        except RelayRefused as exc:
            self.state.wake = ("unsupported" if exc.code == UNKNOWN_REQUEST
                               else "refused: " + str(exc).removeprefix("relay refused: "))
            log.info("relay %s: push endpoint %s", self.peer_id, self.state.wake)
        finally:
            self._wake_done(asked)

    def _wake_done(self, asked: int) -> None:
        self._wake_answered = max(self._wake_answered, asked)
        self._wake_tried.set()
        self._wake_tried = trio.Event()

    def register_wake_again(self) -> int:
        """Our push endpoint changed: register it (with the capabilities) again. Returns the
        ticket `wait_wake_registered` takes."""
        self._wake_asked += 1
        self.caps_changed()
        return self._wake_asked

    async def wait_wake_registered(self, ticket: int) -> None:
        """Return once the relay answered a registration made after `register_wake_again`
        returned `ticket`; its outcome is `state.wake`."""
        while self._wake_answered < ticket:
            await self._wake_tried.wait()

    async def wait_drained(self) -> None:
        """Return once the backlog was fetched on the current connection (`drained`)."""
        while not self.drained:
            await self._drained.wait()

    async def _keep_caps(self, relay: MailboxClient) -> None:
        while True:
            await self._caps_changed.wait()
            await self._register_caps(relay)

    async def _drain(self, relay: MailboxClient) -> None:
        self.state.connected, self.state.last_error, self.state.refused = True, None, None
        after = 0
        while True:
            items, more = await relay.fetch(after, MAX_ITEMS_PER_FRAME)
            if items:
                await self._receive(relay, items)
                after = items[-1].seq
            if not more:
                break
        self.drained = True
        self._drained.set()
        self._drained = trio.Event()
        async for item in relay.pushes():
            await self._receive(relay, [item])

    async def _receive(self, relay: MailboxClient, items: Sequence[Item]) -> None:
        done: list[bytes] = []
        self.state.pending = len(items)
        for start in range(0, len(items), RELAY_SLICE):
            if start:
                await trio.lowlevel.checkpoint()
            done += self._receive_slice(items[start:start + RELAY_SLICE])
            self.state.pending = max(0, len(items) - start - RELAY_SLICE)
        # Committed: the relay may forget them, and also what we refused for good (nacked). One
        # ack per page: an envelope decided but not acked (we stopped first) comes again, and is
        # then a duplicate or refused again.
        await relay.ack(done)
        self.acked += len(done)

    def _receive_slice(self, items: Sequence[Item]) -> list[bytes]:
        """Unseal and decide `items` in one transaction; the ids the relay may forget."""
        incoming: list[Incoming] = []
        forget: list[bytes] = []
        # The relay knows items by their deposit ids; the envelope names the message id
        # (PROTOCOL.md section 9), which de-duplication and receipts use.
        deposit_ids: dict[bytes, bytes] = {}
        for item in items:
            try:
                content = unseal(self.device, item.env)
            except (DecryptionFailed, LimitExceeded) as exc:
                log.info("relay %s: dropping an envelope that does not open: %s", self.peer_id, exc)
                forget.append(item.id)
                continue
            message_id = content.message_id or item.id
            if message_id in deposit_ids:  # the same message twice in one page
                forget.append(item.id)
                continue
            deposit_ids[message_id] = item.id
            incoming.append(Incoming(
                device=content.sender_device.to_bytes(), peer_id=content.sender_device.peer_id(),
                message_id=message_id, message=content.message,
                claimed_account=content.sender.to_bytes()))
        result = self.inbound.process(incoming)
        self.inbound.publish(result)
        self.state.received += result.accepted
        decided = [*result.acks, *(mid for mid, _ in result.nacks)]
        return [*(deposit_ids.get(mid, mid) for mid in decided), *forget]


class Depositor:
    """Deposits sealed envelopes at a contact's relays, from a throwaway identity per batch."""

    def __init__(self, *, open_transport: OpenTransport, identity: IdentityKeyPair,
                 device: DeviceKeyPair, config: Config) -> None:
        self.open_transport = open_transport
        self.identity = identity
        self.device = device
        self.config = config

    def seal(self, recipient: DeviceKey, message: bytes, message_id: bytes | None = None) -> bytes:
        return seal(recipient, SealedContent(sender=self.identity.public,
                                             sender_device=self.device.public, message=message,
                                             message_id=message_id))

    async def deposit(self, relays: Sequence[str], recipient: DeviceKey,
                      messages: Sequence[tuple[bytes, bytes]], *, cap: bytes | None = None,
                      box: bytes | None = None) -> tuple[list[int], list[str], set[str]]:
        """Deposit `(message id, session message)` pairs for `recipient` at up to DEPOSIT_COPIES
        of `relays`, into mailbox `box` (None: the one derived from the recipient's key),
        presenting `cap` (the capability the recipient gave us; None: as a stranger). Returns,
        per message, how many relays now hold it, the errors met (a relay refusing gives its
        code, which the sender shows), and the refusal codes alone."""
        box = box or mailbox_id(recipient)
        ttl = int(min(self.config.fail_after_s, MAX_DEPOSIT_TTL_S))
        requests = [DepositRequest(box, deposit_id(self.device, box, mid),
                                   self.seal(recipient, message, mid), ttl, cap)
                    for mid, message in messages]
        held = [0] * len(requests)
        errors: list[str] = []
        codes: set[str] = set()

        async def one(transport: Transport, address: str) -> None:
            peer_id, dial = split_relay_address(address)
            try:
                async with MailboxClient.connect(transport, peer_id, [dial],
                                                 timeout=self.config.connect_timeout_s) as relay:
                    results = await relay.deposit_many(requests)
            except RemoteError as exc:
                errors.append(f"relay {peer_id[-8:]}: {exc}")
                return
            for i, refused in enumerate(results):
                if refused is None:
                    held[i] += 1
                elif isinstance(refused, RelayRefused):
                    errors.append(f"relay {peer_id[-8:]} refused: {refused.code}")
                    codes.add(refused.code)

        chosen = list(relays)[:DEPOSIT_COPIES]
        # A fresh identity for this batch only: the relays see an unknown peer id that never
        # deposits again (PROTOCOL.md section 21 "What a relay learns").
        async with self.open_transport() as transport, trio.open_nursery() as nursery:
            for address in chosen:
                nursery.start_soon(one, transport, address)
        return held, sorted(set(errors)), codes
