"""A job's trace context without OpenTelemetry (the default): every job still gets one, from the caller's
``traceparent`` when it sends a valid one, shown as the resource's ``trace_id`` and sent on to Dify
(``traceparent``, ``X-Trace-Id``) and to the callback receiver; difyq runs without the ``otel`` extra even when
``OTEL_*`` asks for traces; and which environments turn traces on."""

from __future__ import annotations

import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import requests

from difyq.worker import otel, tracing
from difyq.worker.dify.emulator import start_emulator
from difyq.worker.jobs.model import trace_id_for
from difyq.worker.jobs.store import new_job_id
from difyq.worker.runtime import Runtime
from tests.support.receiver import CallbackReceiver
from tests.support.stack import auth, make_runtime, running_worker, serving_api, wait_for_final
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def emulator() -> Iterator:
    with start_emulator() as running:
        yield running


@pytest.fixture
def dify_probe() -> Iterator[CallbackReceiver]:
    """An HTTP server standing in for Dify: it records what a Dify call sends (and answers 400)."""
    with CallbackReceiver(default=400) as probe:
        yield probe


@pytest.fixture
def runtime(redis_url: str, namespace: str, emulator, dify_probe: CallbackReceiver) -> Runtime:
    return make_runtime(redis_url, namespace, {
        "support": {"api_key": "app-demo", "mode": "chat", "base_url": emulator.base_url},
        "probe": {"api_key": "app-probe-key", "mode": "chat", "base_url": dify_probe.base_url},
    })


def test_a_job_carries_the_callers_trace_to_dify_and_the_callback(runtime: Runtime, emulator,
                                                                   dify_probe: CallbackReceiver) -> None:
    assert otel.recorder() is None
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    with CallbackReceiver() as receiver, running_worker(runtime), serving_api(runtime) as base:
        submitted = requests.post(f"{base}/v1/jobs", headers={**auth(), "traceparent": traceparent}, timeout=10,
                                  json={"app": "support", "query": "traced", "callback_url": receiver.url})
        assert submitted.status_code == 202, submitted.text
        job = wait_for_final(runtime, submitted.json()["id"])
        callback = receiver.wait_for(1)[0]
        probed = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10, json={"app": "probe", "query": "x"})
        wait_for_final(runtime, probed.json()["id"])
        bad = requests.post(f"{base}/v1/jobs", headers={**auth(), "traceparent": "00-not-a-trace-01"}, timeout=10,
                            json={"app": "support", "query": "untraced"})
    assert job["status"] == "succeeded" and job["trace_id"] == trace_id
    call = next(call for call in emulator.calls() if "traced" in str(call["body"]))
    assert call["traceparent"].split("-")[1] == trace_id
    assert callback.headers["traceparent"] == call["traceparent"]
    sent = wait_for(lambda: next((request.headers for request in dify_probe.requests
                                  if request.path.endswith("/chat-messages")), None), what="the probe's Dify call")
    assert sent["traceparent"].split("-")[1] == sent["x-trace-id"] == probed.json()["trace_id"]
    # Without a (valid) traceparent difyq starts the trace, and its id is the job id's 128 bits.
    assert bad.status_code == 202 and bad.json()["trace_id"] == trace_id_for(bad.json()["id"])
    assert probed.json()["trace_id"] == trace_id_for(probed.json()["id"])
    wait_for(lambda: runtime.store.get(bad.json()["id"])["status"] == "succeeded", what="the untraced job")


def test_difyq_runs_without_the_otel_extra() -> None:
    """With the SDK and exporter unimportable and OTEL_EXPORTER_OTLP_ENDPOINT set, the API and worker modules
    import, traces stay off with one warning, and a job still gets a trace context."""
    program = textwrap.dedent("""
        import importlib.abc, sys

        class NoOtelExtra(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith(("opentelemetry.sdk", "opentelemetry.exporter")):
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, NoOtelExtra())
        import difyq.producers.api.app, difyq.worker.app
        from difyq.worker import otel, tracing
        from difyq.worker.logs import configure_logging
        configure_logging("test")
        assert otel.configure("api") is False and otel.recorder() is None
        with tracing.submitting({}) as span:
            assert tracing.trace_id_of(span.traceparent), span.traceparent
            trace_id = tracing.trace_id_of(span.traceparent)
            assert tracing.dify_headers(trace_id) == {"traceparent": span.traceparent, "X-Trace-Id": trace_id}
        print("ran without the extra")
    """)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    ran = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert "ran without the extra" in ran.stdout
    assert ran.stderr.count("otel_unavailable") == 1


@pytest.mark.parametrize(("environ", "wanted"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
])
def test_which_environments_turn_traces_on(environ: dict[str, str], wanted: bool) -> None:
    assert otel.wanted(environ) is wanted


@pytest.mark.parametrize("value", [
    None, "", "garbage", "01-" + "a" * 32 + "-" + "b" * 16 + "-01", "00-" + "0" * 32 + "-" + "b" * 16 + "-01",
    "00-" + "a" * 32 + "-" + "0" * 16 + "-01", "00-" + "a" * 31 + "-" + "b" * 16 + "-01",
])
def test_invalid_traceparents_are_ignored(value: str | None) -> None:
    assert tracing.valid_traceparent(value) is None


def test_a_trace_names_one_job_at_most() -> None:
    """Only a trace difyq started names a job, and only its first: a second submit in the same trace (a caller
    submitting in a loop under one span) gets an id of its own, never the first job's."""
    traceparent = f"00-{tracing.new_trace_id()}-{secrets.token_hex(8)}-01"
    assert tracing.naming_trace_id(traceparent) == tracing.trace_id_of(traceparent)
    assert tracing.naming_trace_id(traceparent) is None
    with tracing.IncomingTrace(f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"):
        assert tracing.naming_trace_id(f"00-{tracing.new_trace_id()}-{secrets.token_hex(8)}-01") is None


def test_ids_made_in_one_millisecond_sort_in_the_order_they_were_made() -> None:
    """Trace ids (and the job ids made from them) are ULIDs in monotonic mode: a process's ids of one millisecond
    sort in the order it made them, each still led by its millisecond."""
    before_ms = int(time.time() * 1000)
    made = [tracing.new_trace_id() for _ in range(2000)]
    after_ms = int(time.time() * 1000)
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(before_ms <= int(trace_id, 16) >> 80 <= after_ms for trace_id in made)
    jobs = [new_job_id() for _ in range(100)]
    assert jobs == sorted(jobs)
