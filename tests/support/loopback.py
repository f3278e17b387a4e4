"""Real HTTP servers on 127.0.0.1 for client tests, so the client's whole HTTP stack runs unpatched.

* `ReplayServer` answers every request with a capture: its status line and headers verbatim, its body cut into
  odd-sized pieces, each written and flushed on its own (as real chunked transfer coding when the capture says
  `Transfer-Encoding: chunked`, raw bytes under its `Content-Length` otherwise). It records what it was sent.
* `ScriptedServer` hands each accepted socket to a script, for peers that misbehave (go silent, dribble, cut
  off).
* `closed_port` and `unanswered_connect_port` give addresses that refuse, or never complete, a connection.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.captures import Capture

ODD_PIECE_SIZES = (1, 3, 7, 13, 29, 61, 127, 251, 509)


@dataclass(frozen=True)
class RecordedRequest:
    """A request the replay server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def split_body(body: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    """`body` in consecutive pieces whose lengths cycle through `sizes`."""
    offset = 0
    for size in itertools.cycle(sizes):
        if offset >= len(body):
            return
        yield body[offset : offset + size]
        offset += size


class _ReplayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    server: _ReplayHTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests assert on `ReplayServer.requests` instead."""

    def _replay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = RecordedRequest(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
        self.server.recorded.append(request)
        capture = self.server.respond(request)
        head = capture.status_line + "\r\n" + "".join(f"{key}: {value}\r\n" for key, value in capture.headers)
        self.wfile.write((head + "\r\n").encode("iso-8859-1"))
        for piece in split_body(capture.body, self.server.piece_sizes):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if capture.is_chunked else piece)
        if capture.is_chunked:
            self.wfile.write(b"0\r\n\r\n")
        elif capture.header("Content-Length") is None:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _replay


class _ReplayHTTPServer(ThreadingHTTPServer):
    def __init__(self, respond: Callable[[RecordedRequest], Capture], piece_sizes: tuple[int, ...]) -> None:
        super().__init__(("127.0.0.1", 0), _ReplayHandler)
        self.respond = respond
        self.piece_sizes = piece_sizes
        self.recorded: list[RecordedRequest] = []


class ReplayServer:
    """Serves `capture` (or whatever `capture(request)` returns) to every request, on a thread of its own."""

    def __init__(
        self,
        capture: Capture | Callable[[RecordedRequest], Capture],
        *,
        piece_sizes: tuple[int, ...] = ODD_PIECE_SIZES,
    ) -> None:
        respond = capture if callable(capture) else (lambda _request: capture)
        self._server = _ReplayHTTPServer(respond, piece_sizes)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="replay-server", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._server.recorded

    def __enter__(self) -> ReplayServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


Script = Callable[[socket.socket, threading.Event], None]


class ScriptedServer:
    """Runs `script(connection, stopping)` for each accepted connection; `stopping` is set when the server
    closes, so a script that stalls should wait on it rather than sleep."""

    def __init__(self, script: Script) -> None:
        self._script = script
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="scripted-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> ScriptedServer:
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._acceptor.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            self._script(connection, self._stopping)


def read_request(connection: socket.socket) -> bytes:
    """Read one HTTP request (head and Content-Length body) off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        received = connection.recv(65536)
        if not received:
            return data
        data += received
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        received = connection.recv(65536)
        if not received:
            break
        body += received
    return head + b"\r\n\r\n" + body


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released), so a connection to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def unanswered_connect_port() -> Iterator[int | None]:
    """A loopback port whose accept queue is full, so a new connection's SYN goes unanswered and the connect
    times out (Linux drops it unless net.ipv4.tcp_abort_on_overflow is set). Yields None where the kernel
    answers anyway."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers: list[socket.socket] = []
        try:
            for _ in range(8):
                filler = socket.socket()
                fillers.append(filler)
                filler.settimeout(0.2)
                try:
                    filler.connect(("127.0.0.1", port))
                except TimeoutError:
                    yield port
                    return
            yield None
        finally:
            for filler in fillers:
                filler.close()
