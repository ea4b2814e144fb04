"""Wake-ups (PROTOCOL.md section 29): the relay's side. A device registers a push endpoint for
its mailbox (`wake`); when a deposit stores a message in a mailbox that nobody is subscribed to,
the relay POSTs an encrypted, content-free wake-up to that endpoint.

- Registration: the URL's host is resolved, and every address it resolves to must be allowed
  (node/protocol/wakeup.py `address_allowed`: globally routable, or in the operator's
  `push_allow`); otherwise `wake-refused` and nothing is stored. Stored in the relay's database
  with the mailbox (node/relay/store.py), so it survives a restart.
- Sending: one `_Job` per mailbox at most (coalesced), started when the mailbox's token bucket
  (node/protocol/ratelimit.py) has a token, retried with doubling delays on the injected clock,
  at most `push_attempts` times, at most `push_concurrency` POSTs at once and `push_max_pending`
  jobs in all. Every POST resolves the host again and connects to a checked address only.
- Metrics: wake-ups sent, failed (by reason), registrations stored and refused.

The HTTP client is httpx over trio (httpcore detects trio), imported and made for the first
wake-up (`Waker.run`).
"""

from __future__ import annotations

import logging
import math
import random
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from node.clock import Clock
from node.errors import StorageError
from node.protocol.mailbox import WAKE_REFUSED, Wake
from node.protocol.ratelimit import TokenBucket
from node.protocol.wakeup import (
    WAKEUP_PLAINTEXT,
    PushTarget,
    address_allowed,
    encrypt,
    parse_networks,
    parse_push_url,
)
from node.relay.config import RelayConfig, push_tls_context
from node.relay.log import box_tag, event
from node.relay.metrics import Registry
from node.relay.store import RelayStore, WakeEndpoint

if TYPE_CHECKING:
    import httpx

    # trio-typing's stubs (a libp2p dependency) hide trio's own `trio.TaskStatus`: see node/rpc.py.
    from trio_typing import TaskStatus

__all__ = ["FAILURE_REASONS", "WAKE_REQUEST_BURST", "WAKE_REQUEST_RATE_PER_S", "Waker"]

log = logging.getLogger("pigeon.relay.push")

#: Seconds a registration may spend resolving the push URL's host before it is refused.
RESOLVE_TIMEOUT_S: Final = 5.0
#: RFC 8030 section 5.2: how long the push service may keep an undelivered wake-up. Messages wait
#: at the relay for days; a wake-up a day late still makes the device fetch them.
PUSH_TTL_S: Final = 86_400
#: RFC 8030 section 5.4: an undelivered wake-up is replaced by the next one with the same topic.
PUSH_TOPIC: Final = "pigeon-fetch"
#: `wake` requests one stream may make: 4 at once, then one every 10 s. A device registers once
#: per connection; each registration may cost the relay a name lookup of up to
#: RESOLVE_TIMEOUT_S, so a stream cannot keep it resolving names.
WAKE_REQUEST_BURST: Final = 4
WAKE_REQUEST_RATE_PER_S: Final = 0.1
#: Buckets kept for mailboxes whose bucket is full again are forgotten beyond this many.
_BUCKETS_KEPT: Final = 4096

#: Why a wake-up was not sent (the `reason` label of the failures metric).
FAILURE_REASONS: Final = ("address", "unreachable", "status", "gone", "overflow", "unregistered")


class _Refused(Exception):
    """The target may not be POSTed to: the host does not resolve or is not allowed."""


@dataclass(slots=True)
class _Job:
    box: bytes
    due: float               # monotonic time at which the next attempt may start
    attempts: int = 0        # POSTs made for this wake-up
    in_flight: bool = False
    again: bool = False      # a deposit came while a POST was in flight


class Waker:
    """Push registrations and wake-ups of one relay. `register` answers `wake` requests;
    `deposited` is told of every mailbox that got a new message with no subscriber; `run` is the
    task that sends (started by the relay service)."""

    def __init__(self, *, store: RelayStore, config: RelayConfig, clock: Clock,
                 registry: Registry) -> None:
        self.store, self.config, self.clock = store, config, clock
        self.allow = parse_networks(config.push_allow)
        self._jobs: dict[bytes, _Job] = {}
        self._buckets: dict[bytes, TokenBucket] = {}
        self._changed = trio.Event()
        self._in_flight = 0
        self.m_sent = registry.counter("pigeon_relay_wakeups_sent_total",
                                       "Wake-ups a push service accepted (2xx).")
        self.m_failed = registry.counter(
            "pigeon_relay_wakeups_failed_total",
            "Wake-ups given up, by reason (address: not allowed or not resolved; unreachable: "
            "no answer after every attempt; status: refused by the push service; gone: 404/410, "
            "registration removed; overflow: too many due; unregistered: removed meanwhile).",
            label="reason", label_values=FAILURE_REASONS)
        self.m_attempts = registry.counter("pigeon_relay_wakeup_posts_total",
                                           "POSTs of wake-ups, first attempts and retries.")
        self.m_registered = registry.counter("pigeon_relay_push_registrations_total",
                                             "Push endpoints registered (or removed) by devices.")
        registry.gauge("pigeon_relay_wakeups_pending", "Wake-ups due or in flight.",
                       lambda: len(self._jobs))

    # --- registration -------------------------------------------------------------------------

    async def register(self, box: bytes, request: Wake) -> tuple[str, str] | None:
        """Store (or remove) the push endpoint of `box` for a `wake` request; None when stored,
        else (error code, text for people). StorageError if the store cannot be written."""
        if request.url is None or request.key is None or request.auth is None:
            self.store.set_wake(box, None)
            self.m_registered.inc()
            event(logging.DEBUG, "push.removed", mailbox=box_tag(box))
            return None
        if not self.config.push:
            return WAKE_REFUSED, "this relay sends no wake-ups"
        try:
            target = parse_push_url(request.url)
            await self._resolve(target)
        except (ValueError, _Refused) as exc:
            return WAKE_REFUSED, _short(str(exc))
        # The endpoint may change under an in-flight or due wake-up: it is read at each POST.
        self.store.set_wake(box, WakeEndpoint(request.url, request.key, request.auth))
        self.m_registered.inc()
        event(logging.DEBUG, "push.registered", mailbox=box_tag(box))
        return None

    async def _resolve(self, target: PushTarget) -> list[str]:
        """Every address of the target's host, all allowed; _Refused otherwise."""
        addresses: list[str] = []
        with trio.move_on_after(RESOLVE_TIMEOUT_S):
            try:
                infos = await trio.socket.getaddrinfo(target.host, target.port,
                                                      type=trio.socket.SOCK_STREAM)
            except OSError as exc:
                raise _Refused(f"{target.host} does not resolve ({exc.strerror or exc})") from None
            addresses = sorted({str(info[4][0]) for info in infos})
        if not addresses:
            raise _Refused(f"{target.host} does not resolve")
        refused = [a for a in addresses if not address_allowed(a, self.allow)]
        if refused:
            raise _Refused(f"{target.host} resolves to {refused[0]}, which this relay's operator "
                           "does not allow wake-ups to")
        return addresses

    # --- deposits -----------------------------------------------------------------------------

    def deposited(self, box: bytes) -> None:
        """A new message is stored for `box` and no stream is subscribed to it: make a wake-up
        due if the mailbox has a push endpoint (coalesced with one already due)."""
        if not self.config.push:
            return
        job = self._jobs.get(box)
        if job is not None:
            if job.in_flight:
                job.again = True
            return
        try:
            if self.store.wake_of(box) is None:
                return
        except StorageError:
            return  # the POST reads it again; a store that cannot be read now wakes nobody
        if len(self._jobs) >= self.config.push_max_pending:
            self.m_failed.inc(1, "overflow")
            return
        self._jobs[box] = _Job(box, due=self.clock.monotonic())
        self._changed.set()

    # --- sending ------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send due wake-ups until cancelled. The HTTP client is made for the first wake-up, not
        at the relay's start: its TLS context loads the CA store (~20 ms of CPU, docs/testing.md
        T3), and most relays never send a wake-up. It is closed after the POSTs in flight."""
        client: httpx.AsyncClient | None = None
        async with AsyncExitStack() as closing, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._changed = trio.Event()
                now = self.clock.monotonic()
                next_due = math.inf
                for job in list(self._jobs.values()):
                    if job.in_flight:
                        continue
                    if job.due > now:
                        next_due = min(next_due, job.due)
                        continue
                    if self._in_flight >= self.config.push_concurrency:
                        break
                    if job.attempts == 0 and not self._bucket(job.box, now).take(1, now=now):
                        # Rate-limited: wait for the mailbox's next token (delayed, not dropped).
                        job.due = now + 1 / self.config.push_rate_per_s
                        next_due = min(next_due, job.due)
                        continue
                    if client is None:
                        client = await closing.enter_async_context(self._client())
                    job.in_flight = True
                    self._in_flight += 1
                    nursery.start_soon(self._attempt, client, job)
                self._forget_buckets(now)
                with trio.move_on_after(max(0.0, next_due - now) if next_due < math.inf
                                        else math.inf):
                    await self._changed.wait()

    def _client(self) -> httpx.AsyncClient:
        import httpx

        # No proxies from the environment, no redirects: a POST goes only where it was checked.
        # HTTPS is verified for the URL's host name (sent as SNI, see _post), against the
        # operator's CAs if it named some, else the public ones.
        verify = push_tls_context(self.config.push_ca_file) if self.config.push_ca_file else True
        return httpx.AsyncClient(trust_env=False, follow_redirects=False, verify=verify)

    def _bucket(self, box: bytes, now: float) -> TokenBucket:
        bucket = self._buckets.get(box)
        if bucket is None:
            bucket = self._buckets[box] = TokenBucket(self.config.push_rate_per_s,
                                                      self.config.push_burst, now=now)
        return bucket

    def _forget_buckets(self, now: float) -> None:
        """Drop the buckets that are full again (as a new one would be), when many are kept."""
        if len(self._buckets) <= _BUCKETS_KEPT:
            return
        for box, b in list(self._buckets.items()):
            if box not in self._jobs and b.tokens + (now - b.stamp) * b.rate >= b.burst:
                del self._buckets[box]

    async def _attempt(self, client: httpx.AsyncClient, job: _Job) -> None:
        outcome = "unreachable"
        try:
            outcome = await self._post(client, job.box)
        except Exception:  # a bug of ours must not stop the waker; logged, counted, retried
            log.exception("wake-up failed", extra={"pigeon_fields": {}})
        finally:
            self._in_flight -= 1
            job.in_flight = False
            job.attempts += 1
            self._changed.set()
        if outcome == "unreachable" and job.attempts < self.config.push_attempts:
            delay = self.config.push_retry_initial_s * 2 ** (job.attempts - 1)
            job.due = self.clock.monotonic() + delay * random.uniform(0.5, 1.0)
            return
        if outcome == "sent":
            self.m_sent.inc()
        else:
            self.m_failed.inc(1, outcome)
            if outcome == "gone":
                with suppress(StorageError):  # if not now, the next 404 removes it
                    self.store.set_wake(job.box, None)
        event(logging.DEBUG, "push.done", mailbox=box_tag(job.box), outcome=outcome,
              attempts=job.attempts)
        if job.again and outcome == "sent":
            # A deposit came during the POST: one more wake-up, under the rate limit.
            self._jobs[job.box] = _Job(job.box, due=self.clock.monotonic())
        else:
            self._jobs.pop(job.box, None)

    async def _post(self, client: httpx.AsyncClient, box: bytes) -> str:
        """One POST of a wake-up for `box`: "sent", "gone", "status", "address",
        "unregistered" or "unreachable" (the one that is retried)."""
        import httpx

        try:
            endpoint = self.store.wake_of(box)
        except StorageError:
            return "unreachable"
        if endpoint is None:
            return "unregistered"
        try:
            target = parse_push_url(endpoint.url)
        except ValueError:
            return "address"
        self.m_attempts.inc()
        with trio.move_on_after(self.config.push_timeout_s):
            try:
                address = (await self._resolve(target))[0]
            except _Refused:
                return "address"
            try:
                body = encrypt(WAKEUP_PLAINTEXT, endpoint.key, endpoint.auth)
            except ValueError:
                return "address"  # keys that were stored but are not a P-256 point
            request = client.build_request(
                "POST", _at_address(target, address), content=body,
                headers=_headers(target),
                extensions={"sni_hostname": target.host,
                            "timeout": _timeouts(self.config.push_timeout_s)})
            try:
                response = await client.send(request, stream=True)
                status = response.status_code
                await response.aclose()  # the status is all we read
            except httpx.HTTPError:
                return "unreachable"
            if 200 <= status < 300:
                return "sent"
            if status in (404, 410):
                return "gone"
            if status == 429 or status >= 500:
                return "unreachable"
            return "status"
        return "unreachable"


def _headers(target: PushTarget) -> dict[str, str]:
    default_port = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    return {
        "Host": host if target.port == default_port else f"{host}:{target.port}",
        "Content-Encoding": "aes128gcm",
        "Content-Type": "application/octet-stream",
        "TTL": str(PUSH_TTL_S),
        "Urgency": "high",
        "Topic": PUSH_TOPIC,
    }


def _at_address(target: PushTarget, address: str) -> str:
    """The URL with its host replaced by the checked address (the name goes in Host and SNI)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(target.url)
    host = f"[{address}]" if ":" in address else address
    return urlunsplit((parts.scheme, f"{host}:{target.port}", parts.path or "/", parts.query, ""))


def _timeouts(seconds: float) -> dict[str, Any]:
    return {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}


def _short(text: str) -> str:
    return text.encode()[:200].decode(errors="ignore")
