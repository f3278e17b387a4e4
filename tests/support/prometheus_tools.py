"""Prometheus for the tests: find (or install) promtool and prometheus, run a throwaway server, and read the PromQL
out of grafana/difyq.json and grafana/difyq-alerts.yaml.

tests/test_grafana_assets.py checks the Grafana assets with it. An end-to-end test can reuse the same pieces to
scrape real difyq processes and ask each dashboard panel for a series::

    with running_prometheus({"difyq-worker": ["127.0.0.1:9191"]}, tmp_path) as url:
        for query in dashboard_expressions():
            answer = query_prometheus(url, substitute_variables(query.expr, {"__rate_interval": "10s"}))

The tools come from the Debian package `prometheus` (`apt-get install -y prometheus`), installed on the fly when
they are missing and this process may (root, apt-get present, DIFYQ_NO_TOOL_INSTALL unset). PROMTOOL and
PROMETHEUS in the environment point at other binaries; `.tools/` in the repository is searched too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = REPO_ROOT / "grafana" / "difyq.json"
ALERT_RULES_PATH = REPO_ROOT / "grafana" / "difyq-alerts.yaml"
ALERT_TESTS_PATH = REPO_ROOT / "grafana" / "difyq-alerts.test.yaml"

DEBIAN_PACKAGE = "prometheus"
INSTALL_HINT = (
    "install the Debian package: `apt-get update && apt-get install -y --no-install-recommends prometheus` "
    "(or set PROMTOOL / PROMETHEUS to the binaries of a Prometheus release)"
)

# Values for Grafana's built-in variables when a query is sent to Prometheus outside Grafana. $__rate_interval is
# what Grafana computes for a 15 s scrape interval; an end-to-end test that scrapes every second passes its own.
GRAFANA_BUILTIN_VALUES: dict[str, str] = {
    "__rate_interval": "1m",
    "__rate_interval_ms": "60000",
    "__interval": "30s",
    "__interval_ms": "30000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

# $name, ${name}, ${name:format}, [[name]], [[name:format]]. Names start with a letter or underscore, so the
# "$1" of a label_replace() replacement is not a variable.
_VARIABLE_REFERENCE = re.compile(
    r"\$\{(?P<braced>[A-Za-z_]\w*)(?::[^}]*)?\}"
    r"|\[\[(?P<bracketed>[A-Za-z_]\w*)(?::[^\]]*)?\]\]"
    r"|\$(?P<plain>[A-Za-z_]\w*)"
)


class PrometheusToolMissing(RuntimeError):
    """promtool or prometheus is not on this machine and could not be installed; the message says what to do."""


# ------------------------------------------------------------------------------------------------ the binaries


def find_tool(name: str) -> str | None:
    """The path of `promtool` or `prometheus`: $PROMTOOL/$PROMETHEUS, then PATH, then the repository's .tools/."""
    configured = os.environ.get(name.upper())
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    tools = REPO_ROOT / ".tools"
    for candidate in [tools / "bin" / name, *sorted(tools.glob(f"prometheus-*/{name}"))]:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def install_prometheus_package() -> None:
    """Install the Debian package `prometheus` (promtool and prometheus) with apt-get, updating lists if needed.

    Raises PrometheusToolMissing when this process may not or cannot install it.
    """
    if os.environ.get("DIFYQ_NO_TOOL_INSTALL"):
        raise PrometheusToolMissing(f"DIFYQ_NO_TOOL_INSTALL is set, so nothing is installed; {INSTALL_HINT}")
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise PrometheusToolMissing(f"apt-get is not available on this machine; {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise PrometheusToolMissing(f"installing needs root (this process is uid {os.geteuid()}); {INSTALL_HINT}")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt_get, "install", "-y", "--no-install-recommends", DEBIAN_PACKAGE]

    def apt(command: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(command, capture_output=True, text=True, env=environment, check=False, timeout=600)
        except subprocess.TimeoutExpired:
            raise PrometheusToolMissing(f"`{' '.join(command)}` did not finish in 10 minutes; {INSTALL_HINT}") from None

    attempt = apt(install)
    if attempt.returncode != 0:  # a fresh image has no package lists yet
        apt([apt_get, "update"])
        attempt = apt(install)
    if attempt.returncode != 0:
        raise PrometheusToolMissing(
            f"`{' '.join(install)}` failed with exit code {attempt.returncode}:\n{attempt.stderr[-2000:]}"
        )


def require_tool(name: str) -> str:
    """The path of `promtool` or `prometheus`, installing the Debian package first when it is missing."""
    found = find_tool(name)
    if found:
        return found
    if os.environ.get(name.upper()):
        raise PrometheusToolMissing(f"{name.upper()}={os.environ[name.upper()]} is not an executable file")
    try:
        install_prometheus_package()
    except PrometheusToolMissing as missing:
        raise PrometheusToolMissing(f"`{name}` is not installed and was not installed now: {missing}") from None
    found = find_tool(name)
    if found is None:
        raise PrometheusToolMissing(f"`{name}` is still not on PATH after installing {DEBIAN_PACKAGE}; {INSTALL_HINT}")
    return found


def run_promtool(
    *arguments: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `promtool` with these arguments (never raises on its exit status: read returncode and the output).

    stdin is fed to promtool's standard input: `run_promtool("check", "metrics", stdin=scrape_text)`.
    """
    return subprocess.run(
        [require_tool("promtool"), *arguments],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        timeout=120,
    )


# ------------------------------------------------------------------------------------------ a throwaway server


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_prometheus_config(
    path: Path,
    scrape_targets: Mapping[str, Sequence[str]],
    *,
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
) -> None:
    """Write a prometheus.yml with one static scrape job per key of scrape_targets (job name -> host:port list)."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]} for job, targets in scrape_targets.items()
        ],
    }
    if rule_files:
        config["rule_files"] = [str(Path(rule_file).resolve()) for rule_file in rule_files]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def start_prometheus(
    scrape_targets: Mapping[str, Sequence[str]],
    tmpdir: Path,
    *,
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    startup_timeout: float = 30.0,
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start `prometheus` on a free loopback port with its config, data and log under tmpdir.

    scrape_targets maps a scrape job name to its host:port targets ({} scrapes nothing). Returns the base URL
    (http://127.0.0.1:PORT) once /-/ready answers, and the process; stop it with stop_prometheus().
    """
    binary = require_tool("prometheus")
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    config_path = tmpdir / "prometheus.yml"
    write_prometheus_config(config_path, scrape_targets, scrape_interval=scrape_interval, rule_files=rule_files)
    log_path = tmpdir / "prometheus.log"
    failures: list[str] = []
    for _ in range(3):  # another process may take the free port between the probe and prometheus binding it
        port = free_loopback_port()
        url = f"http://127.0.0.1:{port}"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmpdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if _wait_until_ready(url, process, startup_timeout):
            return url, process
        stop_prometheus(process)
        failures.append(log_path.read_text(errors="replace")[-2000:])
        if "address already in use" not in failures[-1]:
            break
    raise RuntimeError(f"prometheus did not become ready; its log ({log_path}):\n{failures[-1]}")


def _wait_until_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll /-/ready until it answers 200, the process exits, or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    return False


def stop_prometheus(process: subprocess.Popen[bytes]) -> None:
    """Stop a server from start_prometheus(): SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_prometheus(
    scrape_targets: Mapping[str, Sequence[str]],
    tmpdir: Path,
    *,
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
) -> Iterator[str]:
    """start_prometheus() as a context manager yielding the base URL."""
    url, process = start_prometheus(scrape_targets, tmpdir, scrape_interval=scrape_interval, rule_files=rule_files)
    try:
        yield url
    finally:
        stop_prometheus(process)


@dataclass(frozen=True)
class QueryAnswer:
    """Prometheus's answer to /api/v1/query: the HTTP status and the decoded JSON body."""

    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        """True when the expression parsed and evaluated."""
        return self.status == 200 and self.body.get("status") == "success"

    @property
    def series(self) -> list[dict[str, Any]]:
        """The result's series (vector or matrix) or [] for scalars, strings and errors."""
        data = self.body.get("data") or {}
        result = data.get("result")
        return result if data.get("resultType") in ("vector", "matrix") and isinstance(result, list) else []


def query_prometheus(url: str, expr: str, *, at: float | None = None) -> QueryAnswer:
    """POST an instant query; a parse error comes back as status 400 with errorType bad_data (never raised)."""
    form = {"query": expr}
    if at is not None:
        form["time"] = f"{at:.3f}"
    request = urllib.request.Request(
        f"{url}/api/v1/query",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return QueryAnswer(response.status, json.loads(response.read()))
    except urllib.error.HTTPError as error:
        payload = error.read()
        try:
            body = json.loads(payload)
        except ValueError:
            body = {"status": "error", "error": payload.decode(errors="replace")}
        return QueryAnswer(error.code, body)


def prometheus_api(url: str, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
    """GET one of Prometheus's JSON endpoints (`/api/v1/rules`, `/api/v1/targets`) and return its `data`.

    Raises RuntimeError when the endpoint answers anything but `"status": "success"`.
    """
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}{path}{query}", timeout=10) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body.get('errorType')}: {body.get('error')}")
    return body.get("data") or {}


# ---------------------------------------------------------------------------------- expressions in the assets


@dataclass(frozen=True)
class DashboardQuery:
    """One Prometheus target of one dashboard panel, as written (Grafana variables not yet substituted)."""

    panel_id: int
    panel_title: str
    ref_id: str
    expr: str
    legend_format: str | None
    instant: bool

    @property
    def label(self) -> str:
        """A short name for messages and test ids: `panel 8 "Jobs per second by status" A`."""
        return f'panel {self.panel_id} "{self.panel_title}" {self.ref_id}'


@dataclass(frozen=True)
class RuleExpression:
    """One recording or alerting rule of a Prometheus rule file."""

    group: str
    name: str
    kind: str  # "alert" or "record"
    expr: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    for_: str | None = None

    @property
    def label(self) -> str:
        """A short name for messages and test ids: `alert DifyqNoWorkerUp`."""
        return f"{self.kind} {self.name}"


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    """The dashboard JSON as a dict."""
    return json.loads(Path(path).read_text())


def dashboard_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included, with the panels nested in collapsed rows flattened in after their row."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []) if panel.get("type") == "row" else [])
    return panels


def dashboard_expressions(path: Path = DASHBOARD_PATH) -> list[DashboardQuery]:
    """Every Prometheus query of every panel of the dashboard at path, in panel order."""
    queries = []
    for panel in dashboard_panels(load_dashboard(path)):
        for target in panel.get("targets", []):
            queries.append(
                DashboardQuery(
                    panel_id=panel.get("id", -1),
                    panel_title=panel.get("title", ""),
                    ref_id=target.get("refId", ""),
                    expr=target.get("expr", ""),
                    legend_format=target.get("legendFormat"),
                    instant=bool(target.get("instant")) and not target.get("range"),
                )
            )
    return queries


def dashboard_variable_values(path: Path = DASHBOARD_PATH) -> dict[str, str]:
    """What each template variable of the dashboard becomes in a query when left at its default.

    A multi-value variable with "All" becomes its allValue (or `.*`), a textbox or constant its text, others
    their current value. The datasource variable is left out: it never appears inside PromQL.
    """
    return dict(_dashboard_variable_values(str(Path(path).resolve())))


@functools.lru_cache(maxsize=8)
def _dashboard_variable_values(path: str) -> tuple[tuple[str, str], ...]:
    """Cached body of dashboard_variable_values (the file is read once per path)."""
    values: dict[str, str] = {}
    for variable in load_dashboard(Path(path)).get("templating", {}).get("list", []):
        kind, name = variable.get("type"), variable.get("name")
        if kind == "datasource" or not name:
            continue
        current = (variable.get("current") or {}).get("value")
        if variable.get("includeAll") and current in (None, "$__all", ["$__all"]):
            values[name] = variable.get("allValue") or ".*"
        elif kind in ("textbox", "constant"):
            values[name] = str(variable.get("query", ""))
        elif isinstance(current, list):
            values[name] = current[0] if len(current) == 1 else "(" + "|".join(map(re.escape, current)) + ")"
        elif current is not None:
            values[name] = str(current)
    return tuple(values.items())


def rule_expressions(path: Path = ALERT_RULES_PATH) -> list[RuleExpression]:
    """Every rule of the Prometheus rule file at path, in file order."""
    document = yaml.safe_load(Path(path).read_text()) or {}
    rules = []
    for group in document.get("groups", []):
        for rule in group.get("rules", []):
            kind = "alert" if "alert" in rule else "record"
            rules.append(
                RuleExpression(
                    group=group.get("name", ""),
                    name=rule.get(kind, ""),
                    kind=kind,
                    expr=str(rule.get("expr", "")),
                    labels=dict(rule.get("labels") or {}),
                    annotations=dict(rule.get("annotations") or {}),
                    for_=rule.get("for"),
                )
            )
    return rules


def variable_references(text: str) -> set[str]:
    """The names of the Grafana variables text refers to ($x, ${x}, ${x:fmt}, [[x]])."""
    return {
        match.group("braced") or match.group("bracketed") or match.group("plain")
        for match in _VARIABLE_REFERENCE.finditer(text)
    }


def substitute_variables(
    expr: str, values: Mapping[str, str] | None = None, *, dashboard: Path = DASHBOARD_PATH
) -> str:
    """expr with every Grafana variable replaced, as Grafana would send it to Prometheus.

    Values come from `values`, then the dashboard's variable defaults (dashboard_variable_values), then
    GRAFANA_BUILTIN_VALUES. A variable found in none of them raises KeyError naming it.
    """
    known = {**GRAFANA_BUILTIN_VALUES, **dashboard_variable_values(dashboard), **(values or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bracketed") or match.group("plain")
        if name not in known:
            raise KeyError(f"Grafana variable ${name} in {expr!r} has no value")
        return known[name]

    return _VARIABLE_REFERENCE.sub(replace, expr)


# --------------------------------------------------------------------------- what a PromQL expression refers to


@dataclass(frozen=True)
class Selector:
    """A series selector in an expression: the metric name and the label names its matchers use."""

    metric: str
    labels: frozenset[str]


@dataclass(frozen=True)
class ExpressionParts:
    """The metric names, matcher labels and by/without/on/ignoring/group_* labels of an expression."""

    selectors: tuple[Selector, ...]
    grouping_labels: frozenset[str]

    @property
    def metrics(self) -> set[str]:
        """The metric names (recording-rule names included) the expression reads."""
        return {selector.metric for selector in self.selectors}


_PROMQL_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w:]))
    | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<identifier>[A-Za-z_:][\w:]*)
    | (?P<symbol>.)
    """,
    re.VERBOSE,
)
_GROUPING_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"}
)
_KEYWORDS = _GROUPING_KEYWORDS | _AGGREGATIONS | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
_CLOSING = {"(": ")", "[": "]", "{": "}"}


def analyse_expression(expr: str) -> ExpressionParts:
    """Pick the metric names and label names out of a PromQL expression (Grafana variables substituted or not).

    A lexer, not a parser: good enough for the expressions difyq writes, and Prometheus itself checks the
    syntax (query_prometheus). Identifiers followed by `(` are functions; inside `{}` they are label names;
    `[...]` holds only durations.
    """
    tokens = [
        (match.lastgroup, match.group())
        for match in _PROMQL_TOKEN.finditer(expr)
        if match.lastgroup not in ("space", "comment")
    ]
    selectors: list[Selector] = []
    grouping: set[str] = set()
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if text == "[":
            index = _skip_group(tokens, index)
        elif text == "{":  # a selector without a metric name, e.g. {__name__=~"..."}: reported with metric ""
            labels, index = _identifiers_in_group(tokens, index)
            selectors.append(Selector("", frozenset(labels)))
        elif kind == "identifier" and text.lower() in _GROUPING_KEYWORDS and following == "(":
            labels, index = _identifiers_in_group(tokens, index + 1)
            grouping |= labels
        elif kind == "identifier" and (text.lower() in _KEYWORDS or following == "("):
            index += 1
        elif kind == "identifier":
            labels: set[str] = set()
            index += 1
            if following == "{":
                labels, index = _identifiers_in_group(tokens, index)
            selectors.append(Selector(text, frozenset(labels)))
        else:
            index += 1
    return ExpressionParts(tuple(selectors), frozenset(grouping))


def _skip_group(tokens: list[tuple[str | None, str]], start: int) -> int:
    """The index after the bracket that closes the one at tokens[start]."""
    _, index = _identifiers_in_group(tokens, start)
    return index


def _identifiers_in_group(tokens: list[tuple[str | None, str]], start: int) -> tuple[set[str], int]:
    """The identifiers between the bracket at tokens[start] and its closing bracket, and the index after it."""
    opening = tokens[start][1]
    closing = _CLOSING[opening]
    depth = 0
    names: set[str] = set()
    for index in range(start, len(tokens)):
        kind, text = tokens[index]
        if text == opening:
            depth += 1
        elif text == closing:
            depth -= 1
            if depth == 0:
                return names, index + 1
        elif kind == "identifier":
            names.add(text)
    return names, len(tokens)
