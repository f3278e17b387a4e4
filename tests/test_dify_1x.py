"""Jobs against both Dify shapes the emulator speaks (`--dify-version 0.15` and `1.x`): real Redis, the emulator
over HTTP, an in-process worker. Spend for every mode, a cut stream followed instead of run twice, 1.x errors,
Dify's silent failure, a pinned workflow version and the trace each call carries."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import pytest
import requests
from prometheus_client import REGISTRY
from standardwebhooks import Webhook

from difyq.producers.cli import build_parser
from difyq.producers.submission import JobSubmission
from difyq.producers.submit import submit
from difyq.worker.dify.client import DifyClient, DifyError, DifyRequest
from difyq.worker.dify.emulator import EmulatedApp, RunningEmulator, start_emulator
from difyq.worker.queue_metrics import QueueCollector
from difyq.worker.runtime import Runtime
from tests.support.loopback import closed_port
from tests.support.receiver import CallbackReceiver
from tests.support.stack import SIGNING_SECRET, auth, make_runtime, running_worker, serving_api, wait_for_final
from tests.support.waiting import wait_for

EMULATED = [
    EmulatedApp(name="chat", key="app-1x-chat-0001", mode="chat"),
    EmulatedApp(name="chatflow", key="app-1x-chatflow-01", mode="advanced-chat"),
    EmulatedApp(name="workflow", key="app-1x-workflow-01", mode="workflow", required_inputs=["text"]),
    # A run that lasts about a second, so a stream cut after its start leaves it running at Dify.
    EmulatedApp(name="long", key="app-1x-long-000001", mode="workflow", tokens_per_second=10, answer_tokens=10),
    EmulatedApp(name="long-chatflow", key="app-1x-long-chatfl", mode="advanced-chat", tokens_per_second=10,
                answer_tokens=10),
    EmulatedApp(name="faulty", key="app-1x-faulty-0001", mode="workflow"),
    EmulatedApp(name="review", key="app-1x-review-0001", mode="workflow", human_input=True),
    EmulatedApp(name="review-timeout", key="app-1x-review-tmout", mode="workflow", human_input=True,
                form_timeout_s=1),
]
MODES = {app.name: app.mode for app in EMULATED}


@pytest.fixture(scope="module", params=["0.15", "1.x"])
def emulator(request: pytest.FixtureRequest) -> Iterator[RunningEmulator]:
    with start_emulator(EMULATED, dify_version=request.param) as running:
        yield running


@pytest.fixture
def version(request: pytest.FixtureRequest) -> str:
    """The Dify version the module's emulator speaks."""
    return request.node.callspec.params["emulator"]


@pytest.fixture
def runtime(redis_url: str, namespace: str, emulator: RunningEmulator) -> Runtime:
    apps = {app.name: {"api_key": app.key, "mode": app.mode, "base_url": emulator.base_url, "timeout_s": 20}
            for app in EMULATED}
    apps["quota-defer"] = {**apps["faulty"], "on_quota": "defer"}
    apps["pinned"] = {**apps["workflow"], "workflow_id": EMULATED[2].workflow_id}
    apps["unreachable"] = {**apps["workflow"], "base_url": f"http://127.0.0.1:{closed_port()}/v1"}
    return make_runtime(redis_url, namespace, apps, jobs={
        "retry_min_backoff": "0.05s", "retry_max_backoff": "0.2s", "max_attempts": 2}, dify={
        "connect_timeout_s": 2, "idle_read_timeout_s": 5, "first_event_timeout_s": 1, "run_poll_interval_s": 0.1})


@pytest.fixture(autouse=True)
def clean_faults(emulator: RunningEmulator) -> Iterator[None]:
    yield
    for app in EMULATED:
        emulator.set_app(app.name, fault=None, fault_until=None)


@contextmanager
def restored(emulator: RunningEmulator, app: str, **settings: object) -> Iterator[None]:
    """Set an app's ``settings`` back on the way out."""
    try:
        yield
    finally:
        emulator.set_app(app, **settings)


def enqueue(runtime: Runtime, app: str, marker: str, **request: object) -> str:
    submission = JobSubmission(app=app, query=None if MODES.get(app, "workflow") == "workflow" else marker,
                               inputs={"text": marker}, **request)
    return submit(runtime, submission, source="cli", scope="test").job["id"]


def runs_of(emulator: RunningEmulator, marker: str) -> list[dict]:
    """The generation calls that carried `marker` (reattaches and run records carry no body)."""
    return [call for call in emulator.calls() if marker in str(call.get("body"))]


def paused_gauge(runtime: Runtime, app: str = "review") -> float:
    """``difyq_jobs_paused`` of ``app`` as a scrape reads it."""
    collector = QueueCollector(runtime.raw_redis, runtime.namespace, [app])
    [family] = [family for family in collector.collect() if family.name == "difyq_jobs_paused"]
    return next(sample.value for sample in family.samples if sample.labels == {"app": app})


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("app", ["chat", "chatflow", "workflow"])
def test_every_mode_succeeds_with_its_spend(runtime: Runtime, emulator: RunningEmulator, app: str) -> None:
    marker = f"spend-{app}-{time.time_ns()}"
    tokens_before = counter("difyq_tokens_total", app=app, type="total")
    cost_before = counter("difyq_cost_total", app=app, currency="USD")
    with running_worker(runtime):
        job = wait_for_final(runtime, enqueue(runtime, app, marker))
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    usage = job["result"]["usage"]
    assert usage["total_tokens"] > 0 and Decimal(usage["total_price"]) > 0 and usage["currency"] == "USD"
    assert counter("difyq_cost_total", app=app, currency="USD") - cost_before == pytest.approx(
        float(Decimal(usage["total_price"])))
    if app == "workflow":  # no prompt/completion split: the run's tokens count as `total`
        assert counter("difyq_tokens_total", app=app, type="total") - tokens_before == usage["total_tokens"]
    [call] = runs_of(emulator, marker)
    assert call["outcome"] == "ok"


@pytest.mark.parametrize("app", ["long", "long-chatflow"])
def test_a_stream_cut_after_the_run_started_is_followed_not_run_twice(
        runtime: Runtime, emulator: RunningEmulator, version: str, app: str) -> None:
    emulator.set_app(app, fault="cut-after-start")
    marker = f"cut-{app}-{time.time_ns()}"
    with running_worker(runtime):
        job = wait_for_final(runtime, enqueue(runtime, app, marker))
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    [call] = runs_of(emulator, marker)  # one run at Dify
    assert call["outcome"] == "ok"  # and it ran to its end
    run_id = job["result"]["workflow_run_id"]
    followed = [c["path"] for c in emulator.calls() if run_id in c["path"]]
    if version == "1.x":
        assert followed == [f"/v1/workflow/{run_id}/events"]  # 1.14+: reattached
    else:
        # older: no reattach route (404), the run record is polled
        assert followed[0] == f"/v1/workflow/{run_id}/events"
        assert followed[1:] and set(followed[1:]) == {f"/v1/workflows/run/{run_id}"}
    outputs = job["result"]["outputs"]
    text = outputs.get("result") or outputs.get("answer")
    assert text.startswith("FAKE-LLM says:") and marker in text
    if app == "long-chatflow":
        assert job["result"]["answer"] == text


def test_a_run_that_failed_at_dify_after_a_cut_is_run_again(runtime: Runtime, emulator: RunningEmulator) -> None:
    """The cut-stream fault: the stream breaks and Dify reports the run failed with a transient error."""
    emulator.set_app("faulty", fault="cut-stream")
    marker = f"cut-failed-{time.time_ns()}"
    with running_worker(runtime):
        job = wait_for_final(runtime, enqueue(runtime, "faulty", marker))
    assert job["status"] == "failed" and job["attempts"] == runtime.config.jobs.max_attempts
    assert job["error"]["code"] == "workflow_failed"
    assert len(runs_of(emulator, marker)) == runtime.config.jobs.max_attempts


@pytest.mark.parametrize(
    ("fault", "code", "attempts"),
    [
        ("http429-quota", "rate_limit_error", 1),
        ("http403-version", "workflow_version_execution_not_allowed", 1),
        ("http500-too-many", "internal_server_error", None),
        ("http429", "too_many_requests", None),
    ],
)
def test_1x_errors(runtime: Runtime, emulator: RunningEmulator, fault: str, code: str, attempts: int | None) -> None:
    emulator.set_app("faulty", fault=fault)
    marker = f"err-{fault}-{time.time_ns()}"
    with running_worker(runtime):
        job = wait_for_final(runtime, enqueue(runtime, "faulty", marker))
    expected_attempts = attempts or runtime.config.jobs.max_attempts
    assert (job["status"], job["error"]["code"], job["attempts"]) == ("failed", code, expected_attempts), job
    assert len(runs_of(emulator, marker)) == expected_attempts


def test_a_quota_is_deferred_to_the_next_hour_when_the_app_says_so(
        runtime: Runtime, emulator: RunningEmulator) -> None:
    emulator.set_app("faulty", fault="http429-quota")
    marker = f"quota-{time.time_ns()}"
    with running_worker(runtime):
        job_id = enqueue(runtime, "quota-defer", marker)
        wait_for(lambda: (runtime.store.fields(job_id) or {}).get("deferrals"), what="the quota deferral")
    job = runtime.store.get(job_id)
    assert job["status"] == "queued" and job["error"]["code"] == "rate_limit_error", job
    next_attempt = float(runtime.store.fields(job_id)["next_attempt_at"])
    assert next_attempt % 3600 == pytest.approx(0, abs=0.01) or 3600 - next_attempt % 3600 < 0.01
    assert len(runs_of(emulator, marker)) == 1


@pytest.mark.parametrize(("app", "submission"), [
    ("workflow", {"inputs": {"other": "MARK"}}),
    ("chat", {"query": "MARK", "conversation_id": "6f1c1c4e-8d55-4a57-9d0a-1f1b5f3b2a10"}),
])
def test_a_missing_input_or_an_unknown_conversation_fails_at_once(
        runtime: Runtime, emulator: RunningEmulator, version: str, app: str, submission: dict) -> None:
    """0.15 answers 400 / 404 at once; 1.x fails silently (one ping, then nothing): both end after one attempt."""
    marker = f"silent-{app}-{time.time_ns()}"
    fields = {key: ({"other": marker} if key == "inputs" else marker if value == "MARK" else value)
              for key, value in submission.items()}
    job_id = submit(runtime, JobSubmission(app=app, **fields), source="cli", scope="test").job["id"]
    with running_worker(runtime):
        job = wait_for_final(runtime, job_id)
    assert job["status"] == "failed" and job["attempts"] == 1, job
    expected = "no_first_event" if version == "1.x" else "invalid_param" if app == "workflow" else "not_found"
    assert job["error"]["code"] == expected
    [call] = runs_of(emulator, marker)
    assert call["outcome"] in ("error", "silent", "disconnected")


def test_every_call_carries_the_job_s_trace(runtime: Runtime, emulator: RunningEmulator) -> None:
    marker = f"trace-{time.time_ns()}"
    with running_worker(runtime):
        job = wait_for_final(runtime, enqueue(runtime, "workflow", marker))
    trace_id = job["trace_id"]
    assert len(trace_id) == 32 and int(trace_id, 16)
    [call] = runs_of(emulator, marker)
    assert call["trace_id"] == trace_id
    version, traced, span, flags = call["traceparent"].split("-")
    assert (version, traced, len(span), flags) == ("00", trace_id, 16, "01")


def test_a_pinned_workflow_version(runtime: Runtime, emulator: RunningEmulator, version: str) -> None:
    """1.x runs a published version by id and refuses a draft; 0.15 has no such route (404)."""
    app = EMULATED[2]
    published, draft = f"pub-{time.time_ns()}", f"draft-{time.time_ns()}"
    with running_worker(runtime):
        pinned = wait_for_final(runtime, enqueue(runtime, "pinned", published))
        refused = wait_for_final(runtime, enqueue(runtime, "workflow", draft, workflow_id=app.draft_workflow_id))
    paths = [call["path"] for call in emulator.calls()]
    assert f"/v1/workflows/{app.workflow_id}/run" in paths
    assert refused["status"] == "failed" and refused["attempts"] == 1
    if version == "1.x":
        assert pinned["status"] == "succeeded" and refused["error"]["code"] == "bad_request"
    else:
        assert (pinned["error"]["code"], refused["error"]["code"]) == ("http_404", "http_404")


def test_a_paused_run_is_a_paused_job_resumed_over_the_api(
        runtime: Runtime, emulator: RunningEmulator, version: str) -> None:
    """Human input (Dify 1.13+): paused with the form, `job.paused` (signed, retried on the schedule, shown in the
    callback block), no lease held; the answer resumes the run, whose final callback follows with its own id."""
    if version == "0.15":
        pytest.skip("Dify 0.15 has no human input (the node came in 1.13, its Service API in 1.14)")
    marker = f"review-{time.time_ns()}"
    with CallbackReceiver() as receiver, running_worker(runtime), serving_api(runtime) as base:
        receiver.script([503])  # the first job.paused attempt fails: retried on callbacks.retry_schedule
        response = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10, json={
            "app": "review", "inputs": {"text": marker}, "callback_url": receiver.url})
        job_id = response.json()["id"]
        paused = wait_for(lambda: (job := runtime.store.get(job_id)) and job["status"] == "paused" and job,
                          what="the paused job")
        form = paused["form"]
        assert form["token"] and form["expires_at"] and [a["id"] for a in form["actions"]] == ["approve", "reject"]
        assert [field["output_variable_name"] for field in form["fields"]] == ["comment"]
        assert runtime.store.redis.zscore(runtime.store.leases_key, job_id) is None  # no lease a sweep could misread
        failed, notice = receiver.wait_for(2)
        assert [json.loads(n.body)["type"] for n in (failed, notice)] == ["job.paused"] * 2
        assert failed.webhook_id == notice.webhook_id == f"{job_id}_paused_{form['form_id']}"
        Webhook(SIGNING_SECRET).verify(notice.body, notice.headers)
        delivered = wait_for(lambda: (job := runtime.store.get(job_id))["callback"]["status"] == "delivered" and job,
                             what="the job.paused callback delivered")
        assert (delivered["status"], delivered["callback"]["attempts"]) == ("paused", 2)
        listed = requests.get(f"{base}/v1/jobs", params={"status": "paused", "app": "review"}, headers=auth(),
                              timeout=10).json()["jobs"]
        assert job_id in [job["id"] for job in listed]
        assert paused_gauge(runtime) == 1.0
        url = f"{base}/v1/jobs/{job_id}/input"
        wrong = requests.post(url, headers=auth(), json={"inputs": {"comment": "x"}, "action": "maybe"}, timeout=10)
        assert (wrong.status_code, wrong.json()["error"]["field"]) == (422, "action")
        answered = requests.post(url, headers=auth(), json={"inputs": {"comment": "fine"}, "action": "approve"},
                                 timeout=10)
        assert answered.status_code == 202, answered.text
        job = wait_for_final(runtime, job_id)
        again = requests.post(url, headers=auth(), json={"inputs": {"comment": "x"}, "action": "approve"}, timeout=10)
        final = receiver.wait_for(3)[-1]
        block = wait_for(lambda: (found := runtime.store.get(job_id)["callback"])["status"] == "delivered" and found,
                         what="the final callback recorded")
    assert job["status"] == "succeeded", job
    assert block["attempts"] == 1  # the final event's own block
    assert job["result"]["outputs"] == {"comment": "fine", "action": "approve"} and job["form"] is None
    assert (again.status_code, again.json()["error"]["code"]) == (409, "job_not_paused")
    assert json.loads(final.body)["type"] == "job.succeeded" and final.webhook_id == job_id
    assert len(runs_of(emulator, marker)) == 1  # one run at Dify, paused and resumed
    assert paused_gauge(runtime) == 0.0


def test_a_form_that_times_out_ends_the_job_as_dify_ends_the_run(
        runtime: Runtime, emulator: RunningEmulator, version: str) -> None:
    if version == "0.15":
        pytest.skip("Dify 0.15 has no human input")
    marker = f"review-timeout-{time.time_ns()}"
    with running_worker(runtime):
        job_id = enqueue(runtime, "review-timeout", marker)
        wait_for(lambda: runtime.store.get(job_id)["status"] == "paused", what="the paused job")
        job = wait_for_final(runtime, job_id, timeout=30)
    assert job["status"] == "failed" and job["error"]["code"] == "workflow_failed", job
    assert len(runs_of(emulator, marker)) == 1


def test_canceling_a_paused_job_stops_its_run_at_dify_even_through_an_outage(
        runtime: Runtime, emulator: RunningEmulator, version: str) -> None:
    """DELETE on a paused job: canceled at once (its job.canceled callback follows its job.paused), and its paused
    run stopped at Dify as the job's user, the stop retried while Dify fails it."""
    if version == "0.15":
        pytest.skip("Dify 0.15 has no human input")
    marker = f"review-cancel-{time.time_ns()}"
    with CallbackReceiver() as receiver, running_worker(runtime), serving_api(runtime) as base:
        response = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10, json={
            "app": "review", "inputs": {"text": marker}, "user": "reviewer-7", "callback_url": receiver.url})
        job_id = response.json()["id"]
        wait_for(lambda: runtime.store.get(job_id)["status"] == "paused", what="the paused job")
        receiver.wait_for(1)  # job.paused
        emulator.set_app("review", fault="http500", fault_until=time.time() + 0.5)  # Dify fails the first stop
        canceled = requests.delete(f"{base}/v1/jobs/{job_id}", headers=auth(), timeout=10).json()
        assert canceled["status"] == "canceled" and canceled["form"] is None
        stops = wait_for(lambda: [c for c in emulator.calls() if c["path"].endswith("/stop")][1:] and
                         [c for c in emulator.calls() if c["path"].endswith("/stop")], what="the stop retried")
        [run] = wait_for(lambda: [c for c in runs_of(emulator, marker) if c["outcome"] == "stopped"],
                         what="the paused run stopped")
        notices = [json.loads(n.body)["type"] for n in receiver.wait_for(2)]
    assert [call["status"] for call in stops] == [500, 200]
    assert {call["path"] for call in stops} == {f"/v1/workflows/tasks/{run['task_id']}/stop"}
    assert notices == ["job.paused", "job.canceled"]
    assert runtime.store.get(job_id)["status"] == "canceled"
    assert paused_gauge(runtime) == 0.0


def test_a_canceled_job_s_stopped_run_is_not_followed(
        runtime: Runtime, emulator: RunningEmulator, version: str) -> None:
    """A job canceled while its cut stream is followed ends canceled at once, with no further attempt, although
    Dify 1.14.2 shows a stopped run `running` for good (the emulator's 1.x does too)."""
    emulator.set_app("long", fault="cut-after-start", answer_tokens=100)  # a 10 s run, followed after the cut
    marker = f"cancel-followed-{time.time_ns()}"
    with running_worker(runtime), serving_api(runtime) as base, restored(emulator, "long", answer_tokens=10):
        job_id = enqueue(runtime, "long", marker)
        wait_for(lambda: runtime.store.fields(job_id).get("task_id"), what="the task id recorded")
        requests.delete(f"{base}/v1/jobs/{job_id}", headers=auth(), timeout=10).raise_for_status()
        job = wait_for_final(runtime, job_id, timeout=8)  # well before the app's 20 s timeout
        stopped = wait_for(lambda: [c for c in runs_of(emulator, marker) if c["outcome"] == "stopped"],
                           what="the run stopped at Dify")
    assert (job["status"], job["attempts"], len(stopped)) == ("canceled", 1, 1), job
    if version == "1.x":
        client = DifyClient(emulator.base_url, EMULATED[3].key)
        run_id = runtime.store.fields(job_id)["dify_run_id"]
        assert client.run_detail(run_id)["status"] == "running"  # the stopped run's record, for good
        request = DifyRequest(query=None, inputs={}, user="difyq")
        with pytest.raises(DifyError) as refused:  # so a canceled job's run is never followed
            client.follow_run("workflow", run_id, request, canceled=lambda: True)
        assert refused.value.code == "canceled"


def test_a_reattached_run_is_left_once_its_job_is_canceled(emulator: RunningEmulator, version: str) -> None:
    """A reattached stream (which a stopped 1.14.2 run may never end) asks whether its job was canceled as data
    arrives, and stops reading then instead of waiting for the run's end."""
    if version == "0.15":
        pytest.skip("Dify 0.15 has no reattach")
    client = DifyClient(emulator.base_url, EMULATED[3].key)
    request = DifyRequest(query=None, inputs={"text": f"reattach-{time.time_ns()}"}, user="difyq")
    emulator.set_app("long", fault="cut-after-start", answer_tokens=100)  # a 10 s run, its stream cut at once
    asked: list[float] = []

    def canceled() -> bool:  # the job is canceled after the first look
        asked.append(time.monotonic())
        return len(asked) > 1

    with restored(emulator, "long", answer_tokens=10), pytest.raises(DifyError) as left:
        client.run("workflow", request, canceled=canceled)
    assert left.value.code == "canceled" and len(asked) == 2


def test_a_job_lacking_a_required_input_is_refused_at_submit(runtime: Runtime, emulator: RunningEmulator) -> None:
    """From the app's cached /parameters; an app whose Dify cannot be asked takes the job (Dify decides)."""
    with serving_api(runtime) as base:
        def submit_without_text(app: str) -> requests.Response:
            return requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10,
                                 json={"app": app, "inputs": {"other": "x"}})

        refused = wait_for(lambda: (answer := submit_without_text("workflow")).status_code == 422 and answer.json(),
                           what="the 422 from the cached /parameters")
        accepted = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10,
                                 json={"app": "workflow", "inputs": {"text": "present"}})
        unknown = submit_without_text("unreachable")
    assert refused["error"]["field"] == "inputs.text"
    assert accepted.status_code == 202 and unknown.status_code == 202


def test_check_config_remote(emulator: RunningEmulator, version: str, tmp_path, capsys) -> None:
    config = {
        "apps": {
            "workflow": {"api_key": EMULATED[2].key, "mode": "workflow", "base_url": emulator.base_url},
            "chat": {"api_key": EMULATED[0].key, "mode": "chat", "base_url": emulator.base_url},
            "mislabeled": {"api_key": EMULATED[1].key, "mode": "chat", "base_url": emulator.base_url},
            "bad-key": {"api_key": "app-not-a-key", "mode": "chat", "base_url": emulator.base_url},
        },
        "hooks": {"push": {"app": "workflow", "verify": {"scheme": "none"}, "inputs": {"other": "{{ body.x }}"}}},
        "schedules": {"nightly": {"app": "workflow", "cron": "0 3 * * *", "inputs": {"text": "nightly run"}}},
    }
    path = tmp_path / "difyq.yaml"
    path.write_text(json.dumps(config))
    args = build_parser().parse_args(["check-config", "--config", str(path), "--remote"])
    assert args.func(args) == 1  # (not main(): it would configure the process's logging for good)
    out, err = capsys.readouterr()
    problems = [line.removeprefix("problem: ") for line in err.splitlines() if line.startswith("problem: ")]
    assert any(p.startswith("hooks.push.inputs.text: app 'workflow' requires") for p in problems), err
    assert not any(p.startswith("schedules.nightly") for p in problems)
    assert any(p.startswith("apps.bad-key: the API key is refused") for p in problems)
    mislabeled = any(p.startswith("apps.mislabeled.mode: chat, but Dify says the app is advanced-chat")
                     for p in problems)
    assert mislabeled == (version == "1.x")  # 0.15's /info names no mode
    assert "apps.workflow: 'workflow'" in out and "required inputs: text" in out and "file_size_limit 15" in out


def test_a_lost_worker_s_run_is_followed_by_the_next_attempt(runtime: Runtime, emulator: RunningEmulator) -> None:
    """Each call's workflow run id is recorded with its task id; an attempt that finds one (the reaper requeued a
    job whose worker died mid-run) follows that run instead of starting another."""
    long_app = EMULATED[3]
    marker = f"lost-{time.time_ns()}"
    with requests.post(f"{emulator.base_url}/workflows/run", stream=True, timeout=10,
                       headers={"Authorization": f"Bearer {long_app.key}"},
                       json={"inputs": {"text": marker}, "response_mode": "streaming", "user": "difyq"}) as started:
        first = next(line for line in started.iter_lines() if line.startswith(b"data: "))
    run_id = json.loads(first.removeprefix(b"data: "))["workflow_run_id"]  # the lost worker's run, still going
    job_id = enqueue(runtime, "long", f"never-sent-{marker}")
    runtime.raw_redis.hset(runtime.store.job_key(job_id), "dify_run_id", run_id)
    recorded = enqueue(runtime, "long", f"recorded-{marker}")
    with running_worker(runtime):
        seen = wait_for(lambda: (runtime.store.fields(recorded) or {}).get("dify_run_id"), what="a recorded run id")
        job, other = wait_for_final(runtime, job_id), wait_for_final(runtime, recorded)
    assert job["status"] == "succeeded" and job["result"]["workflow_run_id"] == run_id, job
    assert marker in job["result"]["outputs"]["result"] and not runs_of(emulator, f"never-sent-{marker}")
    assert other["status"] == "succeeded" and other["result"]["workflow_run_id"] == seen
