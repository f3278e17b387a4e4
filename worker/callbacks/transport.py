"""A requests transport that connects only to the addresses the SSRF guard checked.

Checking a host and then letting requests resolve it again leaves a window for DNS rebinding: the second answer
can point into the cluster. Here the check's ``Destination`` travels with the request to the adapter, and the
urllib3 connection opens its socket to one of ``Destination.addresses`` instead of resolving the host. Everything
else stays on the host name: the Host header, TLS SNI and certificate verification. Connection pools are keyed
by the pinned addresses too, so a kept-alive connection to one address never serves a request pinned to another.

The adapter refuses requests that carry no ``Destination`` (or one checked for another URL), never uses a proxy
(a proxy would resolve the name itself) and never retries or follows redirects.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable, Mapping
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as connection_util

from worker.callbacks.ssrf import Destination

_DESTINATION_ATTRIBUTE = "difyq_destination"
_PINNED_KEY = "pinned_addresses"


class UnpinnedRequest(requests.RequestException):
    """A request reached the pinned adapter without a matching checked Destination; it is never sent."""


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
    """urllib3's own pool key for the context, paired with the pinned addresses (which it does not know)."""
    context = dict(request_context)
    addresses = context.pop(_PINNED_KEY, ())
    return base_key(context), tuple(addresses)


class _PinnedPoolManager(PoolManager):
    """A PoolManager whose pools make pinned connections and are keyed by the pinned addresses as well."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pool_classes_by_scheme = {"http": _PinnedHTTPConnectionPool, "https": _PinnedHTTPSConnectionPool}
        self.key_fn_by_scheme = {
            scheme: functools.partial(_key_with_addresses, self.key_fn_by_scheme[scheme])
            for scheme in ("http", "https")
        }


class PinnedAddressAdapter(HTTPAdapter):
    """A transport adapter that sends a request only to the addresses of the Destination attached to it."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("max_retries", 0)
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        self._pool_connections = connections
        self._pool_maxsize = maxsize
        self._pool_block = block
        self.poolmanager = _PinnedPoolManager(num_pools=connections, maxsize=maxsize, block=block, **pool_kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        raise UnpinnedRequest("callbacks are never sent through a proxy")

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        destination = getattr(request, _DESTINATION_ATTRIBUTE, None)
        if not isinstance(destination, Destination) or not destination.serves(
            host_params["scheme"], host_params["host"], host_params["port"]
        ):
            raise UnpinnedRequest("request has no checked destination for its URL; not sent")
        pool_kwargs[_PINNED_KEY] = destination.addresses
        return host_params, pool_kwargs

    def send(  # type: ignore[override]
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """Send as HTTPAdapter does, but never through a proxy, whatever the session or environment says."""
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=None)


def pinned_session() -> requests.Session:
    """A Session for callbacks: the pinned adapter on http and https, no environment proxies, netrc or CA overrides.

    Reuse one per worker thread to keep connections alive; pass it to ``deliver``.
    """
    session = requests.Session()
    session.trust_env = False
    adapter = PinnedAddressAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def post_to_destination(
    session: requests.Session,
    destination: Destination,
    body: bytes,
    headers: Mapping[str, str],
    timeout: float,
) -> requests.Response:
    """POST ``body`` to the checked ``destination`` and return the response with its body unread (stream mode).

    Redirects are not followed. The session must route ``destination.url`` to a PinnedAddressAdapter (see
    ``pinned_session``); otherwise the request is refused rather than sent to a freshly resolved address.
    """
    if not isinstance(session.get_adapter(destination.url), PinnedAddressAdapter):
        raise UnpinnedRequest("the session does not route callbacks through PinnedAddressAdapter")
    request = requests.Request("POST", destination.url, data=body, headers=dict(headers))
    prepared = session.prepare_request(request)
    setattr(prepared, _DESTINATION_ATTRIBUTE, destination)
    return session.send(prepared, allow_redirects=False, stream=True, timeout=timeout)
