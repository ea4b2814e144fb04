"""Prometheus metrics: counters and gauges, the text exposition format (version 0.0.4), and a
minimal HTTP server over trio that answers `GET /metrics`.

No dependency: the format is a few lines per metric,

    # HELP pigeon_relay_deposits_total Deposits stored.
    # TYPE pigeon_relay_deposits_total counter
    pigeon_relay_deposits_total 42
    pigeon_relay_rejects_total{reason="mailbox-full"} 3

and the server reads one bounded request per connection, answers it and closes (Connection:
close), so a scraper cannot hold more than a bounded number of connections open or make the relay
buffer more than MAX_REQUEST_BYTES.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Final

import trio

__all__ = ["Counter", "Gauge", "Registry", "serve_metrics"]

log = logging.getLogger("pigeon.relay.metrics")

#: Largest HTTP request head read (request line and headers); larger requests get 431.
MAX_REQUEST_BYTES: Final = 8 * 1024
#: Seconds a client has to send its request and read the answer.
REQUEST_TIMEOUT_S: Final = 5.0
#: Scrapes served at once; more connections wait in the listen backlog.
MAX_CONNECTIONS: Final = 16

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    """A monotonically increasing count, optionally split by one label."""

    def __init__(self, name: str, help_text: str, *, label: str | None = None,
                 label_values: Iterable[str] = ()) -> None:
        self.name, self.help, self.label = name, help_text, label
        self._values: dict[str, float] = {v: 0.0 for v in label_values}
        if label is None:
            self._values[""] = 0.0

    def inc(self, amount: float = 1, label_value: str = "") -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._values[label_value] = self._values.get(label_value, 0.0) + amount

    def value(self, label_value: str = "") -> float:
        return self._values.get(label_value, 0.0)

    def values(self) -> dict[str, float]:
        return dict(self._values)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self._values.items()):
            labels = f'{{{self.label}="{_escape(key)}"}}' if self.label else ""
            lines.append(f"{self.name}{labels} {_format_value(value)}")
        return lines


class Gauge:
    """A value read when scraped (from the function given)."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name, self.help, self._read = name, help_text, read

    def value(self) -> float:
        return float(self._read())

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge",
                f"{self.name} {_format_value(self.value())}"]


class Registry:
    def __init__(self) -> None:
        self._metrics: list[Counter | Gauge] = []

    def counter(self, name: str, help_text: str, **kwargs: object) -> Counter:
        metric = Counter(name, help_text, **kwargs)  # type: ignore[arg-type]
        self._metrics.append(metric)
        return metric

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> Gauge:
        metric = Gauge(name, help_text, read)
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


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
                    body = registry.render().encode()
                    response = _response("200 OK", body, CONTENT_TYPE)
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
                        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """Serve `GET /metrics` on host:port until cancelled. `task_status.started` gets the bound
    (host, port), so port 0 picks a free one."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, _handler(registry, limiter), listeners)
        task_status.started((bound[0], bound[1]))
