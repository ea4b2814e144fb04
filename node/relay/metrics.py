"""Prometheus metrics of a relay, kept and written out by prometheus_client, and a minimal
HTTP server over trio that answers `GET /metrics`.

Each relay has a CollectorRegistry of its own (not prometheus_client's process-wide default),
so several relays in one process (tests, embedders) keep their figures apart. The exposition
format follows the scraper's Accept header (prometheus_client's `choose_encoder`): the text
format 0.0.4 by default, OpenMetrics when asked for. Besides each counter's `NAME_total`,
prometheus_client writes a `NAME_created` series (when the counter started), as it does for
every counter.

The server reads one bounded request per connection, answers it and closes (Connection:
close), so a scraper cannot hold more than a bounded number of connections open or make the relay
buffer more than MAX_REQUEST_BYTES. It runs on the trio thread, not on a thread of
prometheus_client's own: the gauges read the relay's state, which only the trio thread touches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

import prometheus_client
import trio
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    # trio-typing's stubs (a libp2p dependency) hide trio's own `trio.TaskStatus`: see node/rpc.py.
    from trio_typing import TaskStatus


__all__ = ["Counter", "Registry", "serve_metrics"]

log = logging.getLogger("pigeon.relay.metrics")

#: Largest HTTP request head read (request line and headers); larger requests get 431.
MAX_REQUEST_BYTES: Final = 8 * 1024
#: Seconds a client has to send its request and read the answer.
REQUEST_TIMEOUT_S: Final = 5.0
#: Scrapes served at once; more connections wait in the listen backlog.
MAX_CONNECTIONS: Final = 16


class Counter:
    """A count that only goes up, optionally split by one label (a prometheus_client Counter
    whose known label values are shown from the start, at 0)."""

    def __init__(self, metric: prometheus_client.Counter, label: str | None) -> None:
        self._metric, self.label = metric, label

    def inc(self, amount: float = 1, label_value: str = "") -> None:
        """Add `amount` (ValueError if negative), under `label_value` if split by a label."""
        (self._metric.labels(label_value) if self.label else self._metric).inc(amount)

    def value(self, label_value: str = "") -> float:
        """The count (under `label_value`); 0 for a label value never counted."""
        return self.values().get(label_value, 0.0)

    def values(self) -> dict[str, float]:
        """The count under each label value ("" for a counter without a label)."""
        return {sample.labels.get(self.label, "") if self.label else "": sample.value
                for family in self._metric.collect() for sample in family.samples
                if sample.name == family.name + "_total"}


class Registry:
    """The metrics of one relay: counters it increments and gauges read when scraped."""

    def __init__(self) -> None:
        self.collectors = prometheus_client.CollectorRegistry()

    def counter(self, name: str, help_text: str, *, label: str | None = None,
                label_values: Iterable[str] = ()) -> Counter:
        """A counter (`name` ends in _total), split by `label` if given."""
        metric = prometheus_client.Counter(name, help_text, labelnames=(label,) if label else (),
                                           registry=self.collectors)
        for value in label_values:
            metric.labels(value)
        return Counter(metric, label)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge whose value is `read()` at each scrape."""
        prometheus_client.Gauge(name, help_text, registry=self.collectors).set_function(read)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """Every metric in the format the Accept header `accept` asks for, and its content
        type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.collectors), content_type


# --- HTTP ----------------------------------------------------------------------------------------


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode("ascii") + body


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    buffer = b""
    while b"\r\n\r\n" not in buffer and b"\n\n" not in buffer:
        if len(buffer) > MAX_REQUEST_BYTES:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return b""
        buffer += chunk
    return buffer


def _header(head: bytes, name: bytes) -> str:
    """The value of header `name` (lower case) in a request head; "" if absent."""
    for line in head.split(b"\n")[1:]:
        if not line.strip():
            break  # end of the head
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""


def _handler(registry: Registry, limiter: trio.CapacityLimiter
             ) -> Callable[[trio.SocketStream], object]:
    async def handle(stream: trio.SocketStream) -> None:
        async with limiter:
            try:
                with trio.move_on_after(REQUEST_TIMEOUT_S):
                    head = await _read_head(stream)
                    if head is None:
                        await stream.send_all(_response("431 Request Header Fields Too Large",
                                                        b"request too large\n"))
                        return
                    if not head:
                        return
                    request_line = head.split(b"\n", 1)[0].decode("latin-1").strip()
                    parts = request_line.split()
                    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                        await stream.send_all(_response("400 Bad Request", b"bad request\n"))
                        return
                    method, target = parts[0], parts[1]
                    if target.split("?", 1)[0] != "/metrics":
                        await stream.send_all(_response("404 Not Found", b"try /metrics\n"))
                        return
                    if method not in ("GET", "HEAD"):
                        await stream.send_all(_response("405 Method Not Allowed", b"GET only\n",
                                                        extra="Allow: GET, HEAD\r\n"))
                        return
                    body, content_type = registry.exposition(_header(head, b"accept"))
                    response = _response("200 OK", body, content_type)
                    if method == "HEAD":
                        response = response[: len(response) - len(body)]
                    await stream.send_all(response)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                with trio.move_on_after(1) as cleanup:
                    cleanup.shield = True
                    await stream.aclose()
    return handle


async def serve_metrics(registry: Registry, host: str, port: int, *,
                        task_status: TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """Serve `GET /metrics` on host:port until cancelled. `task_status.started` gets the bound
    (host, port), so port 0 picks a free one."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, _handler(registry, limiter), listeners)
        task_status.started((bound[0], bound[1]))
