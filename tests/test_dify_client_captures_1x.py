"""The client against what a genuine Dify 1.14.2 server sent (`tests/fixtures/dify-1.14.2/`, the `.raw` wire bytes),
replayed over loopback: 1.x streams, a cut stream followed through the reattach and the run record, a paused
run, a call done at its terminal event, and the 1.x error bodies."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import urllib3

from difyq.worker.dify.client import DifyClient
from difyq.worker.dify.errors import DifyError
from difyq.worker.dify.models import DifyRequest, PausedRun
from tests.support.captures import DIFY_1_14_2, Capture, load_wire_capture
from tests.support.loopback import RecordedRequest, ReplayServer, ScriptedServer, read_request

API_KEY = "app-dj9uaZmr4L4REvHABjcDyT3n"
W1_RUN = "59408efd-957c-4266-ab87-b02f07eb85c4"
CUT_RUN = "348c1e5e-4069-4592-9ffc-7d6c82d1726f"
H1_RUN = "77451fc6-a336-4006-9ab0-7637685b2264"


def capture(name: str) -> Capture:
    return load_wire_capture(DIFY_1_14_2 / f"{name}.raw")


@pytest.fixture
def pool() -> Iterator[urllib3.PoolManager]:
    with urllib3.PoolManager() as fresh:
        yield fresh


def client_for(url: str, pool: urllib3.PoolManager, **settings: float) -> DifyClient:
    return DifyClient(url + "/v1", API_KEY, pool=pool, idle_read_timeout=5, run_poll_interval=0.01, **settings)


def workflow_request(user: str = "u1") -> DifyRequest:
    return DifyRequest(query=None, inputs={"q": "1"}, user=user, trace_id="0" * 31 + "1")


def test_every_capture_parses() -> None:
    names = sorted(path.stem for path in DIFY_1_14_2.glob("*.raw"))
    assert len(names) == 94  # 95 captures; the cut run's polling is a log, not a response
    for name in names:
        assert capture(name).status in (200, 400, 401, 404, 412, 500)


def test_a_workflow_stream(pool: urllib3.PoolManager) -> None:
    with ReplayServer(capture("w1_stream_s1")) as server:
        result = client_for(server.url, pool).run("workflow", workflow_request())
    assert result.workflow_run_id == W1_RUN and result.outputs is not None and "body" in result.outputs
    assert result.usage is not None and result.usage.total_tokens == 0 and result.usage.total_price is None
    sent = server.requests[0]
    assert sent.headers["X-Trace-Id"] == "0" * 31 + "1"
    assert sent.headers["traceparent"].startswith("00-" + "0" * 31 + "1-")


def test_a_chatflow_stream_ends_with_workflow_finished_after_message_end(pool: urllib3.PoolManager) -> None:
    with ReplayServer(capture("c1_streaming")) as server:
        result = client_for(server.url, pool).run(
            "advanced-chat", DifyRequest(query="hello", inputs={}, user="u1"))
    assert result.answer == "echo: hello" and result.conversation_id and result.message_id
    assert result.usage is not None and result.usage.total_tokens == 0


def test_a_call_is_done_at_its_terminal_event(pool: urllib3.PoolManager) -> None:
    """Dify 1.x keeps the connection open about a second after `workflow_finished`; the client leaves first."""
    stream = capture("w1_stream_s1")
    left_first = threading.Event()

    def hold_open(connection: socket.socket, stopping: threading.Event) -> None:
        read_request(connection)
        head = "".join(f"{name}: {value}\r\n" for name, value in stream.headers)
        connection.sendall(f"HTTP/1.1 200 OK\r\n{head}\r\n".encode())
        connection.sendall(b"%x\r\n%s\r\n" % (len(stream.body), stream.body))
        connection.settimeout(0.05)
        while not stopping.is_set():
            try:
                if connection.recv(1) == b"":
                    left_first.set()
                    return
            except TimeoutError:
                continue

    with ScriptedServer(hold_open) as server:
        result = client_for(server.url, pool).run("workflow", workflow_request())
        assert left_first.wait(5)
    assert result.outputs is not None


def follow_routes(stream: str, events: Capture | None, detail: Capture | None):
    def respond(request: RecordedRequest) -> Capture:
        if request.method == "POST":
            return capture(stream)
        if "/events" in request.path:
            return events or capture("w1_events_unknown")
        return detail or capture("w1_run_detail_unknown")
    return respond


def test_a_cut_stream_is_followed_through_the_reattach(pool: urllib3.PoolManager) -> None:
    routes = follow_routes("w1_cut_s20_stream", capture("w1_cut_s20_events_after"), None)
    with ReplayServer(routes) as server:
        result = client_for(server.url, pool).run("workflow", workflow_request("u3"))
    assert result.workflow_run_id == CUT_RUN
    assert result.outputs == {"body": '{"path": "/slow", "s": "20", "slept": 20.0}'}
    paths = [(request.method, request.path) for request in server.requests]
    assert paths == [("POST", "/v1/workflows/run"),
                     ("GET", f"/v1/workflow/{CUT_RUN}/events?user=u3&include_state_snapshot=true")]
    assert len({request.headers["X-Trace-Id"] for request in server.requests}) == 1


def test_without_a_reattach_the_run_record_is_polled(pool: urllib3.PoolManager) -> None:
    """Before 1.14 there is no events route (404): the run record (inputs a JSON string) gives the outputs."""
    routes = follow_routes("w1_cut_s20_stream", None, capture("w1_cut_s20_run_detail_final"))
    with ReplayServer(routes) as server:
        result = client_for(server.url, pool).run("workflow", workflow_request("u3"))
    assert result.outputs == {"body": '{"path": "/slow", "s": "20", "slept": 20.0}'}
    assert [request.path for request in server.requests][-1] == f"/v1/workflows/run/{CUT_RUN}"


def test_a_run_dify_does_not_know_fails_at_once(pool: urllib3.PoolManager) -> None:
    with ReplayServer(follow_routes("w1_cut_s20_stream", None, None)) as server, pytest.raises(DifyError) as raised:
        client_for(server.url, pool).run("workflow", workflow_request("u3"))
    assert (raised.value.code, raised.value.status, raised.value.retryable) == ("not_found", 404, False)
    assert sum(request.method == "POST" for request in server.requests) == 1


def test_a_paused_run_gives_its_form(pool: urllib3.PoolManager) -> None:
    with ReplayServer(capture("h1_stream_until_pause")) as server:
        result = client_for(server.url, pool).run("workflow", workflow_request("h1"))
    assert len(server.requests) == 1 and result.paused is not None and result.outputs is None
    assert result.paused.run_id == H1_RUN
    [form] = result.paused.forms
    assert (form["form_token"], form["expiration_time"]) == ("2W4J25cB59rohJKgmp2MoY", 1796508002)
    assert [action["id"] for action in form["actions"]] == ["approve", "reject"]
    assert form["inputs"][0]["output_variable_name"] == "comment"


def test_a_resumed_run_is_followed_to_its_end(pool: urllib3.PoolManager) -> None:
    paused = PausedRun(H1_RUN, [], "0.25", "USD")
    with ReplayServer(capture("h1_events_reattach_across_submit")) as server:
        result = client_for(server.url, pool).follow_run("workflow", H1_RUN, workflow_request("h1"), paused)
    assert result.paused is None
    assert result.outputs == {"comment": "approved by tester", "action": "approve"}
    assert result.usage is not None and result.usage.total_price == "0.25"
    assert server.requests[0].path == f"/v1/workflow/{H1_RUN}/events?user=h1"


@pytest.mark.parametrize(("name", "status", "code"), [
    ("h1_form_submit", 200, None),
    ("h1_form_submit_again", 412, "human_input_form_submitted"),
    ("h1_form_submit_bad_action", 400, "invalid_form_data"),
    ("h1_form_get_unknown", 404, "not_found"),
])
def test_submitting_a_form(pool: urllib3.PoolManager, name: str, status: int, code: str | None) -> None:
    with ReplayServer(capture(name)) as server:
        client = client_for(server.url, pool)
        if code is None:
            client.submit_form("2W4J25cB59rohJKgmp2MoY", {"comment": "ok"}, "approve", "h1")
        else:
            with pytest.raises(DifyError) as raised:
                client.submit_form("2W4J25cB59rohJKgmp2MoY", {"comment": "ok"}, "approve", "h1")
            assert (raised.value.code, raised.value.status, raised.value.retryable) == (code, status, False)
    sent = server.requests[0]
    assert (sent.method, sent.path) == ("POST", "/v1/form/human_input/2W4J25cB59rohJKgmp2MoY")
    assert sent.json() == {"inputs": {"comment": "ok"}, "action": "approve", "user": "h1"}


@pytest.mark.parametrize(
    ("name", "code", "status", "retryable", "rate_limited"),
    [
        ("conc1_blocking_B", "invalid_param", 400, True, True),
        ("conc1_single_streaming_limit1", "invalid_param", 400, True, True),
        ("w1_run_by_draft_id", "bad_request", 400, False, False),
        ("w1_run_by_bad_id", "bad_request", 400, False, False),
        ("w1_run_by_unknown_id", "not_found", 404, False, False),
        ("w1_wrong_key", "unauthorized", 401, False, False),
        ("w1_no_auth_header", "unauthorized", 401, False, False),
        ("w1_missing_user", "invalid_param", 400, False, False),
        ("w1_missing_q_blocking", "invalid_param", 400, False, False),
        ("w1_q_too_long", "invalid_param", 400, False, False),
        ("c1_key_on_workflow_run", "not_workflow_app", 400, False, False),
        ("w1_key_on_chat_endpoint", "not_chat_app", 400, False, False),
        ("c1_unknown_conversation", "not_found", 404, False, False),
    ],
)
def test_1x_error_bodies(pool: urllib3.PoolManager, name: str, code: str, status: int, retryable: bool,
                         rate_limited: bool) -> None:
    with ReplayServer(capture(name)) as server, pytest.raises(DifyError) as raised:
        client_for(server.url, pool).run("workflow", workflow_request())
    error = raised.value
    assert (error.code, error.status, error.retryable, error.rate_limited) == (code, status, retryable, rate_limited)
    assert API_KEY not in str(error)


def test_pings_and_then_silence_is_dify_s_silent_failure(pool: urllib3.PoolManager) -> None:
    """A missing input in streaming mode: one ping, then nothing until Dify closes the stream 300 s later."""
    silent = capture("w1_missing_q_streaming_full")

    def ping_then_hold(connection: socket.socket, stopping: threading.Event) -> None:
        read_request(connection)
        head = "".join(f"{name}: {value}\r\n" for name, value in silent.headers)
        connection.sendall(f"HTTP/1.1 200 OK\r\n{head}\r\n".encode())
        connection.sendall(b"%x\r\n%s\r\n" % (len(silent.body), silent.body))
        stopping.wait(10)

    with ScriptedServer(ping_then_hold) as server, pytest.raises(DifyError) as raised:
        DifyClient(server.url + "/v1", API_KEY, pool=pool, idle_read_timeout=0.5).run("workflow", workflow_request())
    assert (raised.value.code, raised.value.retryable) == ("no_first_event", False)


@pytest.mark.parametrize("dify_version", ["0.15", "1.x"])
def test_a_stream_that_ends_at_once_keeps_its_connection(pool: urllib3.PoolManager, dify_version: str) -> None:
    """The emulator ends each chunked stream right after its terminal event: the connection goes back to the pool
    (a stream held open longer, as Dify 1.x does, is closed instead: test_a_call_is_done_at_its_terminal_event)."""
    from difyq.worker.dify.emulator import EmulatedApp, start_emulator

    with start_emulator([EmulatedApp(name="w", key="app-keep-alive", mode="workflow")],
                        dify_version=dify_version) as emulator:
        client = DifyClient(emulator.base_url, "app-keep-alive", pool=pool)
        for _ in range(3):
            assert client.run("workflow", DifyRequest(query=None, inputs={"text": "hi"}, user="u")).outputs
        host_pool = pool.connection_from_url(emulator.base_url)
        idle = [connection for connection in host_pool.pool.queue if connection is not None]
        assert host_pool.num_connections == 1 and [connection.is_connected for connection in idle] == [True]
