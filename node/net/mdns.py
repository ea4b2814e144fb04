"""LAN discovery over mDNS / DNS-SD, in libp2p's wire format, with zeroconf driven by us.

Wire format (PROTOCOL.md, "mDNS (LAN discovery)"; libp2p's mdns spec): service type
`_p2p._udp.local.`, instance `<32 random [a-z0-9]>._p2p._udp.local.`, and one TXT string
`dnsaddr=<multiaddr>/p2p/<peer id>` per address. We write the TXT rdata raw, so the repeated
`dnsaddr` key survives (a dict of properties would keep one); we also read py-libp2p's numbered
keys (`dnsaddr2=`, ...). SRV and A records are published for resolvers that want them but never
read: the multiaddrs in the TXT record are the only addresses we use.

Why not libp2p's own MDNSDiscovery (docs/libp2p.md L49):
it binds every interface (no `interfaces=`), registers its service on the trio thread (a ~1.7 s
stall per host), advertises the address that routes to 8.8.8.8 as its A record, and reports
discoveries to a process-global object from a zeroconf thread.

Threads (nothing zeroconf does may stall the trio loop):
  * Zeroconf() and ServiceBrowser() construction (sockets, thread start) and the shutdown
    (goodbye packets, loop stop, joins) are blocking calls: they run in `trio.to_thread`.
  * Registering and updating our service are coroutines on zeroconf's own asyncio loop thread;
    trio awaits them through a `trio.Event` set from that thread, so they cost no worker thread
    and are cancellable.
  * Browser callbacks run on zeroconf's ServiceBrowser thread. They never block it: the TXT
    record is normally in zeroconf's cache already (a responder sends it with the PTR answer);
    otherwise a QM query runs as a task on zeroconf's loop. Results cross to trio with
    `TrioToken.run_sync_soon` (the primitive under `trio.from_thread`; it queues and returns at
    once instead of waiting for trio), and go into a bounded memory channel with `send_nowait`:
    when the consumer is behind, the result is dropped and counted, zeroconf is never held up.

Everything read from the network is size-limited and validated before use (`peer_from_txt`);
a bad record is ignored with a debug log, and no exception from the network leaves this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import secrets
import string
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import multiaddr
import trio
from zeroconf import (
    DNSQuestionType,
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceListener,
    Zeroconf,
)

from node.errors import ConfigError, DecodeError, LimitExceeded, NodeError
from node.net.addresses import interface_ipv4_addresses
from node.protocol.keys import DeviceKey

__all__ = [
    "INSTANCE_NAME_CHARS",
    "MAX_ADDRESSES",
    "MAX_TXT_BYTES",
    "SERVICE_TYPE",
    "MdnsDiscovery",
    "MdnsPeer",
    "MdnsStats",
    "encode_txt",
    "peer_from_txt",
]

log = logging.getLogger("pigeon.mdns")

# --- wire format and limits --------------------------------------------------------------------

SERVICE_TYPE: Final = "_p2p._udp.local."
"""libp2p's DNS-SD service type; other libp2p nodes browse it too (and are ignored: not Ed25519
peer ids of contacts)."""

INSTANCE_NAME_CHARS: Final = 32
"""Random [a-z0-9] characters in our instance label (~165 bits): a collision is practically
impossible, which is what lets us skip probing (see `_ANNOUNCE_WITHOUT_PROBING`). A fresh name
each start, so the label does not link one session to the next (the peer id in TXT still does)."""

MAX_ADDRESSES: Final = 16
"""Most dnsaddr strings in one record, advertised or accepted. A device has a few interfaces times
three transports; more than this in a record means it is not a Pigeon node (the whole record is
ignored), and 16 typical strings (~100 bytes each) keep the response near one Ethernet frame."""

MAX_TXT_BYTES: Final = 4096
"""Largest TXT rdata accepted: MAX_ADDRESSES strings of the DNS maximum of 255 bytes (+1 length
byte each). Checked before the record is split, so a huge record costs nothing to refuse."""

_DNSADDR_KEY: Final = b"dnsaddr"
_DNS_STRING_MAX: Final = 255  # a TXT string's length is one byte (RFC 1035 3.3.14)

# --- timing ------------------------------------------------------------------------------------

_QUESTION_TYPE: Final = DNSQuestionType.QM
"""Ask every browse and resolve question QM (answer by multicast). zeroconf's default first
question is QU (answer by unicast); when several processes share port 5353 (SO_REUSEPORT), the
kernel delivers a unicast answer to ONE of their sockets, often another process's, and it is lost
until the next query ~1 s later. Measured (docs/libp2p.md L50): late joiner ~1.1 s with QU, ~0.1 s QM."""

_ANNOUNCE_WITHOUT_PROBING: Final = True
"""`register_service(cooperating_responders=True)`: announce at once instead of probing first.
RFC 6762 section 8.1 says to probe (a 0-250 ms random wait, then three queries 250 ms apart;
zeroconf waits 150-250 ms, then 500 ms between queries) so that two responders do not claim one
name. Our instance label is 32 random characters: a collision would need ~2^82 devices on one
link, so probing buys nothing and delays discovery by ~1.2 s (measured: first discovery at
1.2-1.3 s with probing, 10-40 ms without). The trade-off: if a collision ever happened, both
records would coexist in caches instead of one being renamed, and discovery of the two devices
could be confused until one restarts with a new name."""

RESOLVE_TIMEOUT_MS: Final = 2000
"""How long a query for a TXT record missing from the cache waits: two QM questions (zeroconf
suppresses a repeat QM question within 1 s). Normally unused: the TXT arrives with the PTR."""

MAX_PENDING_RESOLVES: Final = 8
"""Queries for missing TXT records in flight at once. A hostile host announcing many names with
no TXT cannot make us run an unbounded number of queries; extra names are dropped and counted
(they are picked up again when they re-announce)."""

FOUND_BUFFER: Final = 64
"""Discoveries buffered for the consumer of `found()`. When full, new ones are dropped and counted
(`MdnsStats.dropped`) rather than blocking a zeroconf thread."""

MAX_TRACKED_SERVICES: Final = 256
"""Instance names whose last delivered result we remember, to deliver each result once. The
oldest is forgotten first; forgetting only means a repeat delivery."""

CLOSE_TIMEOUT_S: Final = 5.0
"""Upper bound on shutdown. It normally takes ~0.3 s (three goodbye packets 125 ms apart, then
zeroconf's loop thread stops); past the bound the shutdown thread is abandoned and finishes alone
(zeroconf bounds its own waits at ~10 s)."""

_ALPHABET: Final = string.ascii_lowercase + string.digits


# --- data --------------------------------------------------------------------------------------


class MdnsPeer(NamedTuple):
    """A peer announced on the LAN: its libp2p peer id (an Ed25519 one, checked) and the
    multiaddrs it announced (canonical text, without /p2p/, deduplicated, at most
    MAX_ADDRESSES). Unauthenticated: anyone on the LAN can announce any peer id; the Noise
    handshake of the dial is what proves it."""

    peer_id: str
    addresses: tuple[str, ...]


@dataclass(kw_only=True)
class MdnsStats:
    """Counters, for logs and tests. Written from zeroconf's threads and trio; read-only here."""

    found: int = 0  # results handed to the consumer
    dropped: int = 0  # results lost because the consumer's buffer was full
    rejected: int = 0  # records ignored as invalid (bad TXT, bad peer id, too many addresses)
    queried: int = 0  # names whose TXT was not cached, so a query was sent
    resolves_skipped: int = 0  # names not queried because MAX_PENDING_RESOLVES were in flight


# --- TXT encoding and validation (pure) ---------------------------------------------------------


def _check_address(text: str) -> str:
    """The canonical form of one announced address, or DecodeError. Accepted: an /ip4/ or /ip6/
    address (not the unspecified one), any transport after it that `multiaddr` parses, no /p2p/
    and no /p2p-circuit (LAN discovery is for direct connections)."""
    if not text.startswith(("/ip4/", "/ip6/")):
        raise DecodeError("address is not /ip4/ or /ip6/")
    try:
        addr = multiaddr.Multiaddr(text)
        protocols = addr.protocols()
        unspecified = ipaddress.ip_address(addr.value_for_protocol(protocols[0].code)).is_unspecified
        names = {p.name for p in protocols}
        canonical = str(addr)
    except Exception as e:  # multiaddr raises assorted types (ValueError, IndexError, its own)
        raise DecodeError(f"address does not parse: {e}") from None
    if unspecified:
        raise DecodeError("unspecified address")
    if names & {"p2p", "ipfs", "p2p-circuit"}:
        raise DecodeError("address names a peer or a relay circuit")
    return canonical


def _check_peer_id(peer_id: str) -> str:
    DeviceKey.from_peer_id(peer_id)  # DecodeError unless an Ed25519 libp2p peer id
    return peer_id


def _split_txt(rdata: bytes) -> list[bytes]:
    """RFC 1035 <character-string>s: each a length byte then that many bytes."""
    strings, i = [], 0
    while i < len(rdata):
        end = i + 1 + rdata[i]
        if end > len(rdata):
            raise DecodeError("TXT string runs past the end of the record")
        strings.append(rdata[i + 1 : end])
        i = end
    return strings


def _is_dnsaddr_key(key: bytes) -> bool:
    """`dnsaddr` (spec), or py-libp2p's `dnsaddr2`, `dnsaddr3`, ...; keys are case-insensitive
    (RFC 6763 section 6.4)."""
    key = key.lower()
    return key == _DNSADDR_KEY or (key.startswith(_DNSADDR_KEY) and key[len(_DNSADDR_KEY):].isdigit())


def peer_from_txt(rdata: bytes) -> MdnsPeer:
    """Validate a TXT record from the network and return the peer it announces.

    Whole record refused (DecodeError / LimitExceeded): larger than MAX_TXT_BYTES, malformed
    strings, more than MAX_ADDRESSES dnsaddr strings, dnsaddr strings naming two different peer
    ids, a peer id that is not an Ed25519 libp2p peer id, or no usable address. Single addresses
    skipped: not ASCII, no /p2p/<id> suffix, not parsing, not /ip4/ or /ip6/, relayed. Other
    keys are ignored (a newer version may add some).
    """
    if len(rdata) > MAX_TXT_BYTES:
        raise LimitExceeded("MAX_TXT_BYTES", f"{len(rdata)} bytes")
    values = []
    for entry in _split_txt(rdata):
        key, sep, value = entry.partition(b"=")
        if sep and _is_dnsaddr_key(key):
            values.append(value)
    if len(values) > MAX_ADDRESSES:
        raise LimitExceeded("MAX_ADDRESSES", f"{len(values)} dnsaddr strings")
    peer_ids: set[str] = set()
    addresses: dict[str, None] = {}
    for value in values:
        try:
            text = value.decode("ascii")
            addr, slash_p2p, peer_id = text.rpartition("/p2p/")
            if not slash_p2p:
                raise DecodeError("no /p2p/<peer id> suffix")
            peer_ids.add(peer_id)
            addresses[_check_address(addr)] = None
        except (DecodeError, UnicodeDecodeError) as e:
            log.debug("mDNS: skipping address %r: %s", value[:80], e)
    if len(peer_ids) != 1:
        raise DecodeError(f"record names {len(peer_ids)} peer ids, expected 1")
    peer_id = _check_peer_id(peer_ids.pop())
    if not addresses:
        raise DecodeError("no usable address")
    return MdnsPeer(peer_id, tuple(addresses))


def encode_txt(peer_id: str, addresses: Sequence[str]) -> tuple[bytes, tuple[str, ...]]:
    """Our TXT rdata (raw: one `dnsaddr=<addr>/p2p/<peer_id>` string per address) and the
    addresses it carries. Addresses that a receiver would skip are left out with a log line:
    /p2p-circuit ones (not for the LAN), 0.0.0.0, non-IP, unparsable; a trailing /p2p/<our id>
    is removed first. Only the first MAX_ADDRESSES are kept (the caller lists them by preference).
    """
    kept: dict[str, None] = {}
    for original in addresses:
        text = original
        if text.endswith(f"/p2p/{peer_id}"):
            text = text[: -len(f"/p2p/{peer_id}")]
        try:
            canonical = _check_address(text)
        except DecodeError as e:
            log.debug("mDNS: not announcing %s: %s", original, e)
            continue
        if len(f"dnsaddr={canonical}/p2p/{peer_id}".encode()) > _DNS_STRING_MAX:
            log.warning("mDNS: not announcing %s: longer than a TXT string", original)
            continue
        kept[canonical] = None
    chosen = tuple(kept)
    if len(chosen) > MAX_ADDRESSES:
        log.warning("mDNS: announcing only the first %d of %d addresses", MAX_ADDRESSES, len(chosen))
        chosen = chosen[:MAX_ADDRESSES]
    rdata = b"".join(
        bytes([len(s)]) + s for s in (f"dnsaddr={a}/p2p/{peer_id}".encode() for a in chosen))
    return rdata, chosen


def _port_and_hosts(addresses: Sequence[str]) -> tuple[int, list[str]]:
    """SRV port (the first TCP, else UDP, port) and A/AAAA hosts for our record. Only for DNS-SD
    resolvers that insist on SRV + A (py-libp2p's); Pigeon reads the TXT multiaddrs only."""
    parsed = [multiaddr.Multiaddr(text) for text in addresses]
    hosts = dict.fromkeys(addr.value_for_protocol(addr.protocols()[0].code) for addr in parsed)
    ports = [int(addr.value_for_protocol(proto)) for proto in ("tcp", "udp") for addr in parsed
             if proto in {p.name for p in addr.protocols()}]
    return (ports[0] if ports else 0), list(hosts)


# --- the service -------------------------------------------------------------------------------


class _Listener(ServiceListener):
    """ServiceBrowser callbacks, on zeroconf's browser thread. They must neither block nor raise
    (an exception would end up in zeroconf's log, and the next event must still be handled)."""

    def __init__(self, owner: MdnsDiscovery) -> None:
        self._owner = owner

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._owner._on_service(zc, type_, name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._owner._on_service(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._owner._to_trio(self._owner._forget, name.lower())


class MdnsDiscovery:
    """Announce this device on the LAN and report other peers announced there.

    ```
    async with MdnsDiscovery.open(peer_id, addresses, interfaces=["127.0.0.1"]) as mdns:
        async for peer in mdns.found():      # MdnsPeer(peer_id, addresses)
            ...                              # dial it only if it is a device of a contact
    ```
    Browsing starts at once; our registration runs in the background, so peers already on the
    LAN are found without waiting for it. Leaving the block sends goodbye packets and stops
    every zeroconf thread (bounded by CLOSE_TIMEOUT_S).
    """

    def __init__(self, peer_id: str, addresses: Sequence[str], *, interfaces: Sequence[str] | None,
                 announce: bool) -> None:
        try:
            _check_peer_id(peer_id)
        except DecodeError:
            raise ConfigError(f"mDNS: {peer_id!r} is not an Ed25519 libp2p peer id") from None
        self._interfaces = _check_interfaces(interfaces)
        self._peer_id = peer_id
        self._announce = announce
        self._instance = "".join(secrets.choice(_ALPHABET) for _ in range(INSTANCE_NAME_CHARS))
        self._name = f"{self._instance}.{SERVICE_TYPE}"
        self._info, self._announced = self._make_info(addresses)
        self.stats = MdnsStats()
        self._send, self._receive = trio.open_memory_channel[MdnsPeer](FOUND_BUFFER)
        self._token: trio.lowlevel.TrioToken | None = None
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._closing = False
        self._registered = False
        self._register_lock = trio.Lock()
        self._pending_lock = threading.Lock()  # browser thread adds, zeroconf's loop removes
        self._pending: dict[str, concurrent.futures.Future[None]] = {}
        self._delivered: dict[str, MdnsPeer] = {}  # trio thread only

    @classmethod
    @asynccontextmanager
    async def open(cls, peer_id: str, addresses: Sequence[str], *,
                   interfaces: Sequence[str] | None = None,
                   announce: bool = True) -> AsyncIterator[MdnsDiscovery]:
        """Start browsing (and announcing, unless `announce=False`) for the duration of the block.

        `peer_id`: this device's peer id (filtered out of our own results). `addresses`: the
        dialable multiaddrs to announce (see `encode_txt` for what is left out). `interfaces`:
        IPv4 addresses of the local interfaces to bind; None binds every interface (what a
        device needs), tests pass ["127.0.0.1"]. ConfigError for a bad peer id or interface;
        OSError if zeroconf cannot open its sockets. A failure to announce is logged, and
        browsing goes on.
        """
        self = cls(peer_id, addresses, interfaces=interfaces, announce=announce)
        self._token = trio.lowlevel.current_trio_token()
        try:
            await trio.to_thread.run_sync(self._start_zeroconf)
            async with trio.open_nursery() as nursery:
                if announce:
                    nursery.start_soon(self._register_in_background)
                yield self
                nursery.cancel_scope.cancel()
        finally:
            await self._close()

    def found(self) -> trio.abc.ReceiveChannel[MdnsPeer]:
        """Peers found or updated on the LAN, ourselves excluded. A result is delivered when a
        service appears and again when its announced addresses change (a restarted peer has a
        new instance name, so it is delivered again). The channel ends when the block exits."""
        return self._receive

    @property
    def peer_id(self) -> str:
        """This device's peer id, as given to `open`."""
        return self._peer_id

    @property
    def instance_name(self) -> str:
        """Our DNS-SD instance name (`<32 chars>._p2p._udp.local.`)."""
        return self._name

    @property
    def addresses(self) -> tuple[str, ...]:
        """The addresses currently announced (or that would be, with announce=False)."""
        return self._announced

    async def update_addresses(self, addresses: Sequence[str]) -> None:
        """Announce a new address list (addresses changed: new interface, new port). Peers
        browsing the LAN get an update; with no dialable address left the record is withdrawn
        (goodbye). With announce=False only the stored list changes. Returns after the three
        announcements (~0.45 s); zeroconf's failures are logged, not raised."""
        info, chosen = self._make_info(addresses)
        async with self._register_lock:
            self._info, self._announced = info, chosen
            if not self._announce or self._closing:
                return
            try:
                if self._registered and not chosen:  # nothing dialable left: withdraw (goodbye)
                    self._registered = False
                    await self._on_zc_loop(_unregister_service(self._zc_or_raise(), info))
                elif self._registered:
                    await self._on_zc_loop(_update_service(self._zc_or_raise(), info))
                else:
                    await self._register()
            except (Exception, asyncio.CancelledError) as e:  # zeroconf's errors, or it closed
                log.warning("mDNS: could not announce the new addresses: %r", e)

    # --- lifecycle ---------------------------------------------------------------------------

    def _make_info(self, addresses: Sequence[str]) -> tuple[ServiceInfo, tuple[str, ...]]:
        rdata, chosen = encode_txt(self._peer_id, addresses)
        port, hosts = _port_and_hosts(chosen)
        if not hosts and self._interfaces is not None:
            hosts = list(self._interfaces)
        info = ServiceInfo(SERVICE_TYPE, self._name, port=port, properties=rdata,
                           server=f"{self._instance}.local.", parsed_addresses=hosts)
        return info, chosen

    def _start_zeroconf(self) -> None:
        """Worker thread. Assigns as it goes, so that `_close` finds whatever was started even
        if the caller was cancelled meanwhile."""
        self._zc = Zeroconf(
            interfaces=list(self._interfaces) if self._interfaces is not None else InterfaceChoice.All,
            ip_version=IPVersion.V4Only)
        self._browser = ServiceBrowser(
            self._zc, SERVICE_TYPE, listener=_Listener(self), question_type=_QUESTION_TYPE)

    async def _register_in_background(self) -> None:
        try:
            async with self._register_lock:
                await self._register()
        except (Exception, asyncio.CancelledError) as e:  # zeroconf's errors, or it closed
            # Discovery of others goes on; we are just not announced (logged for the operator).
            log.warning("mDNS: could not announce this device: %r", e)

    async def _register(self) -> None:
        """Called with _register_lock held, by the background task or by update_addresses,
        whichever gets the lock first."""
        if self._registered or not self._announced:
            return  # done already; or nothing dialable to announce yet (update_addresses will)
        await self._on_zc_loop(_register_service(self._zc_or_raise(), self._info))
        self._registered = True
        log.debug("mDNS: announced %s with %d addresses", self._name, len(self._announced))

    async def _close(self) -> None:
        self._closing = True
        self._send.close()
        with self._pending_lock:
            pending = list(self._pending.values())
        zc, browser = self._zc, self._browser

        def shutdown() -> None:  # worker thread
            for future in pending:
                future.cancel()  # queries for missing TXT: otherwise zc.close() waits for them
            if browser is not None:
                browser.cancel()  # joins the browser thread
            if zc is not None:
                zc.close()  # goodbyes for our record (TTL 0), then stops and joins its loop thread

        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
            await trio.to_thread.run_sync(  # type: ignore[call-arg]  # stub predates it
                shutdown, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.warning("mDNS: shutdown took over %.0f s; left to finish in the background",
                        CLOSE_TIMEOUT_S)

    def _zc_or_raise(self) -> Zeroconf:
        if self._zc is None:
            raise RuntimeError("zeroconf is not running")
        return self._zc

    async def _on_zc_loop(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine on zeroconf's asyncio loop thread; wait for it without blocking trio
        or holding a worker thread. Cancelling the wait cancels the coroutine."""
        loop = self._zc_or_raise().loop
        if loop is None:
            coro.close()
            raise RuntimeError("zeroconf has no loop")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        done = trio.Event()
        future.add_done_callback(lambda _: self._to_trio(done.set))
        try:
            await done.wait()
        finally:
            future.cancel()  # no-op when done
        future.result()

    # --- zeroconf threads -> trio ------------------------------------------------------------

    def _to_trio(self, fn: Callable[..., None], *args: object) -> None:
        """Queue `fn(*args)` to run in the trio thread; never blocks, never raises."""
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(fn, *args)

    def _on_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        """Browser thread: a service appeared or changed. Use the cached TXT record if there is
        one (the usual case); otherwise start a bounded query on zeroconf's loop."""
        try:
            if self._closing or name.lower() == self._name.lower():
                return
            info = ServiceInfo(type_, name)
            if info.load_from_cache(zc) or info.text:  # complete, or at least the TXT is there
                self._accept(name, info.text)
                return
            with self._pending_lock:
                if name.lower() in self._pending:
                    return
                if len(self._pending) >= MAX_PENDING_RESOLVES:
                    self.stats.resolves_skipped += 1
                    log.debug("mDNS: too many pending queries; not resolving %s", name)
                    return
                loop = zc.loop
                if loop is None or self._closing:
                    return
                future = asyncio.run_coroutine_threadsafe(self._resolve(zc, info, name), loop)
                self._pending[name.lower()] = future
                self.stats.queried += 1
            future.add_done_callback(lambda _: self._resolved(name.lower()))
        except Exception as e:  # a weird name or record must never reach zeroconf's thread loop
            self.stats.rejected += 1
            log.debug("mDNS: ignoring service %r: %r", name[:100], e)

    async def _resolve(self, zc: Zeroconf, info: ServiceInfo, name: str) -> None:
        """zeroconf's loop: query the TXT record (and SRV/A, which zeroconf insists on asking;
        a TXT that arrives alone is used after the timeout)."""
        try:
            complete = await info.async_request(zc, RESOLVE_TIMEOUT_MS, question_type=_QUESTION_TYPE)
            if self._closing:
                return
            if complete or info.text:
                self._accept(name, info.text)
            else:
                self.stats.rejected += 1
                log.debug("mDNS: no TXT record for %r", name[:100])
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.debug("mDNS: resolving %r failed: %r", name[:100], e)

    def _resolved(self, key: str) -> None:
        with self._pending_lock:
            self._pending.pop(key, None)

    def _accept(self, name: str, rdata: bytes) -> None:
        """Any zeroconf thread: validate the record and hand the result to trio."""
        try:
            peer = peer_from_txt(rdata)
        except NodeError as e:
            self.stats.rejected += 1
            log.debug("mDNS: ignoring %r: %s", name[:100], e)
            return
        if peer.peer_id == self._peer_id:
            return  # ourselves, under another instance name (e.g. a stale record of ours)
        self._to_trio(self._deliver, name.lower(), peer)

    # --- trio thread (run_sync_soon callbacks: must not raise) ---------------------------------

    def _deliver(self, key: str, peer: MdnsPeer) -> None:
        if self._delivered.get(key) == peer:
            return  # a re-announcement or a cache refresh: nothing new
        try:
            self._send.send_nowait(peer)
        except trio.WouldBlock:
            self.stats.dropped += 1
            log.debug("mDNS: consumer behind; dropped %s", peer.peer_id)
            return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        self.stats.found += 1
        self._delivered.pop(key, None)
        self._delivered[key] = peer
        if len(self._delivered) > MAX_TRACKED_SERVICES:
            del self._delivered[next(iter(self._delivered))]

    def _forget(self, key: str) -> None:
        self._delivered.pop(key, None)  # goodbye: a return under this name is delivered again


async def _register_service(zc: Zeroconf, info: ServiceInfo) -> None:
    """On zeroconf's loop: add the record and wait for its announcements (~0.45 s)."""
    announcing = asyncio.ensure_future(await zc.async_register_service(
        info, cooperating_responders=_ANNOUNCE_WITHOUT_PROBING))
    try:
        await announcing
    finally:
        announcing.cancel()  # when we are cancelled: no announcement may follow our goodbye


async def _update_service(zc: Zeroconf, info: ServiceInfo) -> None:
    announcing = asyncio.ensure_future(await zc.async_update_service(info))
    try:
        await announcing
    finally:
        announcing.cancel()


async def _unregister_service(zc: Zeroconf, info: ServiceInfo) -> None:
    goodbyes = asyncio.ensure_future(await zc.async_unregister_service(info))
    try:
        await goodbyes
    finally:
        goodbyes.cancel()


def _check_interfaces(interfaces: Sequence[str] | None) -> tuple[str, ...] | None:
    """None (all interfaces) or local IPv4 addresses. An empty list is refused rather than read
    as "all": binding every interface must be asked for explicitly."""
    if interfaces is None:
        return None
    if isinstance(interfaces, str) or not interfaces:
        raise ConfigError("mDNS interfaces: a non-empty list of IPv4 addresses, or None for all")
    local = set(interface_ipv4_addresses())
    for address in interfaces:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise ConfigError(f"mDNS interface {address!r} is not an IPv4 address") from None
        if address not in local:
            raise ConfigError(f"mDNS interface {address!r} is not an address of this machine")
    return tuple(dict.fromkeys(interfaces))
