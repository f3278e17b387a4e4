"""A job from submit to Dify to a stored result: real Redis, the real emulator over HTTP, an in-process
Dramatiq worker. Every app mode, every error class, idempotency and redelivery counted at the emulator."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from difyq.producers.submission import JobSubmission
from difyq.producers.submit import submit
from difyq.worker import task_ids
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.embedded_redis import EmbeddedRedis
from difyq.worker.jobs.messages import JOBS_QUEUE
from difyq.worker.runtime import Runtime
from tests.support.stack import auth, make_runtime, running_worker, serving_api, wait_for_final
from tests.support.waiting import wait_for

EMULATED = [
    EmulatedApp(name="chat", key="app-chat-key-0001", mode="chat"),
    EmulatedApp(name="agent", key="app-agent-key-0001", mode="agent"),
    EmulatedApp(name="chatflow", key="app-chatflow-key-01", mode="advanced-chat"),
    EmulatedApp(name="completion", key="app-completion-key", mode="completion", required_inputs=["text"]),
    EmulatedApp(name="workflow", key="app-workflow-key-01", mode="workflow", required_inputs=["text"]),
    EmulatedApp(name="faulty", key="app-faulty-key-0001", mode="chat"),
    EmulatedApp(name="slow", key="app-slow-key-00001", mode="chat", tokens_per_second=5, answer_tokens=200),
]
MODES = {"chat": "chat", "agent": "agent", "chatflow": "advanced-chat", "completion": "completion",
         "workflow": "workflow", "faulty": "chat", "slow": "chat"}


@pytest.fixture(scope="module")
def emulator() -> Iterator:
    with start_emulator(EMULATED) as running:
        yield running


@pytest.fixture
def runtime(redis_url: str, namespace: str, emulator) -> Runtime:
    apps = {app.name: {"api_key": app.key, "mode": MODES[app.name], "base_url": emulator.base_url, "timeout_s": 30}
            for app in EMULATED}
    apps["wrong-key"] = {"api_key": "app-not-a-real-key", "mode": "chat", "base_url": emulator.base_url}
    apps["wrong-mode"] = {"api_key": "app-workflow-key-01", "mode": "chat", "base_url": emulator.base_url}
    return make_runtime(redis_url, namespace, apps)


def enqueue(runtime: Runtime, app: str, query: str | None = "hello", inputs: dict | None = None,
            key: str | None = None) -> str:
    outcome = submit(runtime, JobSubmission(app=app, query=query, inputs=inputs or {}, idempotency_key=key),
                     source="cli", scope="test")
    return outcome.job["id"]


def calls_for(emulator, text: str) -> list[dict]:
    return [call for call in emulator.calls() if text in str(call.get("body"))]


@pytest.fixture(autouse=True)
def clean_emulator(emulator) -> Iterator[None]:
    emulator.set_app("faulty", fault=None, fault_until=None)
    yield
    emulator.set_app("faulty", fault=None, fault_until=None)


@pytest.mark.parametrize("app", ["chat", "agent", "chatflow", "completion", "workflow"])
def test_every_mode_end_to_end(runtime: Runtime, emulator, app: str) -> None:
    marker = f"mode-{app}-{time.time_ns()}"
    with running_worker(runtime):
        job_id = enqueue(runtime, app, query=marker, inputs={"text": marker})
        job = wait_for_final(runtime, job_id)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and job["error"] is None
    result = job["result"]
    if app == "workflow":
        assert result["outputs"] and result["workflow_run_id"]
    else:
        assert result["answer"] and result["message_id"]
        assert result["usage"]["total_tokens"] > 0 and isinstance(result["usage"]["total_price"], str)
    if app == "chatflow":
        assert result["outputs"] is not None
    calls = calls_for(emulator, marker)
    assert len(calls) == 1 and calls[0]["body"]["response_mode"] == "streaming"


@pytest.mark.parametrize(
    ("app", "query", "code"),
    [
        ("wrong-key", "x", "unauthorized"),
        ("wrong-mode", "x", "not_chat_app"),
        ("completion", "x", "invalid_param"),
    ],
)
def test_errors_retrying_cannot_fix_fail_at_once(runtime: Runtime, app: str, query: str, code: str) -> None:
    with running_worker(runtime):
        job = wait_for_final(runtime, enqueue(runtime, app, query=query, inputs={}))
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] == code and job["error"]["message"]


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("http429", "too_many_requests"),
        ("http429-text", "http_429"),
        ("http400-too-many", "invalid_param"),
        ("http500", "internal_server_error"),
        ("provider429", "completion_request_error"),
        ("provider500", "completion_request_error"),
        ("midstream-error", None),
        ("cut-stream", "stream_incomplete"),
    ],
)
def test_retryable_errors_are_retried_with_backoff(runtime: Runtime, emulator, fault: str, code: str | None) -> None:
    emulator.set_app("faulty", fault=fault)
    marker = f"retry-{fault}-{time.time_ns()}"
    with running_worker(runtime):
        job = wait_for_final(runtime, enqueue(runtime, "faulty", query=marker))
    max_attempts = runtime.config.jobs.max_attempts
    assert job["status"] == "failed" and job["attempts"] == max_attempts, job
    if code:
        assert job["error"]["code"] == code
    assert len(calls_for(emulator, marker)) == max_attempts


def test_a_transient_fault_recovers(runtime: Runtime, emulator) -> None:
    emulator.set_app("faulty", fault="http500", fault_until=time.time() + 0.3)
    marker = f"recover-{time.time_ns()}"
    with running_worker(runtime):
        job = wait_for_final(runtime, enqueue(runtime, "faulty", query=marker))
    assert job["status"] == "succeeded" and job["attempts"] >= 2
    assert job["attempts"] == len(calls_for(emulator, marker))


def test_provider_rate_limit_in_the_text_is_retried(runtime: Runtime, emulator) -> None:
    marker = f"FAIL429 {time.time_ns()}"
    with running_worker(runtime):
        job = wait_for_final(runtime, enqueue(runtime, "workflow", query=None, inputs={"text": marker}))
    assert job["status"] == "failed" and job["attempts"] == runtime.config.jobs.max_attempts
    assert job["error"]["code"] == "workflow_failed" and "429" in job["error"]["message"]


def test_same_key_twenty_times_concurrently_is_one_dify_call(runtime: Runtime, emulator) -> None:
    marker = f"idem-{time.time_ns()}"
    with ThreadPoolExecutor(20) as pool:
        ids = set(pool.map(lambda _: enqueue(runtime, "chat", query=marker, key="same-key"), range(20)))
    assert len(ids) == 1
    with running_worker(runtime):
        job = wait_for_final(runtime, ids.pop())
    assert job["status"] == "succeeded"
    assert len(calls_for(emulator, marker)) == 1


def test_a_message_delivered_twice_calls_dify_once(runtime: Runtime, emulator) -> None:
    marker = f"twice-{time.time_ns()}"
    job_id = enqueue(runtime, "chat", query=marker)
    duplicate = runtime.store.message("jobs", job_id)
    runtime.raw_redis.hset(duplicate.bodies_key, duplicate.redis_message_id, duplicate.body)
    runtime.raw_redis.rpush(duplicate.queue_key, duplicate.redis_message_id)
    with running_worker(runtime):
        wait_for_final(runtime, job_id)
        # Both messages handled: each is acked, and an acked message's body is gone.
        wait_for(lambda: not runtime.raw_redis.hexists(duplicate.bodies_key, duplicate.redis_message_id),
                 timeout=10, what="the duplicate message acked")
    assert len(calls_for(emulator, marker)) == 1
    assert runtime.store.get(job_id)["attempts"] == 1


def test_a_message_without_the_app_hint_still_runs_its_job(runtime: Runtime, emulator) -> None:
    """A job's message names its app (the admission comes before the record is read); a message without the
    hint (written by an older version) runs its job all the same."""
    hinted = enqueue(runtime, "chat", query=f"hinted-{time.time_ns()}")
    plain = enqueue(runtime, "chat", query=f"plain-{time.time_ns()}")
    runtime.raw_redis.delete(f"{runtime.namespace}:{JOBS_QUEUE}")
    for message in (runtime.store.message(JOBS_QUEUE, hinted, hints={"app": "chat"}),
                    runtime.store.message(JOBS_QUEUE, plain)):
        runtime.raw_redis.hset(message.bodies_key, message.redis_message_id, message.body)
        runtime.raw_redis.rpush(message.queue_key, message.redis_message_id)
    with running_worker(runtime):
        results = [wait_for_final(runtime, job_id) for job_id in (hinted, plain)]
    assert [job["status"] for job in results] == ["succeeded", "succeeded"]
    assert [job["result"]["answer"] is not None for job in results] == [True, True]


def test_cancel_a_running_job_stops_dify(runtime: Runtime, emulator) -> None:
    marker = f"cancel-{time.time_ns()}"
    with running_worker(runtime), serving_api(runtime) as base:
        job_id = enqueue(runtime, "slow", query=marker)
        deadline = time.monotonic() + 10
        while not (runtime.store.fields(job_id) or {}).get("task_id") and time.monotonic() < deadline:
            time.sleep(0.02)
        response = requests.delete(f"{base}/v1/jobs/{job_id}", headers=auth(), timeout=10)
        assert response.status_code == 200
        job = wait_for_final(runtime, job_id)
    assert job["status"] == "canceled"
    assert job["result"]["answer"] is not None


def test_a_cancel_that_comes_before_the_task_id_is_recorded_is_stopped_by_the_worker(
        runtime: Runtime, emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task id reaches the record a moment after the stream begins; a cancel in between finds none to stop,
    so the worker stops the task when it records the id. The slow app would stream for 40 s otherwise."""
    monkeypatch.setattr(task_ids, "RECORD_AFTER_S", 1.5)
    marker = f"early-cancel-{time.time_ns()}"
    with running_worker(runtime), serving_api(runtime) as base:
        job_id = enqueue(runtime, "slow", query=marker)
        deadline = time.monotonic() + 10
        while (runtime.store.fields(job_id) or {}).get("status") != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        response = requests.delete(f"{base}/v1/jobs/{job_id}", headers=auth(), timeout=10)
        assert response.status_code == 200
        assert "task_id" not in runtime.store.fields(job_id), "the cancel came before the task id"
        job = wait_for_final(runtime, job_id, timeout=15)
    assert job["status"] == "canceled"
    task_id = runtime.store.fields(job_id)["task_id"]
    assert [call["path"] for call in emulator.calls() if task_id in call["path"]] == [
        f"/v1/chat-messages/{task_id}/stop"], "the worker asked Dify to stop the task, once"


def test_cancel_a_queued_job_never_runs(runtime: Runtime, emulator) -> None:
    marker = f"never-{time.time_ns()}"
    job_id = enqueue(runtime, "chat", query=marker)
    assert runtime.store.cancel(job_id).state == "canceled"
    bodies_key = runtime.store.message(JOBS_QUEUE, job_id).bodies_key
    with running_worker(runtime):
        wait_for(lambda: not runtime.raw_redis.hlen(bodies_key), timeout=10, what="the job's message handled")
    assert runtime.store.get(job_id)["status"] == "canceled"
    assert calls_for(emulator, marker) == []


def test_worker_survives_a_redis_restart(namespace: str, emulator) -> None:
    server = EmbeddedRedis(appendonly=True).start()
    apps = {"chat": {"api_key": "app-chat-key-0001", "mode": "chat", "base_url": emulator.base_url}}
    runtime = make_runtime(server.url, namespace, apps)
    try:
        with running_worker(runtime), serving_api(runtime) as base:
            assert wait_for_final(runtime, enqueue(runtime, "chat"))["status"] == "succeeded"
            server.stop()
            down = requests.post(f"{base}/v1/jobs", json={"app": "chat", "query": "down"}, headers=auth(), timeout=15)
            assert down.status_code == 503
            server.start()
            accepted = requests.post(f"{base}/v1/jobs", json={"app": "chat", "query": "back"}, headers=auth(),
                                     timeout=15)
            assert accepted.status_code == 202
            assert wait_for_final(runtime, accepted.json()["id"], timeout=30)["status"] == "succeeded"
    finally:
        server.close()
