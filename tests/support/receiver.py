"""A real callback receiver for tests: an HTTP server on 127.0.0.1 in a background thread.

It records every request (method, path, headers, body, arrival time, the status it was answered with), answers
from a script (``script([500, 500, 200])``, or ``Reply`` objects for headers, a delay or a body) and then with
the default reply, and checks signatures with the stock ``standardwebhooks`` library, as a real receiver would.

    with CallbackReceiver() as receiver:
        receiver.script([500, 500, 200])
        ...                                   # point a callback at receiver.url
        receiver.wait_for(3, timeout=5)
        assert receiver.delivered_ids() == ["job_1"]
        receiver.verify("whsec_...")

Like a well-behaved receiver it deduplicates on ``webhook-id``: ``delivered_ids()`` lists each id answered with
a 2xx once, and ``duplicate_ids()`` those answered with a 2xx more than once (which a sender should avoid).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook


@dataclass(frozen=True)
class Reply:
    """How to answer one request: status, extra headers (``Retry-After``, ``Location``), body, and a delay first."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the receiver saw it. ``headers`` has lower-case names; ``client_port`` tells connections
    apart (requests on a kept-alive connection share it)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    status: int
    client_port: int = 0

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    @property
    def host(self) -> str | None:
        """The Host header (what the sender thinks it is talking to)."""
        return self.headers.get("host")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: many senders connect at once in concurrency tests
    block_on_close = False
    receiver: CallbackReceiver


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # a reply with a body would otherwise wait ~40 ms for the sender's delayed ACK
    server: _Server

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        receiver = self.server.receiver
        reply = receiver._next_reply()
        receiver._record(
            ReceivedRequest(
                method=self.command,
                path=self.path,
                headers={name.lower(): value for name, value in self.headers.items()},
                body=body,
                received_at=time.time(),
                status=reply.status,
                client_port=self.client_address[1],
            )
        )
        if reply.delay_s and receiver._stopping.wait(reply.delay_s):
            return
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True  # the sender gave up (timeout) and closed its end

    do_POST = do_PUT = do_GET = do_DELETE = do_PATCH = _handle

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``receiver.requests`` instead of stderr."""


class CallbackReceiver:
    """A threaded HTTP(S) server on 127.0.0.1 that records requests and answers from a script. Use ``with``."""

    def __init__(
        self,
        *,
        default: Reply | int = 200,
        path: str = "/callback",
        tls_context: ssl.SSLContext | None = None,
        port: int = 0,
    ):
        self._port = port
        self._default = default if isinstance(default, Reply) else Reply(default)
        self._path = path
        self._tls_context = tls_context
        self._lock = threading.Condition()
        self._script: deque[Reply] = deque()
        self._requests: list[ReceivedRequest] = []
        self._server_names: list[str | None] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CallbackReceiver:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind ``port`` (a free one by default) on 127.0.0.1 and serve in a daemon thread."""
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.receiver = self
        if self._tls_context is not None:
            self._tls_context.sni_callback = self._note_server_name
            server.socket = self._tls_context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="callback-receiver", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving; requests still sleeping on a delay are abandoned."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        assert self._server is not None, "start the receiver first"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        scheme = "https" if self._tls_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The callback URL to give the sender."""
        return self.base_url + self._path

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def server_names(self) -> list[str | None]:
        """TLS SNI names the clients sent, one per handshake (TLS receivers only)."""
        with self._lock:
            return list(self._server_names)

    def script(self, replies: Iterable[int | Reply]) -> None:
        """Answer the next requests with these replies, in order, then with the default reply again."""
        with self._lock:
            self._script.extend(reply if isinstance(reply, Reply) else Reply(reply) for reply in replies)

    def set_default(self, reply: Reply | int) -> None:
        """The reply once the script is used up."""
        with self._lock:
            self._default = reply if isinstance(reply, Reply) else Reply(reply)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedRequest]:
        """Block until at least ``count`` requests have arrived; return them. TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"got {len(self._requests)} of {count} requests within {timeout} s")
                self._lock.wait(remaining)
            return list(self._requests)

    def delivered_ids(self) -> list[str]:
        """Each ``webhook-id`` answered with a 2xx, once, in order of first delivery."""
        ids = [r.webhook_id for r in self.requests if 200 <= r.status < 300 and r.webhook_id]
        return list(dict.fromkeys(ids))

    def duplicate_ids(self) -> list[str]:
        """``webhook-id``s answered with a 2xx more than once."""
        ids = [r.webhook_id for r in self.requests if 200 <= r.status < 300 and r.webhook_id]
        return [webhook_id for webhook_id in dict.fromkeys(ids) if ids.count(webhook_id) > 1]

    def verify(self, secret: str) -> list[Any]:
        """Verify every recorded request with ``standardwebhooks.Webhook(secret).verify``; return the parsed bodies.

        Raises ``standardwebhooks.WebhookVerificationError`` on the first request that does not verify.
        """
        webhook = Webhook(secret)
        return [webhook.verify(request.body, request.headers) for request in self.requests]

    def clear(self) -> None:
        """Forget recorded requests and any script left."""
        with self._lock:
            self._requests.clear()
            self._script.clear()

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.popleft() if self._script else self._default

    def _record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._lock.notify_all()

    def _note_server_name(self, sock: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        with self._lock:
            self._server_names.append(server_name)
