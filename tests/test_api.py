"""The jobs API over real HTTP on a real Redis: every status code of docs/http-api.md and a body naming the problem."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import uvloop

from difyq.producers.submission import JobSubmission
from difyq.producers.submit import SubmitRejected, submit, submit_async
from difyq.worker.embedded_redis import EmbeddedRedis
from difyq.worker.jobs.store import SubmitOutcome
from tests.support.processes import difyq_processes
from tests.support.stack import CLIENT_TOKEN, LIMITED_TOKEN, SIGNING_SECRET, auth, make_runtime, serving_api
from tests.support.waiting import wait_for

APPS = {"support": {"api_key": "app-secret-support", "mode": "chat"},
        "flows": {"api_key": "app-secret-flows", "mode": "workflow"}}


@pytest.fixture
def api(redis_url: str, namespace: str) -> Iterator[tuple[str, object]]:
    runtime = make_runtime(redis_url, namespace, APPS)
    with serving_api(runtime) as base:
        yield base, runtime


def post_job(base: str, body: object, headers: dict[str, str] | None = None, token: str | None = None):
    return requests.post(f"{base}/v1/jobs", json=body, headers={**(auth(token) if token else auth()),
                                                                 **(headers or {})}, timeout=10)


def test_submit_returns_202_with_location_and_resource(api) -> None:
    base, _ = api
    response = post_job(base, {"app": "support", "query": "hi", "inputs": {"a": 1}, "metadata": {"ticket": 7}})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["source"] == "api" and job["attempts"] == 0
    assert job["request"]["metadata"] == {"ticket": 7}
    assert requests.get(f"{base}/v1/jobs/{job['id']}", headers=auth(), timeout=10).json() == job


def test_idempotent_replay_and_reuse(api) -> None:
    base, _ = api
    body = {"app": "support", "query": "once"}
    first = post_job(base, body, {"Idempotency-Key": "abc"})
    replay = post_job(base, body, {"Idempotency-Key": "abc"})
    assert first.status_code == 202 and replay.status_code == 200
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.json()["id"] == first.json()["id"]
    reused = post_job(base, {**body, "query": "different"}, {"Idempotency-Key": "abc"})
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
    in_body = post_job(base, {**body, "idempotency_key": "abc"})
    assert in_body.status_code == 200
    mismatch = post_job(base, {**body, "idempotency_key": "x"}, {"Idempotency-Key": "y"})
    assert mismatch.status_code == 422 and mismatch.json()["error"]["field"] == "idempotency_key"


def test_twenty_concurrent_submissions_make_one_job(api) -> None:
    base, _ = api
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: post_job(base, {"app": "support", "query": "q"},
                                                     {"Idempotency-Key": "same"}), range(20)))
    assert sorted(r.status_code for r in responses) == [200] * 19 + [202]
    assert len({r.json()["id"] for r in responses}) == 1


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"query": "no app"}, 422, "app"),
        ({"app": "support", "inputs": "not an object"}, 422, "inputs"),
        ({"app": "support", "surprise": 1}, 422, "surprise"),
        ({"app": "support", "user": ""}, 422, "user"),
        ({"app": "support", "query": {"a": 1}}, 422, "query"),
        ({"app": "support", "files": [{"type": "image", "transfer_method": "remote_url", "url": "https://x.test/a"},
                                      "not an object"]}, 422, "files[1]"),
        ({"app": "support", "files": [{"type": "image", "transfer_method": "remote_url"}]}, 422, "files[0].url"),
        ({"app": "support", "files": [{"type": "image", "url": "https://x.test/a\n"}]}, 422, "files[0].url"),
        ({"app": "support", "files": [{"type": "image", "transfer_method": "local_file"}]}, 422,
         "files[0].upload_file_id"),
        ({"app": "support", "metadata": []}, 422, "metadata"),
        ({"app": "nope", "query": "x"}, 404, "app"),
        ({"app": "support", "callback_url": "http://169.254.169.254/latest"}, 422, "callback_url"),
        ({"app": "support", "callback_url": "ftp://example.com/"}, 422, "callback_url"),
    ],
)
def test_bad_bodies_name_the_field(api, body: dict, status: int, field: str) -> None:
    base, _ = api
    response = post_job(base, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field


def test_not_json_and_not_an_object(api) -> None:
    base, _ = api
    for data in (b"{not json", b"[1, 2]", b""):
        response = requests.post(f"{base}/v1/jobs", data=data, headers={**auth(), "Content-Type": "application/json"},
                                 timeout=10)
        assert response.status_code == 422, (data, response.text)
        assert response.json()["error"]["code"] in ("invalid_json", "invalid_request")
        assert response.json()["error"]["field"] == "body"


def test_auth_and_permissions(api) -> None:
    base, _ = api
    assert requests.post(f"{base}/v1/jobs", json={"app": "support"}, timeout=10).status_code == 401
    wrong = requests.post(f"{base}/v1/jobs", json={"app": "support"}, headers=auth("nope"), timeout=10)
    assert wrong.status_code == 401 and "nope" not in wrong.text
    forbidden = post_job(base, {"app": "flows", "inputs": {}}, token=LIMITED_TOKEN)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["field"] == "app"
    job = post_job(base, {"app": "flows", "inputs": {}}).json()
    hidden = requests.get(f"{base}/v1/jobs/{job['id']}", headers=auth(LIMITED_TOKEN), timeout=10)
    assert hidden.status_code == 404
    assert requests.get(f"{base}/v1/jobs/job_unknown", headers=auth(), timeout=10).status_code == 404


def test_body_over_one_mebibyte_is_413(api) -> None:
    base, _ = api
    big = {"app": "support", "query": "x" * (1_048_576 + 10)}
    response = post_job(base, big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"app": "support", "query": "'
        for _ in range(20):
            yield b"y" * 65536
        yield b'"}'

    streamed = requests.post(f"{base}/v1/jobs", data=chunks(), headers={**auth(), "Content-Type": "application/json"},
                             timeout=10)
    assert streamed.status_code == 413


def test_a_query_is_bounded_by_the_body_limit_unless_a_cap_is_configured(api, redis_url: str, namespace: str) -> None:
    base, _ = api
    body = {"app": "support", "query": ""}
    body["query"] = "q" * (1_040_384 - len(json.dumps(body)))
    assert len(json.dumps(body)) == 1_040_384
    accepted = post_job(base, body)
    assert accepted.status_code == 202, accepted.text[:300]
    assert len(accepted.json()["request"]["query"]) == len(body["query"])
    capped = make_runtime(redis_url, namespace, APPS, api={"max_query_chars": 1000})
    with serving_api(capped) as capped_base:
        refused = post_job(capped_base, {"app": "support", "query": "q" * 1001})
        assert refused.status_code == 422
        assert refused.json()["error"] == {"code": "query_too_long", "field": "query", "message":
                                           "the query has 1001 characters, over api.max_query_chars (1000)"}
        assert post_job(capped_base, {"app": "support", "query": "q" * 1000}).status_code == 202


def test_list_and_cancel(api) -> None:
    base, _ = api
    ids = [post_job(base, {"app": "support", "query": f"q{i}"}).json()["id"] for i in range(3)]
    listing = requests.get(f"{base}/v1/jobs", params={"limit": 2}, headers=auth(), timeout=10).json()
    assert [j["id"] for j in listing["jobs"]] == ids[::-1][:2] and listing["next_cursor"]
    rest = requests.get(f"{base}/v1/jobs", params={"limit": 2, "cursor": listing["next_cursor"]}, headers=auth(),
                        timeout=10).json()
    assert [j["id"] for j in rest["jobs"]] == ids[:1]
    bad = requests.get(f"{base}/v1/jobs", params={"status": "bogus"}, headers=auth(), timeout=10)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "status"
    canceled = requests.delete(f"{base}/v1/jobs/{ids[0]}", headers=auth(), timeout=10)
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    queued = requests.get(f"{base}/v1/jobs", params={"status": "queued"}, headers=auth(), timeout=10).json()
    assert ids[0] not in [j["id"] for j in queued["jobs"]]


def test_list_filters_by_tenant(api) -> None:
    """``tenant=`` lists the jobs of one tenant: a given one, or the client's name for a job submitted without
    one; a tenant out of 1 to 128 characters is a 422 naming the field."""
    base, _ = api
    acme = [post_job(base, {"app": "support", "query": f"a{i}", "tenant": "acme"}).json()["id"] for i in range(2)]
    other = post_job(base, {"app": "support", "query": "b", "tenant": "globex"}).json()["id"]
    own = post_job(base, {"app": "support", "query": "c"}).json()["id"]

    def listed(**params: object) -> list[str]:
        page = requests.get(f"{base}/v1/jobs", params=params, headers=auth(), timeout=10)
        assert page.status_code == 200, page.text
        return [job["id"] for job in page.json()["jobs"]]

    assert listed(tenant="acme") == acme[::-1]
    assert listed(tenant="globex", status="queued") == [other]
    assert listed(tenant="full") == [own]
    assert listed(tenant="nobody") == []
    first = requests.get(f"{base}/v1/jobs", params={"tenant": "acme", "limit": 1}, headers=auth(), timeout=10).json()
    assert listed(tenant="acme", cursor=first["next_cursor"]) == acme[:1]
    spec = requests.get(f"{base}/openapi.json", timeout=10).json()
    assert "tenant" in {parameter["name"] for parameter in spec["paths"]["/v1/jobs"]["get"]["parameters"]}
    for bad in ("", "t" * 129):
        refused = requests.get(f"{base}/v1/jobs", params={"tenant": bad}, headers=auth(), timeout=10)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "tenant", refused.text


def test_health_readiness_openapi_and_metrics(api) -> None:
    base, _ = api
    assert requests.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{base}/readyz", timeout=10).status_code == 200
    spec = requests.get(f"{base}/openapi.json", timeout=10).json()
    assert "/v1/jobs" in spec["paths"] and "requestBody" in spec["paths"]["/v1/jobs"]["post"]
    post_job(base, {"app": "support", "query": "count me"})
    scrape = requests.get(f"{base}/metrics", timeout=10).text
    assert 'difyq_jobs_submitted_total{app="support",source="api"}' in scrape
    assert 'difyq_queue_messages{queue="jobs"}' in scrape
    assert 'route="/v1/jobs"' in scrape
    assert "app-secret" not in scrape


def test_redis_down_gives_503_quickly_then_recovers(namespace: str) -> None:
    server = EmbeddedRedis().start()
    runtime = make_runtime(server.url, namespace, APPS)
    try:
        with serving_api(runtime) as base:
            assert post_job(base, {"app": "support", "query": "before"}).status_code == 202
            server.stop()
            down = post_job(base, {"app": "support", "query": "during"})
            assert down.status_code == 503 and down.headers["Retry-After"] == "5"
            assert requests.get(f"{base}/readyz", timeout=10).status_code == 503
            assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
            server.start()
            after = post_job(base, {"app": "support", "query": "after"})
            assert after.status_code == 202, after.text
    finally:
        server.close()


def test_a_hung_redis_gives_503_after_the_socket_timeout(namespace: str) -> None:
    """The event loop's submit keeps the sync clients' socket timeout: a stopped Redis is a 503, not a hang."""
    server = EmbeddedRedis().start()
    runtime = make_runtime(server.url, namespace, APPS)
    try:
        with serving_api(runtime) as base:
            assert post_job(base, {"app": "support", "query": "before"}).status_code == 202
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                hung = post_job(base, {"app": "support", "query": "during"})  # within its 10 s timeout
                health = requests.get(f"{base}/healthz", timeout=1.5)
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert hung.status_code == 503 and hung.headers["Retry-After"] == "5", hung.text
            assert hung.json() == {"error": {"code": "unavailable",
                                             "message": "the job store is unreachable; retry shortly"}}
            assert health.status_code == 200
            assert post_job(base, {"app": "support", "query": "after"}).status_code == 202
    finally:
        server.close()


@pytest.mark.e2e
def test_request_id_is_echoed_stored_and_bound_to_the_submit_log(redis_url: str, namespace: str,
                                                                  tmp_path: Path) -> None:
    """Read from a real ``difyq api``'s log lines, as an operator would."""
    config = {"apps": APPS, "clients": {"full": {"token": CLIENT_TOKEN, "apps": ["*"]}},
              "redis": {"namespace": namespace}}
    with difyq_processes(tmp_path, redis_url, config) as difyq:
        base = difyq.start_api()
        given = post_job(base, {"app": "support", "query": "q"}, {"X-Request-ID": "req-test-7"})
        generated = post_job(base, {"app": "support", "query": "q"})
        assert given.status_code == generated.status_code == 202
        expected = [(given.json()["id"], "req-test-7"), (generated.json()["id"], generated.headers["X-Request-ID"])]

        def submit_lines() -> list[tuple[str, str | None]]:
            lines = [json.loads(line) for line in difyq.logs("api").splitlines() if line.startswith("{")]
            return [(line["job_id"], line.get("request_id")) for line in lines if line["event"] == "job_submitted"]

        wait_for(lambda: submit_lines() == expected, timeout=30, what="both submits logged with their request id")
    assert given.headers["X-Request-ID"] == "req-test-7"
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["X-Request-ID"])
    runtime = make_runtime(redis_url, namespace, APPS)
    assert runtime.store.fields(given.json()["id"])["request_id"] == "req-test-7"


def test_callback_hosts_by_name_are_resolved_off_the_event_loop(redis_url: str, namespace: str) -> None:
    open_runtime = make_runtime(redis_url, namespace, APPS)
    closed_runtime = make_runtime(redis_url, namespace, APPS, callbacks={"signing_secret": SIGNING_SECRET})
    with serving_api(open_runtime) as base:
        allowed = post_job(base, {"app": "support", "callback_url": "http://localhost:9/cb"})
    with serving_api(closed_runtime) as base:
        blocked = post_job(base, {"app": "support", "callback_url": "http://localhost:9/cb"})
    assert allowed.status_code == 202, allowed.text
    assert blocked.status_code == 422 and blocked.json()["error"]["code"] == "callback_url_blocked"
    assert "'localhost' resolves to a loopback address" in blocked.json()["error"]["message"]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/cb", "http://localhost:9/cb", "http://0177.0.0.1:9/cb", "http://[::1]:9/cb",
    "http://169.254.169.254/latest", "http://10.1.2.3/x", "ftp://127.0.0.1/x", "http://:9/x",
    "http://no-such-host.test/x",
])
def test_submit_async_judges_callback_urls_like_submit(redis_url: str, namespace: str, url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = make_runtime(redis_url, namespace, APPS)
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host == "no-such-host.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    submission = JobSubmission(app="support", query="q", callback_url=url)

    def verdict(call: Callable[[], SubmitOutcome]) -> tuple[object, ...]:
        try:
            return ("created", call().created)
        except SubmitRejected as exc:
            return (exc.status, exc.code, exc.message, exc.field)

    async def via_event_loop() -> SubmitOutcome:
        client = runtime.async_redis()
        try:
            return await submit_async(runtime, client, submission, source="api", scope="t")
        finally:
            await client.aclose()

    in_thread = verdict(lambda: submit(runtime, submission, source="api", scope="t"))
    assert verdict(lambda: asyncio.run(via_event_loop())) == in_thread


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_answers_an_overloaded_loop_reads_late_are_not_503s(redis_url: str, namespace: str, loop_factory,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests hogging the event loop (turns of 0.18 s) past the submits' deadline (0.1 s) do not turn stored
    jobs into 503s: the deadline counts Redis' silence, not the loop's backlog."""
    monkeypatch.setattr("difyq.producers.submit.REDIS_REPLY_TIMEOUT_S", 0.1)
    runtime = make_runtime(redis_url, namespace, APPS)

    async def hog() -> None:
        for _ in range(6):
            time.sleep(0.03)
            await asyncio.sleep(0)

    async def scenario() -> list[SubmitOutcome]:
        client = runtime.async_redis()
        try:
            hogs = [asyncio.create_task(hog()) for _ in range(6)]
            outcomes = await asyncio.gather(*(submit_async(runtime, client, JobSubmission(app="support", query=f"q{n}"),
                                                           source="api", scope="t")
                                              for n in range(5)))
            await asyncio.gather(*hogs)
            return outcomes
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        outcomes = runner.run(scenario())
    assert all(outcome.created for outcome in outcomes)
    assert runtime.raw_redis.llen(f"{runtime.namespace}:jobs") == 5
