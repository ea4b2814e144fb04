"""A stand-in push distributor: a small local HTTP server that takes the wake-ups relays POST
(PROTOCOL.md section 29) and records them, in place of a real UnifiedPush distributor.

Run it next to a device and a relay on one machine:

    python examples/push_distributor.py --port 8765 --data-dir ~/.pigeon
    pigeon push register http://127.0.0.1:8765/up/me      # the relay must allow 127.0.0.1/32
                                                          # (push_allow in its config)

It prints one JSON line per POST (path, size, and with --data-dir the decrypted payload, which
is always "fetch"); a real distributor would then start `pigeon fetch`. Tests use `Distributor`
from here (tests/pushtools.py). Standard library only, plus Pigeon for --data-dir.
"""

from __future__ import annotations

import argparse
import json
import queue
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

#: Largest body taken: a wake-up is 4,182 bytes at most (RFC 8291, one record of 4,096).
MAX_BODY_BYTES = 8192


@dataclass(frozen=True)
class Post:
    """One POST received: when (time.monotonic()), where, its headers and body."""

    at: float
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Distributor:
    """A threaded HTTP server on 127.0.0.1 that records POSTs. `statuses` gives the status to
    answer each POST in turn (the last one repeats): e.g. [503, 201] fails once, then accepts."""

    statuses: list[int] = field(default_factory=lambda: [201])
    posts: list[Post] = field(default_factory=list)
    _queue: queue.Queue[Post] = field(default_factory=queue.Queue)
    _server: ThreadingHTTPServer | None = None
    _tls: bool = False

    @property
    def port(self) -> int:
        assert self._server is not None, "use `with distributor.running():`"
        return int(self._server.server_address[1])

    def url(self, path: str = "/up/device") -> str:
        """The push URL of this distributor for `path` (by name over HTTPS, as a real
        distributor's would be)."""
        if self._tls:
            return f"https://localhost:{self.port}{path}"
        return f"http://127.0.0.1:{self.port}{path}"

    @contextmanager
    def running(self, port: int = 0, tls: ssl.SSLContext | None = None) -> Iterator[Distributor]:
        """Serve on 127.0.0.1:`port` (0: any free port) until the block ends; over HTTPS with
        `tls` (a server context holding the certificate for "localhost")."""
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self._record))
        self._server.daemon_threads = True
        self._tls = tls is not None
        if tls is not None:  # a client that refuses the certificate makes accept() fail: no POST
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join(timeout=10)

    def _record(self, post: Post) -> int:
        self.posts.append(post)
        self._queue.put(post)
        return self.statuses[min(len(self.posts), len(self.statuses)) - 1]

    def wait_post(self, timeout: float) -> Post:
        """The next POST not yet waited for; queue.Empty if none comes within `timeout` s."""
        return self._queue.get(timeout=timeout)


def _handler(record: Callable[[Post], int]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # the standard library names the handler so
            at = time.monotonic()
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.send_error(413)
                return
            body = self.rfile.read(length)
            status = record(Post(at, self.path, dict(self.headers.items()), body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass  # the JSON lines of main() are the output

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="decrypt wake-ups with this device's push keys")
    parser.add_argument("--count", type=int, default=0, help="exit after this many (0: never)")
    args = parser.parse_args()
    distributor = Distributor()
    with distributor.running(args.port):
        print(json.dumps({"listening": distributor.url("/")}), flush=True)
        seen = 0
        while not args.count or seen < args.count:
            post = distributor.wait_post(timeout=3600 * 24)
            seen += 1
            line: dict[str, object] = {"path": post.path, "bytes": len(post.body),
                                       "encoding": post.headers.get("Content-Encoding")}
            if args.data_dir is not None:
                from node.device.push import decrypt_wakeup
                from node.errors import NodeError

                try:
                    line["payload"] = decrypt_wakeup(args.data_dir, post.body).decode()
                except NodeError as exc:
                    line["error"] = str(exc)
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
