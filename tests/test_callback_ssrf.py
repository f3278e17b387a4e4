"""The SSRF guard: what is refused, what allow_hosts lets through, and that the connection goes to the checked IP.

Only loopback is touched: addresses are judged without connecting, and host names are either ``localhost``
(from /etc/hosts) or resolved by a test resolver, so no DNS query leaves the machine.
"""

from __future__ import annotations

import base64
import ipaddress
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3
from hypothesis import given
from hypothesis import strategies as st

from difyq.worker.callbacks import (
    AllowList,
    BlockedDestination,
    Destination,
    PinnedTransport,
    UnpinnedRequest,
    UnresolvableDestination,
    blocked_reason,
    check_destination,
    deliver,
    post_to_destination,
    resolve_host,
)
from difyq.worker.config import CallbacksConfig
from tests.support.receiver import CallbackReceiver

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()

BLOCKED_URLS = [
    "http://127.0.0.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://[::1]/",
    "http://localhost/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://0/",
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f.1/",
    "http://100.64.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[fe80::1]/",
    "http://224.0.0.251/",
    "http://[ff02::1]/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
    "http://192.0.2.10/",
    "http://198.18.0.1/",
    "http://[2001:db8::1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a00:1::]/",
    "http://[::127.0.0.1]/",
    "https://127.0.0.1:8443/hook",
]


@pytest.mark.parametrize("url", BLOCKED_URLS)
def test_non_public_destinations_are_blocked(url: str) -> None:
    with pytest.raises(BlockedDestination):
        check_destination(url, [])


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "example.com/x", "http:///x"]
)
def test_only_absolute_http_and_https_urls(url: str) -> None:
    with pytest.raises(BlockedDestination, match=r"scheme|not a valid"):
        check_destination(url, [])


def test_the_reason_names_the_kind_of_address_and_never_the_urls_secrets() -> None:
    with pytest.raises(BlockedDestination) as caught:
        check_destination("http://admin:hunter2@169.254.169.254/latest?token=s3cr3t", [])

    assert "link-local" in caught.value.reason
    assert "hunter2" not in caught.value.reason
    assert "s3cr3t" not in caught.value.reason
    assert "169.254.169.254" in caught.value.reason


def test_a_name_is_not_told_what_it_resolved_to() -> None:
    with pytest.raises(BlockedDestination) as caught:
        check_destination("http://intranet.example/", [], resolver=lambda host, port: ["10.1.2.3"])

    assert "private" in caught.value.reason
    assert "10.1.2.3" not in caught.value.reason


@pytest.mark.parametrize(
    ("url", "allow"),
    [
        ("http://127.0.0.1/", ["127.0.0.1"]),
        ("http://127.0.0.1/", ["127.0.0.0/8"]),
        ("http://localhost:8080/cb", ["localhost"]),
        ("http://localhost/", ["127.0.0.0/8"]),
        ("http://169.254.169.254/", ["169.254.0.0/16"]),
        ("http://10.0.0.1/", ["10.0.0.0/8"]),
        ("http://100.64.0.1/", ["100.64.0.0/10"]),
        ("http://[::1]/", ["::1"]),
        ("http://[::1]/", ["[::1]"]),
        ("http://[fd00::5]/", ["fd00::/8"]),
        ("http://[::ffff:127.0.0.1]/", ["127.0.0.1/32"]),
    ],
)
def test_allow_hosts_lets_listed_hosts_and_networks_through(url: str, allow: list[str]) -> None:
    destination = check_destination(url, allow)

    assert destination.addresses


def test_an_allowed_name_may_resolve_anywhere() -> None:
    destination = check_destination(
        "https://hooks.corp.example/in", ["*.corp.example"], resolver=lambda host, port: ["10.9.8.7"]
    )

    assert (destination.host, destination.port, destination.addresses) == ("hooks.corp.example", 443, ("10.9.8.7",))


@pytest.mark.parametrize(
    "url",
    [
        "https://93.184.215.14/callback?x=1",
        "http://8.8.8.8:8080/",
        "http://[2606:4700:4700::1111]/",
        "http://[::ffff:8.8.8.8]/",
        "http://[64:ff9b::808:808]/",
    ],
)
def test_public_addresses_pass(url: str) -> None:
    destination = check_destination(url, [])

    assert destination.url == url
    assert len(destination.addresses) == 1


def test_every_resolved_address_must_be_public() -> None:
    def resolver(host: str, port: int) -> Sequence[str]:
        return ["93.184.215.14", "10.0.0.5"]

    with pytest.raises(BlockedDestination, match="private"):
        check_destination("https://mixed.example/", [], resolver=resolver)

    allowed = check_destination("https://mixed.example/", ["10.0.0.0/8"], resolver=resolver)
    assert allowed.addresses == ("93.184.215.14", "10.0.0.5")
    assert allowed.address == "93.184.215.14"


@pytest.mark.parametrize("host", ["127.0.0.1", "93.184.215.14", "::1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_an_ip_literal_is_its_own_answer_with_no_lookup(host: str, connects: list[Any]) -> None:
    answer = resolve_host(host, 80)

    assert connects == []
    looked_up = socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    assert [ipaddress.ip_address(text) for text in answer] == [ipaddress.ip_address(found[4][0]) for found in looked_up]


def test_an_odd_ipv4_spelling_is_judged_by_what_getaddrinfo_makes_of_it() -> None:
    assert resolve_host("2130706433", 80) == ("127.0.0.1",)


def test_a_name_that_resolves_to_nothing_is_unresolvable() -> None:
    with pytest.raises(UnresolvableDestination):
        check_destination("https://nowhere.example/", [], resolver=lambda host, port: [])


def test_destination_is_normalized_as_requests_sends_it() -> None:
    destination = check_destination("HTTP://LocalHost:8080/a/b?c=d", ["localhost"])

    assert (destination.scheme, destination.host, destination.port) == ("http", "localhost", 8080)
    assert destination.url == "http://localhost:8080/a/b?c=d"
    assert destination.addresses == ("127.0.0.1",)


def test_allow_list_matching() -> None:
    allow = AllowList.parse(["Hooks.Example.com.", "*.corp.example", "10.0.0.0/8", "fd00::1"])

    assert allow.allows_host("hooks.example.com")
    assert allow.allows_host("a.b.corp.example")
    assert not allow.allows_host("corp.example")
    assert not allow.allows_host("evilcorp.example")
    assert not allow.allows_host("example.com")
    assert allow.allows_address(ipaddress.ip_address("10.200.0.1"))
    assert allow.allows_address(ipaddress.ip_address("::ffff:10.0.0.1"))
    assert allow.allows_address(ipaddress.ip_address("fd00::1"))
    assert not allow.allows_address(ipaddress.ip_address("fd00::2"))


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "exa mple.com", "*", "", "http://x/", "a.*.example"])
def test_allow_list_rejects_malformed_entries(entry: str) -> None:
    with pytest.raises(ValueError, match="allow_hosts entry"):
        AllowList.parse([entry])


NON_PUBLIC_V4 = ["10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16"]


@st.composite
def non_public_ipv4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    network = ipaddress.IPv4Network(draw(st.sampled_from(NON_PUBLIC_V4)))
    offset = draw(st.integers(0, network.num_addresses - 1))
    return network[offset]


@given(non_public_ipv4())
def test_ipv6_forms_of_non_public_ipv4_are_blocked(address: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address))
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (int(address) << 80))

    assert blocked_reason(address) is not None
    assert blocked_reason(mapped) is not None
    assert blocked_reason(nat64) is not None
    assert blocked_reason(sixtofour) is not None


@given(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address))
def test_an_ipv4_and_its_mapped_form_are_judged_alike(address: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")

    assert (blocked_reason(address) is None) == (blocked_reason(mapped) is None)


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every address a socket of this process connects to, and every host name looked up, while the test runs."""
    seen: list[Any] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        seen.append(("connect", address[0]))
        real_connect(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(("getaddrinfo", host))
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


@pytest.fixture
def trap() -> Iterator[socket.socket]:
    """A listening socket nobody should reach: a connection to it would wait in its accept queue."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        yield listener


def assert_never_reached(listener: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        listener.accept()


def read_and_release(response: urllib3.HTTPResponse) -> bytes:
    body = response.read()
    response.release_conn()
    return body


def test_the_connection_goes_to_the_checked_address_with_the_original_host_header(connects: list[Any]) -> None:
    """``callbacks.example.test`` cannot resolve (the .test TLD is reserved): the request only arrives because
    the transport connects to the address the check pinned, without a second lookup."""
    lookups: list[str] = []

    def resolver(host: str, port: int) -> Sequence[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    with CallbackReceiver() as receiver, PinnedTransport() as transport:
        url = f"http://callbacks.example.test:{receiver.port}/callback?k=v"
        destination = check_destination(url, ["127.0.0.0/8"], resolver=resolver)
        for _ in range(2):
            response = transport.post(destination, b"{}", {"webhook-id": "job_pin"}, timeout=5)
            assert response.status == 200
            read_and_release(response)

        assert lookups == ["callbacks.example.test"]
        assert [request.host for request in receiver.requests] == [f"callbacks.example.test:{receiver.port}"] * 2
        assert receiver.requests[0].path == "/callback?k=v"
        assert len({request.client_port for request in receiver.requests}) == 1  # one kept-alive connection
        assert connects == [("getaddrinfo", "127.0.0.1"), ("connect", "127.0.0.1")]


def test_a_checked_address_that_refuses_gives_way_to_the_next(connects: list[Any]) -> None:
    """The name resolved to two checked addresses; nothing listens on the first, so the request goes to the
    second. The next request tries them in the same order (the refusal is immediate) and reuses the kept-alive
    connection to the second."""
    with CallbackReceiver() as receiver, PinnedTransport() as transport:
        url = f"http://callbacks.example.test:{receiver.port}/callback"
        destination = check_destination(url, ["127.0.0.0/8"], resolver=lambda h, p: ["127.0.0.2", "127.0.0.1"])
        assert destination.addresses == ("127.0.0.2", "127.0.0.1")
        for _ in range(2):
            read_and_release(transport.post(destination, b"{}", {}, timeout=5))

        assert [request.host for request in receiver.requests] == [f"callbacks.example.test:{receiver.port}"] * 2
        assert [entry for entry in connects if entry[0] == "connect"] == [("connect", "127.0.0.2"),
                                                                         ("connect", "127.0.0.1"),
                                                                         ("connect", "127.0.0.2")]


def test_the_pinned_transport_refuses_requests_without_a_checked_destination(
    connects: list[Any], trap: socket.socket
) -> None:
    port = trap.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cb"
    elsewhere = port + 1
    forged = [
        Destination(url, "http", "127.0.0.1", elsewhere, ("127.0.0.1",)),  # checked for another URL (port)
        Destination(url, "https", "127.0.0.1", port, ("127.0.0.1",)),  # ... another scheme
        Destination(url, "http", "localhost", port, ("127.0.0.1",)),  # ... another host
        Destination(url, "http", "127.0.0.1", port, ()),  # no checked address
    ]
    with PinnedTransport() as transport:
        for destination in forged:
            with pytest.raises(UnpinnedRequest):
                transport.post(destination, b"{}", {}, timeout=5)
        with pytest.raises(UnpinnedRequest):
            transport.post(url, b"{}", {}, timeout=5)  # type: ignore[arg-type]  # a URL, not a checked Destination
    assert connects == []
    assert_never_reached(trap)


def test_a_plain_client_is_refused(connects: list[Any], trap: socket.socket) -> None:
    port = trap.getsockname()[1]
    destination = check_destination(f"http://127.0.0.1:{port}/", ["127.0.0.1"])
    config = CallbacksConfig(signing_secret=SECRET, allow_hosts=["127.0.0.1"], timeout=5)
    for client in (urllib3.PoolManager(), requests.Session()):
        with pytest.raises(UnpinnedRequest):
            post_to_destination(client, destination, b"{}", {}, timeout=5)  # type: ignore[arg-type]
        with pytest.raises(UnpinnedRequest):
            deliver(destination.url, b"{}", "job_plain", config, session=client)  # type: ignore[arg-type]

    assert [kind for kind, _ in connects if kind == "connect"] == []  # only the SSRF check's own lookups
    assert_never_reached(trap)


def test_a_blocked_callback_opens_no_socket(connects: list[Any], trap: socket.socket) -> None:
    """The SSRF check refuses the loopback receiver before any connection: only the check's own lookup of the name
    happens (an IP literal needs none)."""
    port = trap.getsockname()[1]
    config = CallbacksConfig(signing_secret=SECRET, allow_hosts=[], timeout=5)
    with PinnedTransport() as transport:
        for url in (f"http://127.0.0.1:{port}/cb", f"http://localhost:{port}/cb", f"http://[::ffff:127.0.0.1]:{port}/"):
            attempt = deliver(url, b"{}", "job_blocked", config, session=transport)
            assert attempt.outcome == "blocked"
    assert connects == [("getaddrinfo", "localhost")]
    assert_never_reached(trap)


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
def test_proxy_variables_are_ignored(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    config = CallbacksConfig(signing_secret=SECRET, allow_hosts=["127.0.0.1"], timeout=5)
    with CallbackReceiver() as receiver, CallbackReceiver() as proxy, PinnedTransport() as transport:
        monkeypatch.setenv(variable, proxy.base_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        attempt = deliver(receiver.url, b"{}", "job_proxy", config, session=transport)

        assert attempt.outcome == "delivered"
        assert [request.path for request in receiver.requests] == ["/callback"]
        assert proxy.requests == []


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for callbacks.example.test (it is its own CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=callbacks.example.test",
         "-addext", "subjectAltName=DNS:callbacks.example.test",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def tls_server_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def test_tls_sni_and_certificate_use_the_host_name_not_the_pinned_ip(tls_files: tuple[Path, Path]) -> None:
    cert = tls_files[0]
    with (
        CallbackReceiver(tls_context=tls_server_context(tls_files)) as receiver,
        PinnedTransport(ca_certs=str(cert)) as transport,
    ):
        good = check_destination(
            f"https://callbacks.example.test:{receiver.port}/cb", ["127.0.0.1"], resolver=lambda h, p: ["127.0.0.1"]
        )
        for _ in range(2):
            response = transport.post(good, b"{}", {}, timeout=5)
            assert response.status == 200
            read_and_release(response)
        assert receiver.server_names == ["callbacks.example.test"]  # one handshake: the connection was reused
        assert [request.host for request in receiver.requests] == [f"callbacks.example.test:{receiver.port}"] * 2

        wrong = check_destination(
            f"https://other.example.test:{receiver.port}/cb", ["127.0.0.1"], resolver=lambda h, p: ["127.0.0.1"]
        )
        with pytest.raises(urllib3.exceptions.SSLError):
            transport.post(wrong, b"{}", {}, timeout=5)
        assert len(receiver.requests) == 2


def test_a_certificate_for_another_name_is_a_retryable_tls_failure(tls_files: tuple[Path, Path]) -> None:
    config = CallbacksConfig(signing_secret=SECRET, allow_hosts=["localhost"], timeout=5)
    with (
        CallbackReceiver(tls_context=tls_server_context(tls_files)) as receiver,
        PinnedTransport(ca_certs=str(tls_files[0])) as transport,
    ):
        attempt = deliver(f"https://localhost:{receiver.port}/cb", b"{}", "job_tls", config, session=transport)

        assert attempt.outcome == "retry"
        assert (attempt.error or "").startswith("TLS certificate rejected")
        assert "Hostname mismatch" in (attempt.error or "")
        assert receiver.requests == []


def test_only_the_certifi_bundle_is_trusted_whatever_the_environment_says(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with requests and ``trust_env = False``: REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE and SSL_CERT_FILE are not
    read, so a self-signed receiver is rejected even when the environment names its certificate."""
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.setenv(variable, str(tls_files[0]))
    config = CallbacksConfig(signing_secret=SECRET, allow_hosts=["127.0.0.1"], timeout=5)
    with CallbackReceiver(tls_context=tls_server_context(tls_files)) as receiver, PinnedTransport() as transport:
        url = f"https://callbacks.example.test:{receiver.port}/cb"
        destination = check_destination(url, ["127.0.0.1"], resolver=lambda h, p: ["127.0.0.1"])
        with pytest.raises(urllib3.exceptions.SSLError) as caught:
            transport.post(destination, b"{}", {}, timeout=5)
        assert isinstance(caught.value.args[0], ssl.SSLCertVerificationError)
        assert "self-signed" in caught.value.args[0].verify_message

        attempt = deliver(f"https://127.0.0.1:{receiver.port}/cb", b"{}", "job_tls", config, session=transport)
        assert (attempt.outcome, attempt.error) == ("retry", "TLS certificate rejected: self-signed certificate")
        assert receiver.requests == []
