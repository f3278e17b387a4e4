"""The callback transport: urllib3 connection pools made for the addresses the SSRF guard checked.

Checking a host and then letting an HTTP client resolve it again leaves a window for DNS rebinding: the second
answer can point into the cluster. Here the check's ``Destination`` is what ``PinnedTransport.post`` sends to:
each pool is made for one of ``Destination.addresses`` (tried in order, the first that connects), so its sockets
go to that address and the host name is never resolved again. Everything else stays on the host name, through
urllib3's public options: the Host header, and for HTTPS the pool's ``server_hostname`` (TLS SNI and the
certificate's host name check) with the certifi CA bundle (as requests used with ``trust_env = False``: no
``REQUESTS_CA_BUNDLE``, ``SSL_CERT_FILE`` or system store). A pool belongs to one address and one host name, so a
kept-alive connection to one address never serves a request pinned to another.

The transport is urllib3 without requests (no Request/PreparedRequest building, hooks or cookie handling): one
``PinnedTransport`` is shared by every thread or greenlet of a process; its pools are thread-safe and never
block (up to ``maxsize`` idle connections are kept per pool). It never uses a proxy (urllib3 reads no proxy
environment variables and a ``PoolManager`` has no proxy), never retries and never follows redirects. A request
that does not carry a checked ``Destination`` for its URL is refused with ``UnpinnedRequest`` before a pool or
socket exists for it.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import certifi
from urllib3 import HTTPResponse, PoolManager, Timeout
from urllib3.exceptions import ConnectTimeoutError
from urllib3.util.ssl_ import create_urllib3_context

from difyq.worker.callbacks.ssrf import DEFAULT_PORTS, Destination

DEFAULT_NUM_POOLS = 128
DEFAULT_MAXSIZE = 1024


class UnpinnedRequest(Exception):
    """A request without a matching checked Destination (or not through a PinnedTransport); it is never sent.

    This is a programming error, not a delivery failure: ``deliver`` lets it propagate.
    """


def host_header(destination: Destination) -> str:
    """The Host header of a request to ``destination``: its host name (IPv6 in brackets), with the port unless it
    is the scheme's default."""
    host = f"[{destination.host}]" if ":" in destination.host else destination.host
    default = DEFAULT_PORTS.get(destination.scheme)
    return host if destination.port == default else f"{host}:{destination.port}"


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
        self._pools = PoolManager(num_pools=num_pools, maxsize=maxsize, block=False)

    def _tls(self) -> ssl.SSLContext:
        """The TLS context, made on first use (loading the CA bundle costs tens of ms of CPU; plain-HTTP workers
        and tests never pay it, and under gevent it is made after monkey-patching)."""
        if self._tls_context is None:
            with self._tls_lock:
                if self._tls_context is None:
                    self._tls_context = tls_context(self._ca_certs)
        return self._tls_context

    def get(self, destination: Destination, headers: Mapping[str, str], timeout: float) -> HTTPResponse:
        """GET the checked ``destination`` (a file to fetch), as ``post`` sends: pinned, no retry, no redirect (a
        3xx is the caller's to check and follow)."""
        return self._request("GET", destination, None, headers, timeout)

    def post(self, destination: Destination, body: bytes, headers: Mapping[str, str], timeout: float) -> HTTPResponse:
        """POST ``body`` with ``headers`` (as given, plus the Host header) to the checked ``destination``; the
        response's body is unread.

        The socket goes to ``destination.addresses``, the first that accepts a connection; ``timeout`` applies to
        connecting and to each read. No retry, no redirect. The caller reads the body or closes the response, then
        calls ``release_conn()``. urllib3 errors (``urllib3.exceptions.HTTPError``) propagate (for a connection
        that no address accepted, the last address's); ``UnpinnedRequest`` when ``destination`` is not a checked
        Destination with addresses for its own URL.
        """
        return self._request("POST", destination, body, headers, timeout)

    def _request(self, method: str, destination: Destination, body: bytes | None, headers: Mapping[str, str],
                 timeout: float) -> HTTPResponse:
        if not isinstance(destination, Destination) or not destination.addresses:
            raise UnpinnedRequest("request has no checked destination; not sent")
        parts = urlsplit(destination.url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not destination.serves(parts.scheme, parts.hostname, port):
            raise UnpinnedRequest("the destination was checked for another URL; not sent")
        target = f"{parts.path or '/'}?{parts.query}" if parts.query else parts.path or "/"
        request_headers = {**headers, "Host": host_header(destination)}
        *fallbacks, last = destination.addresses
        for address in fallbacks:
            try:
                return self._send(method, destination, address, target, body, request_headers, timeout)
            except ConnectTimeoutError:  # not connected (refused or timed out): nothing was sent, try the next
                continue
        return self._send(method, destination, last, target, body, request_headers, timeout)

    def _send(self, method: str, destination: Destination, address: str, target: str, body: bytes | None,
              headers: dict[str, str], timeout: float) -> HTTPResponse:
        """The request over the pool made for ``address`` (and, for HTTPS, the destination's host name)."""
        pool_kwargs: dict[str, Any] = {}
        if destination.scheme == "https":
            pool_kwargs = {"ssl_context": self._tls(), "server_hostname": destination.host}
        pool = self._pools.connection_from_host(address, destination.port, destination.scheme, pool_kwargs=pool_kwargs)
        return pool.urlopen(  # type: ignore[return-value]
            method,
            target,
            body=body,
            headers=headers,
            retries=False,
            redirect=False,
            assert_same_host=False,
            timeout=Timeout(connect=timeout, read=timeout),
            preload_content=False,
            decode_content=False,
        )

    def close(self) -> None:
        """Close every pooled connection (connections in use close when they are released)."""
        self._pools.clear()

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
