"""DifyClient against real loopback HTTP: every Dify 0.15.8 capture replayed byte for byte (bodies cut into odd
pieces), the request it sends, stop, and the transport failures (timeouts, refused, cut-off streams)."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import certifi
import pytest
import urllib3

from difyq.worker.dify.client import DifyClient, DifyError, DifyRequest, DifyResult, environment_settings
from tests.support.captures import Capture, iter_captures, load_index, parse_capture
from tests.support.loopback import (
    ReplayServer,
    ScriptedServer,
    closed_port,
    read_request,
    unanswered_connect_port,
)

API_KEY = "app-SECRETKEYSECRETKEY0123"
CAPTURES = {capture.name: capture for capture in iter_captures()}
INDEX = load_index()
USD_ZERO = ("0E-7", "USD")


@dataclasses.dataclass(frozen=True)
class Succeeds:
    answer: str | None
    conversation_id: str | None
    message_id: str | None
    task_id: str
    tokens: tuple[int | None, int | None, int | None]
    price: tuple[str | None, str | None] = USD_ZERO
    outputs: dict[str, Any] | None = None
    workflow_run_id: str | None = None


@dataclasses.dataclass(frozen=True)
class Fails:
    code: str
    status: int | None
    retryable: bool
    rate_limited: bool = False
    message: str = ""


PROVIDER_429 = "[openai_api_compatible] Error: API request failed with status code 429"
PROVIDER_500 = "[openai_api_compatible] Error: API request failed with status code 500"
LONG_ANSWER = " ".join(f"word{index}" for index in range(60))

SUCCEEDS = {
    "chat_blocking.txt": Succeeds(
        "FAKE-LLM says: Hello Dify", "06d0df81-b096-46fe-a9b3-6bb534c50926",
        "8426bb8c-a6a4-4267-8743-5ca2554db195", "dd7fe97b-be7e-4312-8dff-b385c4a2ea12", (7, 4, 11)),
    "chat_blocking_followup.txt": Succeeds(
        "FAKE-LLM says: Second turn", "06d0df81-b096-46fe-a9b3-6bb534c50926",
        "c9bdac96-005b-4f2f-bd9d-359dc03bad7b", "95e94549-9df2-4383-9659-d136646f1fed", (15, 4, 19)),
    "chat_no_response_mode.txt": Succeeds(
        "FAKE-LLM says: no response_mode given", "d34a20d5-3bd1-43f5-a0ec-f12dc42cab5b",
        "c2ed8a16-e727-4274-8549-a6d83f49ebf1", "725ad128-a8f4-4b6f-a1eb-ada647fc9f4e", (8, 5, 13)),
    "chat_streaming.txt": Succeeds(
        "FAKE-LLM says: Stream me please", "dab88a2f-8599-4183-88b3-4cea3bff9947",
        "fdb1f3c9-7baf-4397-95a0-b2495cf5b75a", "946634d2-1418-4989-963d-64c8b6ecfbcc", (8, 5, 13)),
    "chat_streaming_followup.txt": Succeeds(
        "FAKE-LLM says: Third turn streamed", "06d0df81-b096-46fe-a9b3-6bb534c50926",
        "186e5695-c569-4996-b1a3-cf8fd8f45f23", "00172c67-b8cf-42b1-9fd5-479479a125ef", (23, 5, 28)),
    "chat_long_streaming.txt": Succeeds(
        LONG_ANSWER, "1a8417e4-0c71-44a0-bf86-fa574f7264b3",
        "c227248d-d081-4dfa-9981-128a6a3b1756", "52d335ef-4734-4de6-bb0d-28c7a85cfd5d", (8, 60, 68)),
    "chat_streaming_with_ping.txt": Succeeds(
        "FAKE-LLM says: WAIT11 then answer", "0713329c-184f-490e-8847-7e405214b481",
        "2ac06641-8ba4-4803-be56-5d4b8a341cea", "9329cf8d-9463-4bb9-901c-e71b0a22c62a", (8, 5, 13)),
    # Stopped through the stop API: Dify ends it like any message, with the partial answer.
    "chat_streaming_slow_stopped.txt": Succeeds(
        "FAKE-LLM", "e8191b69-87aa-447f-930c-8927af25d3aa",
        "c13b4376-8fc0-4dbc-bde3-0869c18f6548", "78d99d3d-cfcd-4a43-aab7-e8699275f2af", (28, 13, 41)),
    # The fake upstream cut its stream short: Dify ends normally with the partial answer and reports nothing.
    "llm_midstream_disconnect_chat_streaming.txt": Succeeds(
        "FAKE-LLM says:", "2958cbf2-e9f1-4adb-a896-3f797f02312f",
        "87203170-c659-4afd-8edd-72b98fb9611f", "46166d40-3bf7-4432-a9f5-8d7eab225f5f", (7, 7, 14)),
    "llm_midstream_disconnect_chat_blocking.txt": Succeeds(
        "FAKE-LLM says: MIDFAIL one two three four five", "ae7bb1a8-51e7-4f39-b87b-822f1ccb1e57",
        "e2c64fc0-b314-4306-8504-0d14027c2539", "7bb5d8a2-81e2-4657-9dd7-c8fd886d54d4", (11, 8, 19)),
    "completion_blocking.txt": Succeeds(
        "FAKE-LLM says: Process this text: The quick brown fox", None,
        "96ab3455-f105-41df-a324-721a3a96f243", "4dfbe8d5-033e-416f-a34b-f64ad741df0f", (7, 9, 16)),
    "completion_streaming.txt": Succeeds(
        "FAKE-LLM says: Process this text: Stream this text", None,
        "89bceeda-b0a3-4ab5-9299-a963c950de05", "c0d435d7-3c21-4de5-8d9f-d6b9f3588b42", (6, 8, 14)),
    # Despite its name, 0.15.8 did not ignore `query`: the completion app answered it instead of inputs.text.
    "completion_with_query_ignored.txt": Succeeds(
        "FAKE-LLM says: ignored query", None,
        "2e07447d-f408-4c8e-81b0-ae3167a34861", "54be9c28-8041-44aa-be14-f7ce4f0879d6", (6, 4, 10)),
    "workflow_blocking.txt": Succeeds(
        None, None, None, "3fd22afa-068a-486e-a7ea-900373445c29", (None, None, 13), (None, None),
        outputs={"result": "FAKE-LLM says: Run the workflow"},
        workflow_run_id="5ce2759a-d3a2-477f-8eac-12d4b969187e"),
    "workflow_streaming.txt": Succeeds(
        "FAKE-LLM says: Stream the workflow", None, None, "2a143ae7-4610-429f-84c0-87e3367675e8",
        (None, None, 13), ("0.0000000", "USD"), outputs={"result": "FAKE-LLM says: Stream the workflow"},
        workflow_run_id="2691bc25-ad93-4ba9-8c52-fd828d92034d"),
    "chatflow_blocking.txt": Succeeds(
        "FAKE-LLM says: Hello chatflow", "b674d4b7-da50-477d-9448-7b181225b290",
        "c63b0204-e005-4fe5-82f6-0e8a75759c54", "170dda88-b257-4d72-8e45-1551f24b7e1a", (7, 4, 11)),
    "chatflow_streaming.txt": Succeeds(
        "FAKE-LLM says: Stream chatflow", "098346a9-c4d0-483d-ad1e-3d57e0e10a90",
        "b97c9905-9f7f-4c1c-af02-7aa45adfab42", "537b7bd0-a139-4ec1-9b91-179873036be5", (7, 4, 11),
        outputs={"answer": "FAKE-LLM says: Stream chatflow"},
        workflow_run_id="235da997-376f-4989-afbb-1096a12c8caa"),
}  # fmt: skip

PARAM_MISSING = "Missing required parameter in the JSON body"
SAME_ROUTE = "Please check if your app mode matches the right API route."

FAILS = {
    "err_bad_api_key.txt": Fails("unauthorized", 401, False, message="Access token is invalid"),
    "err_no_auth_header.txt": Fails("unauthorized", 401, False, message="Authorization header must be provided"),
    "err_auth_not_bearer.txt": Fails("unauthorized", 401, False, message="Authorization header must be provided"),
    "err_missing_query.txt": Fails("invalid_param", 400, False, message=f"{PARAM_MISSING} (params: query)"),
    "err_missing_inputs.txt": Fails("invalid_param", 400, False, message=f"{PARAM_MISSING} (params: inputs)"),
    "err_missing_user.txt": Fails("invalid_param", 400, False, message="Arg user must be provided."),
    "err_empty_query.txt": Fails("invalid_param", 400, False, message="query is required"),
    "err_bad_response_mode.txt": Fails("invalid_param", 400, False, message="fast is not a valid choice"),
    "err_malformed_conversation_id.txt": Fails("invalid_param", 400, False, message="not-a-uuid is not a valid uuid."),
    "err_unknown_conversation_id.txt": Fails("not_found", 404, False, message="Conversation Not Exists."),
    "err_unknown_conversation_id_streaming.txt": Fails("not_found", 404, False, message="Conversation Not Exists."),
    "err_conversation_of_other_user.txt": Fails("not_found", 404, False, message="Conversation Not Exists."),
    "err_invalid_json.txt": Fails("bad_request", 400, False, message="The browser (or proxy) sent a request"),
    "err_completion_missing_required_input.txt": Fails("invalid_param", 400, False, message="text is required"),
    "err_workflow_missing_required_input.txt": Fails("invalid_param", 400, False, message="text is required"),
    "err_workflow_missing_required_input_streaming.txt": Fails("invalid_param", 400, False, message="text is required"),
    "err_chat_key_on_completion.txt": Fails("app_unavailable", 400, False, message="App unavailable"),
    "err_completion_key_on_chat.txt": Fails("not_chat_app", 400, False, message=SAME_ROUTE),
    "err_workflow_key_on_chat.txt": Fails("not_chat_app", 400, False, message=SAME_ROUTE),
    "err_chat_key_on_workflow.txt": Fails("not_workflow_app", 400, False, message=SAME_ROUTE),
    "err_unknown_route.txt": Fails("http_404", 404, False, message="HTTP 404 NOT FOUND: <!doctype html>"),
    "llm_fail429_chat_blocking.txt": Fails("completion_request_error", 400, True, True, PROVIDER_429),
    "llm_fail429_chat_streaming.txt": Fails("completion_request_error", 400, True, True, PROVIDER_429),
    "llm_fail429_completion_blocking.txt": Fails("completion_request_error", 400, True, True, PROVIDER_429),
    "llm_fail429_completion_streaming.txt": Fails("completion_request_error", 400, True, True, PROVIDER_429),
    "llm_fail429_workflow_blocking.txt": Fails("workflow_failed", None, True, True, PROVIDER_429),
    "llm_fail429_workflow_streaming.txt": Fails("workflow_failed", None, True, True, PROVIDER_429),
    "llm_fail429_chatflow_streaming.txt": Fails("invalid_param", 400, True, True, f"Run failed: {PROVIDER_429}"),
    "llm_fail500_chat_blocking.txt": Fails("completion_request_error", 400, True, False, PROVIDER_500),
    "llm_fail500_chat_streaming.txt": Fails("completion_request_error", 400, True, False, PROVIDER_500),
    "llm_fail500_completion_blocking.txt": Fails("completion_request_error", 400, True, False, PROVIDER_500),
    "llm_fail500_completion_streaming.txt": Fails("completion_request_error", 400, True, False, PROVIDER_500),
    "llm_fail500_workflow_blocking.txt": Fails("workflow_failed", None, True, False, PROVIDER_500),
    "llm_fail500_workflow_streaming.txt": Fails("workflow_failed", None, True, False, PROVIDER_500),
    "llm_fail500_chatflow_streaming.txt": Fails("invalid_param", 400, True, False, f"Run failed: {PROVIDER_500}"),
}

# Responses of endpoints the client does not call; replayed by test_every_capture_replays_byte_for_byte.
OTHER_ENDPOINTS = {
    "chat_stop_response.txt",
    "message_feedback.txt",
    "parameters_chat.txt",
    "parameters_completion.txt",
    "parameters_workflow.txt",
    "info_chat.txt",
    "conversations_list.txt",
    "messages_list.txt",
    "workflow_run_detail.txt",
}


def mode_of(name: str) -> str:
    """The app mode whose run call produced a capture, from the route and key INDEX.md records."""
    request = INDEX[name]
    if request.path == "/completion-messages":
        return "completion"
    if request.path == "/workflows/run":
        return "workflow"
    return "advanced-chat" if request.key == "CHATFLOW" else "chat"


def request_of(name: str) -> DifyRequest:
    """The captured request body as a DifyRequest (its response_mode aside: the client always streams)."""
    body = INDEX[name].json_body() if INDEX[name].body.startswith("{") and INDEX[name].body.endswith("}") else {}
    return DifyRequest(
        query=body.get("query"),
        inputs=body.get("inputs", {}),
        user=body.get("user", "sample-user-1"),
        conversation_id=body.get("conversation_id"),
    )


def sse_capture(*events: dict[str, Any] | str) -> Capture:
    """A chunked event-stream response: dicts as `data:` events, strings verbatim (e.g. a ping)."""
    body = "".join(event if isinstance(event, str) else f"data: {json.dumps(event)}\n\n" for event in events)
    head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
    return parse_capture(head.encode() + body.encode(), name="synthetic")


def stream_events(name: str) -> list[dict[str, Any]]:
    body = CAPTURES[name].body
    return [json.loads(line[len(b"data: ") :]) for line in body.split(b"\n") if line.startswith(b"data: ")]


@pytest.fixture
def pool() -> Iterator[urllib3.PoolManager]:
    """A pool of the test's own (loopback only: an injected pool ignores proxies from the environment)."""
    with urllib3.PoolManager() as fresh:
        yield fresh


def client_for(url: str, pool: urllib3.PoolManager, **timeouts: float) -> DifyClient:
    return DifyClient(url + "/v1", API_KEY, pool=pool, **timeouts)


def run_failing(client: DifyClient, mode: str, request: DifyRequest, **kwargs: Any) -> DifyError:
    with pytest.raises(DifyError) as raised:
        client.run(mode, request, **kwargs)
    error = raised.value
    assert API_KEY not in str(error) and API_KEY not in repr(error.as_dict())
    return error


def test_every_capture_is_expected_somewhere() -> None:
    tables = [set(SUCCEEDS), set(FAILS), OTHER_ENDPOINTS]
    assert set().union(*tables) == set(CAPTURES) == set(INDEX)
    assert sum(len(table) for table in tables) == len(CAPTURES)


@pytest.mark.parametrize("name", sorted(SUCCEEDS))
def test_replayed_success(name: str, pool: urllib3.PoolManager) -> None:
    expected = SUCCEEDS[name]
    task_ids: list[str] = []
    with ReplayServer(CAPTURES[name]) as server:
        result = client_for(server.url, pool).run(mode_of(name), request_of(name), on_task_id=task_ids.append)
    assert isinstance(result, DifyResult)
    assert result.answer == expected.answer
    assert result.outputs == expected.outputs
    assert (result.conversation_id, result.message_id) == (expected.conversation_id, expected.message_id)
    assert (result.workflow_run_id, result.task_id) == (expected.workflow_run_id, expected.task_id)
    assert task_ids == [expected.task_id]
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == expected.tokens
    assert (result.usage.total_price, result.usage.currency) == expected.price
    if expected.price[0] is not None:
        assert result.usage.price() == 0
    assert result.usage.latency is not None
    assert result.stopped is False
    if expected.answer:
        assert result.time_to_first_token_s is not None
        assert 0 <= result.time_to_first_token_s <= result.duration_s


@pytest.mark.parametrize("name", sorted(FAILS))
def test_replayed_failure(name: str, pool: urllib3.PoolManager) -> None:
    expected = FAILS[name]
    with ReplayServer(CAPTURES[name]) as server:
        error = run_failing(client_for(server.url, pool), mode_of(name), request_of(name))
    assert (error.code, error.status) == (expected.code, expected.status)
    assert (error.retryable, error.rate_limited) == (expected.retryable, expected.rate_limited)
    assert error.message.startswith(expected.message)
    assert error.retry_after is None


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_every_capture_replays_byte_for_byte(name: str, pool: urllib3.PoolManager) -> None:
    """The replay harness itself: what urllib3 receives is exactly the capture."""
    capture = CAPTURES[name]
    if capture.header("Content-Length") is not None:
        assert int(capture.header("Content-Length") or 0) == len(capture.body)
    with ReplayServer(capture) as server:
        response = pool.request("POST", server.url + "/v1/anything", json={}, timeout=5, retries=False)
    assert (response.status, response.reason) == (capture.status, capture.reason)
    assert response.data == capture.body
    for key, value in capture.headers:
        assert response.headers[key] == value
    if capture.content_type.startswith("application/json"):
        assert isinstance(capture.json(), dict)


@pytest.mark.parametrize(
    ("mode", "path", "expected"),
    [
        ("chat", "/v1/chat-messages",
         {"inputs": {"a": 1}, "query": "hi", "response_mode": "streaming", "user": "u", "auto_generate_name": False}),
        ("agent", "/v1/chat-messages",
         {"inputs": {"a": 1}, "query": "hi", "response_mode": "streaming", "user": "u", "auto_generate_name": False}),
        ("advanced-chat", "/v1/chat-messages",
         {"inputs": {"a": 1}, "query": "hi", "response_mode": "streaming", "user": "u", "auto_generate_name": False}),
        ("completion", "/v1/completion-messages",
         {"inputs": {"a": 1}, "query": "hi", "response_mode": "streaming", "user": "u"}),
        ("workflow", "/v1/workflows/run", {"inputs": {"a": 1}, "response_mode": "streaming", "user": "u"}),
    ],
)  # fmt: skip
def test_request_sent(mode: str, path: str, expected: dict[str, Any], pool: urllib3.PoolManager) -> None:
    with ReplayServer(CAPTURES["err_bad_api_key.txt"]) as server:
        run_failing(client_for(server.url, pool), mode, DifyRequest(query="hi", inputs={"a": 1}, user="u"))
    [sent] = server.requests
    assert (sent.method, sent.path) == ("POST", path)
    assert sent.json() == expected
    assert sent.headers["Authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["Accept"] == "text/event-stream"
    assert sent.headers["Content-Type"] == "application/json"


def test_optional_fields_are_sent_when_set(pool: urllib3.PoolManager) -> None:
    files = [{"type": "image", "transfer_method": "remote_url", "url": "https://example.com/a.png"}]
    request = DifyRequest(
        query="again", inputs={}, user="u", conversation_id="c-1", files=files, auto_generate_name=True
    )
    with ReplayServer(CAPTURES["err_bad_api_key.txt"]) as server:
        client = client_for(server.url, pool)
        run_failing(client, "chat", request)
        run_failing(client, "workflow", request)
        run_failing(client, "chat", dataclasses.replace(request, query=None, conversation_id="", files=[]))
    chat, workflow, bare = (sent.json() for sent in server.requests)
    assert chat["conversation_id"] == "c-1" and chat["files"] == files and chat["auto_generate_name"] is True
    assert workflow == {"inputs": {}, "response_mode": "streaming", "user": "u", "files": files}
    assert bare == {"inputs": {}, "response_mode": "streaming", "user": "u", "auto_generate_name": True}


@pytest.mark.parametrize(
    ("mode", "path"),
    [
        ("chat", "/v1/chat-messages/task%2F1/stop"),
        ("advanced-chat", "/v1/chat-messages/task%2F1/stop"),
        ("completion", "/v1/completion-messages/task%2F1/stop"),
        ("workflow", "/v1/workflows/tasks/task%2F1/stop"),
    ],
)
def test_stop(mode: str, path: str, pool: urllib3.PoolManager) -> None:
    with ReplayServer(CAPTURES["chat_stop_response.txt"]) as server:
        assert client_for(server.url, pool).stop(mode, "task/1", "sample-user-1") is None
    [sent] = server.requests
    assert (sent.path, sent.json()) == (path, {"user": "sample-user-1"})
    assert sent.headers["Authorization"] == f"Bearer {API_KEY}"


def test_stop_error_is_a_dify_error(pool: urllib3.PoolManager) -> None:
    with ReplayServer(CAPTURES["err_completion_key_on_chat.txt"]) as server, pytest.raises(DifyError) as raised:
        client_for(server.url, pool).stop("chat", "t", "u")
    assert (raised.value.code, raised.value.retryable) == ("not_chat_app", False)


def test_unknown_mode_is_a_programming_error(pool: urllib3.PoolManager) -> None:
    with pytest.raises(ValueError, match="unknown Dify app mode 'chatbot'"):
        client_for("http://127.0.0.1:9", pool).run("chatbot", DifyRequest(query="q", inputs={}, user="u"))


def http_capture(status_line: str, content_type: str, body: bytes, *extra_headers: str) -> Capture:
    """A Content-Length response built from its parts."""
    lines = [status_line, f"Content-Type: {content_type}", *extra_headers, f"Content-Length: {len(body)}", "", ""]
    return parse_capture("\r\n".join(lines).encode() + body)


def test_cloudflare_429_with_retry_after(pool: urllib3.PoolManager) -> None:
    capture = http_capture("HTTP/1.1 429 Too Many Requests", "text/plain", b"error code: 1015", "Retry-After: 7")
    with ReplayServer(capture) as server:
        error = run_failing(client_for(server.url, pool), "chat", request_of("chat_streaming.txt"))
    assert (error.code, error.status, error.retry_after) == ("http_429", 429, 7.0)
    assert (error.retryable, error.rate_limited) == (True, True)
    assert error.message == "HTTP 429 Too Many Requests: error code: 1015"


@pytest.mark.parametrize(
    ("capture", "code", "status", "rate_limited"),
    [
        (http_capture("HTTP/1.1 429 TOO MANY REQUESTS", "application/json",
                      b'{"code": "too_many_requests", "message": "Too many requests.", "status": 429}\n'),
         "too_many_requests", 429, True),
        (http_capture("HTTP/1.1 400 BAD REQUEST", "application/json",
                      b'{"code": "invalid_param", "message": "Too many requests. Please try again later.", '
                      b'"status": 400}\n'),
         "invalid_param", 400, True),
        (http_capture("HTTP/1.1 500 INTERNAL SERVER ERROR", "application/json",
                      b'{"message": "Internal Server Error", "code": "unknown", "status": 500}\n'),
         "unknown", 500, False),
        (http_capture("HTTP/1.1 502 Bad Gateway", "text/html", b"<html><h1>502 Bad Gateway</h1></html>"),
         "http_502", 502, False),
    ],
)  # fmt: skip
def test_retryable_http_errors(
    capture: Capture, code: str, status: int, rate_limited: bool, pool: urllib3.PoolManager
) -> None:
    with ReplayServer(capture) as server:
        error = run_failing(client_for(server.url, pool), "chat", request_of("chat_streaming.txt"))
    assert (error.code, error.status, error.retryable, error.rate_limited) == (code, status, True, rate_limited)
    assert error.time_to_first_token_s is None and "time_to_first_token_s" not in error.as_dict()


def test_redirect_is_not_followed(pool: urllib3.PoolManager) -> None:
    capture = http_capture("HTTP/1.1 301 Moved Permanently", "text/html", b"", "Location: https://elsewhere.example/v1")
    with ReplayServer(capture) as server:
        error = run_failing(client_for(server.url, pool), "chat", request_of("chat_streaming.txt"))
    assert (error.code, error.status, error.retryable) == ("http_301", 301, False)
    assert len(server.requests) == 1


def test_agent_stream_with_thoughts_replace_and_tts(pool: urllib3.PoolManager) -> None:
    wrapper = {"conversation_id": "c", "message_id": "m", "task_id": "t"}
    capture = sse_capture(
        "event: ping\n\n",
        {"event": "agent_thought", **wrapper, "thought": "I should search", "position": 1},
        {"event": "agent_message", **wrapper, "answer": "Hel"},
        {"event": "agent_message", **wrapper, "answer": "lo"},
        {"event": "message_replace", **wrapper, "answer": "[moderated]", "reason": "output"},
        {"event": "message_end", **wrapper, "metadata": {"usage": {"total_tokens": 5, "total_price": "0.0001"}}},
        {"event": "tts_message_end", **wrapper, "audio": ""},
    )
    with ReplayServer(capture) as server:
        result = client_for(server.url, pool).run("agent", DifyRequest(query="q", inputs={}, user="u"))
    assert (result.answer, result.conversation_id, result.task_id) == ("[moderated]", "c", "t")
    assert result.usage is not None and result.usage.price() == Decimal("0.0001")
    assert result.usage.prompt_tokens is None and result.usage.currency is None


def test_stopped_workflow_without_text(pool: urllib3.PoolManager) -> None:
    capture = sse_capture(
        {"event": "workflow_started", "workflow_run_id": "r", "task_id": "t", "data": {"id": "r"}},
        {"event": "workflow_finished", "workflow_run_id": "r", "task_id": "t",
         "data": {"id": "r", "status": "stopped", "outputs": None, "error": None, "total_tokens": 3}},
    )  # fmt: skip
    with ReplayServer(capture) as server:
        result = client_for(server.url, pool).run("workflow", DifyRequest(query=None, inputs={}, user="u"))
    assert (result.stopped, result.answer, result.outputs, result.time_to_first_token_s) == (True, None, None, None)
    assert result.usage is not None and result.usage.total_tokens == 3


def test_chatflow_accepts_message_end_before_workflow_finished(pool: urllib3.PoolManager) -> None:
    events = stream_events("chatflow_streaming.txt")
    events[-2], events[-1] = events[-1], events[-2]
    assert [event["event"] for event in events[-2:]] == ["message_end", "workflow_finished"]
    with ReplayServer(sse_capture(*events)) as server:
        result = client_for(server.url, pool).run("advanced-chat", request_of("chatflow_streaming.txt"))
    assert result.answer == "FAKE-LLM says: Stream chatflow"
    assert result.outputs == {"answer": "FAKE-LLM says: Stream chatflow"}


@pytest.mark.parametrize(
    ("name", "mode", "drop"),
    [
        ("chat_streaming.txt", "chat", "message_end"),
        ("completion_streaming.txt", "completion", "message_end"),
    ],
)
def test_stream_closed_without_terminal_event(name: str, mode: str, drop: str, pool: urllib3.PoolManager) -> None:
    """A workflow run's broken stream is followed instead (see test_dify_follow)."""
    events = [event for event in stream_events(name) if event["event"] != drop]
    with ReplayServer(sse_capture(*events)) as server:
        error = run_failing(client_for(server.url, pool), mode, request_of(name))
    assert (error.code, error.retryable, error.rate_limited) == ("stream_incomplete", True, False)
    # Tokens came before the cut: the attempt's record says how soon.
    assert error.time_to_first_token_s is not None and error.time_to_first_token_s >= 0
    assert error.as_dict()["time_to_first_token_s"] == round(error.time_to_first_token_s, 3)


def test_chatflow_failed_run_without_error_event(pool: urllib3.PoolManager) -> None:
    events = [event for event in stream_events("llm_fail500_chatflow_streaming.txt") if event["event"] != "error"]
    with ReplayServer(sse_capture(*events)) as server:
        error = run_failing(client_for(server.url, pool), "advanced-chat", request_of("chatflow_streaming.txt"))
    assert (error.code, error.retryable, error.rate_limited) == ("workflow_failed", True, False)
    assert error.message.startswith(PROVIDER_500)


def test_event_data_that_is_not_json(pool: urllib3.PoolManager) -> None:
    with ReplayServer(sse_capture("data: [DONE]\n\n")) as server:
        error = run_failing(client_for(server.url, pool), "chat", request_of("chat_streaming.txt"))
    assert (error.code, error.retryable) == ("invalid_response", True)


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
SSE_HEAD_UNTIL_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nConnection: close\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def capture_lines(name: str) -> list[bytes]:
    """The `data:` events of a capture as framed SSE bytes."""
    return [line + b"\n\n" for line in CAPTURES[name].body.split(b"\n") if line.startswith(b"data: ")]


def test_connection_refused(pool: urllib3.PoolManager) -> None:
    client = DifyClient(f"http://127.0.0.1:{closed_port()}/v1", API_KEY, connect_timeout=2, pool=pool)
    error = run_failing(client, "chat", request_of("chat_streaming.txt"))
    assert (error.code, error.status, error.retryable, error.rate_limited) == ("connection_error", None, True, False)


def test_connect_timeout(pool: urllib3.PoolManager) -> None:
    with unanswered_connect_port() as port:
        if port is None:
            pytest.skip("this kernel answers connections beyond a full accept queue")
        client = DifyClient(f"http://127.0.0.1:{port}/v1", API_KEY, connect_timeout=0.3, pool=pool)
        error = run_failing(client, "chat", request_of("chat_streaming.txt"))
    assert (error.code, error.retryable) == ("timeout", True)
    assert "connecting" in error.message


def test_server_that_accepts_and_never_answers(pool: urllib3.PoolManager) -> None:
    def silent(connection: socket.socket, stopping: threading.Event) -> None:
        read_request(connection)
        stopping.wait()

    with ScriptedServer(silent) as server:
        error = run_failing(
            client_for(server.url, pool, idle_read_timeout=0.3), "chat", request_of("chat_streaming.txt")
        )
    assert (error.code, error.retryable) == ("timeout", True)


def test_stream_that_goes_silent_mid_answer(pool: urllib3.PoolManager) -> None:
    def stall(connection: socket.socket, stopping: threading.Event) -> None:
        read_request(connection)
        connection.sendall(SSE_HEAD + chunk(capture_lines("chat_streaming.txt")[0]))
        stopping.wait()

    task_ids: list[str] = []
    with ScriptedServer(stall) as server:
        client = client_for(server.url, pool, idle_read_timeout=0.3)
        error = run_failing(client, "chat", request_of("chat_streaming.txt"), on_task_id=task_ids.append)
    assert (error.code, error.retryable) == ("timeout", True)
    assert task_ids == ["946634d2-1418-4989-963d-64c8b6ecfbcc"]


def test_pings_forever_hit_the_total_timeout(pool: urllib3.PoolManager) -> None:
    def ping_forever(connection: socket.socket, stopping: threading.Event) -> None:
        read_request(connection)
        connection.sendall(SSE_HEAD_UNTIL_CLOSE)
        while not stopping.wait(0.05):
            connection.sendall(b"event: ping\n\n")

    with ScriptedServer(ping_forever) as server:
        client = client_for(server.url, pool, idle_read_timeout=5, total_timeout=0.5)
        error = run_failing(client, "chat", request_of("chat_streaming.txt"))
    assert (error.code, error.retryable) == ("timeout", True)
    assert "total timeout" in error.message


def test_on_task_id_is_called_while_the_stream_is_still_open(pool: urllib3.PoolManager) -> None:
    task_seen = threading.Event()
    seen_before_end: list[bool] = []

    def wait_for_task_id(connection: socket.socket, stopping: threading.Event) -> None:
        read_request(connection)
        first, *rest = capture_lines("chat_streaming.txt")
        connection.sendall(SSE_HEAD_UNTIL_CLOSE + first)
        seen_before_end.append(task_seen.wait(5))
        connection.sendall(b"".join(rest))

    with ScriptedServer(wait_for_task_id) as server:
        client = client_for(server.url, pool)
        result = client.run("chat", request_of("chat_streaming.txt"), on_task_id=lambda _task: task_seen.set())
    assert seen_before_end == [True]
    assert result.answer == "FAKE-LLM says: Stream me please"


def test_broken_chunked_encoding_mid_stream(pool: urllib3.PoolManager) -> None:
    def cut_off(connection: socket.socket, stopping: threading.Event) -> None:
        read_request(connection)
        connection.sendall(SSE_HEAD + chunk(capture_lines("chat_streaming.txt")[0]) + b"400\r\ndata: {")

    with ScriptedServer(cut_off) as server:
        error = run_failing(client_for(server.url, pool), "chat", request_of("chat_streaming.txt"))
    assert (error.code, error.retryable) == ("stream_incomplete", True)


def test_result_kept_when_the_peer_stalls_after_the_terminal_event(pool: urllib3.PoolManager) -> None:
    def stall_after_end(connection: socket.socket, stopping: threading.Event) -> None:
        read_request(connection)
        connection.sendall(SSE_HEAD + b"".join(chunk(line) for line in capture_lines("chat_streaming.txt")))
        stopping.wait()

    with ScriptedServer(stall_after_end) as server:
        client = client_for(server.url, pool, idle_read_timeout=0.3)
        result = client.run("chat", request_of("chat_streaming.txt"))
    assert result.answer == "FAKE-LLM says: Stream me please"


def test_repr_hides_the_key() -> None:
    assert API_KEY not in repr(DifyClient("https://dify.example/v1", API_KEY))


def test_environment_proxies_and_ca_bundle_are_resolved_once_per_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests would scan the environment on every call; the client takes the same settings once, when made."""
    for name in ("HTTP_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.internal:3128")  # no scheme: http:// assumed, as requests does
    monkeypatch.setenv("NO_PROXY", "dify.internal")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/private-ca.pem")
    assert environment_settings("https://api.dify.ai/v1") == ("http://proxy.internal:3128", "/etc/ssl/private-ca.pem")
    assert environment_settings("https://dify.internal/v1").proxy is None
    assert environment_settings("http://api.dify.ai/v1").proxy is None  # HTTPS_PROXY is for https URLs only
    client = DifyClient("https://api.dify.ai/v1", API_KEY)
    monkeypatch.setenv("NO_PROXY", "api.dify.ai")
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    assert environment_settings("https://api.dify.ai/v1") == (None, certifi.where())
    assert isinstance(client.pool, urllib3.ProxyManager)  # what the environment said when the client was made
    assert client.pool.connection_pool_kw["ca_certs"] == "/etc/ssl/private-ca.pem"
