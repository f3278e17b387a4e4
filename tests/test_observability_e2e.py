"""Observability end to end: a real Prometheus scrapes a real ``difyq api``, a two-process ``difyq worker`` and a
``difyq scheduler`` while jobs of every outcome flow; then every PromQL expression of grafana/difyq.json and
grafana/difyq-alerts.yaml goes through Prometheus's HTTP API.

What the run shows:

* every expression parses, every dashboard target (so every panel) returns at least one series, and every rule,
  loaded into that Prometheus, evaluates without an error;
* the panels on-call reads in a bad moment answer with a number, not "No data": an app whose every job fails shows
  a success ratio of 0, the one callback that was given up is seen by ``DifyqCallbackDeliveriesFailing``;
* ``promtool check metrics`` finds nothing to complain about in the api's, the worker's or the scheduler's scrape;
* no configured API key, client token or signing secret appears in any log line or scrape of the run.

One stack serves the whole module (a module-scoped fixture that records what it saw); the tests read the record.
Waits are bounded polls for something to appear, never timing assertions.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.embedded_redis import free_port
from tests.support.doc_reference import metrics_table_problems, undocumented_redis_keys
from tests.support.processes import DifyqProcesses, difyq_processes, wait_for_port
from tests.support.prometheus_tools import (
    ALERT_RULES_PATH,
    DashboardQuery,
    QueryAnswer,
    RuleExpression,
    dashboard_expressions,
    prometheus_api,
    query_prometheus,
    rule_expressions,
    run_promtool,
    running_prometheus,
    substitute_variables,
)
from tests.support.receiver import CallbackReceiver

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Secrets of this run: distinctive, so that finding one in a log or a scrape cannot be a coincidence.
SUPPORT_KEY = "app-obs-support-3f9c1a7e5d"
LIMITED_KEY = "app-obs-limited-8b2d4c6091"
HOT_KEY = "app-obs-hot-5e7a1f93c2b4"
STRANGER_KEY = "app-obs-stranger-c41d9b2a77"  # configured in difyq, unknown to the emulator: Dify answers 401
CAPPED_KEY = "app-obs-capped-0d8e2f4b61"  # a token budget smaller than one job: of two jobs, one is refused
CLIENT_TOKEN = "obs-client-token-6a1f0c9e2b7d4e58"
SIGNING_KEY = base64.b64encode(b"difyq observability e2e key 32b!").decode()
SIGNING_SECRET = f"whsec_{SIGNING_KEY}"
HOOK_TOKEN = "obs-hook-token-93c0e1d7a2f5b8"
SECRETS = {
    "apps.support.api_key": SUPPORT_KEY,
    "apps.limited.api_key": LIMITED_KEY,
    "apps.hot.api_key": HOT_KEY,
    "apps.stranger.api_key": STRANGER_KEY,
    "apps.capped.api_key": CAPPED_KEY,
    "clients.obs.token": CLIENT_TOKEN,
    "callbacks.signing_secret": SIGNING_SECRET,
    "callbacks.signing_secret (key material)": SIGNING_KEY,
    "hooks.signed.verify.secret": HOOK_TOKEN,
}

# Scrape job names as the assets expect them (grafana/README.md: `.*difyq.*worker.*`, `.*difyq.*scheduler.*`).
SCRAPE_JOBS = {"api": "difyq-api", "worker": "difyq-worker", "scheduler": "difyq-scheduler"}
# Grafana would compute $__rate_interval from a 1 s scrape interval; 15 s keeps every rate() fed and the run short.
GRAFANA_VALUES = {"__rate_interval": "15s", "__rate_interval_ms": "15000"}
LIMITED_RPM = 2  # a burst of one call: of four jobs submitted together, three are deferred
PANEL_WAIT_S = 45.0
APPS_WITH_ONLY_FAILURES = ("stranger",)
RATIO_PANEL = "Success ratio by app"
CALLBACK_ALERT = "DifyqCallbackDeliveriesFailing"
OWN_METRIC = {"api": "difyq_http_requests_total", "worker": "difyq_jobs_finished_total",
              "scheduler": "difyq_schedule_fires_total"}


@dataclass
class Traffic:
    """What was submitted, and how the API answered."""

    jobs: dict[str, str] = field(default_factory=dict)  # label -> job id
    statuses: dict[str, int] = field(default_factory=dict)  # label -> HTTP status of the submission


@dataclass
class LiveRun:
    """Everything one run of the stack recorded, for the tests to read."""

    snapshot: Snapshot
    scrapes: dict[str, str]
    logs: dict[str, str]
    traffic: Traffic
    jobs: dict[str, dict[str, Any]]
    schedule_jobs: int
    flaky_statuses: list[int]
    dead_statuses: list[int]
    namespace: str
    redis_keys: list[str]


# ------------------------------------------------------------------------------------------------- the stack


def difyq_config(namespace: str, emulator_url: str) -> dict[str, Any]:
    """Five apps (one fine, one paced to 2 calls a minute, one Dify answers 429, one whose key Dify does not know,
    one whose token budget fails every job after the first of the day), a USD budget of the client, two hooks, a
    schedule firing every second, one retry step for callbacks."""

    def app(key: str, **extra: Any) -> dict[str, Any]:
        return {"api_key": key, "mode": "chat", "base_url": emulator_url, "timeout_s": 10, **extra}

    return {
        "apps": {
            "support": app(SUPPORT_KEY),
            "limited": app(LIMITED_KEY, limits={"requests_per_minute": LIMITED_RPM}, fairness="tenant"),
            "hot": app(HOT_KEY),
            "stranger": app(STRANGER_KEY),
            "capped": app(CAPPED_KEY),
        },
        "budgets": {
            "capped-daily": {"by": "app", "of": "capped", "unit": "tokens", "limit": 1, "on_exhausted": "fail"},
            "client-usd": {"by": "client", "limit": 100, "currency": "USD"},
        },
        "clients": {"obs": {"token": CLIENT_TOKEN, "apps": ["*"]}},
        "hooks": {
            "inbound": {"app": "support", "query": "{{ body.text }}", "verify": {"scheme": "none"}},
            "signed": {"app": "support", "query": "{{ body.text }}",
                       "verify": {"scheme": "token", "secret": HOOK_TOKEN}},
        },
        "schedules": {"tick": {"cron": "* * * * * *", "app": "support", "query": "tick {{ fire_time.isoformat() }}"}},
        "callbacks": {"signing_secret": SIGNING_SECRET, "allow_hosts": ["127.0.0.0/8"], "retry_schedule": ["0.3s"],
                      "timeout": "2s"},
        "jobs": {"max_attempts": 3, "retry_min_backoff": "0.1s", "retry_max_backoff": "0.5s"},
        "dify": {"connect_timeout_s": 2, "idle_read_timeout_s": 5},
        "redis": {"namespace": namespace},
    }


def emulated_apps() -> list[EmulatedApp]:
    """The Dify side: `stranger`'s key is deliberately missing, `hot` answers every call with a JSON 429."""
    return [
        EmulatedApp(name="support", key=SUPPORT_KEY, mode="chat"),
        EmulatedApp(name="limited", key=LIMITED_KEY, mode="chat"),
        EmulatedApp(name="hot", key=HOT_KEY, mode="chat", fault="http429"),
        EmulatedApp(name="capped", key=CAPPED_KEY, mode="chat"),
    ]


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; returns its last answer."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def series_count(url: str, expr: str) -> int:
    """How many series ``expr`` returns now (0 for an error)."""
    return len(query_prometheus(url, expr).series)


def auth() -> dict[str, str]:
    """The client's bearer header."""
    return {"Authorization": f"Bearer {CLIENT_TOKEN}"}


def drive_traffic(base: str, flaky: CallbackReceiver, dead: CallbackReceiver) -> Traffic:
    """Submit one job or delivery per outcome the dashboard shows."""
    traffic = Traffic()

    def submit(label: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        response = requests.post(f"{base}/v1/jobs", json=body, headers={**auth(), **(headers or {})}, timeout=10)
        traffic.statuses[label] = response.status_code
        assert response.status_code in (200, 202), f"{label}: {response.status_code} {response.text}"
        traffic.jobs[label] = response.json()["id"]

    flaky.script([500])  # the first callback attempt fails, the retry is accepted
    submit("callback_retried", {"app": "support", "query": "hello", "callback_url": flaky.url})
    submit("callback_failed", {"app": "support", "query": "hello", "callback_url": dead.url})
    submit("once", {"app": "support", "query": "only once"}, {"Idempotency-Key": "obs-once"})
    submit("once_again", {"app": "support", "query": "only once"}, {"Idempotency-Key": "obs-once"})
    for index in range(2):
        submit(f"unauthorized_{index}", {"app": "stranger", "query": f"who am I {index}"})
    for index in range(4):
        submit(f"limited_{index}", {"app": "limited", "query": f"paced {index}"})
    for index in range(2):
        submit(f"upstream_{index}", {"app": "hot", "query": f"too many {index}"})
    for index in range(2):
        submit(f"capped_{index}", {"app": "capped", "query": f"over budget {index}"})

    def hook(label: str, name: str, headers: dict[str, str] | None = None) -> None:
        response = requests.post(f"{base}/hooks/{name}", json={"text": f"from {label}"}, headers=headers, timeout=10)
        traffic.statuses[label] = response.status_code
        if response.status_code == 202:
            traffic.jobs[label] = response.json()["id"]

    hook("hook_none", "inbound")
    hook("hook_signed", "signed", {"Authorization": f"Bearer {HOOK_TOKEN}"})
    hook("hook_bad_token", "signed", {"Authorization": "Bearer not-the-token"})
    return traffic


def job(base: str, job_id: str) -> dict[str, Any]:
    """The job resource as the API shows it."""
    return requests.get(f"{base}/v1/jobs/{job_id}", headers=auth(), timeout=10).json()


def settled(record: dict[str, Any]) -> bool:
    """Final, and its callback (if any) delivered or given up."""
    return record["status"] in ("succeeded", "failed", "canceled") and record["callback"]["status"] != "pending"


@dataclass(frozen=True)
class Snapshot:
    """One round of questions to Prometheus: every dashboard target (variables substituted), every rule
    expression, the rules' evaluation state, and the success ratio by app just after the failures."""

    dashboard: list[tuple[DashboardQuery, str, QueryAnswer]]
    rules: list[tuple[RuleExpression, QueryAnswer]]
    rule_states: dict[str, dict[str, Any]]
    ratio_after_failures: QueryAnswer | None


def dashboard_target(title: str) -> DashboardQuery:
    """The first target of the panel titled ``title``."""
    found = [query for query in dashboard_expressions() if query.panel_title == title]
    assert found, f"the dashboard has no panel titled {title!r}"
    return found[0]


def ask_prometheus(url: str, failures_scraped_at: float) -> Snapshot:
    """Everything the tests read, asked of Prometheus now. The success ratio by app is evaluated at
    ``failures_scraped_at`` (a moment whose rate window holds the failed jobs), once that moment has passed."""
    dashboard = []
    for query in dashboard_expressions():
        expr = substitute_variables(query.expr, GRAFANA_VALUES)
        dashboard.append((query, expr, query_prometheus(url, expr)))
    rules = [(rule, query_prometheus(url, rule.expr)) for rule in rule_expressions()]
    states = {rule["name"]: rule for group in prometheus_api(url, "/api/v1/rules")["groups"]
              for rule in group["rules"]}
    ratio = None
    if time.time() > failures_scraped_at:
        expr = substitute_variables(dashboard_target(RATIO_PANEL).expr, GRAFANA_VALUES)
        ratio = query_prometheus(url, expr, at=failures_scraped_at)
    return Snapshot(dashboard, rules, states, ratio)


def targets_without_series(dashboard: list[tuple[DashboardQuery, str, QueryAnswer]]) -> list[str]:
    """`panel N "title" A: expr` for each target whose answer holds no series."""
    return [f"{query.label}: {expr}" for query, expr, answer in dashboard if not answer.series]


def ratios_by_app(answer: QueryAnswer | None) -> dict[str, float]:
    """app -> value of a `by (app)` answer (NaN stays NaN)."""
    return {series["metric"].get("app", ""): float(series["value"][1]) for series in (answer.series if answer else [])}


def gaps(snapshot: Snapshot) -> list[str]:
    """What the run is still waiting for: targets without a series, the all-failing app's success ratio, the
    given-up callback in its alert, rules not evaluated yet."""
    missing = targets_without_series(snapshot.dashboard)
    ratios = ratios_by_app(snapshot.ratio_after_failures)
    missing += [f"{RATIO_PANEL}: no 0 for {app} ({ratios})" for app in APPS_WITH_ONLY_FAILURES if ratios.get(app) != 0]
    if snapshot.rule_states.get(CALLBACK_ALERT, {}).get("state") not in ("pending", "firing"):
        missing.append(f"{CALLBACK_ALERT}: not pending")
    missing += [f"rule {name}: {state.get('health')}" for name, state in snapshot.rule_states.items()
                if state.get("health") != "ok"]
    return missing


def start_scheduler(difyq: DifyqProcesses) -> int:
    """Start `difyq scheduler` with its /metrics on a free port; return the port once it listens."""
    port = free_port()
    process = difyq.start("scheduler", "scheduler", env={"DIFYQ_METRICS_PORT": str(port)})
    wait_for_port(port, process=process)
    return port


def scrape(port: int, path: str = "/metrics") -> str:
    """One scrape of a process's /metrics, as text."""
    response = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    response.raise_for_status()
    return response.text


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[LiveRun]:
    """Run the stack once: Prometheus scraping api, worker and scheduler while the traffic flows."""
    directory = tmp_path_factory.mktemp("observability")
    namespace = f"difyq-obs-{uuid.uuid4().hex[:12]}"
    try:
        yield run_stack(directory, redis_url, namespace)
    finally:
        client = redis.Redis.from_url(redis_url)
        try:
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def run_stack(directory: Path, redis_url: str, namespace: str) -> LiveRun:
    """Emulator, receivers, api, worker (2 processes), scheduler and Prometheus; traffic; then ask Prometheus
    until nothing is missing (or PANEL_WAIT_S passes) and record the answers, scrapes and logs."""
    with start_emulator(emulated_apps()) as emulator, CallbackReceiver() as flaky, \
            CallbackReceiver(default=500) as dead, \
            difyq_processes(directory, redis_url, difyq_config(namespace, emulator.base_url)) as difyq:
        base = difyq.start_api()
        api_port = int(base.rsplit(":", 1)[1])
        _, worker_port = difyq.start_worker(processes=2, threads=4)
        scheduler_port = start_scheduler(difyq)
        ports = {"api": api_port, "worker": worker_port, "scheduler": scheduler_port}
        targets = {SCRAPE_JOBS[name]: [f"127.0.0.1:{port}"] for name, port in ports.items()}
        with running_prometheus(targets, directory / "prometheus", rule_files=[ALERT_RULES_PATH]) as url:
            # Traffic starts once every target is scraped and the worker's zeroed series are in, so that the first
            # failure of each kind is an increase Prometheus can see.
            wait_until(lambda: series_count(url, 'up{job=~"difyq-.*"} == 1') == len(targets)
                       and series_count(url, "difyq_callback_deliveries_total") > 0, timeout=20)
            traffic = drive_traffic(base, flaky, dead)
            to_settle = [label for label in traffic.jobs if not label.startswith(("limited_", "upstream_"))]
            wait_until(lambda: all(settled(job(base, traffic.jobs[label])) for label in to_settle), timeout=30)
            failures_scraped_at = time.time() + 3  # three scrape intervals after the failures were stored

            deadline = time.monotonic() + PANEL_WAIT_S
            snapshot = ask_prometheus(url, failures_scraped_at)
            while gaps(snapshot) and time.monotonic() < deadline:
                time.sleep(1)
                snapshot = ask_prometheus(url, failures_scraped_at)
            jobs = {label: job(base, job_id) for label, job_id in traffic.jobs.items()}
            listed = requests.get(f"{base}/v1/jobs", params={"source": "schedule", "limit": 200}, headers=auth(),
                                  timeout=10).json()["jobs"]
            scrapes = {name: scrape(port) for name, port in ports.items()}
            redis_keys = sorted(key.decode() for key in redis.Redis.from_url(redis_url).scan_iter(
                match=f"{namespace}:*", count=1000))
    return LiveRun(
        snapshot=snapshot,
        scrapes=scrapes,
        logs={name: difyq.logs(name) for name in ("api", "worker", "scheduler")},
        traffic=traffic,
        jobs=jobs,
        schedule_jobs=len(listed),
        flaky_statuses=[request.status for request in flaky.requests],
        dead_statuses=[request.status for request in dead.requests],
        namespace=namespace,
        redis_keys=redis_keys,
    )


# ------------------------------------------------------------------------------------------------- the tests


def test_the_run_had_every_outcome(live_run: LiveRun) -> None:
    """The traffic did what the panels are meant to show (else an empty panel would prove nothing)."""
    jobs, statuses = live_run.jobs, live_run.traffic.statuses
    retried, failed = jobs["callback_retried"], jobs["callback_failed"]
    assert retried["status"] == "succeeded" and retried["callback"]["status"] == "delivered"
    assert live_run.flaky_statuses == [500, 200]
    assert failed["status"] == "succeeded" and failed["callback"]["status"] == "failed"
    assert live_run.dead_statuses == [500, 500]
    assert (statuses["once"], statuses["once_again"]) == (202, 200)
    assert jobs["once"]["id"] == jobs["once_again"]["id"]
    for label in ("unauthorized_0", "unauthorized_1"):
        assert jobs[label]["status"] == "failed" and jobs[label]["error"]["code"] == "unauthorized", jobs[label]
    assert any(jobs[f"limited_{index}"]["status"] == "queued" for index in range(4)), "no job was deferred"
    assert (statuses["hook_none"], statuses["hook_signed"], statuses["hook_bad_token"]) == (202, 202, 401)
    assert jobs["hook_none"]["status"] == jobs["hook_signed"]["status"] == "succeeded"
    assert live_run.schedule_jobs >= 2
    worker = live_run.scrapes["worker"]
    assert 'difyq_rate_limited_total{app="limited",limit="requests"}' in worker
    assert 'difyq_rate_limited_total{app="hot",limit="upstream"}' in worker


def test_every_expression_parses_in_prometheus(live_run: LiveRun) -> None:
    """Every dashboard target and every rule expression is accepted by Prometheus's query API."""
    snapshot = live_run.snapshot
    failures = [f"{query.label}: {answer.status} {answer.body.get('error')}"
                for query, _, answer in snapshot.dashboard if not answer.ok]
    failures += [f"{rule.label}: {answer.status} {answer.body.get('error')}"
                 for rule, answer in snapshot.rules if not answer.ok]
    print(f"{len(snapshot.dashboard)} dashboard targets and {len(snapshot.rules)} rule expressions checked")
    assert failures == []


def test_every_dashboard_target_returns_a_series(live_run: LiveRun) -> None:
    """Every target, so every panel: nothing on the dashboard reads "No data" while the system works."""
    dashboard = live_run.snapshot.dashboard
    panels = {query.panel_id for query, _, _ in dashboard}
    with_series = {query.panel_id for query, _, answer in dashboard if answer.series}
    print(f"{len(with_series)} of {len(panels)} panels return series")
    missing = targets_without_series(dashboard)
    assert not missing, "targets without a series:\n" + "\n".join(missing)


def test_an_app_whose_every_job_fails_shows_a_success_ratio_of_zero(live_run: LiveRun) -> None:
    """Right after the failures, "Success ratio by app" shows 0 for the app whose jobs all failed (not a
    missing line) and 1 for the app whose jobs all succeeded."""
    ratios = ratios_by_app(live_run.snapshot.ratio_after_failures)
    assert {app: ratios.get(app) for app in APPS_WITH_ONLY_FAILURES} == dict.fromkeys(APPS_WITH_ONLY_FAILURES, 0.0)
    assert ratios.get("support") == 1.0, ratios


def test_every_rule_evaluates_on_the_live_metrics(live_run: LiveRun) -> None:
    """The rule file, loaded into the scraping Prometheus, evaluates every rule without an error."""
    states = live_run.snapshot.rule_states
    assert set(states) == {rule.name for rule in rule_expressions()}
    broken = {name: (state.get("health"), state.get("lastError")) for name, state in states.items()
              if state.get("health") != "ok"}
    assert broken == {}


def test_the_given_up_callback_reaches_its_alert(live_run: LiveRun) -> None:
    """DifyqCallbackDeliveriesFailing counts the one callback that ended failed; its `for:` is longer than the
    run, so the alert is pending."""
    answer = next(answer for rule, answer in live_run.snapshot.rules if rule.name == CALLBACK_ALERT)
    values = [float(series["value"][1]) for series in answer.series]
    assert values and all(value > 0 for value in values), answer.body
    assert live_run.snapshot.rule_states[CALLBACK_ALERT]["state"] in ("pending", "firing")


@pytest.mark.parametrize("process", sorted(SCRAPE_JOBS))
def test_promtool_finds_nothing_in_the_scrape(live_run: LiveRun, process: str) -> None:
    """`promtool check metrics` is silent on the process's scrape taken after the traffic."""
    text = live_run.scrapes[process]
    assert f"# TYPE {OWN_METRIC[process]} " in text
    result = run_promtool("check", "metrics", stdin=text)
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), result.stdout + result.stderr


def test_no_secret_in_any_log_line_or_scrape(live_run: LiveRun) -> None:
    """No API key, client token, callback signing secret or hook secret in the logs or scrapes of the run
    (which logged submits, finishes, callback attempts and Dify failures, so the search is not vacuous)."""
    logs = "\n".join(live_run.logs.values())
    events = {json.loads(line).get("event") for line in logs.splitlines() if line.startswith("{")}
    assert {"job_submitted", "job_finished", "callback_attempt", "dify_call_failed"} <= events, "too little logged"
    texts = {f"{name} log": text for name, text in live_run.logs.items()}
    texts |= {f"{name} scrape": text for name, text in live_run.scrapes.items()}
    found = [f"{secret} in the {where}" for where, text in texts.items() for secret, value in SECRETS.items()
             if value in text]
    assert found == []


def test_the_metrics_reference_matches_what_the_processes_expose(live_run: LiveRun) -> None:
    """docs/metrics.md lists every difyq_* and dramatiq_* family of the api's, worker's and scheduler's scrapes,
    with its type and the labels its samples carry (the run gives every difyq metric a sample)."""
    problems = metrics_table_problems(live_run.scrapes)
    assert not problems, "docs/metrics.md differs from the live scrapes:\n" + "\n".join(problems)


def test_every_redis_key_of_the_run_is_in_the_architecture_doc(live_run: LiveRun) -> None:
    """Every key the run left in Redis (jobs, hooks, a schedule, limits, callbacks, Dramatiq's queues) matches a
    row of the Redis table of docs/architecture.md."""
    assert len(live_run.redis_keys) > 20, live_run.redis_keys
    undocumented = undocumented_redis_keys(live_run.redis_keys, live_run.namespace)
    assert not undocumented, ("docs/architecture.md: add a row to the Redis table for these keys "
                              f"(`{{ns}}` = {live_run.namespace}):\n" + "\n".join(undocumented))
