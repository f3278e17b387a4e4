"""DifyClient's urllib3 transport against loopback servers: one process-wide pool, kept-alive connections reused
across calls and threads, a part-read connection never reused, and the proxy chosen from the environment."""

from __future__ import annotations

import base64
import itertools
import json
import socket
import threading
from collections.abc import Iterator

import certifi
import pytest
import urllib3

from difyq.worker.dify.client import USER_AGENT, DifyClient, DifyError, DifyRequest
from tests.support.captures import iter_captures
from tests.support.loopback import ScriptedServer, read_request
from tests.support.receiver import CallbackReceiver, Reply

API_KEY = "app-SECRETKEYSECRETKEY0123"
CHAT_STREAM = next(capture for capture in iter_captures() if capture.name == "chat_streaming.txt").body
SSE = {"Content-Type": "text/event-stream; charset=utf-8"}
REQUEST = DifyRequest(query="hi", inputs={}, user="u")
ANSWER = "FAKE-LLM says: Stream me please"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def no_proxy_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    """A keep-alive HTTP/1.1 server answering every call with a whole chat stream under a Content-Length."""
    with CallbackReceiver(default=Reply(200, SSE, CHAT_STREAM)) as server:
        yield server


def ports(receiver: CallbackReceiver) -> list[int]:
    return [request.client_port for request in receiver.requests]


def test_clients_share_one_process_wide_pool(receiver: CallbackReceiver) -> None:
    first = DifyClient(receiver.base_url + "/v1", API_KEY)
    second = DifyClient("https://api.dify.ai/v1", "app-other")
    from_a_thread: list[urllib3.PoolManager] = []
    thread = threading.Thread(target=lambda: from_a_thread.append(first.pool))
    thread.start()
    thread.join()
    assert first.pool is second.pool is from_a_thread[0]
    assert type(first.pool) is urllib3.PoolManager
    settings = first.pool.connection_pool_kw
    assert (settings["maxsize"], settings["block"]) == (16384, False)  # above one gevent process's greenlets
    assert (settings["cert_reqs"], settings["ca_certs"]) == ("CERT_REQUIRED", certifi.where())


def test_connection_is_reused_across_calls(receiver: CallbackReceiver) -> None:
    error_body = b'{"code": "invalid_param", "message": "query is required", "status": 400}'
    receiver.script([Reply(400, {"Content-Type": "application/json"}, error_body)])
    client = DifyClient(receiver.base_url + "/v1", API_KEY)
    with pytest.raises(DifyError, match="query is required"):
        client.run("chat", REQUEST)  # an error response read to its end keeps its connection too
    for _ in range(5):
        assert client.run("chat", REQUEST).answer == ANSWER
    assert len(receiver.requests) == 6
    assert len(set(ports(receiver))) == 1
    sent = receiver.requests[-2]
    assert (sent.headers["user-agent"], sent.headers["content-type"]) == (USER_AGENT, "application/json")
    assert USER_AGENT.startswith("difyq/")
    assert (sent.headers["authorization"], sent.headers["accept"]) == (f"Bearer {API_KEY}", "text/event-stream")
    assert json.loads(sent.body) == {"inputs": {}, "query": "hi", "response_mode": "streaming", "user": "u",
                                     "auto_generate_name": False}  # fmt: skip


def test_one_client_serves_concurrent_calls(receiver: CallbackReceiver) -> None:
    threads, calls = 4, 5  # 4: within the receiver's listen backlog of 5, so no SYN waits for a resend
    client = DifyClient(receiver.base_url + "/v1", API_KEY)
    start = threading.Barrier(threads)
    answers: list[str | None] = []

    def caller() -> None:
        start.wait(5)
        answers.extend(client.run("chat", REQUEST).answer for _ in range(calls))

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert answers == [ANSWER] * threads * calls


def test_a_part_read_stream_does_not_poison_the_next_call() -> None:
    """A stream given up midway (a bad event, the rest of its body still to come) closes its connection. Put
    back as it was, it would be the next call's (nothing to read on it yet, so urllib3 sees no drop), and that
    call would fail: a new request on a connection whose last response is unfinished."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n"
    bad_event = b"data: [DONE]\n\n"
    connections = itertools.count()
    request_ports: list[int] = []

    def serve(connection: socket.socket, stopping: threading.Event) -> None:
        port = connection.getpeername()[1]
        if next(connections) == 0:
            read_request(connection)
            request_ports.append(port)
            connection.sendall(head % (len(bad_event) + 1000) + bad_event)  # 1000 bytes more announced, not sent
            stopping.wait()
            return
        while read_request(connection):  # keep-alive until the client closes
            request_ports.append(port)
            connection.sendall(head % len(CHAT_STREAM) + CHAT_STREAM)

    pool = urllib3.PoolManager(maxsize=1)  # one connection kept: the next call gets whatever was put back
    with ScriptedServer(serve) as server:
        client = DifyClient(server.url + "/v1", API_KEY, pool=pool)
        with pytest.raises(DifyError) as raised:
            client.run("chat", REQUEST)
        assert raised.value.code == "invalid_response"
        assert client.run("chat", REQUEST).answer == ANSWER
        assert client.run("chat", REQUEST).answer == ANSWER
        pool.connection_from_url(server.url).close()  # ends the server's keep-alive loop
    first, second, third = request_ports
    assert first != second == third


def test_proxy_is_chosen_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://user:p%40ss@proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "dify.internal,localhost")
    proxied = DifyClient("https://api.dify.ai/v1", API_KEY)
    also_proxied = DifyClient("https://eu.api.dify.ai/v1", "app-other")
    direct = DifyClient("https://dify.internal/v1", API_KEY)
    plain_http = DifyClient("http://api.dify.ai/v1", API_KEY)  # HTTPS_PROXY does not cover http URLs
    pool = proxied.pool
    assert isinstance(pool, urllib3.ProxyManager)
    assert (pool.proxy.scheme, pool.proxy.host, pool.proxy.port) == ("http", "proxy.internal", 3128)
    assert pool.proxy_headers == {"proxy-authorization": "Basic " + base64.b64encode(b"user:p@ss").decode()}
    assert (pool.connection_pool_kw["maxsize"], pool.connection_pool_kw["cert_reqs"]) == (16384, "CERT_REQUIRED")
    assert also_proxied.pool is pool
    assert not isinstance(direct.pool, urllib3.ProxyManager)
    assert plain_http.pool is direct.pool


def test_calls_go_through_an_http_proxy(monkeypatch: pytest.MonkeyPatch, receiver: CallbackReceiver) -> None:
    """The receiver plays a forwarding proxy: an http:// call reaches it in absolute form, Host the real one."""
    monkeypatch.setenv("HTTP_PROXY", receiver.base_url)
    client = DifyClient("http://dify.example/v1", API_KEY)
    assert client.run("chat", REQUEST).answer == ANSWER
    assert client.run("chat", REQUEST).answer == ANSWER
    first, second = receiver.requests
    assert (first.path, first.host) == ("http://dify.example/v1/chat-messages", "dify.example")
    assert first.headers["authorization"] == f"Bearer {API_KEY}"
    assert first.client_port == second.client_port
