"""Backpressure on real Redis and real HTTP: a ``max_pending`` cap answers 429 with ``Retry-After`` and writes
nothing, and accepts again once jobs finish, fail or are canceled; the memory guard answers 503 on a Redis with a
small ``maxmemory`` while the jobs it accepted before still run and store their results."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import requests

from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.embedded_redis import EmbeddedRedis
from difyq.worker.jobs.model import JobRequest, NewJob, client_scope
from difyq.worker.jobs.schema import JobStatus
from difyq.worker.jobs.store import TooManyPending
from difyq.worker.redis_keys import RedisKeys
from difyq.worker.runtime import Runtime
from tests.support.stack import (
    CLIENT_TOKEN,
    LIMITED_TOKEN,
    auth,
    make_runtime,
    running_worker,
    serving_api,
    wait_for_final,
)
from tests.support.waiting import wait_for

APPS = {"support": {"api_key": "app-secret-support", "mode": "chat", "max_pending": 2},
        "flows": {"api_key": "app-secret-flows", "mode": "workflow"},
        "burst": {"api_key": "app-secret-burst", "mode": "chat", "max_pending": 5}}
CLIENTS = {"full": {"token": CLIENT_TOKEN, "apps": ["*"]},
           "capped": {"token": LIMITED_TOKEN, "apps": ["*"], "max_pending": 1}}
HOOKS = {"inbound": {"app": "support", "verify": {"scheme": "none"}, "query": "{{ body.text }}"}}


@pytest.fixture
def api(redis_url: str, namespace: str) -> Iterator[tuple[str, Runtime]]:
    runtime = make_runtime(redis_url, namespace, APPS, clients=CLIENTS, hooks=HOOKS)
    with serving_api(runtime) as base:
        yield base, runtime


def post_job(base: str, body: dict[str, Any], token: str = CLIENT_TOKEN, key: str | None = None,
             ) -> requests.Response:
    headers = {**auth(token), **({"Idempotency-Key": key} if key else {})}
    return requests.post(f"{base}/v1/jobs", json=body, headers=headers, timeout=10)


def deliver(base: str, text: str) -> requests.Response:
    return requests.post(f"{base}/hooks/inbound", json={"text": text}, timeout=10)


def stored(runtime: Runtime) -> dict[str, bytes | None]:
    """Every key of the namespace with its serialized value, but the hooks' recent-deliveries log (the console's
    record of each answer, refusals included)."""
    client = runtime.raw_redis
    keys = [key for key in client.scan_iter(match=f"{runtime.namespace}:*", count=1000)
            if b":hookrecent:" not in key]
    return {key.decode(): client.dump(key) for key in keys}


def assert_refused(response: requests.Response, status: int, code: str, retry_after: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Retry-After"] == retry_after
    error = response.json()["error"]
    assert error["code"] == code
    return error


def test_max_pending_answers_429_writes_nothing_and_accepts_again_once_jobs_end(api) -> None:
    base, runtime = api
    first, second = (post_job(base, {"app": "support", "query": f"q{n}"}) for n in (1, 2))
    assert first.status_code == second.status_code == 202
    before = stored(runtime)

    error = assert_refused(post_job(base, {"app": "support", "query": "q3"}, key="k3"), 429, "too_many_pending", "30")
    assert error["field"] == "app" and "apps.support.max_pending" in error["message"]
    refused_hook = deliver(base, "from a hook")
    assert_refused(refused_hook, 429, "too_many_pending", "30")
    assert stored(runtime) == before, "a refused submit wrote to Redis"
    assert runtime.raw_redis.get(runtime.store.idempotency_key(client_scope("full"), "k3")) is None

    # A cancel frees a place: the refused request is accepted as new (its key was never claimed).
    assert requests.delete(f"{base}/v1/jobs/{first.json()['id']}", headers=auth(), timeout=10).json()["status"] \
        == "canceled"
    accepted = post_job(base, {"app": "support", "query": "q3"}, key="k3")
    assert accepted.status_code == 202, accepted.text
    assert post_job(base, {"app": "support", "query": "q3"}, key="k3").status_code == 200  # a replay, even when full
    assert deliver(base, "still full").status_code == 429
    # A job the worker finishes (failed, after a retry) frees one too: the hook's redelivery is accepted.
    job_id = second.json()["id"]
    assert runtime.store.start_attempt(job_id, lease_s=30).state == "started"
    assert runtime.store.requeue(job_id, delay_s=0.0).startswith("queued")
    assert deliver(base, "after a retry").status_code == 429
    assert runtime.store.start_attempt(job_id, lease_s=30).state == "started"
    assert runtime.store.finish(job_id, JobStatus.FAILED, error={"code": "x", "message": "y"}) == "failed"
    assert deliver(base, "redelivered").status_code == 202

    # The client's cap counts its own jobs, of every app; another client is not held to it.
    assert post_job(base, {"app": "flows", "query": "c1"}, token=LIMITED_TOKEN).status_code == 202
    error = assert_refused(post_job(base, {"app": "flows", "query": "c2"}, token=LIMITED_TOKEN), 429,
                           "too_many_pending", "30")
    assert "field" not in error and "clients.capped.max_pending" in error["message"]
    assert post_job(base, {"app": "flows", "query": "other client"}).status_code == 202

    scrape = requests.get(f"{base}/metrics", timeout=10).text
    assert 'difyq_submits_refused_total{app="support",reason="max_pending",source="api"} 1.0' in scrape
    assert 'difyq_submits_refused_total{app="flows",reason="max_pending",source="api"} 1.0' in scrape
    assert 'difyq_submits_refused_total{app="support",reason="max_pending",source="hook"} 3.0' in scrape
    assert 'difyq_hook_requests_total{hook="inbound",outcome="throttled"} 3.0' in scrape


def test_concurrent_submits_never_overshoot_the_cap(api) -> None:
    base, runtime = api
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda n: post_job(base, {"app": "burst", "query": f"b{n}"}).status_code, range(24)))
    assert sorted(answers) == [202] * 5 + [429] * 19
    assert runtime.raw_redis.zcard(RedisKeys(runtime.namespace).pending_of_app("burst")) == 5


def test_a_rerun_job_counts_again(redis_url: str, namespace: str) -> None:
    runtime = make_runtime(redis_url, namespace, {"one": {"api_key": "app-secret-one", "mode": "chat",
                                                          "max_pending": 1}})
    store = runtime.store

    def new(query: str) -> NewJob:
        return NewJob(app="one", source="cli", request=JobRequest(query=query), scope="cli")

    job_id = store.submit(new("first")).job["id"]
    with pytest.raises(TooManyPending):
        store.submit(new("second"))
    store.cancel(job_id)
    second = store.submit(new("second")).job["id"]
    store.cancel(second)
    assert store.rerun(job_id) == "queued"
    with pytest.raises(TooManyPending):
        store.submit(new("third"))


EMULATED = EmulatedApp(name="chat", key="app-guard-key-0001", mode="chat", answer_tokens=400)


def test_the_memory_guard_answers_503_before_redis_refuses_writes_and_loses_no_job(namespace: str) -> None:
    server = EmbeddedRedis().start()
    try:
        with start_emulator([EMULATED]) as emulator:
            runtime = make_runtime(server.url, namespace, {"chat": {"api_key": EMULATED.key, "mode": "chat",
                                                                    "base_url": emulator.base_url}}, hooks={
                "inbound": {"app": "chat", "verify": {"scheme": "none"}, "query": "{{ body.text }}"}})
            client = redis.Redis.from_url(server.url)
            with serving_api(runtime) as base:
                accepted = [post_job(base, {"app": "chat", "query": f"before {n}"}).json()["id"] for n in range(3)]
                used = client.info("memory")["used_memory"]
                maxmemory = used + 32 * 1024 * 1024  # 10 % of it (3 MB) is the room the guard keeps
                client.config_set("maxmemory", maxmemory)
                filler = f"{namespace}:filler"
                while client.info("memory")["used_memory"] < 0.91 * maxmemory:
                    client.rpush(filler, b"x" * 262144)

                def refused() -> list[requests.Response]:  # a list: a 503 Response is falsy
                    answer = post_job(base, {"app": "chat", "query": "during"})
                    if answer.status_code == 202:  # the last reading (at most 1 s old) was under the share
                        accepted.append(answer.json()["id"])
                    return [answer] if answer.status_code == 503 else []

                [refusal] = wait_for(refused, timeout=10)
                error = assert_refused(refusal, 503, "redis_memory_full", "60")
                assert "redis.memory_guard" in error["message"]
                assert_refused(deliver(base, "during"), 503, "redis_memory_full", "60")
                assert client.zcard(runtime.store.index_key()) == len(accepted), "a refused submit stored a job"
                scrape = requests.get(f"{base}/metrics", timeout=10).text
                assert re.search(r"^difyq_redis_memory_guard_active 1\.0$", scrape, re.M)
                assert 'difyq_submits_refused_total{app="chat",reason="memory_guard",source="api"}' in scrape

                # Accepted jobs still run and store their results while the guard holds.
                with running_worker(runtime, threads=4):
                    finished = [wait_for_final(runtime, job_id) for job_id in accepted]
                assert [job["status"] for job in finished] == ["succeeded"] * len(accepted)
                assert all(job["result"]["answer"] for job in finished)
                assert client.info("memory")["used_memory"] < maxmemory
                assert post_job(base, {"app": "chat", "query": "still full"}).status_code == 503

                client.delete(filler)
                wait_for(lambda: post_job(base, {"app": "chat", "query": "after"}).status_code == 202, timeout=10)
                assert re.search(r"^difyq_redis_memory_guard_active 0\.0$",
                                 requests.get(f"{base}/metrics", timeout=10).text, re.M)
            client.close()
    finally:
        server.close()

