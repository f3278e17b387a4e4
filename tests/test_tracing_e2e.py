"""Traces of jobs, end to end with real processes: ``difyq api``, ``difyq worker`` and ``difyq scheduler`` export
their spans over OTLP/HTTP (the ``OTEL_*`` variables) to a receiver on loopback, and one job's spans form one
tree: the request's server span (under the caller's ``traceparent``), the submit, each wait in the queue, each
attempt with its Dify call as a GenAI client span, and each callback attempt. Dify and the callback receiver get
the ``traceparent`` of the span that called them; the job resource and the job's log lines carry its trace id. A
webhook delivery and a schedule fire start traces of their own, whose ids are their jobs' ids."""

from __future__ import annotations

import importlib.util
import json
import logging
import secrets
from pathlib import Path

import pytest
import requests

from difyq.worker.embedded_redis import free_port
from difyq.worker.jobs.model import trace_id_for
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan, tree
from tests.support.processes import difyq_processes, wait_for_port
from tests.support.receiver import CallbackReceiver
from tests.support.stack import CLIENT_TOKEN, SIGNING_SECRET
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
log = logging.getLogger(__name__)

AUTH = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
# FastAPI makes the request's server span itself from 0.165 on (its native OpenTelemetry); before, the submit
# span is the API's first, under the caller's traceparent.
FASTAPI_SERVER_SPANS = importlib.util.find_spec("fastapi.telemetry") is not None


def config_for(namespace: str, emulator_url: str) -> dict:
    return {
        "apps": {"support": {"api_key": "app-demo", "mode": "chat", "base_url": emulator_url}},
        "clients": {"crm": {"token": CLIENT_TOKEN, "apps": ["*"]}},
        "callbacks": {"signing_secret": SIGNING_SECRET, "allow_hosts": ["127.0.0.0/8"], "retry_schedule": ["0.2s"]},
        "jobs": {"retry_min_backoff": "2s", "retry_max_backoff": "2s", "max_attempts": 5},
        "hooks": {"ping": {"app": "support", "verify": {"scheme": "none"}, "query": "hook {{ body.q }}"}},
        "schedules": {"tick": {"cron": "* * * * * *", "app": "support", "query": "tick"}},
        "redis": {"namespace": namespace},
    }


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name}"
    return found[0]


@pytest.mark.slow
def test_one_job_is_one_trace_across_api_worker_and_callback(tmp_path: Path, redis_url: str,
                                                              namespace: str) -> None:
    caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    emulator_port = free_port()
    with OtlpReceiver() as otlp, CallbackReceiver() as receiver, \
            difyq_processes(tmp_path, redis_url, {}) as bootstrap:
        emulator = bootstrap.start("emulator", "emulator", "--port", str(emulator_port))
        wait_for_port(emulator_port, process=emulator)
        control = f"http://127.0.0.1:{emulator_port}/_emulator"
        with difyq_processes(tmp_path, redis_url, config_for(namespace, f"http://127.0.0.1:{emulator_port}/v1")) \
                as difyq:
            difyq.env.update(OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint, OTEL_SERVICE_NAME="difyq-test",
                             OTEL_BSP_SCHEDULE_DELAY="100")
            base = difyq.start_api()
            difyq.start_worker(processes=1, threads=4)
            # Dify fails the first call (then recovers), the receiver the first callback attempt.
            requests.put(f"{control}/apps/demo", json={"fault": "http500"}, timeout=5).raise_for_status()
            receiver.script([500, 200])
            submitted = requests.post(f"{base}/v1/jobs", timeout=10, json={
                "app": "support", "query": "trace me", "user": "tracer", "callback_url": receiver.url},
                headers={**AUTH, "traceparent": f"00-{caller_trace}-{caller_span}-01"})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            assert submitted.json()["trace_id"] == caller_trace
            wait_for(lambda: any(call["status"] == 500 for call in requests.get(f"{control}/calls", timeout=5)
                                 .json()), timeout=30, what="the first Dify call")
            requests.put(f"{control}/apps/demo", json={"fault": None}, timeout=5).raise_for_status()
            received = receiver.wait_for(2, timeout=30)
            spans = otlp.wait_for(caller_trace, ["difyq.submit", "difyq.callback", "difyq.callback"])
            job = requests.get(f"{base}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()
            # A webhook delivery without a traceparent: difyq starts the trace, and its id is the job id's bits.
            delivered = requests.post(f"{base}/hooks/ping", json={"q": "traced hook"}, timeout=10)
            assert delivered.status_code == 202, delivered.text
            hook_job_id = delivered.json()["id"]
            hook_trace = trace_id_for(hook_job_id)
            hook_spans = otlp.wait_for(hook_trace, ["difyq.submit", "difyq.attempt", "chat support"])
            hook_job = requests.get(f"{base}/v1/jobs/{hook_job_id}", headers=AUTH, timeout=10).json()
            # A schedule fire (every second) starts a trace in the scheduler process.
            scheduler = difyq.start("scheduler", "scheduler", env={"DIFYQ_METRICS_PORT": "0"})
            fire = wait_for(lambda: next((span for span in otlp.spans() if span.name == "difyq.schedule_fire"),
                                         None), timeout=30, what="a schedule fire's span")
            difyq.stop(scheduler)
            fire_spans = otlp.wait_for(fire.trace_id, ["difyq.submit", "difyq.attempt", "chat support"])
            dify_calls = [call for call in requests.get(f"{control}/calls", timeout=5).json()
                          if call["path"].endswith("/chat-messages")]
            worker_log = difyq.logs("worker")

    printed = tree(spans)
    print(f"\ntrace {caller_trace} of job {job_id}:\n{printed}")
    log.info("trace of job %s:\n%s", job_id, printed)
    print(f"trace {hook_trace} of job {hook_job_id}:\n{tree(hook_spans)}")
    print(f"trace {fire.trace_id} of a schedule fire:\n{tree(fire_spans)}")
    by_id = {span.span_id: span for span in spans}
    assert job["status"] == "succeeded" and job["trace_id"] == caller_trace

    submit = one(spans, "difyq.submit")
    assert submit.kind == "producer" and submit.process == "api" and submit.resource["service.name"] == "difyq-test"
    if FASTAPI_SERVER_SPANS:
        server = one(spans, "POST /v1/jobs")
        assert server.kind == "server" and server.parent_span_id == caller_span
        assert submit.parent_span_id == server.span_id
    else:
        assert submit.parent_span_id == caller_span
    assert submit.attributes["difyq.job.id"] == job_id and submit.attributes["difyq.source"] == "api"

    attempts = sorted((span for span in spans if span.name == "difyq.attempt"),
                      key=lambda span: span.attributes["difyq.attempt"])
    assert [span.attributes["difyq.attempt"] for span in attempts] == list(range(1, len(attempts) + 1))
    assert len(attempts) >= 2
    assert all(span.parent_span_id == submit.span_id and span.process == "worker" for span in attempts)
    waits = [span for span in spans if span.name == "difyq.queue_wait"]
    assert all(span.parent_span_id == submit.span_id for span in waits)
    assert len([span for span in waits if span.attributes["messaging.destination.name"] == "jobs"]) == len(attempts)

    chats = sorted((span for span in spans if span.name == "chat support"), key=lambda span: span.start_ns)
    assert [by_id[span.parent_span_id].attributes["difyq.attempt"] for span in chats] == [
        span.attributes["difyq.attempt"] for span in attempts]
    assert all(span.kind == "client" and span.attributes["gen_ai.operation.name"] == "chat"
               and span.attributes["gen_ai.provider.name"] == "dify" for span in chats)
    assert chats[0].attributes["error.type"] == "internal_server_error"
    last = chats[-1].attributes
    assert "error.type" not in last and last["gen_ai.usage.input_tokens"] > 0 and last["gen_ai.usage.output_tokens"] > 0
    assert last["gen_ai.conversation.id"] == job["result"]["conversation_id"]
    # Dify got each call's own span as its parent, and the trace id as X-Trace-Id's value.
    traced_calls = [call for call in dify_calls if call["trace_id"] == caller_trace]
    assert [call["traceparent"].split("-")[1:3] for call in traced_calls] == [
        [caller_trace, span.span_id] for span in chats]

    callbacks = sorted((span for span in spans if span.name == "difyq.callback"),
                       key=lambda span: span.attributes["difyq.callback.attempt"])
    assert [span.attributes.get("http.response.status_code") for span in callbacks] == [500, 200]
    assert all(span.parent_span_id == submit.span_id for span in callbacks)
    assert [request.headers["traceparent"].split("-")[1:3] for request in received] == [
        [caller_trace, span.span_id] for span in callbacks]

    job_lines = [json.loads(line) for line in worker_log.splitlines()
                 if line.startswith("{") and job_id in line]
    assert job_lines and all(line.get("trace_id") == caller_trace for line in job_lines), job_lines

    assert hook_job["trace_id"] == hook_trace
    hook_submit = one(hook_spans, "difyq.submit")
    assert hook_submit.attributes["difyq.source"] == "hook"
    if FASTAPI_SERVER_SPANS:
        hook_server = one(hook_spans, "POST /hooks/{name}")
        assert hook_server.parent_span_id is None and hook_submit.parent_span_id == hook_server.span_id
    else:
        assert hook_submit.parent_span_id is None
    assert one(hook_spans, "difyq.attempt").parent_span_id == hook_submit.span_id

    assert fire.parent_span_id is None and fire.process == "scheduler" and fire.attributes["difyq.schedule"] == "tick"
    fire_submit = one(fire_spans, "difyq.submit")
    assert fire_submit.parent_span_id == fire.span_id and fire_submit.attributes["difyq.source"] == "schedule"
    assert trace_id_for(fire_submit.attributes["difyq.job.id"]) == fire.trace_id
    assert one(fire_spans, "difyq.attempt").parent_span_id == fire_submit.span_id
