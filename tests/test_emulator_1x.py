"""The emulator's Dify 1.x mode (`--dify-version 1.x`) against the raw Dify 1.14.2 captures: each event's field
layout (names and order) for a workflow, a chatflow and a human-input run, the run record, the reattach, the form
routes and the error bodies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from difyq.worker.dify.emulator import EmulatedApp, RunningEmulator, start_emulator
from tests.support.captures import DIFY_1_14_2, load_wire_capture
from tests.support.waiting import wait_for

APPS = [
    EmulatedApp(name="w", key="app-1x-w", mode="workflow", required_inputs=["text"]),
    EmulatedApp(name="c", key="app-1x-c", mode="advanced-chat"),
    EmulatedApp(name="h", key="app-1x-h", mode="workflow", human_input=True),
    EmulatedApp(name="cut", key="app-1x-cut", mode="workflow", fault="cut-after-start", tokens_per_second=20),
]


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with start_emulator(APPS, dify_version="1.x") as running:
        yield running


@pytest.fixture(scope="module")
def client(emulator: RunningEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, timeout=10) as http:
        yield http


def captured(name: str) -> list[dict[str, Any]]:
    body = load_wire_capture(DIFY_1_14_2 / f"{name}.raw").body
    return [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]


def captured_json(name: str) -> Any:
    return json.loads(load_wire_capture(DIFY_1_14_2 / f"{name}.raw").body)


def streamed(client: httpx.Client, app: str, body: dict[str, Any], path: str = "/workflows/run") -> list[dict]:
    answer = client.post(path, headers={"Authorization": f"Bearer app-1x-{app}"},
                         json={"response_mode": "streaming", "user": "u1", **body})
    assert answer.headers["X-Version"] == "1.14.2" and answer.text.startswith("event: ping\n\n")
    return [json.loads(line[6:]) for line in answer.text.split("\n") if line.startswith("data: ")]


def layouts(events: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[str]]]:
    """Per event name: its keys and its `data` keys, in order."""
    return {event["event"]: (list(event), list(event["data"]) if isinstance(event.get("data"), dict) else [])
            for event in events}


@pytest.mark.parametrize(("app", "capture", "body", "path"), [
    ("w", "w1_stream_s1", {"inputs": {"text": "hi"}}, "/workflows/run"),
    ("c", "c1_streaming", {"inputs": {}, "query": "hello"}, "/chat-messages"),
])
def test_stream_layouts_match_1_14_2(client: httpx.Client, app: str, capture: str, body: dict, path: str) -> None:
    emulated, real = streamed(client, app, body, path), captured(capture)
    assert [e["event"] for e in emulated][-2:] == [e["event"] for e in real][-2:]
    assert emulated[0]["data"]["reason"] == "initial"
    real_layouts = layouts(real)
    for name, layout in layouts(emulated).items():
        if name in real_layouts:
            assert layout == real_layouts[name], name


def test_run_record_and_reattach(client: httpx.Client) -> None:
    auth = {"Authorization": "Bearer app-1x-w"}
    run_id = streamed(client, "w", {"inputs": {"text": "hi"}})[0]["workflow_run_id"]
    record = client.get(f"/workflows/run/{run_id}", headers=auth).json()
    assert list(record) == list(captured_json("w1_run_detail_finished"))
    assert record["status"] == "succeeded" and isinstance(record["inputs"], str) and isinstance(record["outputs"], dict)
    reattached = client.get(f"/workflow/{run_id}/events", params={"user": "u1"}, headers=auth).text
    [alone] = [json.loads(line[6:]) for line in reattached.split("\n") if line.startswith("data: ")]
    assert alone["event"] == "workflow_finished" and alone["data"]["outputs"] == record["outputs"]
    unknown = client.get("/workflows/run/00000000-0000-0000-0000-000000000000", headers=auth)
    assert (unknown.status_code, unknown.json()) == (404, captured_json("w1_run_detail_unknown"))
    other = client.get(f"/workflow/{run_id}/events", params={"user": "u2"}, headers=auth)
    assert (other.status_code, other.json()) == (404, captured_json("w1_events_finished_other_user"))
    no_user = client.get(f"/workflow/{run_id}/events", headers=auth)
    assert (no_user.status_code, no_user.json()) == (400, captured_json("w1_events_no_user"))


def test_a_cut_stream_leaves_the_run_going(client: httpx.Client, emulator: RunningEmulator) -> None:
    events = streamed(client, "cut", {"inputs": {"text": "go on"}})
    assert [e["event"] for e in events] == ["workflow_started"]
    run_id = events[0]["workflow_run_id"]
    auth = {"Authorization": "Bearer app-1x-cut"}
    wait_for(lambda: client.get(f"/workflows/run/{run_id}", headers=auth).json()["status"] == "succeeded",
             what="the cut run's end at Dify")


def test_human_input_pause_form_and_resume(client: httpx.Client) -> None:
    auth = {"Authorization": "Bearer app-1x-h"}
    events = streamed(client, "h", {"inputs": {"text": "order 42"}})
    real = layouts(captured("h1_stream_until_pause"))
    emulated = layouts(events)
    assert [e["event"] for e in events][-2:] == ["human_input_required", "workflow_paused"]
    for name in ("human_input_required", "workflow_paused"):
        assert emulated[name] == real[name], name
    run_id, token = events[0]["workflow_run_id"], events[-2]["data"]["form_token"]
    assert client.get(f"/workflows/run/{run_id}", headers=auth).json()["status"] == "paused"
    form = client.get(f"/form/human_input/{token}", headers=auth).json()
    assert list(form) == list(captured_json("h1_form_get"))
    bad = client.post(f"/form/human_input/{token}", headers=auth, json={"inputs": {"comment": "x"},
                                                                         "action": "maybe", "user": "u1"})
    assert (bad.status_code, bad.json()) == (400, captured_json("h1_form_submit_bad_action"))
    ok = client.post(f"/form/human_input/{token}", headers=auth,
                     json={"inputs": {"comment": "fine"}, "action": "approve", "user": "u1"})
    assert (ok.status_code, ok.json()) == (200, {})
    again = client.post(f"/form/human_input/{token}", headers=auth,
                        json={"inputs": {"comment": "fine"}, "action": "approve", "user": "u1"})
    assert (again.status_code, again.json()["code"]) == (412, "human_input_form_submitted")
    record = wait_for(lambda: (r := client.get(f"/workflows/run/{run_id}", headers=auth).json())["status"]
                      == "succeeded" and r, what="the resumed run's end")
    assert record["outputs"] == {"comment": "fine", "action": "approve"}


def test_pinned_versions(client: httpx.Client) -> None:
    auth = {"Authorization": "Bearer app-1x-w"}
    app = APPS[0]
    body = {"inputs": {"text": "hi"}, "response_mode": "blocking", "user": "u1"}
    assert client.post(f"/workflows/{app.workflow_id}/run", headers=auth, json=body).status_code == 200
    draft = client.post(f"/workflows/{app.draft_workflow_id}/run", headers=auth, json=body).json()
    assert draft["code"] == "bad_request" and draft["message"].startswith("Cannot use draft workflow version.")
    unknown = client.post("/workflows/00000000-0000-0000-0000-000000000000/run", headers=auth, json=body)
    assert (unknown.status_code, unknown.json()) == (404, captured_json("w1_run_by_unknown_id"))
    not_uuid = client.post("/workflows/not-a-uuid/run", headers=auth, json=body)
    assert (not_uuid.status_code, not_uuid.json()) == (400, captured_json("w1_run_by_bad_id"))


def test_a_missing_conversation_is_silent_when_streamed_and_404_for_its_history(client: httpx.Client) -> None:
    """1.14.2 streams one ping for a chat call to a conversation it does not have (c1_unknown_conversation_streaming)
    and then nothing; `GET /messages` of it answers 404 at once, and `DELETE /conversations/{id}` answers 204."""
    headers = {"Authorization": "Bearer app-1x-c"}
    started = client.post("/chat-messages", headers=headers, json={"inputs": {}, "query": "hi", "user": "u1",
                                                                   "response_mode": "blocking"}).json()
    conversation = started["conversation_id"]
    history = client.get("/messages", headers=headers, params={"conversation_id": conversation, "user": "u1"})
    assert history.status_code == 200 and history.json()["data"][0]["extra_contents"] == []
    assert set(history.json()["data"][0]) == set(captured_json("c1_messages")["data"][0])
    deleted = client.request("DELETE", f"/conversations/{conversation}", headers=headers, json={"user": "u1"})
    assert (deleted.status_code, deleted.content) == (204, b"")
    missing = client.get("/messages", headers=headers, params={"conversation_id": conversation, "user": "u1"})
    assert (missing.status_code, missing.json()["message"]) == (404, "Conversation Not Exists.")
    with client.stream("POST", "/chat-messages", headers=headers, json={
            "inputs": {}, "query": "x", "user": "u1", "response_mode": "streaming",
            "conversation_id": conversation}) as silent:
        assert silent.status_code == 200
        assert next(silent.iter_raw()) == b"event: ping\n\n"
