"""The Dify emulator over real HTTP: knobs, every fault, the concurrency cap and its stats, stop, call records,
runtime app changes, and a few hundred streams held open at once. Durations are printed, never asserted as
speeds; the only time checks are lower bounds the emulator must wait out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from difyq.worker.dify.emulator import EmulatedApp, RunningEmulator, default_apps, load_apps, start_emulator
from difyq.worker.dify.emulator.faults import SLOW_TOKEN_INTERVAL_S
from tests.support.waiting import wait_for

USER = "tester"
APPS = [
    EmulatedApp(name="chat", key="app-chat", mode="chat"),
    EmulatedApp(name="short", key="app-short", mode="chat", answer_tokens=3),
    EmulatedApp(
        name="paced",
        key="app-paced",
        mode="chat",
        time_to_first_token_s=0.3,
        tokens_per_second=20,
        answer_tokens=5,
        ping_interval_s=0.1,
    ),
    EmulatedApp(name="slow", key="app-slow", mode="chat", tokens_per_second=2, answer_tokens=20),
    EmulatedApp(name="capped", key="app-capped", mode="chat", max_concurrency=2, tokens_per_second=2, answer_tokens=20),
    EmulatedApp(
        name="capped400",
        key="app-capped400",
        mode="chat",
        max_concurrency=1,
        concurrency_error="400",
        tokens_per_second=2,
        answer_tokens=20,
    ),
    EmulatedApp(name="agent", key="app-agent", mode="agent", answer_tokens=4),
    EmulatedApp(name="completion", key="app-completion", mode="completion", required_inputs=["text", "tone"]),
    EmulatedApp(name="workflow", key="app-workflow", mode="workflow", required_inputs=["text"]),
    EmulatedApp(name="slow-workflow", key="app-slow-workflow", mode="workflow", tokens_per_second=2, answer_tokens=20),
    EmulatedApp(name="chatflow", key="app-chatflow", mode="advanced-chat"),
    EmulatedApp(name="faulty", key="app-faulty", mode="chat", fault="http500"),
    EmulatedApp(name="disabled", key="app-disabled", mode="chat", api_enabled=False),
    EmulatedApp(name="many", key="app-many", mode="chat", tokens_per_second=0.05, answer_tokens=3),
]
ROUTE = {"workflow": "/workflows/run", "slow-workflow": "/workflows/run", "completion": "/completion-messages"}


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with start_emulator(APPS) as running:
        yield running


@pytest.fixture(scope="module")
def client(emulator: RunningEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, timeout=10) as http:
        yield http


@pytest.fixture
def control(emulator: RunningEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url.removesuffix("/v1") + "/_emulator", timeout=10) as http:
        yield http


def auth(app: str) -> dict[str, str]:
    return {"Authorization": f"Bearer app-{app}"}


def body_for(app: str, query: str = "hello there", streaming: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": {"text": query}, "user": USER, **extra}
    if app not in ROUTE:
        body["query"] = query
    if streaming:
        body["response_mode"] = "streaming"
    return body


def call(
    client: httpx.Client,
    app: str,
    query: str = "hello there",
    *,
    streaming: bool = False,
    fault: str | None = None,
    **extra: Any,
) -> httpx.Response:
    headers = auth(app) | ({"X-Emulator-Fault": fault} if fault else {})
    return client.post(ROUTE.get(app, "/chat-messages"), json=body_for(app, query, streaming, **extra), headers=headers)


def sse(text: str) -> list[Any]:
    """The stream's frames: "ping", or the decoded data of a `data:` frame."""
    frames = []
    for frame in text.split("\n\n"):
        if frame == "event: ping":
            frames.append("ping")
        elif frame.startswith("data: "):
            frames.append(json.loads(frame[len("data: ") :]))
    return frames


def names(frames: list[Any]) -> list[str]:
    return [frame if frame == "ping" else frame["event"] for frame in frames]


@contextlib.contextmanager
def open_stream(client: httpx.Client, app: str, query: str = "hello there") -> Iterator[Iterator[dict[str, Any]]]:
    """A streaming call whose events are read one at a time, left open until the block ends."""
    with client.stream(
        "POST", ROUTE.get(app, "/chat-messages"), json=body_for(app, query, True), headers=auth(app)
    ) as response:
        assert response.status_code == 200
        yield (json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: "))


def ended_record(emulator: RunningEmulator, **match: Any) -> dict[str, Any]:
    """The latest call record with these fields, once it has ended (a stream's record closes just after the
    client has read the last event)."""

    def latest() -> dict[str, Any] | None:
        return next((record for record in reversed(emulator.calls()) if match.items() <= record.items()), None)

    wait_for(lambda: (latest() or {}).get("outcome") is not None)
    return latest() or {}


# -- answers and knobs --------------------------------------------------------------------------------------------


def test_blocking_is_the_default_and_answer_tokens_sets_the_length(client: httpx.Client) -> None:
    answer = call(client, "short", "one two three four")
    assert answer.status_code == 200
    body = answer.json()
    assert body["mode"] == "chat" and body["answer"] == "FAKE-LLM says: one"
    usage = body["metadata"]["usage"]
    assert usage["completion_tokens"] == 3 and isinstance(usage["prompt_tokens"], int)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert Decimal(usage["total_price"]) == Decimal(usage["prompt_price"]) + Decimal(usage["completion_price"]) > 0
    assert usage["currency"] == "USD" and isinstance(usage["latency"], float)


def test_streaming_sends_the_tokens_then_an_empty_delta_then_message_end(client: httpx.Client) -> None:
    answer = call(client, "short", "one two three four", streaming=True)
    frames = sse(answer.text)
    assert answer.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert names(frames) == ["message"] * 4 + ["message_end"]
    assert "".join(frame["answer"] for frame in frames[:-1]) == "FAKE-LLM says: one"
    assert frames[-2]["answer"] == ""
    assert frames[-1]["metadata"]["usage"]["completion_tokens"] == 3
    assert len({frame["task_id"] for frame in frames}) == 1


def test_time_to_first_token_is_waited_out_with_pings(client: httpx.Client) -> None:
    started = time.monotonic()
    with client.stream("POST", "/chat-messages", json=body_for("paced", streaming=True), headers=auth("paced")) as r:
        frames, first_token_at = [], None
        for line in r.iter_lines():
            if line == "event: ping":
                frames.append("ping")
            elif line.startswith("data: "):
                frames.append(json.loads(line[len("data: ") :]))
                first_token_at = first_token_at or time.monotonic() - started
    total = time.monotonic() - started
    print(f"paced app: first token after {first_token_at:.3f}s, whole answer {total:.3f}s")
    assert names(frames).index("message") >= 2, "0.3 s to the first token, pinged every 0.1 s meanwhile"
    assert [name for name in names(frames) if name != "ping"] == ["message"] * 6 + ["message_end"]


def test_wait_trigger_keeps_silent_while_pings_flow(client: httpx.Client) -> None:
    frames = sse(call(client, "paced", "WAIT0.3 then answer", streaming=True).text)
    leading_pings = names(frames).index("message")
    print(f"WAIT0.3 on a 0.3s time to first token with 0.1s pings: {leading_pings} pings first")
    assert leading_pings >= 2


@pytest.mark.parametrize(("query", "fault"), [("SLOW down", None), ("hello", "slow-stream")])
def test_slow_tokens(client: httpx.Client, query: str, fault: str | None) -> None:
    started = time.monotonic()
    frames = sse(call(client, "short", query, streaming=True, fault=fault).text)
    elapsed = time.monotonic() - started
    print(f"slow tokens ({query!r}, fault {fault}): 3 tokens in {elapsed:.3f}s")
    # A lower bound on the delay the emulator is asked to inject (no load can make it shorter), not a latency.
    assert names(frames)[-1] == "message_end" and elapsed >= 2 * SLOW_TOKEN_INTERVAL_S


def test_required_inputs_are_configurable(client: httpx.Client) -> None:
    answer = client.post(
        "/completion-messages", json={"inputs": {"text": "x"}, "user": USER}, headers=auth("completion")
    )
    assert answer.status_code == 400
    assert answer.json() == {"code": "invalid_param", "message": "tone is required in input form", "status": 400}
    ok = client.post(
        "/completion-messages", json={"inputs": {"text": "x", "tone": "dry"}, "user": USER}, headers=auth("completion")
    )
    assert ok.status_code == 200 and "conversation_id" not in ok.json()
    parameters = client.get("/parameters", headers=auth("completion")).json()
    assert [item["paragraph"]["variable"] for item in parameters["user_input_form"]] == ["text", "tone"]


def test_agent_streams_thoughts_and_rejects_blocking(client: httpx.Client) -> None:
    blocking = call(client, "agent")
    assert (blocking.status_code, blocking.json()) == (
        400,
        {"code": "invalid_param", "message": "Agent Chat App does not support blocking mode", "status": 400},
    )
    frames = sse(call(client, "agent", "hi", streaming=True).text)
    assert names(frames) == ["agent_thought"] + ["agent_message"] * 4 + ["agent_thought", "message_end"]
    assert frames[-2]["thought"] == "".join(frame["answer"] for frame in frames[1:5])


def test_conversations_belong_to_their_user(client: httpx.Client) -> None:
    first = call(client, "chatflow").json()
    follow_up = sse(call(client, "chatflow", streaming=True, conversation_id=first["conversation_id"]).text)
    assert follow_up[0]["conversation_id"] == first["conversation_id"]
    assert follow_up[0]["data"]["inputs"]["sys.dialogue_count"] == 1
    assert names(follow_up)[-2:] == ["workflow_finished", "message_end"]
    stranger = client.post(
        "/chat-messages",
        headers=auth("chatflow"),
        json={"inputs": {}, "query": "x", "user": "someone-else", "conversation_id": first["conversation_id"]},
    )
    assert (stranger.status_code, stranger.json()["message"]) == (404, "Conversation Not Exists.")


# -- auth and routing ---------------------------------------------------------------------------------------------


def test_auth_failures(client: httpx.Client) -> None:
    missing = client.post("/chat-messages", json=body_for("chat"))
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == 'Bearer realm="api"'
    scheme = client.post("/chat-messages", json=body_for("chat"), headers={"Authorization": "Token app-chat"})
    assert scheme.json() == {"code": "unauthorized", "message": "Authorization scheme must be 'Bearer'", "status": 401}
    disabled = call(client, "disabled")
    assert disabled.status_code == 403
    assert disabled.json() == {
        "code": "forbidden",
        "message": "The app's API service has been disabled.",
        "status": 403,
    }
    form = client.post("/chat-messages", data={"query": "x"}, headers=auth("chat"))
    assert (form.status_code, form.json()["code"]) == (415, "unsupported_media_type")


def test_routing_errors_are_werkzeug_html(client: httpx.Client) -> None:
    wrong_method = client.get("/chat-messages", headers=auth("chat"))
    assert wrong_method.status_code == 405 and wrong_method.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>405 Method Not Allowed</title>" in wrong_method.text
    trailing_slash = client.post("/chat-messages/", json=body_for("chat"), headers=auth("chat"))
    assert trailing_slash.status_code == 404 and "<title>404 Not Found</title>" in trailing_slash.text


def test_info_and_parameters(client: httpx.Client) -> None:
    assert client.get("/info", headers=auth("chat")).json() == {
        "name": "chat",
        "description": "emulated chat app",
        "tags": [],
    }
    workflow = client.get("/parameters", headers=auth("workflow")).json()
    assert workflow["user_input_form"][0]["paragraph"]["variable"] == "text"


# -- faults -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("fault", "status", "content_type", "code"),
    [
        ("http429", 429, "application/json", "too_many_requests"),
        ("http400-too-many", 400, "application/json", "invalid_param"),
        ("http500", 500, "application/json", "internal_server_error"),
        ("http429-text", 429, "text/plain; charset=utf-8", None),
        ("http500-too-many", 500, "application/json", "internal_server_error"),
        ("http429-quota", 429, "application/json", "rate_limit_error"),
        ("http403-version", 403, "application/json", "workflow_version_execution_not_allowed"),
    ],
)
def test_http_faults(
    client: httpx.Client, fault: str, status: int, content_type: str, code: str | None, streaming: bool
) -> None:
    answer = call(client, "chat", streaming=streaming, fault=fault)
    assert (answer.status_code, answer.headers["content-type"]) == (status, content_type)
    if code is None:
        assert answer.text == "error code: 1015"
    else:
        assert answer.json()["code"] == code and answer.json()["status"] == status
    if fault in ("http429", "http400-too-many", "http500-too-many"):
        assert answer.json()["message"].startswith("Too many requests. Please try again later.")


@pytest.mark.parametrize("status", [429, 500])
def test_provider_faults(client: httpx.Client, status: int) -> None:
    fault = f"provider{status}"
    expected = f"[openai_api_compatible] Error: API request failed with status code {status}: "
    blocking = call(client, "chat", fault=fault)
    assert blocking.status_code == 400 and blocking.json()["code"] == "completion_request_error"
    assert blocking.json()["message"].startswith(expected)
    streamed = sse(call(client, "chat", streaming=True, fault=fault).text)
    assert names(streamed) == ["error"] and streamed[0]["message"].startswith(expected)
    assert "task_id" not in streamed[0]
    workflow = call(client, "workflow", fault=fault)
    assert workflow.status_code == 200 and workflow.json()["data"]["status"] == "failed"
    assert workflow.json()["data"]["error"].startswith(expected)
    chatflow = sse(call(client, "chatflow", streaming=True, fault=fault).text)
    assert names(chatflow)[-2:] == ["workflow_finished", "error"]
    assert chatflow[-1]["code"] == "invalid_param" and chatflow[-1]["message"].startswith("Run failed: " + expected)


def test_midstream_error_fault(client: httpx.Client) -> None:
    frames = sse(call(client, "chat", streaming=True, fault="midstream-error").text)
    assert names(frames) == ["message"] * 4 + ["error"]
    assert (frames[-1]["code"], frames[-1]["status"]) == ("internal_server_error", 500)
    workflow = sse(call(client, "workflow", streaming=True, fault="midstream-error").text)
    assert names(workflow)[-1] == "error" and "workflow_finished" not in names(workflow)
    assert set(workflow[-1]) == {"event", "workflow_run_id", "code", "status", "message"}
    blocking = call(client, "chat", fault="midstream-error")
    assert (blocking.status_code, blocking.json()["code"]) == (500, "internal_server_error")


def test_cut_stream_fault(client: httpx.Client, emulator: RunningEmulator) -> None:
    frames = sse(call(client, "chat", streaming=True, fault="cut-stream").text)
    assert names(frames) == ["message"] * 4
    assert ended_record(emulator, fault="cut-stream")["outcome"] == "cut"
    with pytest.raises(httpx.RemoteProtocolError):
        call(client, "chat", fault="cut-stream")


def test_midfail_trigger_ends_normally_with_a_partial_answer(client: httpx.Client) -> None:
    frames = sse(call(client, "chat", "MIDFAIL one two three", streaming=True).text)
    assert names(frames) == ["message"] * 3 + ["message_end"]
    assert frames[-1]["metadata"]["usage"]["completion_tokens"] == 2


def test_hang_fault_holds_the_call_until_the_client_gives_up(emulator: RunningEmulator) -> None:
    with httpx.Client(base_url=emulator.base_url, timeout=0.5) as impatient:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            call(impatient, "slow", fault="hang")
        print(f"hang: client gave up after {time.monotonic() - started:.3f}s")
    record = ended_record(emulator, fault="hang")
    assert (record["status"], record["outcome"]) == (None, "hung")
    assert emulator.stats()["slow"]["open"] == 0


def test_unknown_fault_header_is_rejected(client: httpx.Client) -> None:
    answer = call(client, "chat", fault="gremlins")
    assert answer.status_code == 400 and "X-Emulator-Fault" in answer.json()["message"]


# -- app faults and runtime changes -------------------------------------------------------------------------------


def test_app_fault_changes_at_runtime_over_http(client: httpx.Client, control: httpx.Client) -> None:
    assert call(client, "faulty").status_code == 500
    try:
        assert control.put("/apps/faulty", json={"fault": None}).json()["fault"] is None
        assert call(client, "faulty").status_code == 200
        changed = control.put("/apps/faulty", json={"fault": "http429", "until": time.time() + 60})
        assert changed.status_code == 200 and changed.json()["fault_until"] > time.time()
        assert call(client, "faulty").status_code == 429
        control.put("/apps/faulty", json={"until": time.time() - 1})
        assert control.get("/apps/faulty").json()["fault"] == "http429"
        assert call(client, "faulty").status_code == 200
        assert control.put("/apps/faulty", json={"fault": "nonsense"}).status_code == 400
        assert control.put("/apps/faulty", json={"colour": "red"}).status_code == 400
        assert control.put("/apps/nobody", json={"fault": None}).status_code == 404
        assert "faulty" in [app["name"] for app in control.get("/apps").json()]
    finally:
        control.put("/apps/faulty", json={"fault": "http500"})


def test_set_app_from_python(client: httpx.Client, emulator: RunningEmulator) -> None:
    updated = emulator.set_app("short", answer_tokens=1, fault="provider500", until=time.time() + 60)
    try:
        assert updated.active_fault() == "provider500"
        assert updated.active_fault(now=time.time() + 120) is None
        assert call(client, "short").json()["code"] == "completion_request_error"
        emulator.set_app("short", fault=None)
        assert call(client, "short").json()["answer"] == "FAKE-LLM"
    finally:
        emulator.set_app("short", answer_tokens=3, fault=None)
    with pytest.raises(ValueError, match="fault must be one of"):
        emulator.set_app("short", fault="boom")


# -- concurrency, stop, records -----------------------------------------------------------------------------------


def test_concurrency_cap_answers_429_and_stats_show_the_peak(
    client: httpx.Client, control: httpx.Client, emulator: RunningEmulator
) -> None:
    app_id = control.get("/apps/capped").json()["app_id"]
    with open_stream(client, "capped") as first, open_stream(client, "capped") as second:
        next(first), next(second)
        assert emulator.stats()["capped"]["open"] == 2
        rejected = call(client, "capped")
    assert rejected.status_code == 429 and "retry-after" not in rejected.headers
    assert rejected.json() == {
        "code": "too_many_requests",
        "message": "Too many requests. Please try again later. The current maximum concurrent requests allowed for "
        f"{app_id} is 2.",
        "status": 429,
    }
    wait_for(lambda: emulator.stats()["capped"]["open"] == 0)
    stats = emulator.stats()["capped"]
    assert stats["max_concurrent"] == 2 and stats["calls"] == 3
    records = [record for record in emulator.calls() if record["app"] == "capped"]
    assert [record["concurrency_at_start"] for record in records] == [1, 2, 2]
    assert [record["outcome"] for record in records] == ["disconnected", "disconnected", "error"]


def test_concurrency_cap_can_answer_400(client: httpx.Client) -> None:
    with open_stream(client, "capped400") as stream:
        next(stream)
        rejected = call(client, "capped400")
    assert rejected.status_code == 400 and rejected.json()["code"] == "invalid_param"
    assert rejected.json()["message"].startswith("Too many requests. Please try again later.")


def test_stop_ends_a_chat_stream_with_message_end(client: httpx.Client, emulator: RunningEmulator) -> None:
    with open_stream(client, "slow") as events:
        first = next(events)
        stop_url = f"/chat-messages/{first['task_id']}/stop"
        assert client.post(stop_url, json={"user": "someone-else"}, headers=auth("slow")).json() == {
            "result": "success"
        }
        assert next(events)["event"] == "message"  # another user's stop changes nothing
        client.post(stop_url, json={"user": USER}, headers=auth("slow"))
        rest = list(events)
    assert rest[-1]["event"] == "message_end" and len(rest) < 5  # 18 tokens were still to come
    assert all(event["event"] == "message" and event["answer"] for event in rest[:-1])  # no closing "" delta
    record = ended_record(emulator, task_id=first["task_id"])
    assert (record["status"], record["outcome"]) == (200, "stopped")


def test_stop_ends_a_workflow_stream_with_workflow_finished_stopped(client: httpx.Client) -> None:
    with open_stream(client, "slow-workflow") as events:
        first = next(event for event in events if event["event"] == "text_chunk")
        stopped = client.post(
            f"/workflows/tasks/{first['task_id']}/stop", json={"user": USER}, headers=auth("slow-workflow")
        )
        assert stopped.json() == {"result": "success"}
        rest = list(events)
    assert rest[-1]["event"] == "workflow_finished" and rest[-1]["data"]["status"] == "stopped"
    assert {event["event"] for event in rest[:-1]} <= {"text_chunk"} and len(rest) < 5


def test_stop_routes_check_the_app_mode(client: httpx.Client) -> None:
    on_completion = client.post("/completion-messages/t/stop", json={"user": USER}, headers=auth("chat"))
    assert on_completion.json()["code"] == "app_unavailable"
    on_chat = client.post("/chat-messages/t/stop", json={"user": USER}, headers=auth("workflow"))
    assert on_chat.json()["code"] == "not_chat_app"
    on_workflow = client.post("/workflows/tasks/t/stop", json={"user": USER}, headers=auth("chat"))
    assert on_workflow.json()["code"] == "not_workflow_app"
    missing_user = client.post("/chat-messages/t/stop", json={}, headers=auth("chat"))
    assert missing_user.json()["message"] == "Arg user must be provided."


def test_call_records_and_reset(client: httpx.Client, control: httpx.Client, emulator: RunningEmulator) -> None:
    control.delete("/calls")
    assert emulator.calls() == [] and emulator.stats()["chat"]["calls"] == 0
    answer = call(client, "chat", "record me").json()
    client.get("/info", headers={"Authorization": "Bearer nope"})
    first, second = control.get("/calls").json()
    assert first["started_at"] <= first["ended_at"]
    assert (first["key"], first["app"], first["method"], first["path"]) == (
        "app-chat",
        "chat",
        "POST",
        "/v1/chat-messages",
    )
    assert first["body"]["query"] == "record me"
    assert (first["status"], first["outcome"], first["concurrency_at_start"]) == (200, "ok", 1)
    assert first["task_id"] == answer["task_id"]
    assert (second["app"], second["status"], second["code"]) == (None, 401, "unauthorized")
    assert control.get("/stats").json()["chat"]["calls"] == 1
    taken = control.delete("/calls")
    assert taken.status_code == 200 and taken.json() == [first, second]  # what it forgot, in one step
    assert emulator.calls() == [] and control.get("/stats").json()["chat"]["calls"] == 0
    call(client, "chat", "record me too")
    assert [record["body"]["query"] for record in emulator.reset_calls()] == ["record me too"]
    assert emulator.calls() == []


def test_hundreds_of_streams_held_open_at_once(emulator: RunningEmulator) -> None:
    streams = 300

    async def hold_all() -> dict[str, int]:
        opened, release = 0, asyncio.Event()
        all_open = asyncio.Event()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=emulator.base_url, timeout=30, limits=limits) as client:

            async def hold() -> None:
                nonlocal opened
                async with client.stream(
                    "POST", "/chat-messages", json=body_for("many", streaming=True), headers=auth("many")
                ) as response:
                    lines = response.aiter_lines()  # held: a dropped line iterator closes the connection
                    while not (await anext(lines)).startswith("data: "):
                        pass
                    opened += 1
                    if opened == streams:
                        all_open.set()
                    await release.wait()

            tasks = [asyncio.create_task(hold()) for _ in range(streams)]
            await asyncio.wait_for(all_open.wait(), 30)
            seen = emulator.stats()["many"]
            release.set()
            await asyncio.gather(*tasks)
        return seen

    started = time.monotonic()
    seen = asyncio.run(hold_all())
    print(f"{streams} streams opened and read in {time.monotonic() - started:.2f}s")
    assert seen["open"] == streams and seen["max_concurrent"] >= streams
    wait_for(lambda: emulator.stats()["many"]["open"] == 0, timeout=10)


# -- configuration ------------------------------------------------------------------------------------------------


def test_default_apps_cover_every_mode() -> None:
    apps = default_apps()
    assert {app.mode for app in apps} == {"chat", "agent", "advanced-chat", "completion", "workflow"}
    assert next(app for app in apps if app.name == "demo").key == "app-demo"


def test_load_apps_from_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "apps.yaml"
    yaml_file.write_text(
        "apps:\n  support: {key: app-support, mode: chat, max_concurrency: 4, concurrency_error: 400}\n"
        "  report: {key: app-report, mode: workflow, required_inputs: [text]}\n"
    )
    support, report = load_apps(yaml_file)
    assert (support.name, support.max_concurrency, support.concurrency_error) == ("support", 4, "400")
    assert (report.mode, report.required_inputs) == ("workflow", ["text"])
    json_file = tmp_path / "apps.json"
    json_file.write_text(json.dumps([{"name": "a", "key": "app-a", "mode": "completion", "fault": "hang"}]))
    assert load_apps(json_file)[0].fault == "hang"
    json_file.write_text(json.dumps([{"name": "a", "key": "app-a", "mode": "chatbot"}]))
    with pytest.raises(ValueError, match="mode must be one of"):
        load_apps(json_file)


def test_stop_ends_open_streams_and_hung_calls() -> None:
    emulator = start_emulator([EmulatedApp(name="s", key="app-s", mode="chat", tokens_per_second=0.1, answer_tokens=5)])
    hung: dict[str, Exception] = {}

    def hang() -> None:
        with httpx.Client(base_url=emulator.base_url, timeout=10) as http, contextlib.suppress(httpx.HTTPError):
            call(http, "s", fault="hang")
            hung["error"] = AssertionError("the hung call was answered")

    with httpx.Client(base_url=emulator.base_url, timeout=10) as client, open_stream(client, "s") as events:
        next(events)
        waiter = threading.Thread(target=hang)
        waiter.start()
        wait_for(lambda: emulator.stats()["s"]["open"] == 2)
        started = time.monotonic()
        emulator.stop()
        print(f"stop with an open stream and a hung call: {time.monotonic() - started:.3f}s")
        assert list(events) == []  # the stream ends with no terminal event
        waiter.join()
    assert "error" not in hung
    assert sorted(record["outcome"] for record in emulator.calls()) == ["shutdown", "shutdown"]


def test_a_conversation_s_history_pages_back_and_deletes(client: httpx.Client) -> None:
    """`GET /messages` pages back from the newest turns (oldest first within a page, `first_id` for the page
    before); `DELETE /conversations/{id}` is the user's only, and a deleted conversation is 404 everywhere."""
    first = call(client, "chat", "turn one").json()
    conversation = first["conversation_id"]
    for query in ("turn two", "turn three"):
        assert call(client, "chat", query, conversation_id=conversation).status_code == 200
    newest = client.get("/messages", headers=auth("chat"),
                        params={"conversation_id": conversation, "user": USER, "limit": 2}).json()
    assert (newest["limit"], newest["has_more"]) == (2, True)
    assert [message["query"] for message in newest["data"]] == ["turn two", "turn three"]
    assert newest["data"][0]["answer"].startswith("FAKE-LLM says: turn two")
    older = client.get("/messages", headers=auth("chat"), params={
        "conversation_id": conversation, "user": USER, "limit": 2, "first_id": newest["data"][0]["id"]}).json()
    assert ([message["query"] for message in older["data"]], older["has_more"]) == (["turn one"], False)
    assert older["data"][0]["id"] == first["message_id"]
    for params, status, message in [
        ({"conversation_id": conversation, "user": "someone-else"}, 404, "Conversation Not Exists."),
        ({"conversation_id": conversation, "user": USER, "first_id": "nope"}, 404, "First Message Not Exists."),
        ({"conversation_id": conversation, "user": USER, "limit": 101}, 400, None),
        ({"conversation_id": conversation}, 400, None),
    ]:
        answer = client.get("/messages", headers=auth("chat"), params=params)
        assert answer.status_code == status, (params, answer.text)
        assert message is None or answer.json()["message"] == message
    assert client.get("/messages", headers=auth("workflow"), params={"conversation_id": conversation,
                                                                     "user": USER}).status_code == 400
    stranger = client.request("DELETE", f"/conversations/{conversation}", headers=auth("chat"),
                              json={"user": "someone-else"})
    assert stranger.status_code == 404
    deleted = client.request("DELETE", f"/conversations/{conversation}", headers=auth("chat"), json={"user": USER})
    assert (deleted.status_code, deleted.json()) == (200, {"result": "success"})
    assert client.get("/messages", headers=auth("chat"),
                      params={"conversation_id": conversation, "user": USER}).status_code == 404
    gone = call(client, "chat", "turn four", conversation_id=conversation)
    assert (gone.status_code, gone.json()["message"]) == (404, "Conversation Not Exists.")


def test_a_recalling_app_answers_with_the_turn_and_the_last_question(client: httpx.Client,
                                                                     emulator: RunningEmulator) -> None:
    emulator.set_app("short", recalls=True)
    try:
        first = call(client, "short", "where is my parcel").json()
        assert first["answer"] == "FAKE-LLM says: where"
        follow_up = call(client, "short", "it was due monday", conversation_id=first["conversation_id"]).json()
        assert follow_up["answer"] == "FAKE-LLM says: (turn 2; you asked before: 'where is my parcel') it"
    finally:
        emulator.set_app("short", recalls=False)
