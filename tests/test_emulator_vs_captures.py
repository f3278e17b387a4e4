"""The emulator against the raw Dify 0.15.8 captures: every captured request on an emulated route is sent to the
emulator, and the answer must have the capture's status, content type, event sequence and field layout (names,
order and JSON types at every level; ids, times and generated text aside). Error bodies, which hold no generated
values, must match byte for byte, and every JSON text must be `json.dumps` output, as the 0.15.8 server wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from difyq.worker.dify.emulator import EmulatedApp, RunningEmulator, start_emulator
from tests.support.captures import DIFY_0_15_8, Capture, CaptureRequest, load_capture, load_index

CAPTURED_CONVERSATION = "06d0df81-b096-46fe-a9b3-6bb534c50926"
CAPTURED_USER = "sample-user-1"
KEYS = {
    "CHAT": "app-cap-chat",
    "COMPLETION": "app-cap-completion",
    "WORKFLOW": "app-cap-workflow",
    "CHATFLOW": "app-cap-chatflow",
    "BAD": "app-not-a-key",
}
EMULATED_PATHS = ("/chat-messages", "/completion-messages", "/workflows/run", "/parameters", "/info", "/no-such-",
                  "/messages?")
# Replayed by the dedicated tests at the end: they need a running stream or a ping-length silence.
DEDICATED = {"chat_stop_response.txt", "chat_streaming_slow_stopped.txt", "chat_streaming_with_ping.txt"}
DELTA_EVENTS = {"message": "answer", "agent_message": "answer", "text_chunk": "text"}

INDEX = load_index()
REPLAYED = sorted(
    name
    for name, request in INDEX.items()
    if name not in DEDICATED and request.path.startswith(EMULATED_PATHS) and "/run/" not in request.path
)


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    apps = [
        EmulatedApp(name="cap-chat", key=KEYS["CHAT"], mode="chat"),
        EmulatedApp(name="cap-completion", key=KEYS["COMPLETION"], mode="completion", required_inputs=["text"]),
        EmulatedApp(name="cap-workflow", key=KEYS["WORKFLOW"], mode="workflow", required_inputs=["text"]),
        EmulatedApp(name="cap-chatflow", key=KEYS["CHATFLOW"], mode="advanced-chat"),
        EmulatedApp(name="cap-chat-ping", key="app-cap-chat-ping", mode="chat", ping_interval_s=0.45),
        EmulatedApp(name="cap-chat-slow", key="app-cap-chat-slow", mode="chat", tokens_per_second=1.0),
    ]
    with start_emulator(apps) as running:
        yield running


@pytest.fixture(scope="module")
def client(emulator: RunningEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, timeout=10) as http:
        yield http


@pytest.fixture(scope="module")
def conversation(client: httpx.Client) -> str:
    """A conversation of the captures' user, standing in for the one the captured follow-ups name."""
    answer = client.post(
        "/chat-messages",
        json={"inputs": {}, "query": "first turn", "user": CAPTURED_USER},
        headers={"Authorization": f"Bearer {KEYS['CHAT']}"},
    )
    return answer.json()["conversation_id"]


def send(client: httpx.Client, request: CaptureRequest, conversation: str) -> httpx.Response:
    headers = {"Content-Type": "application/json"} if request.method == "POST" else {}
    if request.key in KEYS:
        headers["Authorization"] = f"Bearer {KEYS[request.key]}"
    elif request.file == "err_auth_not_bearer.txt":
        headers["Authorization"] = KEYS["CHAT"]
    body = request.body.replace(CAPTURED_CONVERSATION, conversation)
    return client.request(request.method, request.path.replace(CAPTURED_CONVERSATION, conversation),
                          content=body.encode() if body else None, headers=headers)


# -- what is compared ---------------------------------------------------------------------------------------------


def layout(value: Any) -> Any:
    """Field names in order with JSON types at every level; list items as the set of their layouts."""
    if isinstance(value, dict):
        return [[key, layout(item)] for key, item in value.items()]
    if isinstance(value, list):
        return sorted({json.dumps(layout(item)) for item in value})
    return type(value).__name__


def assert_dumps_format(text: str) -> None:
    """`text` is exactly what `json.dumps` (default separators, ASCII escapes) writes for its value."""
    assert text == json.dumps(json.loads(text))


def stream_events(body: bytes) -> list[tuple[str, Any]]:
    """(event name, layout) per SSE frame, `ping` for the bare keep-alive; checks the framing on the way."""
    assert body.endswith(b"\n\n")
    events: list[tuple[str, Any]] = []
    for frame in body.decode().split("\n\n")[:-1]:
        if frame == "event: ping":
            events.append(("ping", None))
            continue
        assert frame.startswith("data: ") and "\n" not in frame
        assert_dumps_format(frame[len("data: ") :])
        payload = json.loads(frame[len("data: ") :])
        events.append((payload["event"], layout(payload)))
    return events


def collapse(events: list[Any]) -> list[Any]:
    """Runs of the same event (token deltas, repeated pings) count once: answer lengths are a knob."""
    return [event for index, event in enumerate(events) if index == 0 or event != events[index - 1]]


def last_delta_is_empty(body: bytes) -> bool | None:
    """Whether the last token delta before the end has empty text (0.15.8 ends answers that way)."""
    deltas = [
        json.loads(frame[len("data: ") :])
        for frame in body.decode().split("\n\n")
        if frame.startswith("data: ") and json.loads(frame[len("data: ") :])["event"] in DELTA_EVENTS
    ]
    if not deltas:
        return None
    last = deltas[-1]
    field = DELTA_EVENTS[last["event"]]
    return (last[field] if field in last else last["data"][field]) == ""


def assert_matches(capture: Capture, answer: httpx.Response) -> None:
    assert answer.status_code == capture.status
    assert answer.headers["content-type"] == capture.content_type
    if capture.is_event_stream:
        ours = [event for event in stream_events(answer.content) if event[0] != "ping"]
        theirs = stream_events(capture.body)
        assert collapse(ours) == collapse(theirs)
        assert last_delta_is_empty(answer.content) == last_delta_is_empty(capture.body)
    elif capture.content_type == "application/json":
        assert answer.content.endswith(b"\n") == capture.body.endswith(b"\n")
        assert_dumps_format(answer.text.removesuffix("\n"))
        assert layout(answer.json()) == layout(capture.json())
    if capture.status != 200:
        assert answer.content == capture.body


# -- the tests ----------------------------------------------------------------------------------------------------


def test_every_request_on_an_emulated_route_is_replayed() -> None:
    assert len(REPLAYED) >= 50
    assert {"chat_streaming.txt", "chatflow_streaming.txt", "err_unknown_route.txt", "info_chat.txt"} <= set(REPLAYED)


@pytest.mark.parametrize("name", REPLAYED)
def test_answer_matches_capture(name: str, client: httpx.Client, conversation: str) -> None:
    capture = load_capture(DIFY_0_15_8 / name)
    if capture.content_type == "application/json":
        assert_dumps_format(capture.body.decode().removesuffix("\n"))  # the check holds for the real server too
    assert_matches(capture, send(client, INDEX[name], conversation))


def test_follow_up_continues_the_conversation(client: httpx.Client, conversation: str) -> None:
    answer = send(client, INDEX["chat_blocking_followup.txt"], conversation)
    assert answer.json()["conversation_id"] == conversation


def test_pings_while_the_llm_is_silent_match_capture(client: httpx.Client) -> None:
    capture = load_capture(DIFY_0_15_8 / "chat_streaming_with_ping.txt")
    answer = client.post(
        "/chat-messages",
        json={"inputs": {}, "query": "WAIT0.7 then answer", "response_mode": "streaming", "user": CAPTURED_USER},
        headers={"Authorization": "Bearer app-cap-chat-ping"},
    )
    assert answer.headers["content-type"] == capture.content_type
    assert collapse(stream_events(answer.content)) == collapse(stream_events(capture.body))


def test_stop_and_stopped_stream_match_captures(client: httpx.Client) -> None:
    stopped = load_capture(DIFY_0_15_8 / "chat_streaming_slow_stopped.txt")
    stop_answer = load_capture(DIFY_0_15_8 / "chat_stop_response.txt")
    body = {"inputs": {}, "query": "SLOW a b c d e f g h", "response_mode": "streaming", "user": CAPTURED_USER}
    headers = {"Authorization": "Bearer app-cap-chat-slow"}
    with client.stream("POST", "/chat-messages", json=body, headers=headers) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        task_id = json.loads(first[len("data: ") :])["task_id"]
        stop = client.post(f"/chat-messages/{task_id}/stop", json={"user": CAPTURED_USER}, headers=headers)
        rest = "\n".join(lines)
    assert (stop.status_code, stop.headers["content-type"], stop.content) == (
        stop_answer.status,
        stop_answer.content_type,
        stop_answer.body,
    )
    ours = (first + "\n\n" + rest.strip("\n") + "\n\n").encode()
    assert collapse(stream_events(ours)) == collapse(stream_events(stopped.body))
    assert last_delta_is_empty(ours) is last_delta_is_empty(stopped.body) is False
