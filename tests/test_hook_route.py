"""POST /hooks/{name} over real HTTP (uvicorn on a loopback port), with a real Redis for delivery dedupe.

Requests are signed the way GitHub, Stripe and Standard Webhooks senders sign them. The job submission is an
in-process recorder (the job store is tested on its own): it keeps the jobs it was asked for and answers a
repeated idempotency key with the first job, as the store does.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pydantic import BaseModel, Field
from redis.backoff import NoBackoff
from redis.retry import Retry
from standardwebhooks import Webhook

from difyq.producers.hooks import HookDeliveries, MappedJob, build_hooks_router
from difyq.producers.hooks.route import UNKNOWN_HOOK_LABEL
from difyq.producers.submit import SubmitRejected
from difyq.worker.config import Config, parse_config
from difyq.worker.embedded_redis import free_port
from difyq.worker.jobs.store import IdempotencyConflict

FIXTURES = Path(__file__).parent / "fixtures" / "webhooks"
GITHUB_BODY = (FIXTURES / "github-issues-opened.json").read_bytes()
STRIPE_BODY = (FIXTURES / "stripe-invoice-paid.json").read_bytes()
GITHUB_SECRET = "gh-hook-secret-7f2c"
STRIPE_SECRET = "whsec_stripe_test_5b9d0e"
STANDARD_SECRET = "whsec_" + base64.b64encode(b"difyq route test key, 32 bytes!").decode()
CRM_TOKEN = "crm-token-1e4a"
MIB = 1_048_576

CONFIG = parse_config({
    "apps": {"support": {"api_key": "app-test", "mode": "chat"}},
    "hooks": {
        "github-issues": {
            "app": "support",
            "verify": {"scheme": "github", "secret": GITHUB_SECRET},
            "when": "{{ headers['x-github-event'] == 'issues' and body.action == 'opened' }}",
            "idempotency_key": "{{ headers['x-github-delivery'] }}",
            "query": "Summarize: {{ body.issue.title }}\n{{ body.issue.body }}",
            "inputs": {"repo": "{{ body.repository.full_name }}"},
            "user": "{{ body.sender.login }}",
            "callback_url": "https://example.com/summaries",
        },
        "stripe-invoices": {
            "app": "support",
            "verify": {"scheme": "stripe", "secret": STRIPE_SECRET},
            "when": "{{ body.type == 'invoice.paid' }}",
            "query": "Thank {{ body.data.object.customer_name }} for invoice {{ body.data.object.number }}",
            "inputs": {"amount_paid": "{{ body.data.object.amount_paid }}"},
            "user": "{{ body.data.object.customer }}",
        },
        "events": {
            "app": "support",
            "verify": {"scheme": "standard", "secret": STANDARD_SECRET},
            "query": "{{ body.type }}",
        },
        "crm-orders": {
            "app": "support",
            "verify": {"scheme": "token", "secret": CRM_TOKEN},
            "idempotency_key": "order-{{ body.order_id }}",
            "query": "Order {{ body.order_id }} from {{ query.source }}",
            "user": "{{ body.customer }}",
            "metadata": {"items": "{{ body['items'] | default([]) }}"},
        },
        "tiny": {"app": "support", "verify": {"scheme": "none"}, "max_body_bytes": 64, "query": "tiny"},
        "open": {"app": "support", "verify": {"scheme": "none"}, "query": "{{ body.q | default('none') }}"},
    },
})


@dataclass(frozen=True)
class Outcome:
    job: dict[str, Any]
    created: bool


@dataclass
class RecordingSubmit:
    """Records each submission; a key seen before answers with its first job, like the job store."""

    calls: list[tuple[str, MappedJob]] = field(default_factory=list)
    by_key: dict[tuple[str, str], str] = field(default_factory=dict)
    error: Exception | None = None
    ids: Iterator[int] = field(default_factory=itertools.count)

    def __call__(self, hook: str, job: MappedJob) -> Outcome:
        if self.error is not None:
            raise self.error
        self.calls.append((hook, job))
        if job.idempotency_key and (hook, job.idempotency_key) in self.by_key:
            return Outcome({"id": self.by_key[(hook, job.idempotency_key)], "status": "queued"}, created=False)
        job_id = f"job_{next(self.ids):04d}"
        if job.idempotency_key:
            self.by_key[(hook, job.idempotency_key)] = job_id
        return Outcome({"id": job_id, "status": "queued"}, created=True)


@dataclass
class Service:
    url: str
    submit: RecordingSubmit
    deliveries: HookDeliveries

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            return client.post(path, **kwargs)


def serve(app: FastAPI) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}", server, thread


def hooks_app(config: Config, submit: RecordingSubmit, deliveries: HookDeliveries) -> FastAPI:
    app = FastAPI()
    app.include_router(build_hooks_router(lambda: config, submit, deliveries))
    return app


@pytest.fixture
def service(redis_client: redis.Redis, namespace: str) -> Iterator[Service]:
    submit = RecordingSubmit()
    deliveries = HookDeliveries(redis_client, namespace)
    url, server, thread = serve(hooks_app(CONFIG, submit, deliveries))
    yield Service(url, submit, deliveries)
    server.should_exit = True
    thread.join(timeout=10)


def counted(hook: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("difyq_hook_requests_total", {"hook": hook, "outcome": outcome}) or 0.0


def github_request(body: bytes = GITHUB_BODY, delivery: str | None = None, event: str = "issues",
                   secret: str = GITHUB_SECRET) -> dict[str, Any]:
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
               "X-Hub-Signature-256": f"sha256={signature}", "User-Agent": "GitHub-Hookshot/044aadd",
               "Content-Type": "application/json"}
    return {"content": body, "headers": headers}


def stripe_request(body: bytes = STRIPE_BODY, timestamp: int | None = None) -> dict[str, Any]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    signature = hmac.new(STRIPE_SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    headers = {"Stripe-Signature": f"t={timestamp},v1={signature}", "Content-Type": "application/json; charset=utf-8",
               "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)"}
    return {"content": body, "headers": headers}


def standard_request(payload: dict[str, Any], message_id: str, timestamp: float | None = None) -> dict[str, Any]:
    body = json.dumps(payload)
    sent_at = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, tz=UTC)
    signature = Webhook(STANDARD_SECRET).sign(message_id, sent_at, body)
    headers = {"webhook-id": message_id, "webhook-timestamp": str(int(sent_at.timestamp())),
               "webhook-signature": signature, "content-type": "application/json"}
    return {"content": body.encode(), "headers": headers}


def flip_byte(body: bytes, index: int = 20) -> bytes:
    return body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]


class TestGitHub:
    def test_an_opened_issue_is_accepted_with_the_job_id_and_location(self, service: Service):
        before = counted("github-issues", "accepted")
        response = service.post("/hooks/github-issues", **github_request(delivery="guid-1"))
        assert response.status_code == 202
        job_id = response.json()["id"]
        assert response.json() == {"id": job_id, "status": "accepted"}
        assert response.headers["location"] == f"/v1/jobs/{job_id}"
        [(hook, job)] = service.submit.calls
        assert hook == "github-issues"
        assert job.app == "support" and job.user == "monalisa" and job.inputs == {"repo": "octo-org/hello-world"}
        assert job.query.startswith("Summarize: Login page returns 500 after upgrading to 2.4.0\nAfter upgrading")
        assert job.idempotency_key == "guid-1" and job.callback_url == "https://example.com/summaries"
        assert counted("github-issues", "accepted") == before + 1

    def test_a_redelivery_answers_200_with_the_same_job_and_submits_nothing(
        self, service: Service, redis_client: redis.Redis, namespace: str
    ):
        first = service.post("/hooks/github-issues", **github_request(delivery="guid-2"))
        before = counted("github-issues", "duplicate")
        again = service.post("/hooks/github-issues", **github_request(delivery="guid-2"))
        assert again.status_code == 200
        assert again.json() == {"id": first.json()["id"], "status": "duplicate"}
        assert again.headers["location"] == first.headers["location"]
        assert len(service.submit.calls) == 1
        assert counted("github-issues", "duplicate") == before + 1
        key = f"{namespace}:hookdelivery:github-issues:guid-2"
        assert redis_client.get(key) == first.json()["id"].encode()
        assert 3 * 86_400 - 60 < redis_client.ttl(key) <= 3 * 86_400

    def test_one_tampered_byte_is_401_without_the_secret(self, service: Service):
        request = github_request()
        request["content"] = flip_byte(request["content"])
        before = counted("github-issues", "unauthorized")
        response = service.post("/hooks/github-issues", **request)
        assert response.status_code == 401
        assert response.json() == {"error": {"code": "invalid_signature", "message": "signature mismatch"}}
        assert GITHUB_SECRET not in response.text
        assert service.submit.calls == []
        assert counted("github-issues", "unauthorized") == before + 1

    def test_no_signature_header_is_401(self, service: Service):
        request = github_request()
        del request["headers"]["X-Hub-Signature-256"]
        response = service.post("/hooks/github-issues", **request)
        assert response.status_code == 401
        assert response.json()["error"]["message"] == "missing X-Hub-Signature-256 header"

    def test_a_closed_issue_is_204_and_enqueues_nothing(self, service: Service):
        payload = json.loads(GITHUB_BODY)
        payload["action"] = "closed"
        before = counted("github-issues", "skipped")
        response = service.post("/hooks/github-issues", **github_request(json.dumps(payload).encode()))
        assert response.status_code == 204 and response.content == b""
        assert service.submit.calls == []
        assert counted("github-issues", "skipped") == before + 1

    def test_a_ping_without_an_action_is_204(self, service: Service):
        ping = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 292430182}).encode()
        assert service.post("/hooks/github-issues", **github_request(ping, event="ping")).status_code == 204

    def test_a_payload_missing_a_mapped_field_is_422_naming_it(self, service: Service):
        payload = json.loads(GITHUB_BODY)
        del payload["repository"]
        before = counted("github-issues", "invalid")
        response = service.post("/hooks/github-issues", **github_request(json.dumps(payload).encode()))
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "mapping_failed" and error["field"] == "inputs.repo"
        assert "repository" in error["message"]
        assert service.submit.calls == []
        assert counted("github-issues", "invalid") == before + 1


class TestStripe:
    def test_invoice_paid_is_accepted_keyed_by_the_event_id(self, service: Service):
        response = service.post("/hooks/stripe-invoices", **stripe_request())
        assert response.status_code == 202
        [(_, job)] = service.submit.calls
        assert job.idempotency_key == "evt_1PeQ2vLkdIwHu7ixQ5Zr6Hx3"
        assert job.query == "Thank Jenny Rosen for invoice 8C3D1F2A-0007"
        assert job.inputs == {"amount_paid": 4900} and job.user == "cus_QVQ9wn1b0Yx4Gm"

    def test_a_retry_with_a_fresh_signature_is_the_same_job(self, service: Service):
        first = service.post("/hooks/stripe-invoices", **stripe_request(timestamp=int(time.time()) - 120))
        retry = service.post("/hooks/stripe-invoices", **stripe_request())
        assert (first.status_code, retry.status_code) == (202, 200)
        assert retry.json()["id"] == first.json()["id"]
        assert len(service.submit.calls) == 1

    def test_an_old_timestamp_is_401(self, service: Service):
        response = service.post("/hooks/stripe-invoices", **stripe_request(timestamp=int(time.time()) - 301))
        assert response.status_code == 401
        assert response.json()["error"]["message"] == "timestamp outside tolerance"
        assert service.submit.calls == []

    def test_one_tampered_byte_and_no_header_are_401(self, service: Service):
        request = stripe_request()
        tampered = service.post("/hooks/stripe-invoices", content=flip_byte(STRIPE_BODY, 300),
                                headers=request["headers"])
        unsigned = service.post("/hooks/stripe-invoices", content=STRIPE_BODY,
                                headers={"Content-Type": "application/json"})
        assert (tampered.status_code, unsigned.status_code) == (401, 401)
        assert unsigned.json()["error"]["message"] == "missing Stripe-Signature header"


class TestStandardWebhooks:
    def test_a_library_signed_message_is_accepted_and_its_retry_deduplicated(self, service: Service):
        first = service.post("/hooks/events", **standard_request({"type": "order.created"}, "msg_1"))
        retry = service.post("/hooks/events", **standard_request({"type": "order.created"}, "msg_1"))
        other = service.post("/hooks/events", **standard_request({"type": "order.created"}, "msg_2"))
        assert (first.status_code, retry.status_code, other.status_code) == (202, 200, 202)
        assert retry.json()["id"] == first.json()["id"] != other.json()["id"]
        assert [job.idempotency_key for _, job in service.submit.calls] == ["msg_1", "msg_2"]

    def test_tampered_old_and_unsigned_messages_are_401(self, service: Service):
        request = standard_request({"type": "order.created"}, "msg_3")
        tampered = service.post("/hooks/events", content=flip_byte(request["content"], 5), headers=request["headers"])
        old = service.post("/hooks/events", **standard_request({"type": "x"}, "msg_4", time.time() - 301))
        unsigned = service.post("/hooks/events", json={"type": "x"})
        assert [tampered.status_code, old.status_code, unsigned.status_code] == [401, 401, 401]
        assert [r.json()["error"]["message"] for r in (tampered, old, unsigned)] == [
            "signature mismatch", "timestamp outside tolerance", "missing webhook-id header",
        ]


class TestBodies:
    def test_form_fields_and_url_parameters_map(self, service: Service):
        response = service.post("/hooks/crm-orders?source=shop", content=b"order_id=42&customer=ada&items=a&items=b",
                                headers={"Authorization": f"Bearer {CRM_TOKEN}",
                                         "Content-Type": "application/x-www-form-urlencoded"})
        assert response.status_code == 202
        [(_, job)] = service.submit.calls
        assert job == MappedJob(app="support", query="Order 42 from shop", user="ada",
                                metadata={"items": ["a", "b"]}, idempotency_key="order-42")

    def test_the_same_idempotency_key_is_the_same_job(self, service: Service):
        headers = {"Authorization": f"Bearer {CRM_TOKEN}"}
        first = service.post("/hooks/crm-orders?source=a", json={"order_id": 7, "customer": "ada"}, headers=headers)
        second = service.post("/hooks/crm-orders?source=a", json={"order_id": 7, "customer": "ada"}, headers=headers)
        assert (first.status_code, second.status_code) == (202, 200)
        assert second.json() == {"id": first.json()["id"], "status": "duplicate"}
        assert second.headers["idempotent-replayed"] == "true"

    def test_an_unsupported_content_type_is_415(self, service: Service):
        response = service.post("/hooks/open", content=b"q=1", headers={"Content-Type": "text/plain"})
        assert response.status_code == 415
        assert response.json()["error"]["code"] == "unsupported_media_type"

    def test_malformed_json_is_422_on_the_body(self, service: Service):
        response = service.post("/hooks/open", content=b'{"q": ', headers={"Content-Type": "application/json"})
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_body" and response.json()["error"]["field"] == "body"

    def test_an_unknown_hook_is_404(self, service: Service):
        before = counted(UNKNOWN_HOOK_LABEL, "not_found")
        response = service.post("/hooks/nope", json={})
        assert response.status_code == 404 and response.json()["error"]["code"] == "hook_not_found"
        assert counted(UNKNOWN_HOOK_LABEL, "not_found") == before + 1


class TestSizeLimit:
    def test_a_declared_length_over_the_hook_limit_is_413(self, service: Service):
        before = counted("tiny", "too_large")
        response = service.post("/hooks/tiny", content=b"{}" + b" " * 63, headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert counted("tiny", "too_large") == before + 1
        assert service.submit.calls == []

    def test_a_streamed_body_over_the_limit_is_413(self, service: Service):
        chunks = iter([b"{}", b" " * 40, b" " * 40])
        response = service.post("/hooks/tiny", content=chunks, headers={"Content-Type": "application/json"})
        assert response.status_code == 413

    def test_exactly_the_limit_is_accepted(self, service: Service):
        response = service.post("/hooks/tiny", content=b"{}" + b" " * 62, headers={"Content-Type": "application/json"})
        assert response.status_code == 202

    def test_the_default_limit_is_one_mebibyte(self, service: Service):
        exact = json.dumps({"q": "big", "pad": "x" * MIB}).encode()[: MIB - 2] + b'"}'
        assert len(exact) == MIB
        json_type = {"Content-Type": "application/json"}
        assert service.post("/hooks/open", content=exact, headers=json_type).status_code == 202
        over = exact[:-2] + b'x"}'
        assert service.post("/hooks/open", content=over, headers=json_type).status_code == 413


class TestSubmitFailures:
    def test_a_submit_rejection_keeps_its_status_and_field(self, service: Service):
        service.submit.error = SubmitRejected(422, "callback_url_blocked", "resolves to a private address",
                                              "callback_url")
        response = service.post("/hooks/open", json={"q": "x"})
        assert response.status_code == 422
        assert response.json()["error"] == {"code": "callback_url_blocked", "message": "resolves to a private address",
                                            "field": "callback_url"}

    def test_a_job_that_fails_validation_is_422_naming_the_field(self, service: Service):
        class Limits(BaseModel):
            user: str = Field(max_length=3)

        try:
            Limits(user="too long")
        except ValueError as exc:
            service.submit.error = exc
        response = service.post("/hooks/open", json={"q": "x"})
        assert response.status_code == 422 and response.json()["error"]["field"] == "user"

    def test_a_reused_template_key_is_422_but_a_reused_delivery_id_is_the_same_job(self, service: Service):
        service.submit.error = IdempotencyConflict("job_existing")
        headers = {"Authorization": f"Bearer {CRM_TOKEN}"}
        reused = service.post("/hooks/crm-orders?source=a", json={"order_id": 1, "customer": "x"}, headers=headers)
        assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
        redelivered = service.post("/hooks/events", **standard_request({"type": "t"}, "msg_9"))
        assert redelivered.status_code == 200 and redelivered.json()["id"] == "job_existing"
        assert service.deliveries.recall("events", "msg_9") == "job_existing"


def test_redis_down_is_503_with_retry_after(namespace: str):
    unreachable = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    submit = RecordingSubmit()
    url, server, thread = serve(hooks_app(CONFIG, submit, HookDeliveries(unreachable, namespace)))
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            response = client.post("/hooks/github-issues", **github_request())
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5" and response.json()["error"]["code"] == "unavailable"
        assert submit.calls == []
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_route_is_documented_in_openapi():
    app = hooks_app(CONFIG, RecordingSubmit(), HookDeliveries(redis.Redis(), "unused"))
    operation = app.openapi()["paths"]["/hooks/{name}"]["post"]
    assert {"200", "202", "204", "401", "404", "413", "415", "422", "503"} <= set(operation["responses"])
    assert set(operation["requestBody"]["content"]) == {"application/json", "application/x-www-form-urlencoded"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hook=st.sampled_from(["open", "github-issues", "stripe-invoices", "crm-orders"]),
    content_type=st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain", ""]),
    body=st.binary(max_size=300) | st.builds(lambda value: json.dumps(value).encode(), st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
        max_leaves=10)),
    signature=st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60),
)
def test_no_payload_is_ever_a_500(service: Service, hook, content_type, body, signature):
    headers = {"Content-Type": content_type, "X-Hub-Signature-256": signature.strip().encode("latin-1"),
               "Stripe-Signature": signature.strip().encode("latin-1"), "Authorization": f"Bearer {CRM_TOKEN}",
               "X-GitHub-Event": "issues"}
    response = service.post(f"/hooks/{hook}", content=body, headers=headers)
    assert response.status_code in {200, 202, 204, 401, 413, 415, 422}


def test_a_real_shaped_payload_with_a_null_issue_body_still_maps(service: Service):
    payload = copy.deepcopy(json.loads(GITHUB_BODY))
    payload["issue"]["body"] = None
    response = service.post("/hooks/github-issues", **github_request(json.dumps(payload).encode()))
    assert response.status_code == 202
    assert service.submit.calls[0][1].query == "Summarize: Login page returns 500 after upgrading to 2.4.0\n"
