"""The SSRF guard: may a callback go to this URL, and to which addresses exactly?

A callback URL is supplied by API clients and hook payloads, so without a guard it is a way to make the worker
POST into the cluster (Redis, the metadata service at 169.254.169.254, admin ports on loopback). The host is
resolved once, here, and *every* address it resolves to must be public; the resulting ``Destination`` carries
those checked addresses and the transport (``difyq.worker.callbacks.transport``) connects to them and nowhere else, so a
DNS answer that changes between check and connect (DNS rebinding) cannot redirect the request.

Addresses hidden inside IPv6 forms (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``)
are judged by the IPv4 address they carry. Odd IPv4 spellings (``0``, ``2130706433``, ``0177.0.0.1``) need no
special case: they are judged by what ``getaddrinfo`` turns them into, which is also what a connect would use.

``callbacks.allow_hosts`` is the escape hatch for receivers on private networks: exact host names,
``*.example.com`` (any subdomain, not the apex), IP addresses and CIDRs.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}

_IPV4_BLOCKED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private address (RFC 1918)"),
    ("100.64.0.0/10", "a carrier-grade NAT address (RFC 6598)"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address (incl. cloud metadata)"),
    ("172.16.0.0/12", "a private address (RFC 1918)"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a reserved (6to4 relay) address"),
    ("192.168.0.0/16", "a private address (RFC 1918)"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved or broadcast address"),
)
_IPV6_BLOCKED: tuple[tuple[str, str], ...] = (
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("::/96", "an IPv4-compatible address (deprecated)"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("2001::/23", "an IETF protocol assignment address (incl. Teredo and benchmarking)"),
    ("2001:db8::/32", "a documentation address"),
    ("3fff::/20", "a documentation address"),
    ("5f00::/16", "an SRv6 SID address"),
    ("fc00::/7", "a unique local (private) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address (deprecated)"),
    ("ff00::/8", "a multicast address"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_BLOCKED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), reason) for cidr, reason in _IPV4_BLOCKED + _IPV6_BLOCKED
)
_HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class BlockedDestination(Exception):
    """The callback URL may not be used; ``reason`` is safe to show the client (a 422 body) and to log."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class UnresolvableDestination(BlockedDestination):
    """The host did not resolve. At submit time that is a bad URL; at send time it may be a passing DNS failure."""


@dataclass(frozen=True)
class Destination:
    """A checked callback target: the URL to request and the only addresses the connection may go to.

    ``url`` is the URL as requests will send it (IDNA host, lower-case scheme and host); ``host`` is its host name
    as it goes into the Host header and TLS SNI (IPv6 without brackets); ``addresses`` are the checked IPs, to be
    tried in order.
    """

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]

    @property
    def address(self) -> str:
        """The first checked address: where the connection goes unless it refuses."""
        return self.addresses[0]

    def serves(self, scheme: str, host: str | None, port: int | None) -> bool:
        """Whether a request for ``scheme://host:port`` is the one this destination was checked for."""
        return (
            scheme.lower() == self.scheme
            and (host or "").lower() == self.host
            and (port or DEFAULT_PORTS.get(scheme.lower())) == self.port
        )


def _normalize_host(host: str) -> str:
    return host.strip().lower().strip("[]").rstrip(".")


@dataclass(frozen=True)
class AllowList:
    """``callbacks.allow_hosts`` parsed: exact names, ``*.`` suffixes, and networks (a lone IP is a /32 or /128)."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """Parse entries; raise ValueError naming the first entry that is neither a host name nor an IP or CIDR."""
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for entry in entries:
            text = _normalize_host(entry)
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                if "/" in text or not _HOST_PATTERN.match(text):
                    raise ValueError(
                        f"allow_hosts entry {entry!r} is not a host name, *.domain, IP address or CIDR"
                    ) from None
            if text.startswith("*."):
                suffixes.append(text[1:])
            else:
                names.add(text)
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    def allows_host(self, host: str) -> bool:
        """Whether the host name itself is listed (exactly, or under a ``*.`` entry)."""
        name = _normalize_host(host)
        return name in self.names or any(name.endswith(suffix) for suffix in self.suffixes)

    def allows_address(self, address: IPAddress) -> bool:
        """Whether the address (or the IPv4 address an IPv4-mapped one carries) is in a listed network."""
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        return any(
            candidate.version == network.version and candidate in network
            for candidate in candidates
            for network in self.networks
        )


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 transition form routes to, with the form's name, if it is one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped, "IPv4-mapped"
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "NAT64"
    if address.sixtofour is not None:
        return address.sixtofour, "6to4"
    return None


def blocked_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a public destination (``"a loopback address"``), or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner, form = embedded
            reason = blocked_reason(inner)
            return f"{reason} ({form})" if reason else None
    for network, reason in _BLOCKED_NETWORKS:
        if address.version == network.version and address in network:
            return reason
    if isinstance(address, ipaddress.IPv6Address) and address not in _GLOBAL_UNICAST:
        return "a reserved address (outside 2000::/3)"
    if not address.is_global:
        return "a non-public address"
    return None


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` (as a URL's host, without brackets) is an IPv4 or IPv6 address in its standard spelling."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _parse_url(url: str, subject: str = "callback") -> tuple[str, str, str, int]:
    """The URL as requests will send it, its scheme, host and port; BlockedDestination when it is not usable.
    Pure, so remembered: every attempt checks the URL again, but only its DNS answer can have changed."""
    prepared = requests.PreparedRequest()
    try:
        prepared.prepare_url(url, None)
    except (requests.RequestException, ValueError, UnicodeError):
        raise BlockedDestination(f"the {subject} URL is not a valid absolute http(s) URL") from None
    normalized = prepared.url or ""
    parts = urlsplit(normalized)
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = scheme if scheme.isalnum() and len(scheme) <= 16 else "?"
        raise BlockedDestination(f"the {subject} URL scheme {shown!r} is not allowed (use http or https)")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise BlockedDestination(f"the {subject} URL has an invalid port") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise BlockedDestination(f"the {subject} URL has no host")
    if port == 0:
        raise BlockedDestination(f"the {subject} URL has an invalid port")
    return normalized, scheme, host, port


@functools.lru_cache(maxsize=64)
def _allow_list(hosts: tuple[str, ...]) -> AllowList:
    return AllowList.parse(hosts)


def resolve_host(host: str, port: int) -> tuple[str, ...]:
    """Every address ``host`` resolves to for TCP (getaddrinfo), in its order of preference, without duplicates. An
    IP address literal is its own answer, with no lookup: a gevent worker's getaddrinfo is a trip through gevent's
    thread pool, at every callback attempt."""
    with contextlib.suppress(ValueError):
        return (str(ipaddress.ip_address(host)),)
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableDestination(f"the callback host {host!r} does not resolve") from exc
    return addresses_of(answers)


def addresses_of(answers: Iterable[tuple[Any, ...]]) -> tuple[str, ...]:
    """The addresses of getaddrinfo answers, in their order of preference, without duplicates."""
    return tuple(dict.fromkeys(str(answer[4][0]) for answer in answers))


def check_destination(
    url: str,
    allow_hosts: Iterable[str] | AllowList,
    *,
    resolver: Callable[[str, int], Sequence[str]] = resolve_host,
    subject: str = "callback",
    setting: str = "callbacks.allow_hosts",
) -> Destination:
    """Check ``url`` for SSRF and return where the callback may connect; raise BlockedDestination if it may not.

    The scheme must be http or https; the host is resolved with getaddrinfo and every address must be public,
    unless the host name, or the address's network, is in ``allow_hosts``. Reasons name the host and the kind of
    address, never the URL's path, query or credentials (they may hold tokens) nor the addresses a name resolved
    to. ``resolver`` is for tests and must answer like ``resolve_host``. ``subject`` names what the URL is for in
    reasons (``callback``, ``file``), ``setting`` the allow list that would let it through.
    """
    allow = allow_hosts if isinstance(allow_hosts, AllowList) else _allow_list(tuple(allow_hosts))
    normalized, scheme, host, port = _parse_url(url, subject)
    try:
        addresses = tuple(resolver(host, port))
    except UnresolvableDestination:
        addresses = ()
    if not addresses:
        raise UnresolvableDestination(f"the {subject} host {host!r} does not resolve")
    if not allow.allows_host(host):
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            if allow.allows_address(address):
                continue
            reason = blocked_reason(address)
            if reason is not None:
                verb = "is" if is_ip_literal(host) else "resolves to"
                raise BlockedDestination(
                    f"the {subject} host {host!r} {verb} {reason}; list it in {setting} to allow it"
                )
    return Destination(url=normalized, scheme=scheme, host=host, port=port, addresses=addresses)
