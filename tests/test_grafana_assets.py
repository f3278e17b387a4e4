"""The Grafana dashboard and the alert rules: valid for promtool and for import, every query parses in a real
Prometheus, and every metric and label they read is one difyq (or Dramatiq, or Prometheus itself) exports.

Needs promtool and prometheus (Debian package `prometheus`); tests/support/prometheus_tools.py finds or installs
them and these tests fail, saying what is missing, where they cannot.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from difyq.worker import metrics as difyq_metrics
from tests.support.prometheus_tools import (
    ALERT_RULES_PATH,
    ALERT_TESTS_PATH,
    GRAFANA_BUILTIN_VALUES,
    DashboardQuery,
    PrometheusToolMissing,
    RuleExpression,
    analyse_expression,
    dashboard_expressions,
    dashboard_panels,
    free_loopback_port,
    load_dashboard,
    query_prometheus,
    require_tool,
    rule_expressions,
    run_promtool,
    running_prometheus,
    start_prometheus,
    stop_prometheus,
    substitute_variables,
    variable_references,
)

# Labels Prometheus attaches to every scraped series (the target's labels).
TARGET_LABELS = frozenset({"job", "instance"})

# Gauges computed from Redis at scrape time (not declared in worker/metrics.py), with their labels.
SCRAPE_TIME_GAUGES: dict[str, frozenset[str]] = {
    "difyq_queue_messages": frozenset({"queue"}),
    "difyq_queue_delayed_messages": frozenset({"queue"}),
    "difyq_dead_letters": frozenset({"queue"}),
    "difyq_oldest_queued_job_age_seconds": frozenset({"queue"}),
    "difyq_jobs_running": frozenset({"app"}),
    "difyq_jobs_paused": frozenset({"app"}),
    "difyq_budget_spent": frozenset({"budget", "subject", "unit"}),
    "difyq_budget_reserved": frozenset({"budget", "subject", "unit"}),
    "difyq_budget_remaining": frozenset({"budget", "subject", "unit"}),
    "difyq_budget_limit": frozenset({"budget", "subject", "unit", "threshold"}),
}

# Dramatiq's Prometheus middleware (dramatiq/middleware/prometheus.py, 2.2). dramatiq_message_retries_total
# exists but double-counts (dramatiq-notes §3), so the assets must not read it.
_DRAMATIQ_LABELS = frozenset({"queue_name", "actor_name"})
DRAMATIQ_SERIES: dict[str, frozenset[str]] = {
    "dramatiq_messages_total": _DRAMATIQ_LABELS,
    "dramatiq_message_errors_total": _DRAMATIQ_LABELS,
    "dramatiq_message_rejects_total": _DRAMATIQ_LABELS,
    "dramatiq_messages_inprogress": _DRAMATIQ_LABELS,
    "dramatiq_delayed_messages_inprogress": _DRAMATIQ_LABELS | {"pid"},
    "dramatiq_message_duration_milliseconds_bucket": _DRAMATIQ_LABELS | {"le"},
    "dramatiq_message_duration_milliseconds_sum": _DRAMATIQ_LABELS,
    "dramatiq_message_duration_milliseconds_count": _DRAMATIQ_LABELS,
}

EXPECTED_ROWS = {"Overview", "Latency", "Tokens and spend", "Budgets", "Rate limiting", "Errors", "Callbacks",
                 "Schedules", "API"}
SEVERITIES = {"critical", "warning", "info"}


def declared_series() -> dict[str, frozenset[str]]:
    """Every series name worker/metrics.py exposes (histograms as _bucket/_sum/_count), with its label names."""
    series: dict[str, frozenset[str]] = {}
    for metric in vars(difyq_metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = frozenset(metric._labelnames)  # prometheus-client has no public accessor for declared labels
        for family in metric.describe():
            if family.type == "counter":
                series[f"{family.name}_total"] = labels
            elif family.type == "histogram":
                series[f"{family.name}_bucket"] = labels | {"le"}
                series[f"{family.name}_sum"] = labels
                series[f"{family.name}_count"] = labels
            else:
                series[family.name] = labels
    return series


def recorded_series(rules: list[RuleExpression]) -> dict[str, frozenset[str]]:
    """The recording rules' names, with the labels their expression keeps plus their static labels."""
    return {
        rule.name: analyse_expression(rule.expr).grouping_labels | frozenset(rule.labels)
        for rule in rules
        if rule.kind == "record"
    }


def known_series() -> dict[str, frozenset[str]]:
    """Every series an expression may read, with the label names it may match or group on (besides job/instance)."""
    return {
        **declared_series(),
        **SCRAPE_TIME_GAUGES,
        **DRAMATIQ_SERIES,
        "up": frozenset(),
        **recorded_series(rule_expressions()),
    }


def all_expressions() -> list[tuple[str, str]]:
    """(where, PromQL with Grafana variables substituted) for every dashboard target and every rule."""
    dashboard = [(query.label, substitute_variables(query.expr)) for query in dashboard_expressions()]
    return dashboard + [(rule.label, rule.expr) for rule in rule_expressions()]


def panels_with_queries() -> list[dict[str, Any]]:
    """The dashboard's panels other than rows."""
    return [panel for panel in dashboard_panels(load_dashboard()) if panel.get("type") != "row"]


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool's path, or a failure that says what is missing."""
    try:
        return require_tool("promtool")
    except PrometheusToolMissing as missing:
        pytest.fail(f"cannot check the alert rules: {missing}", pytrace=False)


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """prometheus's path, or a failure that says what is missing."""
    try:
        return require_tool("prometheus")
    except PrometheusToolMissing as missing:
        pytest.fail(f"cannot check the PromQL: {missing}", pytrace=False)


@pytest.fixture(scope="module")
def prometheus_url(prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus on a free loopback port, scraping nothing, with the alert rules loaded."""
    url, process = start_prometheus({}, tmp_path_factory.mktemp("prometheus"), rule_files=[ALERT_RULES_PATH])
    yield url
    stop_prometheus(process)


# --------------------------------------------------------------------------------------------------- the rules


def test_promtool_accepts_the_rule_file(promtool: str) -> None:
    result = run_promtool("check", "rules", ALERT_RULES_PATH.name, cwd=ALERT_RULES_PATH.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass(promtool: str) -> None:
    result = run_promtool("test", "rules", ALERT_TESTS_PATH.name, cwd=ALERT_TESTS_PATH.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    tests = yaml.safe_load(ALERT_TESTS_PATH.read_text())["tests"]
    fired = {
        case["alertname"] for group in tests for case in group.get("alert_rule_test", []) if case.get("exp_alerts")
    }
    alerts = {rule.name for rule in rule_expressions() if rule.kind == "alert"}
    assert alerts - fired == set()


def test_alerts_say_how_long_how_bad_and_what_to_do() -> None:
    problems = []
    for rule in rule_expressions():
        if rule.kind != "alert":
            continue
        if not rule.for_:
            problems.append(f"{rule.name}: no for:")
        if rule.labels.get("severity") not in SEVERITIES:
            problems.append(f"{rule.name}: severity {rule.labels.get('severity')!r} not in {sorted(SEVERITIES)}")
        for annotation in ("summary", "description", "runbook"):
            if not str(rule.annotations.get(annotation, "")).strip():
                problems.append(f"{rule.name}: no {annotation} annotation")
    assert problems == []


def test_every_alert_has_a_runbook_section() -> None:
    headings = {
        line.removeprefix("### ").strip()
        for line in (ALERT_RULES_PATH.parent / "README.md").read_text().splitlines()
        if line.startswith("### ")
    }
    alerts = {rule.name for rule in rule_expressions() if rule.kind == "alert"}
    assert alerts - headings == set()
    for rule in rule_expressions():
        if rule.kind == "alert":
            assert f"grafana/README.md#{rule.name.lower()}" in rule.annotations["runbook"], rule.name


def test_spend_budget_is_a_recording_rule_the_chart_can_replace() -> None:
    groups = {group["name"]: group for group in yaml.safe_load(ALERT_RULES_PATH.read_text())["groups"]}
    budget = groups["difyq-budget"]["rules"]  # helm/difyq/templates/prometheusrule.yaml replaces it by name
    assert [rule["record"] for rule in budget] == ["difyq:cost_budget_per_hour"] * len(budget)
    assert all("currency" in rule.get("labels", {}) for rule in budget)


# ----------------------------------------------------------------------------------------------- the dashboard


def test_dashboard_is_importable() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard.get("id") is None, "an exported dashboard carries no database id"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    app = variables["app"]
    assert app["type"] == "query"
    assert app["definition"] == "label_values(difyq_jobs_submitted_total, app)"
    assert app["query"]["query"] == app["definition"]
    assert app["datasource"]["uid"] == "${datasource}"
    assert app["multi"] and app["includeAll"]
    for panel in dashboard_panels(dashboard):
        position = panel["gridPos"]
        assert position["x"] >= 0 and position["x"] + position["w"] <= 24, panel["title"]


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in dashboard_panels(load_dashboard())]
    assert sorted({panel_id for panel_id in ids if ids.count(panel_id) > 1}) == []


def test_rows_cover_the_on_call_questions() -> None:
    rows = {panel["title"] for panel in dashboard_panels(load_dashboard()) if panel["type"] == "row"}
    assert rows == EXPECTED_ROWS


def test_every_panel_queries_the_datasource_variable() -> None:
    problems = []
    for panel in panels_with_queries():
        expected = {"type": "prometheus", "uid": "${datasource}"}
        if panel.get("datasource") != expected:
            problems.append(f"panel {panel['id']}: datasource {panel.get('datasource')}")
        if not panel.get("targets"):
            problems.append(f"panel {panel['id']}: no targets")
        for target in panel.get("targets", []):
            if target.get("datasource") != expected:
                problems.append(f"panel {panel['id']} {target.get('refId')}: datasource {target.get('datasource')}")
    assert problems == []


def test_every_target_has_an_expression_and_its_own_ref_id() -> None:
    problems = []
    for panel in panels_with_queries():
        ref_ids = [target.get("refId") for target in panel["targets"]]
        if len(set(ref_ids)) != len(ref_ids) or not all(ref_ids):
            problems.append(f"panel {panel['id']}: refIds {ref_ids}")
        problems += [f"panel {panel['id']}: empty expr" for target in panel["targets"] if not target.get("expr")]
    assert problems == []


def test_every_panel_says_what_it_answers() -> None:
    undescribed = [panel["title"] for panel in panels_with_queries() if len(panel.get("description", "")) < 30]
    assert undescribed == []


def test_every_template_variable_resolves() -> None:
    dashboard = load_dashboard()
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    texts = [str(panel.get(key, "")) for panel in dashboard_panels(dashboard) for key in ("title", "description")]
    texts += [str(panel.get("datasource", "")) for panel in dashboard_panels(dashboard)]
    texts += [target.get("expr", "") for panel in dashboard_panels(dashboard) for target in panel.get("targets", [])]
    texts += [str(variable.get("query", "")) for variable in dashboard["templating"]["list"]]
    texts += [str(variable.get("datasource", "")) for variable in dashboard["templating"]["list"]]
    used = set().union(*(variable_references(text) for text in texts))
    assert used - defined - set(GRAFANA_BUILTIN_VALUES) == set()
    for query in dashboard_expressions():
        substitute_variables(query.expr)  # raises KeyError for a variable without a value


# ---------------------------------------------------------------------------------- what the expressions read


def test_every_metric_read_is_exported() -> None:
    known = known_series()
    app_variable = next(v for v in load_dashboard()["templating"]["list"] if v["name"] == "app")
    assert "difyq_jobs_submitted_total" in known, app_variable["definition"]
    unknown = [
        f"{where}: {metric or '(selector without a metric name)'}"
        for where, expr in all_expressions()
        for metric in sorted(analyse_expression(expr).metrics)
        if metric not in known
    ]
    assert unknown == []


def test_every_label_matched_or_grouped_on_exists() -> None:
    known = known_series()
    problems = []
    for where, expr in all_expressions():
        parts = analyse_expression(expr)
        readable: set[str] = set(TARGET_LABELS)
        for selector in parts.selectors:
            if selector.metric not in known:
                continue  # test_every_metric_read_is_exported reports it
            allowed = known[selector.metric] | TARGET_LABELS
            readable |= allowed
            if selector.labels - allowed:
                problems.append(f"{where}: {selector.metric} has no label {sorted(selector.labels - allowed)}")
        if parts.grouping_labels - readable:
            problems.append(f"{where}: groups on {sorted(parts.grouping_labels - readable)}, which nothing has")
    assert problems == []


def test_expression_reader_finds_metrics_and_labels() -> None:
    parts = analyse_expression(
        'sum by (app) (rate(a_total{x="1", y=~"b|c"}[5m] offset 1h30m)) / on (app) group_left (z) b:rec '
        '> 0.1 and absent(up{job=~".*"} == 1) or label_replace(vector(1), "d", "$1", "e", "(.*)")'
    )
    assert parts.metrics == {"a_total", "b:rec", "up"}
    assert {s.metric: s.labels for s in parts.selectors}["a_total"] == {"x", "y"}
    assert parts.grouping_labels == {"app", "z"}


def test_variables_are_substituted_like_grafana_does() -> None:
    expr = 'rate(x{app=~"$app", j=~"${worker_job}", k="[[app]]", r="$1"}[$__rate_interval])'
    assert substitute_variables(expr, {"app": "(a|b)"}) == (
        'rate(x{app=~"(a|b)", j=~".*difyq.*worker.*", k="(a|b)", r="$1"}[1m])'
    )
    with pytest.raises(KeyError, match="nope"):
        substitute_variables('x{a="$nope"}')


# ------------------------------------------------------------------------------------- parsed by a Prometheus


def test_prometheus_reports_a_parse_error_as_bad_data(prometheus_url: str) -> None:
    answer = query_prometheus(prometheus_url, "sum by (app (rate(x[5m]))")
    assert (answer.status, answer.body.get("errorType")) == (400, "bad_data")


def test_every_expression_parses_in_prometheus(prometheus_url: str) -> None:
    failures = []
    for where, expr in all_expressions():
        answer = query_prometheus(prometheus_url, expr)
        if not answer.ok:
            failures.append(f"{where}: {answer.status} {answer.body.get('errorType')}: {answer.body.get('error')}")
    assert failures == []


def test_dashboard_queries_cover_every_panel() -> None:
    queries: list[DashboardQuery] = dashboard_expressions()
    assert {query.panel_id for query in queries} == {panel["id"] for panel in panels_with_queries()}


def test_start_prometheus_scrapes_a_worker_scrape_job(prometheus_binary: str, tmp_path: Path) -> None:
    """The helpers an end-to-end test builds on: a scrape job named like the workers' feeds the dashboard."""
    registry = CollectorRegistry()
    Counter("difyq_jobs_submitted_total", "Jobs.", ["app", "source"], registry=registry).labels("demo", "api").inc(3)
    port = free_loopback_port()
    exporter, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    workers_up = next(query for query in dashboard_expressions() if query.panel_title == "Workers up")
    try:
        with running_prometheus({"difyq-worker": [f"127.0.0.1:{port}"]}, tmp_path) as url:
            deadline = time.monotonic() + 30  # a wait for the first scrape, not a latency assertion
            answer = query_prometheus(url, substitute_variables(workers_up.expr))
            while not answer.series and time.monotonic() < deadline:
                time.sleep(0.2)
                answer = query_prometheus(url, substitute_variables(workers_up.expr))
            submitted = query_prometheus(url, substitute_variables('difyq_jobs_submitted_total{app=~"$app"}'))
    finally:
        exporter.shutdown()
        exporter.server_close()
    assert [series["value"][1] for series in answer.series] == ["1"]
    assert [series["metric"]["job"] for series in submitted.series] == ["difyq-worker"]
