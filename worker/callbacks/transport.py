"""The callback transport: urllib3 connection pools whose sockets go only to the addresses the SSRF guard checked.

Checking a host and then letting an HTTP client resolve it again leaves a window for DNS rebinding: the second
answer can point into the cluster. Here the check's ``Destination`` is what ``PinnedTransport.post`` sends to: the
urllib3 connection opens its socket to one of ``Destination.addresses`` (in order, the first that connects)
instead of resolving the host. Everything else stays on the host name: the Host header, TLS SNI and certificate
verification (the certifi CA bundle, as requests used with ``trust_env = False``: no ``REQUESTS_CA_BUNDLE``,
``SSL_CERT_FILE`` or system store). Connection pools are keyed by the pinned addresses too, so a kept-alive
connection to one address never serves a request pinned to another.

The transport is urllib3 without requests (no Request/PreparedRequest building, hooks or cookie handling): one
``PinnedTransport`` is shared by every thread or greenlet of a process; its pools are thread-safe and never
block (up to ``maxsize`` idle connections are kept per pool). It never uses a proxy (urllib3 reads no proxy
environment variables and a ``PoolManager`` has no proxy), never retries and never follows redirects. A request
that does not carry a checked ``Destination`` for its URL, or that reaches the pools without pinned addresses, is
refused with ``UnpinnedRequest`` before a pool or socket exists for it.
"""

from __future__ import annotations

import functools
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import certifi
from urllib3 import HTTPConnectionPool, HTTPResponse, HTTPSConnectionPool, PoolManager, Timeout
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as connection_util
from urllib3.util.ssl_ import create_urllib3_context

from difyq.worker.callbacks.ssrf import Destination

_PINNED_KEY = "pinned_addresses"
DEFAULT_NUM_POOLS = 128
DEFAULT_MAXSIZE = 1024


class UnpinnedRequest(Exception):
    """A request without a matching checked Destination (or not through a PinnedTransport); it is never sent.

    This is a programming error, not a delivery failure: ``deliver`` lets it propagate.
    """


class _PinnedConnectionMixin:
    """Open the socket to the pinned addresses, in order, instead of resolving ``self.host``."""

    host: str
    port: int
    timeout: Any
    source_address: tuple[str, int] | None
    socket_options: Any

    def __init__(self, *args: Any, pinned_addresses: tuple[str, ...] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pinned_addresses = pinned_addresses

    def _new_conn(self) -> socket.socket:
        if not self.pinned_addresses:
            raise NewConnectionError(self, "refusing to connect: no checked address was pinned")
        last_error: OSError | None = None
        for address in self.pinned_addresses:
            try:
                return connection_util.create_connection(
                    (address, self.port),
                    self.timeout,
                    source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except OSError as exc:
                last_error = exc
        if isinstance(last_error, TimeoutError):
            raise ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            ) from last_error
        raise NewConnectionError(self, f"Failed to establish a new connection: {last_error}") from last_error


class PinnedHTTPConnection(_PinnedConnectionMixin, HTTPConnection):
    """An HTTP connection whose socket goes to a pinned address."""


class PinnedHTTPSConnection(_PinnedConnectionMixin, HTTPSConnection):
    """An HTTPS connection whose socket goes to a pinned address; SNI and certificate checks use the host name."""


class _PinnedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = PinnedHTTPConnection


class _PinnedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = PinnedHTTPSConnection


def _key_with_addresses(
    base_key: Callable[[dict[str, Any]], Any], request_context: dict[str, Any]
) -> tuple[Any, tuple[str, ...]]:
    """urllib3's own pool key for the context, paired with the pinned addresses (which it does not know).

    A context without pinned addresses (the pool manager used directly, as a plain ``PoolManager``) is refused
    here, before a pool or a socket exists for it.
    """
    context = dict(request_context)
    addresses = tuple(context.pop(_PINNED_KEY, ()))
    if not addresses:
        raise UnpinnedRequest("request has no checked addresses to connect to; not sent")
    return base_key(context), addresses


class _PinnedPoolManager(PoolManager):
    """A PoolManager whose pools make pinned connections and are keyed by the pinned addresses as well."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pool_classes_by_scheme = {"http": _PinnedHTTPConnectionPool, "https": _PinnedHTTPSConnectionPool}
        self.key_fn_by_scheme = {
            scheme: functools.partial(_key_with_addresses, self.key_fn_by_scheme[scheme])
            for scheme in ("http", "https")
        }


def tls_context(ca_certs: str | None = None) -> ssl.SSLContext:
    """The client TLS context for callbacks: urllib3's defaults (TLS 1.2 or later, certificate and host name
    required) trusting ``ca_certs`` (a PEM bundle; the certifi bundle by default), loaded once instead of on
    every new connection."""
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    context.load_verify_locations(cafile=ca_certs or certifi.where())
    return context


class PinnedTransport:
    """POSTs callbacks to checked destinations only; share one per process (thread- and greenlet-safe).

    ``ca_certs`` replaces the certifi bundle (tests with a self-signed receiver). ``num_pools`` destinations
    (scheme, host, port and pinned addresses) keep their pools, least recently used dropped first; each keeps up
    to ``maxsize`` idle connections and opens more when all are busy (it never blocks).
    """

    def __init__(
        self, *, ca_certs: str | None = None, num_pools: int = DEFAULT_NUM_POOLS, maxsize: int = DEFAULT_MAXSIZE
    ):
        self._ca_certs = ca_certs
        self._tls_context: ssl.SSLContext | None = None
        self._tls_lock = threading.Lock()
        self.pool_manager = _PinnedPoolManager(num_pools=num_pools, maxsize=maxsize, block=False)

    def _tls(self) -> ssl.SSLContext:
        """The TLS context, made on first use (loading the CA bundle costs tens of ms of CPU; plain-HTTP workers
        and tests never pay it, and under gevent it is made after monkey-patching)."""
        if self._tls_context is None:
            with self._tls_lock:
                if self._tls_context is None:
                    self._tls_context = tls_context(self._ca_certs)
        return self._tls_context

    def post(self, destination: Destination, body: bytes, headers: Mapping[str, str], timeout: float) -> HTTPResponse:
        """POST ``body`` with ``headers`` (as given) to the checked ``destination``; the response's body is unread.

        The socket goes to ``destination.addresses``; ``timeout`` applies to connecting and to each read. No retry,
        no redirect. The caller reads the body or closes the response, then calls ``release_conn()``. urllib3
        errors (``urllib3.exceptions.HTTPError``) propagate; ``UnpinnedRequest`` when ``destination`` is not a
        checked Destination with addresses for its own URL.
        """
        if not isinstance(destination, Destination) or not destination.addresses:
            raise UnpinnedRequest("request has no checked destination; not sent")
        parts = urlsplit(destination.url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not destination.serves(parts.scheme, parts.hostname, port):
            raise UnpinnedRequest("the destination was checked for another URL; not sent")
        pool_kwargs: dict[str, Any] = {_PINNED_KEY: destination.addresses}
        if destination.scheme == "https":
            pool_kwargs["ssl_context"] = self._tls()
        pool = self.pool_manager.connection_from_host(
            destination.host, destination.port, destination.scheme, pool_kwargs=pool_kwargs
        )
        target = f"{parts.path or '/'}?{parts.query}" if parts.query else parts.path or "/"
        return pool.urlopen(  # type: ignore[return-value]
            "POST",
            target,
            body=body,
            headers=dict(headers),
            retries=False,
            redirect=False,
            assert_same_host=False,
            timeout=Timeout(connect=timeout, read=timeout),
            preload_content=False,
            decode_content=False,
        )

    def close(self) -> None:
        """Close every pooled connection (connections in use close when they are released)."""
        self.pool_manager.clear()

    def __enter__(self) -> PinnedTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def post_to_destination(
    transport: PinnedTransport, destination: Destination, body: bytes, headers: Mapping[str, str], timeout: float
) -> HTTPResponse:
    """``transport.post(...)``, refusing (``UnpinnedRequest``) anything that is not a PinnedTransport, so an
    injected plain client can never send a callback to a freshly resolved address."""
    if not isinstance(transport, PinnedTransport):
        raise UnpinnedRequest("callbacks are sent only through a PinnedTransport")
    return transport.post(destination, body, headers, timeout)
