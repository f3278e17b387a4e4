"""``POST /v1/jobs/{id}/feedback`` rates the job's Dify message as the job's user: it reaches the emulator's
``/messages/{id}/feedbacks``; a job without a message is refused. Real Redis, the emulator, the API over HTTP and
an in-process worker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from difyq.worker.dify.emulator import EmulatedApp, RunningEmulator, start_emulator
from difyq.worker.runtime import Runtime
from tests.support.stack import auth, make_runtime, running_worker, serving_api, wait_for_final

APPS = [EmulatedApp(name="support", key="app-support", mode="chat"),
        EmulatedApp(name="report", key="app-report", mode="workflow", required_inputs=["text"])]


@pytest.fixture
def stack(redis_url: str, namespace: str) -> Iterator[tuple[Runtime, str, RunningEmulator]]:
    with start_emulator(APPS) as emulator:
        apps = {app.name: {"api_key": app.key, "mode": app.mode, "base_url": emulator.base_url} for app in APPS}
        runtime = make_runtime(redis_url, namespace, apps)
        with running_worker(runtime, threads=2), serving_api(runtime) as base:
            yield runtime, base, emulator


def _job(runtime: Runtime, base: str, body: dict) -> dict:
    answer = requests.post(f"{base}/v1/jobs", json=body, headers=auth(), timeout=10)
    assert answer.status_code == 202, answer.text
    return wait_for_final(runtime, answer.json()["id"])


def test_feedback_reaches_dify_for_the_job_s_message_and_user(stack) -> None:
    runtime, base, emulator = stack
    job = _job(runtime, base, {"app": "support", "query": "hello", "user": "erin"})
    message_id = job["result"]["message_id"]
    sent = requests.post(f"{base}/v1/jobs/{job['id']}/feedback", headers=auth(), timeout=10,
                         json={"rating": "dislike", "content": "the answer missed the order number"})
    assert sent.status_code == 200, sent.text
    assert sent.json() == {"id": job["id"], "message_id": message_id, "rating": "dislike",
                           "content": "the answer missed the order number"}
    withdrawn = requests.post(f"{base}/v1/jobs/{job['id']}/feedback", headers=auth(), timeout=10,
                              json={"rating": None})
    assert withdrawn.status_code == 200, withdrawn.text
    calls = [call for call in emulator.calls() if call["path"] == f"/v1/messages/{message_id}/feedbacks"]
    assert [(call["status"], call["body"]) for call in calls] == [
        (200, {"rating": "dislike", "user": "erin", "content": "the answer missed the order number"}),
        (200, {"rating": None, "user": "erin"})]


def test_feedback_needs_a_message_and_a_valid_rating(stack) -> None:
    runtime, base, _ = stack
    workflow = _job(runtime, base, {"app": "report", "inputs": {"text": "q3"}})
    no_message = requests.post(f"{base}/v1/jobs/{workflow['id']}/feedback", headers=auth(), timeout=10,
                               json={"rating": "like"})
    assert no_message.status_code == 409 and no_message.json()["error"]["code"] == "no_message", no_message.text
    chat = _job(runtime, base, {"app": "support", "query": "hello"})
    bad = requests.post(f"{base}/v1/jobs/{chat['id']}/feedback", headers=auth(), timeout=10, json={"rating": "meh"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "rating", bad.text
    missing = requests.post(f"{base}/v1/jobs/job_unknown/feedback", headers=auth(), timeout=10, json={"rating": None})
    assert missing.status_code == 404
