"""Kademlia DHT over the transport's libp2p host (PROTOCOL.md "DHT records").

`Dht` wraps py-libp2p 0.8.1's `KadDHT` (protocol /ipfs/kad/1.0.0, the libp2p kad-dht spec)
behind a small async API and works around what 0.8.1 gets wrong; each item cites the section of
docs/libp2p.md that says what was observed and where it is in libp2p:

- Only the namespaces Pigeon registers are accepted, with strict validation: unknown namespaces
  and un-namespaced keys are refused locally and when peers PUT them (docs/libp2p.md L30).
  libp2p's default /pk/ and /ipns/ validators are not installed, so nobody can park data here
  under them.
- The validator must raise to reject; the selector returns the index of the best value and, on
  a full tie, the later one (docs/libp2p.md L31).
- `get` drops the local copy before asking the network: `KadDHT.get_value` answers from the
  local store without any lookup when the key is there (docs/libp2p.md L32), and the local copy
  is exactly what goes stale (clients never receive PUTs; entry correction leaves a copy on every
  getter). The old copy still competes with what the network returns, through the selector.
- Bootstrap only from the addresses given (there is no built-in public list): connect, wait for
  identify (bounded), then add the peer to the routing table (docs/libp2p.md L37).
- The startup refresh is not retried by libp2p for 600 s and can leave a node with a routing
  table of one (docs/libp2p.md L34): a maintenance task refreshes again, with backoff, while the
  table is small, and bootstraps again when it is empty.
- A server adds every peer that opens a KAD stream to its routing table without checking that
  it is a server (docs/libp2p.md L35); client-mode peers then pollute routing tables and every
  lookup that reaches them fails. Here a peer that contacted us is added only once identify
  shows it serves /ipfs/kad/1.0.0.
- A server's closer-peers answers (FIND_NODE, GET_VALUE) include the target of a FIND_NODE
  whenever it is in the peerstore, clients included, and any routing-table peer whose mode was
  never checked (docs/libp2p.md L57): a client-mode device's peer id and addresses would be
  handed to anyone who asks. Here an answer lists only routing-table peers that identify has
  not shown to be clients (PROTOCOL.md section 23.7), and a peer found to be a client leaves
  the routing table.
- libp2p's DHT logs a warning for every RPC it serves (docs/libp2p.md L36): its logger is set to
  ERROR unless the application configured it.
- The service runs in a nursery of its own, under `background_trio_service` (docs/libp2p.md L29).

The auto-connector (docs/libp2p.md L8) is already disabled by `Transport`.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.kad_dht.common import PROTOCOL_ID as _KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.peer.id import ID
from libp2p.records.record import make_signed_put_record
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.tools.anyio_service import background_trio_service

from node.clock import Clock
from node.errors import DecodeError, InvalidRecord, TransportError
from node.net.host import Transport, public_key_from_peer_id
from node.protocol.directory import NAMESPACES, select, validate

__all__ = ["KAD_PROTOCOL", "Dht", "DhtSelector", "DhtValidator", "open_pigeon_dht"]

log = logging.getLogger("pigeon.dht")

KAD_PROTOCOL: str = str(_KAD_PROTOCOL_ID)
"""/ipfs/kad/1.0.0: the libp2p Kademlia protocol id, served in server mode only."""

DhtValidator = Callable[[str, bytes], None]
"""validator(key, value): return to accept, raise InvalidRecord to refuse."""
DhtSelector = Callable[[str, list[bytes]], int]
"""selector(key, values): index of the best value (later index on a full tie)."""

# --- limits and timing --------------------------------------------------------------------------

BOOTSTRAP_TIMEOUT_S = 10.0
"""Per bootstrap peer: connect plus identify. A peer slower than this is skipped for now."""

IDENTIFY_TIMEOUT_S = 5.0
"""Wait for identify after connecting (~0.5 s typical, docs/libp2p.md L37) before adding the peer anyway."""

LOOKUP_TIMEOUT_S = 30.0
"""Bound on one put or get. libp2p bounds a FIND_NODE walk at 30 s of rounds and each query at
10 s (kad_dht QUERY_TIMEOUT); this keeps a whole call, value phase included, finite."""

SMALL_ROUTING_TABLE = 5
"""Below this many peers the routing table counts as small and is refreshed again. It is
libp2p's MIN_PEERS_THRESHOLD, under which a lookup falls back to every connected peer."""

REFRESH_RETRY_S = 5.0
"""First wait before refreshing a small routing table again; doubled after each try..."""

REFRESH_RETRY_MAX_S = 600.0
"""...up to libp2p's own refresh period (ROUTING_TABLE_REFRESH_INTERVAL)."""

HEALTH_CHECK_S = 60.0
"""How often a healthy routing table is checked for having become small."""

PEERSTORE_ADDR_TTL_S = 3600
"""How long a bootstrap or added peer's address stays in the peerstore (identify renews it)."""

MAX_PROVIDERS = 200
"""Most providers one `find_providers` returns: a directory of relays, not of everyone."""

_POLL_S = 0.02  # identify completion is only visible in the peerstore: poll it (bounded)

_put_acks: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "pigeon_dht_put_acks", default=None)


class _Rules(Validator):
    """Pigeon's validator and selector in libp2p's Validator shape (one per namespace)."""

    def __init__(self, validate: DhtValidator, select: DhtSelector) -> None:
        self._validate = validate
        self._select = select

    def validate(self, key: str, value: bytes) -> None:
        self._validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        return self._select(key, values)


def _protocols_of(peerstore: Any, pid: ID) -> list[str]:
    """The protocols identify recorded for `pid` (none until identify has run)."""
    try:
        return [str(p) for p in peerstore.get_protocols(pid) or []]
    except Exception:  # PeerStoreError: not known yet
        return []


def _serves_kad(peerstore: Any, pid: ID) -> bool:
    return KAD_PROTOCOL in _protocols_of(peerstore, pid)


class _ServersPeerstore:
    """The peerstore as a lookup's starting set sees it: listing its peers lists only DHT
    servers. Everything else is delegated."""

    def __init__(self, peerstore: Any) -> None:
        self._peerstore = peerstore

    def __getattr__(self, name: str) -> Any:
        return getattr(self._peerstore, name)

    def peer_ids(self) -> list[ID]:
        return [p for p in self._peerstore.peer_ids() if _serves_kad(self._peerstore, p)]


class _ServersOnlyHost:
    """The host as KadDHT's peer routing sees it: the peers it lists (connected, in the
    peerstore) are DHT servers only. A lookup with fewer than 5 peers in the routing table
    starts from every peer listed there and asks only the 20 closest (docs/libp2p.md L82); a
    device knows mostly peers that serve no DHT. Only the peer routing holds it: KadDHT's own
    answers look up whether each peer they name is connected (`get_connection_type`), and a
    filtered list there would cost a relay O(connections) per peer named."""

    def __init__(self, host: Any) -> None:
        self._host = host
        self._peerstore = _ServersPeerstore(host.get_peerstore())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    def get_peerstore(self) -> Any:
        return self._peerstore

    def get_connected_peers(self) -> list[ID]:
        peerstore = self._host.get_peerstore()
        return [p for p in self._host.get_connected_peers() if _serves_kad(peerstore, p)]


class _CountingHost:
    """The host as KadDHT sees it: everything is delegated, and KAD streams are counted (the
    only way to observe DHT RPCs in 0.8.1, docs/libp2p.md L38), both the ones this node opens
    and the ones it serves. Only this DHT's components hold the proxy."""

    def __init__(self, host: Any) -> None:
        self._host = host
        self.opened = 0
        self.served = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    async def new_stream(self, peer_id: Any, protocol_ids: Sequence[Any]) -> Any:
        stream = await self._host.new_stream(peer_id, protocol_ids)
        if _KAD_PROTOCOL_ID in protocol_ids:
            self.opened += 1
        return stream

    def set_stream_handler(self, protocol_id: Any, handler: Any) -> None:
        if protocol_id == _KAD_PROTOCOL_ID:
            inner = handler

            async def counted(stream: Any) -> None:
                self.served += 1
                await inner(stream)

            handler = counted
        self._host.set_stream_handler(protocol_id, handler)


def _split_bootstrap(addrs: Sequence[str]) -> dict[str, list[str]]:
    """Group bootstrap multiaddrs by the peer id they end in (/p2p/<id>). ValueError otherwise."""
    peers: dict[str, list[str]] = {}
    for text in addrs:
        head, sep, peer_id = text.rpartition("/p2p/")
        try:
            if not sep or not head or "/" in peer_id:
                raise DecodeError("no /p2p/<peer id> at the end")
            public_key_from_peer_id(peer_id)
            multiaddr.Multiaddr(head)
        except Exception as exc:
            raise ValueError(f"bootstrap address {text!r} is not a multiaddr ending in "
                             f"/p2p/<peer id>: {exc}") from exc
        peers.setdefault(peer_id, []).append(text)
    return peers


class Dht:
    """One node's view of the Pigeon DHT: put and get signed records, in server or client mode.

    Open it with `async with Dht.open(transport, ...) as dht:` inside the transport's block;
    leaving it stops the service and unregisters the KAD handler (the transport keeps running).
    """

    def __init__(self, transport: Transport, kad: KadDHT, host: _CountingHost, *, server: bool,
                 bootstrap: dict[str, list[str]], validator: DhtValidator,
                 selector: DhtSelector, namespaces: Sequence[str]) -> None:
        self._transport = transport
        self._kad = kad
        self._host = host
        self._server = server
        self._bootstrap_peers = bootstrap
        self._validate = validator
        self._select = selector
        self._namespaces = frozenset(namespaces)
        self._nursery: trio.Nursery | None = None
        self._refreshing: trio.Event | None = None
        self._refreshed = trio.Event()
        self._refreshes = 0
        self._pending_adds: set[str] = set()
        self._key_locks: dict[str, trio.Lock] = {}

    # -- lifecycle --

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        transport: Transport,
        *,
        server: bool,
        bootstrap: Sequence[str],
        validator: DhtValidator,
        selector: DhtSelector,
        namespaces: Sequence[str],
        maintain: bool = True,
    ) -> AsyncIterator[Dht]:
        """Join the DHT through `bootstrap` (multiaddrs ending in /p2p/<peer id>; may be empty)
        and run until the block is left.

        `server`: serve /ipfs/kad/1.0.0 (store records, answer lookups) or only use the DHT
        (client mode: nobody can query this node). `validator` and `selector` apply to every key
        of `namespaces` (e.g. node.protocol.directory's rules bound to the clock); keys of any
        other namespace are refused. Bootstrap peers that cannot be reached within
        BOOTSTRAP_TIMEOUT_S are skipped (the maintenance task retries while the routing table
        is empty). `maintain=False` turns that task off (benchmarks that measure bare libp2p).
        Raises ValueError for a malformed bootstrap address or an empty namespace list.
        """
        if not namespaces or any(not ns or "/" in ns for ns in namespaces):
            raise ValueError(f"bad namespaces: {list(namespaces)!r}")
        peers = _split_bootstrap(bootstrap)
        peers.pop(transport.peer_id, None)
        _quiet_kad_logging()

        host = _CountingHost(transport._host)  # same package: the host stays private to it
        rules = _Rules(validator, selector)
        kad = KadDHT(
            host,  # type: ignore[arg-type]  # a delegating proxy of the IHost
            DHTMode.SERVER if server else DHTMode.CLIENT,
            validator=NamespacedValidator({ns: rules for ns in namespaces}, strict_validation=True),
            validator_changed=True,  # no default /pk/ and /ipns/ validators
            strict_validation=True,
        )
        dht = cls(transport, kad, host, server=server, bootstrap=peers, validator=validator,
                  selector=selector, namespaces=namespaces)
        dht._install_hooks()
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                dht._nursery = nursery
                try:
                    # Bootstrap before the service starts: KadDHT.run() refreshes the routing
                    # table at once, and that refresh needs someone to ask.
                    await dht.bootstrap(refresh=False)
                    async with background_trio_service(kad):
                        if maintain:
                            nursery.start_soon(dht._maintain)
                        try:
                            yield dht
                        except BaseException as exc:
                            body_error = exc
                            raise
                finally:
                    # Only once the service has stopped: cancelling this nursery while the
                    # service's exit still awaits would turn the body's exception into a
                    # Cancelled that this very scope then swallows (docs/libp2p.md L29).
                    dht._nursery = None
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Nurseries (ours and libp2p's service) wrap the body's exception in groups; give
            # the caller its own exception back when it is all there is.
            if body_error is None or group.split(lambda e: e is body_error)[1] is not None:
                raise
        finally:
            if server:
                # Through the Transport, which replaces the handler instead of deleting it: a
                # peer's kad stream negotiating right now would otherwise end the host with a
                # KeyError (docs/libp2p.md L75; seen as a relay shut down, about 1 run in 28
                # of tests/test_relay_fleet.py).
                try:
                    transport.remove_stream_handler(_KAD_PROTOCOL_ID)
                except Exception:  # pragma: no cover - the host may already be closed
                    log.debug("could not remove the KAD handler", exc_info=True)
        if body_error is not None:
            raise body_error

    def _install_hooks(self) -> None:
        """Instance-level hooks into KadDHT (libp2p's methods are left untouched)."""
        kad: Any = self._kad
        original_refresh = kad.refresh_routing_table
        routing_table = kad.routing_table
        original_store = kad.value_store._store_at_peer

        async def refresh_routing_table() -> None:
            # One refresh at a time: the service's own and ours share the CPU-bound RPCs
            # (docs/libp2p.md L34), so a second caller waits for the running one instead.
            if self._refreshing is not None:
                await self._refreshing.wait()
                return
            done = self._refreshing = trio.Event()
            try:
                await original_refresh()
            finally:
                self._refreshing = None
                self._refreshes += 1
                self._refreshed.set()
                done.set()

        async def add_peer(peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
            if skip_server_mode_check:
                # Called for every inbound KAD stream (docs/libp2p.md L35): add only known servers.
                return await self._add_inbound_peer(peer_id)
            return bool(await routing_table.add_peer(peer_id))

        async def store_at_peer(peer_id: ID, key: bytes, value: bytes,
                                record: Record | None = None) -> bool:
            ok = bool(await original_store(peer_id, key, value, record=record))
            acks = _put_acks.get()
            if ok and acks is not None:
                acks[0] += 1
            return ok

        original_closer = kad._add_closer_peers_to_response

        def add_closer_peers(response: Any, closest_peers: Sequence[ID],
                             exclude_peer_id: ID | None = None) -> None:
            listed = [p for p in closest_peers if self._may_list(p)]
            original_closer(response, listed, exclude_peer_id)

        kad.refresh_routing_table = refresh_routing_table
        kad.peer_routing.host = _ServersOnlyHost(kad.peer_routing.host)
        kad.add_peer = add_peer
        kad.value_store._store_at_peer = store_at_peer
        kad._add_closer_peers_to_response = add_closer_peers

    def _may_list(self, pid: ID) -> bool:
        """Whether a closer-peers answer may name `pid` (PROTOCOL.md section 23.7): this node
        itself, or a routing-table peer that identify has not shown to be a client. A client
        found in the table is dropped from it."""
        if pid == self._host.get_id():
            return True
        table = self._kad.routing_table
        if not table.peer_in_table(pid):
            return False
        protocols = self._protocols(pid)
        if protocols and KAD_PROTOCOL not in protocols:
            table.remove_peer(pid)
            return False
        return True

    # -- state --

    @property
    def server(self) -> bool:
        """Whether this node serves /ipfs/kad/1.0.0 (server mode)."""
        return self._server

    def routing_table_size(self) -> int:
        return self._kad.get_routing_table_size()

    def routing_table_peers(self) -> list[str]:
        """Peer ids in the routing table (for diagnostics and tests)."""
        return [p.to_base58() for p in self._kad.routing_table.get_peer_ids()]

    def rpc_count(self) -> int:
        """KAD streams this node opened (one per DHT request it sent) since it started."""
        return self._host.opened

    def served_count(self) -> int:
        """KAD streams other nodes opened to this one (always 0 in client mode)."""
        return self._host.served

    def refresh_count(self) -> int:
        """Routing-table refreshes completed (the service's startup one included)."""
        return self._refreshes

    async def wait_refreshed(self) -> None:
        """Return once the first routing-table refresh (started when the DHT opens) is done."""
        await self._refreshed.wait()

    def stored(self, key: str) -> bytes | None:
        """The value this node holds locally for `key` (no network; for diagnostics and tests)."""
        record = self._kad.value_store.get(key.encode("utf-8"))
        return None if record is None else record.value

    # -- records --

    async def put(self, key: str, value: bytes, *, timeout: float = LOOKUP_TIMEOUT_S) -> int:
        """Store `value` under `key`: locally, then at the closest peers the lookup finds.

        Returns how many peers acknowledged it (0: only the local copy exists, e.g. the routing
        table is empty; the caller republishes later). Raises InvalidRecord, before anything is
        sent, if the validator refuses the value, its namespace is not ours, or the local copy
        is newer (the selector prefers it). Returns what was acknowledged so far after
        `timeout` seconds.
        """
        self._validate(key, value)
        acks = [0]
        token = _put_acks.set(acks)
        try:
            with trio.move_on_after(timeout) as scope:
                await self._kad.put_value(key, value)
        except InvalidRecordType as exc:
            raise InvalidRecord(f"no DHT namespace for key {key!r:.80}") from exc
        except ValueError as exc:  # "Refusing to replace newer value with the older one"
            raise InvalidRecord(f"a newer record is already held for {key!r:.80}") from exc
        finally:
            _put_acks.reset(token)
        if scope.cancelled_caught:
            log.info("put of %s timed out after %ss (%d acks)", key, timeout, acks[0])
        return acks[0]

    async def get(self, key: str, *, timeout: float = LOOKUP_TIMEOUT_S) -> bytes | None:
        """A fresh network lookup of `key`: the best valid record (by the selector) among what
        the closest peers return and what this node held before, or None.

        Records that fail the validator are dropped wherever they come from; the winner is
        kept locally and pushed to the peers that returned an older one (libp2p's entry
        correction). After `timeout` seconds the lookup stops and the best record known so far
        (possibly the old local one) is returned. ValueError for a key outside our namespaces.
        """
        if not key.startswith("/") or key.split("/", 2)[1] not in self._namespaces:
            raise ValueError(f"not a key of this DHT's namespaces: {key!r:.80}")
        key_bytes = key.encode("utf-8")
        lock = self._key_locks.setdefault(key, trio.Lock())
        async with lock:
            old = self._kad.value_store.get(key_bytes)
            if old is not None:
                self._kad.value_store.remove(key_bytes)
            try:
                with trio.move_on_after(timeout) as scope:
                    await self._kad.get_value(key)
                if scope.cancelled_caught:
                    log.info("get of %s timed out after %ss", key, timeout)
            finally:
                best = self._settle(key, key_bytes, old)
                if not lock.statistics().tasks_waiting:
                    self._key_locks.pop(key, None)
            return best

    def _settle(self, key: str, key_bytes: bytes, old: Record | None) -> bytes | None:
        """Keep the better of the old local copy and what the lookup stored; return it if valid."""
        store = self._kad.value_store
        new = store.get(key_bytes)
        candidates = [r for r in (old, new) if r is not None]
        if not candidates:
            return None
        try:
            chosen = candidates[self._select(key, [r.value for r in candidates])]
            self._validate(key, chosen.value)
        except InvalidRecord:
            store.remove(key_bytes)
            return None
        if chosen is not new:
            store.put_record(key_bytes, chosen)
        return chosen.value

    async def put_at(self, peer_id: str, key: str, value: bytes, *,
                     timeout: float = LOOKUP_TIMEOUT_S) -> bool:
        """Send one PUT_VALUE straight to `peer_id`, WITHOUT validating it here (the peer
        validates). Returns whether the peer acknowledged (stored) it. For tests and diagnostics:
        it is what a hostile peer can do, and lets a test check that honest nodes refuse it."""
        key_bytes = key.encode("utf-8")
        # record= is required: without it libp2p sends our LOCAL record for the key, if any,
        # and silently ignores `value` (docs/libp2p.md L33).
        record = make_signed_put_record(key_bytes, value, self._host.get_private_key())
        with trio.move_on_after(timeout):
            return await self._kad.value_store._store_at_peer(
                ID.from_base58(peer_id), key_bytes, value, record=record)
        return False

    async def ask_closest(self, peer_id: str, target: bytes, *,
                          timeout: float = LOOKUP_TIMEOUT_S) -> list[str]:
        """Send one FIND_NODE for `target` (raw key bytes, e.g. a peer id's bytes) straight to
        `peer_id` and return the peer ids its answer lists ([] if it did not answer in time).
        For tests and diagnostics: it shows what a server hands out to anyone who asks."""
        with trio.move_on_after(timeout):
            found = await self._kad.peer_routing._query_peer_for_closest(
                ID.from_base58(peer_id), target)
            return [p.to_base58() for p in found]
        return []

    # -- provider records (PROTOCOL.md section 28.1: the relay directory) --

    async def provide(self, key: str, *, timeout: float = LOOKUP_TIMEOUT_S) -> bool:
        """Announce this node as a provider of `key` (hex of a multihash, e.g. the relay
        directory's key): kad-dht ADD_PROVIDER to the closest peers a lookup finds. Returns
        whether any peer was sent it (False: only the local provider store holds it; the caller
        announces again later). libp2p sends this host's listen addresses with it; readers take
        addresses from the signed record instead (docs/libp2p.md L84)."""
        bytes.fromhex(key)  # ValueError for anything but hex: libp2p would take it as UTF-8
        with trio.move_on_after(timeout):
            return bool(await self._kad.provide(key))
        log.info("provide of %s timed out after %ss", key, timeout)
        return False

    async def find_providers(self, key: str, *, count: int = MAX_PROVIDERS,
                             timeout: float = LOOKUP_TIMEOUT_S) -> dict[str, list[str]]:
        """The providers of `key` (hex of a multihash) the network knows now: peer id -> the
        addresses it announced with (unverified: only where to dial), at most `count`. A fresh
        lookup every time: libp2p answers from its local provider cache when it holds any
        entry, and every lookup fills that cache, so the first answer would otherwise be the
        only one ever (docs/libp2p.md L84). After `timeout` seconds what was found so far is
        returned."""
        key_bytes = bytes.fromhex(key)
        store: Any = self._kad.provider_store
        own = store.providers.get(key_bytes, {}).get(self._transport.peer_id)
        store.providers.pop(key_bytes, None)
        found: list[Any] = []
        try:
            with trio.move_on_after(timeout) as lookup:
                # libp2p's count includes the duplicates each queried server returns: ask for
                # many more than wanted, then keep each peer once.
                found = list(await self._kad.find_providers(key, count * 4))
            if lookup.cancelled_caught:
                # Out of time (a server that does not answer holds the whole lookup): the
                # providers heard of so far are in the local store, where libp2p adds each one
                # as it arrives (docs/libp2p.md L84).
                found = list(store.get_providers(key_bytes))
        finally:
            if own is not None:
                store.providers.setdefault(key_bytes, {})[self._transport.peer_id] = own
        peers: dict[str, list[str]] = {}
        for info in found:
            if len(peers) >= count:
                break
            addrs = peers.setdefault(info.peer_id.to_base58(), [])
            addrs.extend(a for a in (str(m) for m in info.addrs) if a not in addrs)
        return peers

    async def get_from(self, peer_id: str, addrs: Sequence[str], key: str, *,
                       timeout: float = LOOKUP_TIMEOUT_S) -> bytes | None:
        """Ask `peer_id` alone (dialed at `addrs` if need be) for its value of `key`: one
        GET_VALUE instead of a lookup, for a record its owner holds (a relay's own record,
        PROTOCOL.md section 28.1). The value is returned only if the validator accepts it;
        None if the peer has none, cannot be reached or answered nothing valid in time."""
        with trio.move_on_after(timeout):
            try:
                await self._transport.connect(peer_id, addrs, timeout=timeout)
            except TransportError:
                return None
            # The library's own one-peer GET_VALUE (docs/libp2p.md L84); it returns None for
            # every failure.
            value = await self._kad.value_store._get_from_peer(
                ID.from_base58(peer_id), key.encode("utf-8"))
            if not isinstance(value, bytes):
                return None
            try:
                self._validate(key, value)
            except InvalidRecord:
                return None
            return value
        return None

    # -- routing table --

    async def add_peer(self, peer_id: str, addrs: Sequence[str], *,
                       timeout: float = BOOTSTRAP_TIMEOUT_S) -> bool:
        """Connect to a peer found another way (mDNS, an invite, a relay), wait for identify and
        add it to the routing table if it is a DHT server. Returns whether it was added.
        Raises DecodeError for a malformed peer id; a peer that cannot be reached gives False."""
        public_key_from_peer_id(peer_id)
        if peer_id == self._transport.peer_id:
            return False
        with trio.move_on_after(timeout):
            return await self._join_peer(peer_id, list(addrs))
        log.info("adding DHT peer %s timed out", peer_id)
        return False

    async def bootstrap(self, *, refresh: bool = True) -> int:
        """Connect to every bootstrap peer again (concurrently, each bounded by
        BOOTSTRAP_TIMEOUT_S), add those that answer to the routing table, then refresh it.
        Returns how many bootstrap peers were added."""
        added = [0]

        async def one(peer_id: str, addrs: list[str]) -> None:
            with trio.move_on_after(BOOTSTRAP_TIMEOUT_S):
                if await self._join_peer(peer_id, addrs):
                    added[0] += 1
                return
            log.info("bootstrap peer %s did not answer within %ss", peer_id, BOOTSTRAP_TIMEOUT_S)

        async with trio.open_nursery() as nursery:
            for peer_id, addrs in self._bootstrap_peers.items():
                nursery.start_soon(one, peer_id, addrs)
        if self._bootstrap_peers:
            log.info("DHT bootstrap: %d of %d peers added", added[0], len(self._bootstrap_peers))
        if refresh and added[0]:
            await self.refresh()
        return added[0]

    async def refresh(self) -> None:
        """Refresh the routing table now (a self-lookup plus one random lookup per non-empty
        bucket); if one is already running, wait for it instead of starting another."""
        await self._kad.refresh_routing_table()

    async def _join_peer(self, peer_id: str, addrs: list[str]) -> bool:
        try:
            await self._transport.connect(peer_id, addrs, timeout=BOOTSTRAP_TIMEOUT_S)
        except TransportError as exc:
            log.info("DHT peer %s unreachable: %s", peer_id, exc)
            return False
        pid = ID.from_base58(peer_id)
        peerstore = self._host.get_peerstore()
        maddrs = []
        for text in addrs:
            try:
                maddrs.append(multiaddr.Multiaddr(text.rpartition("/p2p/")[0] or text))
            except Exception:
                log.debug("skipping unparsable address %r", text)
        if maddrs:  # the routing table only takes peers with a known address
            peerstore.add_addrs(pid, maddrs, PEERSTORE_ADDR_TTL_S)
        await self._wait_identified(pid, IDENTIFY_TIMEOUT_S)
        return await self._kad.routing_table.add_peer(pid)

    async def _wait_identified(self, pid: ID, timeout: float) -> bool:
        """Wait (bounded) until identify has recorded the peer's protocols."""
        with trio.move_on_after(timeout):
            while not self._protocols(pid):
                await trio.sleep(_POLL_S)
            return True
        return False

    def _protocols(self, pid: ID) -> list[str]:
        return _protocols_of(self._host.get_peerstore(), pid)

    async def _add_inbound_peer(self, pid: ID) -> bool:
        protocols = self._protocols(pid)
        if protocols:
            return KAD_PROTOCOL in protocols and await self._kad.routing_table.add_peer(pid)
        # Identify has not finished yet: decide once it has, without holding up the RPC.
        key = pid.to_base58()
        if self._nursery is not None and key not in self._pending_adds:
            self._pending_adds.add(key)
            try:
                self._nursery.start_soon(self._add_when_identified, pid, key)
            except RuntimeError:  # closing
                self._pending_adds.discard(key)
        return False

    async def _add_when_identified(self, pid: ID, key: str) -> None:
        try:
            if await self._wait_identified(pid, IDENTIFY_TIMEOUT_S) and \
                    KAD_PROTOCOL in self._protocols(pid):
                await self._kad.routing_table.add_peer(pid)
        finally:
            self._pending_adds.discard(key)

    async def _maintain(self) -> None:
        """Refresh while the routing table is small, with backoff; bootstrap again when it is
        empty (docs/libp2p.md L34). Every iteration sleeps, so the loop's traffic is bounded."""
        await self.wait_refreshed()
        delay = REFRESH_RETRY_S
        while True:
            if self.routing_table_size() >= SMALL_ROUTING_TABLE:
                delay = REFRESH_RETRY_S
                await trio.sleep(HEALTH_CHECK_S)
                continue
            await trio.sleep(delay)
            delay = min(delay * 2, REFRESH_RETRY_MAX_S)
            try:
                if self.routing_table_size() == 0 and self._bootstrap_peers:
                    await self.bootstrap(refresh=False)
                if self.routing_table_size() < SMALL_ROUTING_TABLE:
                    log.debug("routing table small (%d): refreshing", self.routing_table_size())
                    await self.refresh()
            except Exception:
                log.exception("DHT maintenance failed")


def _quiet_kad_logging() -> None:
    """libp2p's DHT server logs a WARNING for every RPC it serves (each ends in StreamEOF, which
    it treats as an error: docs/libp2p.md L36). Unless the application set the level itself, show only
    errors."""
    logger = logging.getLogger("libp2p.kad_dht")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


@asynccontextmanager
async def open_pigeon_dht(transport: Transport, *, server: bool, bootstrap: Sequence[str],
                          clock: Clock) -> AsyncIterator[Dht]:
    """The Pigeon DHT on `transport`: only Pigeon's namespaces, each record checked with the
    rules of PROTOCOL.md section 23 against the current time by `clock` (nodes and relays
    alike)."""
    async with Dht.open(
        transport, server=server, bootstrap=bootstrap, namespaces=NAMESPACES,
        validator=lambda key, value: validate(key, value, clock.now_s()),
        selector=lambda key, values: select(key, values, clock.now_s()),
    ) as dht:
        yield dht
