"""Callbacks through the worker: retried with the same webhook-id until accepted (Dify called once), 410 stops,
redirects are failures, a receiver down past the schedule ends in the dead letters and ``difyq dlq replay``
delivers it; internal callback URLs are refused at submit unless allowed."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import difyq.worker.runtime as worker_runtime
from difyq.producers.cli import main as difyq
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.jobs.messages import JOBS_QUEUE
from difyq.worker.runtime import Runtime
from tests.support.receiver import CallbackReceiver, Reply
from tests.support.stack import SIGNING_SECRET, auth, make_runtime, running_worker, serving_api, wait_for_final
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def emulator() -> Iterator:
    with start_emulator([EmulatedApp(name="chat", key="app-callbacks-key1", mode="chat")]) as running:
        yield running


def runtime_for(redis_url: str, namespace: str, emulator, allow_hosts: list[str]) -> Runtime:
    return make_runtime(redis_url, namespace,
                        {"chat": {"api_key": "app-callbacks-key1", "mode": "chat", "base_url": emulator.base_url}},
                        callbacks={"signing_secret": SIGNING_SECRET, "allow_hosts": allow_hosts,
                                   "retry_schedule": ["0.1s", "0.1s", "0.1s", "0.1s"], "timeout": "2s"})


@pytest.fixture
def runtime(redis_url: str, namespace: str, emulator) -> Runtime:
    return runtime_for(redis_url, namespace, emulator, ["127.0.0.0/8"])


def submit_with_callback(base: str, url: str, query: str) -> str:
    response = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10,
                             json={"app": "chat", "query": query, "callback_url": url})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_for_callback(runtime: Runtime, job_id: str, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = runtime.store.get(job_id)
        if job["callback"]["status"] in ("delivered", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"callback of {job_id} still pending: {runtime.store.get(job_id)['callback']}")


def test_retried_until_accepted_with_one_webhook_id(runtime: Runtime, emulator) -> None:
    marker = f"cb-retry-{time.time_ns()}"
    with CallbackReceiver() as receiver, running_worker(runtime), serving_api(runtime) as base:
        receiver.script([500, 503, Reply(429, headers={"Retry-After": "0"}), 200])
        job_id = submit_with_callback(base, receiver.url, marker)
        job = wait_for_callback(runtime, job_id)
        fetched = requests.get(f"{base}/v1/jobs/{job_id}", headers=auth(), timeout=10).json()
    assert job["status"] == "succeeded"
    assert job["callback"] == {**job["callback"], "status": "delivered", "attempts": 4, "last_status_code": 200}
    history = fetched["callback"]["history"]
    assert [(a["status_code"], a["outcome"], a["error"]) for a in history] == [
        (500, "retry", "HTTP 500"), (503, "retry", "HTTP 503"), (429, "retry", "HTTP 429"), (200, "delivered", None)]
    assert all(a["event"] == "job.succeeded" and a["duration_s"] >= 0 for a in history)
    assert [a["at"] for a in history] == sorted(a["at"] for a in history)
    assert [r.webhook_id for r in receiver.requests] == [job_id] * 4
    assert receiver.verify(SIGNING_SECRET)
    assert len([c for c in emulator.calls() if marker in str(c["body"])]) == 1
    body = json.loads(receiver.requests[-1].body)
    assert body["type"] == "job.succeeded" and body["data"]["result"]["answer"]


def test_the_first_attempt_is_sent_by_the_jobs_worker_and_leaves_no_lease_or_lock(runtime: Runtime) -> None:
    with CallbackReceiver() as receiver, running_worker(runtime), serving_api(runtime) as base:
        job_id = submit_with_callback(base, receiver.url, "inline")
        job = wait_for_callback(runtime, job_id)
    assert job["callback"]["status"] == "delivered" and receiver.delivered_ids() == [job_id]
    assert runtime.raw_redis.zscore(runtime.store.leases_key, job_id) is None
    assert not runtime.raw_redis.exists(runtime.store.callback_lock_key(job_id))
    assert runtime.raw_redis.hlen(f"{runtime.namespace}:callbacks.msgs") == 0, "no callback message was needed"


def test_a_finished_jobs_message_leaves_nothing_in_the_queue(runtime: Runtime) -> None:
    """Once a job has its outcome, with or without a callback, neither its message nor the message's body is left
    in the jobs queue (Dramatiq acked it), and nothing is requeued at shutdown."""
    with CallbackReceiver() as receiver, running_worker(runtime), serving_api(runtime) as base:
        with_callback = submit_with_callback(base, receiver.url, "acked with a callback")
        without = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10,
                                json={"app": "chat", "query": "acked without a callback"}).json()["id"]
        assert wait_for_callback(runtime, with_callback)["callback"]["status"] == "delivered"
        assert wait_for_final(runtime, without)["status"] == "succeeded"
    jobs = f"{runtime.namespace}:{JOBS_QUEUE}"
    assert runtime.raw_redis.llen(jobs) == 0 and runtime.raw_redis.hlen(f"{jobs}.msgs") == 0


def test_with_the_first_attempt_queued_callbacks_still_retry_until_accepted(redis_url: str, namespace: str,
                                                                             emulator) -> None:
    runtime = make_runtime(redis_url, namespace,
                           {"chat": {"api_key": "app-callbacks-key1", "mode": "chat", "base_url": emulator.base_url}},
                           callbacks={"signing_secret": SIGNING_SECRET, "allow_hosts": ["127.0.0.0/8"],
                                      "retry_schedule": ["0.1s"], "timeout": "2s", "first_attempt_inline": False})
    with CallbackReceiver() as receiver, running_worker(runtime), serving_api(runtime) as base:
        receiver.script([500, 200])
        job_id = submit_with_callback(base, receiver.url, "queued first")
        job = wait_for_callback(runtime, job_id)
    assert job["callback"] == {**job["callback"], "status": "delivered", "attempts": 2, "last_status_code": 200}
    assert [r.webhook_id for r in receiver.requests] == [job_id] * 2
    assert runtime.raw_redis.zscore(runtime.store.leases_key, job_id) is None


def test_gone_stops_at_once_and_redirect_is_not_followed(runtime: Runtime) -> None:
    with CallbackReceiver() as gone, CallbackReceiver() as moved, running_worker(runtime), \
            serving_api(runtime) as base:
        gone.script([410])
        moved.set_default(Reply(302, headers={"Location": gone.url}))
        gone_id = submit_with_callback(base, gone.url, "gone")
        moved_id = submit_with_callback(base, moved.url, "moved")
        gone_job = wait_for_callback(runtime, gone_id)
        moved_job = wait_for_callback(runtime, moved_id)
    assert gone_job["callback"]["status"] == "failed" and gone_job["callback"]["attempts"] == 1
    assert gone_job["callback"]["last_status_code"] == 410
    assert moved_job["callback"]["status"] == "failed" and moved_job["callback"]["last_status_code"] == 302
    assert moved_job["callback"]["attempts"] == 5
    assert len(gone.requests) == 1, "the redirect was followed"


def test_receiver_down_ends_in_dead_letters_and_replay_delivers(runtime: Runtime, capsys, monkeypatch) -> None:
    monkeypatch.setattr(worker_runtime, "_current", runtime)
    receiver = CallbackReceiver()
    receiver.start()
    url = receiver.url
    receiver.stop()
    with running_worker(runtime), serving_api(runtime) as base:
        job_id = submit_with_callback(base, url, "down")
        job = wait_for_callback(runtime, job_id)
        assert job["callback"]["status"] == "failed" and job["callback"]["attempts"] == 5
        history = job["callback"]["history"]
        assert [(a["status_code"], a["outcome"]) for a in history] == [(None, "retry")] * 4 + [(None, "failed")]
        assert all(a["error"].startswith("connection failed") for a in history), history
        capsys.readouterr()
        assert difyq(["dlq", "list"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [entry["job_id"] for entry in listed["callbacks"]] == [job_id]

        with CallbackReceiver(port=int(url.split(":")[2].split("/")[0])) as back_up:
            assert difyq(["dlq", "replay", job_id]) == 0
            back_up.wait_for(1, timeout=10)
            job = wait_for_callback(runtime, job_id)
        assert job["callback"]["status"] == "delivered" and back_up.delivered_ids() == [job_id]
        capsys.readouterr()
        difyq(["dlq", "list"])
        assert json.loads(capsys.readouterr().out)["callbacks"] == []


def test_callback_retry_over_http(runtime: Runtime) -> None:
    with CallbackReceiver() as receiver, running_worker(runtime), serving_api(runtime) as base:
        job_id = submit_with_callback(base, receiver.url, "again")
        wait_for_callback(runtime, job_id)
        retried = requests.post(f"{base}/v1/jobs/{job_id}/callback/retry", headers=auth(), timeout=10)
        assert retried.status_code == 202
        receiver.wait_for(2, timeout=10)
    assert [r.webhook_id for r in receiver.requests] == [job_id, job_id]


@pytest.mark.parametrize("url", ["http://127.0.0.1/", "http://169.254.169.254/latest/meta-data",
                                 "http://10.0.0.1/", "http://[::1]/", "http://localhost:8080/hook"])
def test_internal_callback_urls_are_refused_unless_allowed(redis_url: str, namespace: str, emulator,
                                                           url: str) -> None:
    strict = runtime_for(redis_url, namespace, emulator, [])
    with serving_api(strict) as base:
        refused = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10,
                                json={"app": "chat", "query": "x", "callback_url": url})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "callback_url"
    allowed = runtime_for(redis_url, namespace, emulator,
                          ["127.0.0.0/8", "169.254.169.254", "10.0.0.0/8", "::1", "localhost"])
    with serving_api(allowed) as base:
        accepted = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10,
                                 json={"app": "chat", "query": "x", "callback_url": url})
    assert accepted.status_code == 202, accepted.text


def test_dev_command_allows_loopback(tmp_path: Path) -> None:
    from difyq.producers.dev import _dev_config

    config = _dev_config({}, "http://127.0.0.1:5001/v1")
    assert "127.0.0.0/8" in config["callbacks"]["allow_hosts"]
    assert config["callbacks"]["signing_secret"].startswith("whsec_")


def test_a_job_that_succeeds_after_failed_attempts_has_no_error(redis_url: str, namespace: str, emulator) -> None:
    """A failed attempt's error does not outlive a later success: GET and the callback body say ``error: null``,
    and ``attempt_errors`` keeps each failed attempt's error with its attempt number."""
    app = {"api_key": "app-callbacks-key1", "mode": "chat", "base_url": emulator.base_url}
    runtime = make_runtime(
        redis_url, namespace, {"chat": app},
        jobs={"retry_min_backoff": "0.3s", "retry_max_backoff": "0.5s", "max_attempts": 10})
    emulator.set_app("chat", fault="http500")
    try:
        with CallbackReceiver() as receiver, running_worker(runtime), serving_api(runtime) as base:
            job_id = submit_with_callback(base, receiver.url, f"recovers-{time.time_ns()}")
            wait_for(lambda: len(runtime.store.get(job_id)["attempt_errors"]) >= 2, what="two failed attempts")
            emulator.set_app("chat", fault=None)
            job = wait_for_callback(runtime, job_id)
            fetched = requests.get(f"{base}/v1/jobs/{job_id}", headers=auth(), timeout=10).json()
    finally:
        emulator.set_app("chat", fault=None)
    assert fetched["status"] == "succeeded" and fetched["attempts"] >= 3 and fetched["error"] is None
    errors = fetched["attempt_errors"]
    assert [error["attempt"] for error in errors] == list(range(1, fetched["attempts"]))
    assert {error["code"] for error in errors} == {"internal_server_error"} and all(e["message"] for e in errors)
    assert all(error["status"] == 500 and error["duration_s"] >= 0 for error in errors)
    assert [error["started_at"] for error in errors] == sorted(error["started_at"] for error in errors)
    assert errors[0]["started_at"] == fetched["started_at"]
    data = json.loads(receiver.requests[-1].body)["data"]
    assert data["error"] is None and data["attempt_errors"] == errors
    assert job["callback"]["status"] == "delivered"
