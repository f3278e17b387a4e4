"""The user documentation (README.md and docs/) is tested like code: every YAML block passes `difyq check-config`,
every curl line answers the status it promises against the real API on a real Redis, the receiver's Python
snippet verifies a callback difyq signed, the job resource example has the fields of a real job, and every table
equals its source of truth: the config model, the OpenAPI routes, argparse, the environment variables the code
reads, the metrics the processes register, the job statuses, the dashboard's rows, the latest benchmark run. A
table no test knows fails too (the metrics labels and the Redis keys are compared with a live run in
tests/test_observability_e2e.py).

A failing test says which file and which row to change, and what to write there."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from pydantic import SecretStr, TypeAdapter

from difyq.worker.config import Config, parse_config
from difyq.worker.runtime import Runtime
from tests.support.config_reference import MAP_SEGMENT, Setting, default_text, settings
from tests.support.doc_reference import (
    ARCHITECTURE,
    METRIC_COLUMNS,
    METRICS,
    REDIS_COLUMNS,
    documented_metrics,
    exposed_families,
    undocumented_redis_keys,
)
from tests.support.markdown import (
    DOCS,
    ROOT,
    blocks,
    code_spans,
    curl_lines,
    documentation_files,
    relative,
    table,
    tables,
    unquote,
)
from tests.support.stack import serving_api

CONFIGURATION = DOCS / "configuration.md"
HTTP_API = DOCS / "http-api.md"
CLI = DOCS / "cli.md"
OPERATIONS = DOCS / "operations.md"
BENCHMARK = DOCS / "benchmark.md"
README = ROOT / "README.md"

CONFIG_COLUMNS = ("key", "type", "default", "allowed", "meaning")
ROUTE_COLUMNS = ("call", "status", "when")
CLI_COLUMNS = ("command", "does")
ENV_COLUMNS = ("variable", "read by", "default", "meaning")
DASHBOARD_COLUMNS = ("row", "panels and the question each answers")
BENCH_COLUMNS = ("goal", "target", "difyq", "bare", "celery", "difyq ÷ bare", "verdict")
INDEX_COLUMNS = ("page", "what it holds")
VALUES_COLUMNS = ("field", "values")


# ------------------------------------------------------------------------------------------------ config blocks


def _env_for(text: str) -> dict[str, str]:
    """A value for every ${NAME} the block references: a Standard Webhooks secret for signing secrets."""
    secret = "whsec_" + base64.b64encode(b"docs test signing secret 32 b!!").decode()
    return {name: secret if "CALLBACK_SECRET" in name or "SIGNING" in name else f"docs-test-{name.lower()}"
            for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text)}


def _yaml_blocks() -> list[Any]:
    return [pytest.param(block, id=block.where) for path in documentation_files() for block in blocks(path, "yaml")]


@pytest.mark.e2e
@pytest.mark.parametrize("block", _yaml_blocks())
def test_every_config_block_passes_check_config(block: Any, tmp_path: Path) -> None:
    """Copied as printed, with the variables it references set, `difyq check-config` accepts the block."""
    file = tmp_path / "difyq.yaml"
    file.write_text(block.text, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "difyq.producers.cli", "check-config", "--config", str(file)],
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", **_env_for(block.text)})
    assert result.returncode == 0, f"the YAML block at {block.where} fails `difyq check-config`:\n{result.stderr}"


# ------------------------------------------------------------------------------------------- config reference


def _documented_settings() -> dict[str, tuple[str, ...]]:
    rows = table(CONFIGURATION, *CONFIG_COLUMNS).rows
    return {unquote(row[0]): row for row in rows}


def _expected_row(setting: Setting) -> str:
    return (f"| `{setting.path}` | {setting.type_name} | {default_text(setting)} | {setting.allowed} | "
            "<what it does> |")


def _default_matches(setting: Setting, cell: str) -> bool:
    if setting.required:
        return cell == "required"
    if cell == "required":
        return False
    field = setting.field
    annotation = typing.Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    documented = TypeAdapter(annotation).validate_python(yaml.safe_load(cell) if cell else "")
    default = setting.default()
    if isinstance(default, SecretStr) or isinstance(documented, SecretStr):
        return False
    return documented == default


def test_config_reference_lists_every_key_of_the_model() -> None:
    documented = _documented_settings()
    expected = {setting.path: setting for setting in settings(Config)}
    missing = [_expected_row(expected[path]) for path in expected if path not in documented]
    stale = sorted(set(documented) - set(expected))
    assert not missing, (f"{relative(CONFIGURATION)}: the reference table lacks these keys of worker/config.py; "
                         "add the rows (describe each):\n" + "\n".join(missing))
    assert not stale, f"{relative(CONFIGURATION)}: the reference table names keys the config model lacks: {stale}"


def test_config_reference_types_defaults_and_allowed_values_match_the_model() -> None:
    documented = _documented_settings()
    wrong = []
    for setting in settings(Config):
        row = documented.get(setting.path)
        if row is None:
            continue
        _, type_cell, default_cell, allowed_cell, meaning = row
        if (type_cell, allowed_cell) != (setting.type_name, setting.allowed) \
                or not _default_matches(setting, default_cell) or not meaning:
            wrong.append(f"| {' | '.join(row)} |\n  should read {_expected_row(setting)}")
    assert not wrong, (f"{relative(CONFIGURATION)}: rows that disagree with worker/config.py (a duration's default "
                       "may be written as 24h):\n" + "\n".join(wrong))


def test_config_reference_segments_name_maps() -> None:
    """`<name>` stands for a map key in every path that has one, nothing else does."""
    for path in _documented_settings():
        assert all(part == MAP_SEGMENT or re.fullmatch(r"[a-z_]+", part) for part in path.split(".")), path


# --------------------------------------------------------------------------------------------------- HTTP API


@pytest.fixture(scope="module")
def docs_runtime(redis_url: str) -> Iterator[Runtime]:
    """The API's config for the documented calls: the `demo` and `summarize-document` apps of `difyq dev` with its
    `dev-token`, and the
    `support` app and `crm` client of docs/configuration.md, whose token is $DIFYQ_CRM_TOKEN; both apps on the
    emulator."""
    import uuid

    import redis

    from difyq.worker.dify.emulator import EmulatedApp, start_emulator

    namespace = f"difyq-docs-{uuid.uuid4().hex[:12]}"
    apps = [EmulatedApp(name="demo", key="app-docs-demo-0001", mode="chat", answer_tokens=3),
            EmulatedApp(name="support", key="app-docs-support-01", mode="chat", answer_tokens=3),
            EmulatedApp(name="summarize-document", key="app-docs-document-1", mode="workflow",
                        required_inputs=["document"], file_inputs=["document"])]
    loopback_files = {"files": {"allow_hosts": ["127.0.0.1"]}}  # as `difyq dev` allows loopback
    with start_emulator(apps) as emulator:
        config = parse_config({
            "apps": {app.name: {"api_key": app.key, "mode": app.mode, "base_url": emulator.base_url,
                                **(loopback_files if app.mode == "workflow" else {})} for app in apps},
            "clients": {"dev": {"token": "dev-token", "apps": ["*"]},
                        "crm": {"token": CRM_TOKEN, "apps": ["support"]}},
            "redis": {"namespace": namespace},
        })
        yield Runtime(config, redis_url)
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def ran_job(docs_runtime: Runtime) -> dict[str, Any]:
    """A job submitted over HTTP and run by a worker (in this process) on the emulator: `GET /v1/jobs/{id}`."""
    import requests

    from tests.support.stack import running_worker, wait_for_final

    headers = {"Authorization": f"Bearer {CRM_TOKEN}"}
    with serving_api(docs_runtime) as base, running_worker(docs_runtime, threads=2):
        submitted = requests.post(f"{base}/v1/jobs", json={"app": "support", "query": "fields"}, headers=headers,
                                  timeout=10)
        wait_for_final(docs_runtime, submitted.json()["id"])
        job = requests.get(f"{base}/v1/jobs/{submitted.json()['id']}", headers=headers, timeout=10).json()
    assert job["status"] == "succeeded", job
    return job


CRM_TOKEN = "docs-crm-token-5c1e7a9b"


def _documented_routes() -> set[tuple[str, int]]:
    return {(unquote(row[0]), int(row[1])) for row in table(HTTP_API, *ROUTE_COLUMNS).rows}


def _served_routes(runtime: Runtime) -> set[tuple[str, int]]:
    """(``METHOD /path``, status) of every response the OpenAPI document declares."""
    from difyq.producers.api.app import create_app

    served = set()
    for path, operations in create_app(runtime).openapi()["paths"].items():
        for method, operation in operations.items():
            for status in operation["responses"]:
                served.add((f"{method.upper()} {path}", int(status)))
    return served


def test_http_api_table_lists_every_route_and_status(docs_runtime: Runtime) -> None:
    documented, served = _documented_routes(), _served_routes(docs_runtime)
    missing = [f"| `{call}` | {status} | <when> |" for call, status in sorted(served - documented)]
    assert not missing, (f"{relative(HTTP_API)}: the routes table lacks these answers of the API (OpenAPI); add "
                         "the rows:\n" + "\n".join(missing))
    assert not documented - served, (f"{relative(HTTP_API)}: the routes table lists answers the API does not "
                                     f"declare: {sorted(documented - served)}")


def test_the_openapi_document_declares_only_answers_the_api_gives(docs_runtime: Runtime) -> None:
    """/openapi.json has no FastAPI validation error (difyq answers a failed validation with its own error body),
    and a route whose parameters are plain path strings declares no 422 it could never send."""
    from difyq.producers.api.app import create_app

    document = create_app(docs_runtime).openapi()
    assert "HTTPValidationError" not in json.dumps(document)
    assert "422" not in document["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]


def _curl_params() -> list[Any]:
    return [pytest.param(path, id=relative(path)) for path in documentation_files() if list(curl_lines(path))]


def _route_of(command: str) -> tuple[str, str]:
    method = re.search(r"-X (\w+)", command)
    url = re.search(r"https?://[^/\s']+(/[^\s'?]*)", command)
    assert url, command
    path = re.sub(r"/job_[A-Za-z0-9_]+|/<id>", "/{job_id}", url.group(1))
    path = re.sub(r"^/v1/threads/[^/]+", "/v1/threads/{thread}", path)  # a thread name, percent-encoded
    return (method.group(1) if method else "GET"), path


@pytest.mark.parametrize("path", _curl_params())
def test_every_curl_line_answers_as_documented(path: Path, docs_runtime: Runtime) -> None:
    """Each curl line of the file, in order, against the real API on a real Redis: it answers the status its
    `# → NNN` comment promises, and that status is one the routes table lists for the call. `<id>` is the job
    the first submission created."""
    documented = _documented_routes()
    job_id = None
    with serving_api(docs_runtime) as base:
        for line in curl_lines(path):
            where = f"{line.block.where}: {line.command}"
            assert line.expected_status is not None, f"{where}: end the line with `    # → <status>`"
            method, route = _route_of(line.command)
            assert (f"{method} {route}", line.expected_status) in documented, (
                f"{where}: {line.expected_status} is not in the routes table of {relative(HTTP_API)}")
            command = line.command.replace("http://127.0.0.1:8080", base)
            if "<id>" in command:
                assert job_id, f"{where}: <id> before any job was created"
                command = command.replace("<id>", job_id)
            result = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"], capture_output=True,
                                    text=True, timeout=30, env={"PATH": "/usr/bin:/bin",
                                                                "DIFYQ_CRM_TOKEN": CRM_TOKEN})
            body, _, status = result.stdout.rpartition("\n")
            assert int(status) == line.expected_status, f"{where}: answered {status} {body}"
            if method == "POST" and route == "/v1/jobs" and status in ("200", "202") and job_id is None:
                job_id = json.loads(body)["id"]


# -------------------------------------------------------------------------------------------------------- CLI


def _help(words: list[str]) -> str:
    """What `difyq <words> --help` prints."""
    import contextlib
    import io

    from difyq.producers.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*words, "--help"])
    return out.getvalue()


def _parser_commands(words: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """``difyq jobs list`` -> its options, read from the --help of each command and subcommand."""
    text = _help(list(words))
    usage = text.split("\n\n", 1)[0]
    choices = re.search(r"\{([a-z,-]+)\}\s+\.\.\.", usage)
    if choices:
        found: dict[str, set[str]] = {}
        for name in choices.group(1).split(","):
            found.update(_parser_commands((*words, name)))
        return found
    return {" ".join(("difyq", *words)): set(re.findall(r"^\s+(--[a-z][a-z-]*)", text, flags=re.MULTILINE))
            - {"--help"}}


def test_cli_table_matches_argparse() -> None:
    parsed = _parser_commands()
    documented: dict[str, set[str]] = {}
    for row in table(CLI, *CLI_COLUMNS).rows:
        command = unquote(row[0])
        words = re.match(r"[a-z][a-z-]*( [a-z][a-z-]*)*", command)
        assert words, row
        documented[words.group(0)] = set(re.findall(r"--[a-z][a-z-]*", command))
    missing = sorted(set(parsed) - set(documented))
    assert not missing, f"{relative(CLI)}: add a row for each of these commands: {missing}"
    assert not set(documented) - set(parsed), f"{relative(CLI)}: no such commands: {set(documented) - set(parsed)}"
    wrong = {command: {"undocumented": sorted(parsed[command] - flags), "no such flag": sorted(flags - parsed[command])}
             for command, flags in documented.items() if flags != parsed[command]}
    assert not wrong, f"{relative(CLI)}: the options of these rows differ from producers/cli.py: {wrong}"


# ------------------------------------------------------------------------------------- environment variables

SOURCES_READING_THE_ENVIRONMENT = ("worker", "producers", "Dockerfile", "helm/difyq/templates")


def _variables_in_code() -> dict[str, str]:
    """Every DIFYQ_* variable the code, the image or the chart names, PROMETHEUS_MULTIPROC_DIR and REDIS_URL, and
    the Dramatiq settings `difyq worker` defaults (``env.setdefault("dramatiq_…")``): name -> a file naming it."""
    found: dict[str, str] = {}
    for source in SOURCES_READING_THE_ENVIRONMENT:
        root = ROOT / source
        for file in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            text = file.read_text(encoding="utf-8", errors="replace")
            names = re.findall(r"\b(DIFYQ_[A-Z0-9_]+|REDIS_URL|REDIS_SENTINEL[A-Z_]*|PROMETHEUS_MULTIPROC_DIR)\b", text)
            names += re.findall(r"setdefault\(\"(dramatiq_[a-z_]+)\"", text)
            for name in names:
                found.setdefault(name, relative(file))
    return found


def test_environment_table_lists_every_variable_the_code_reads() -> None:
    documented = {unquote(row[0]) for row in table(OPERATIONS, *ENV_COLUMNS).rows}
    in_code = _variables_in_code()
    missing = [f"| `{name}` | <which commands> | <default> | <meaning> |   (named in {where})"
               for name, where in sorted(in_code.items()) if name not in documented]
    assert not missing, (f"{relative(OPERATIONS)}: the environment variables table lacks variables the code reads; "
                         "add the rows:\n" + "\n".join(missing))
    assert documented <= set(in_code), (f"{relative(OPERATIONS)}: the table lists variables no code reads: "
                                        f"{sorted(documented - set(in_code))}")


def _defaults_in_code() -> dict[str, str]:
    """The literal defaults the code gives variables: ``environ.get("NAME", "default")``, ``setdefault(…)``."""
    found: dict[str, str] = {}
    for source in SOURCES_READING_THE_ENVIRONMENT:
        root = ROOT / source
        for file in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            text = file.read_text(encoding="utf-8", errors="replace")
            for name, default in re.findall(r"(?:get|setdefault)\(\s*[\"']([A-Za-z_]+)[\"']\s*,\s*[\"']([^\"']+)[\"']",
                                            text):
                found[name] = default
    return found


def test_environment_table_defaults_are_the_code_defaults() -> None:
    rows = {unquote(row[0]): row[2] for row in table(OPERATIONS, *ENV_COLUMNS).rows}
    wrong = [f"`{name}`: the code's default is {default!r}, the table says {rows[name]!r}"
             for name, default in sorted(_defaults_in_code().items())
             if name in rows and default not in rows[name]]
    assert not wrong, f"{relative(OPERATIONS)}: environment variables table:\n" + "\n".join(wrong)


# ---------------------------------------------------------------------------------------------------- metrics


def test_metrics_table_names_and_types_match_the_registry(docs_runtime: Runtime, ran_job: dict[str, Any]) -> None:
    """The names and types every process registers (difyq.worker.metrics is imported by all three, the scrape-time
    gauges come from the queue and the budget collectors), and the labels of those a job run in this process gave
    samples; every label of every metric is compared with live scrapes in tests/test_observability_e2e.py."""
    from prometheus_client import CollectorRegistry, generate_latest

    from difyq.worker import metrics  # noqa: F401  (registers every difyq metric)
    from difyq.worker.budgets import BudgetCollector, BudgetLedger
    from difyq.worker.queue_metrics import QueueCollector

    queue_registry = CollectorRegistry()
    queue_registry.register(QueueCollector(docs_runtime.raw_redis, docs_runtime.namespace, ["demo"]))
    queue_registry.register(BudgetCollector(BudgetLedger(docs_runtime.redis, docs_runtime.namespace), []))
    scrape = generate_latest(REGISTRY).decode() + generate_latest(queue_registry).decode()
    documented = documented_metrics()
    exposed = exposed_families(scrape)
    problems = [f"add | `{name}` | {kind} | <labels> | <meaning> |" for name, (kind, _) in sorted(exposed.items())
                if name.startswith("difyq_") and name not in documented]
    problems += [f"`{name}`: the table says {documented[name][0]}, the registry {kind}"
                 for name, (kind, _) in exposed.items() if name in documented and documented[name][0] != kind]
    problems += [f"`{name}` is in the table but not registered: remove its row"
                 for name in documented if name.startswith("difyq_") and name not in exposed]
    problems += [f"`{name}`: the table says labels {sorted(documented[name][1])}, the samples carry {sorted(labels)}"
                 for name, (_, labels) in sorted(exposed.items())
                 if name in documented and labels is not None and labels != documented[name][1]]
    assert not problems, f"{relative(METRICS)}:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------- dashboard, benchmark, index


def test_dashboard_table_has_one_row_per_dashboard_row() -> None:
    dashboard = json.loads((ROOT / "grafana" / "difyq.json").read_text(encoding="utf-8"))
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    documented = [row[0] for row in table(METRICS, *DASHBOARD_COLUMNS).rows]
    assert documented == rows, f"{relative(METRICS)}: the dashboard table's rows must be grafana/difyq.json's {rows}"


@pytest.mark.parametrize("page", [BENCHMARK, README], ids=relative)
def test_benchmark_table_is_the_latest_run(page: Path) -> None:
    latest = ROOT / "tests" / "bench" / "results" / "latest.md"
    assert table(page, *BENCH_COLUMNS).rows == table(latest, *BENCH_COLUMNS).rows, (
        f"{relative(page)}: copy the summary table of {relative(latest)}")


def test_readme_indexes_every_page_of_docs() -> None:
    linked = {re.search(r"\(([^)]+)\)", row[0]).group(1) for row in table(README, *INDEX_COLUMNS).rows}
    pages = {relative(page) for page in DOCS.glob("*.md")}
    assert pages <= linked, f"README.md: add a row to the documentation table for {sorted(pages - linked)}"


# ------------------------------------------------------------------------------------ every table, every path

CHECKED_TABLES: dict[tuple[Path, tuple[str, ...]], str] = {  # (file, columns) -> the test that checks it
    (CONFIGURATION, CONFIG_COLUMNS): "test_config_reference_*",
    (HTTP_API, ROUTE_COLUMNS): "test_http_api_table_lists_every_route_and_status",
    (HTTP_API, VALUES_COLUMNS): "test_job_field_values_match_the_model",
    (CLI, CLI_COLUMNS): "test_cli_table_matches_argparse",
    (OPERATIONS, ENV_COLUMNS): "test_environment_table_*",
    (METRICS, METRIC_COLUMNS): "test_metrics_table_* and tests/test_observability_e2e.py",
    (METRICS, DASHBOARD_COLUMNS): "test_dashboard_table_has_one_row_per_dashboard_row",
    (BENCHMARK, BENCH_COLUMNS): "test_benchmark_table_is_the_latest_run",
    (README, BENCH_COLUMNS): "test_benchmark_table_is_the_latest_run",
    (README, INDEX_COLUMNS): "test_readme_indexes_every_page_of_docs",
    (ARCHITECTURE, REDIS_COLUMNS): "test_every_*redis_key* and tests/test_observability_e2e.py",
}


def test_every_table_is_checked_by_a_test() -> None:
    """Each table of README.md and docs/ is one a test compares with its source (in the file the test reads)."""
    unchecked = [f"{found.where} {found.header}" for path in documentation_files() for found in tables(path)
                 if (path, found.header) not in CHECKED_TABLES]
    assert not unchecked, ("tables no test compares with their source of truth; write them as prose, move them "
                           "where the test for their kind reads, or add a check to tests/test_docs.py:\n"
                           + "\n".join(unchecked))


def test_every_linked_file_and_named_path_exists() -> None:
    """Relative links, and paths in code spans (`worker/leases.py`, `tests/test_api.py`), point at real files."""
    missing = []
    for path in documentation_files():
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+:", target) and not (path.parent / target).exists():
                missing.append(f"{relative(path)}: link {target}")
        for span in code_spans(text):
            if re.fullmatch(r"(worker|producers|tests|grafana|helm|docs)/[\w./-]+\.(py|lua|json|yaml|md)", span) \
                    and not (ROOT / span).exists():
                missing.append(f"{relative(path)}: `{span}`")
    assert not missing, "these files are gone; update the docs:\n" + "\n".join(missing)


def test_nothing_points_at_a_design_document_users_do_not_have() -> None:
    sources = [*documentation_files(), *sorted((ROOT / "worker").rglob("*.py")),
               *sorted((ROOT / "producers").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py")),
               *sorted((ROOT / "helm").rglob("*")), ROOT / "Dockerfile"]
    pattern = re.compile("DESIGN" + r" (§|\\u00a7)")
    found = [relative(file) for file in sources
             if file.is_file() and pattern.search(file.read_text(encoding="utf-8", errors="replace"))]
    assert not found, f"these files point at a design document users do not have; point at docs/ instead: {found}"


# ------------------------------------------------------------------------------------------------ python blocks


def _python_blocks() -> list[Any]:
    return [pytest.param(block, id=block.where) for path in documentation_files() for block in blocks(path, "python")]


@pytest.mark.parametrize("block", _python_blocks())
def test_every_python_block_verifies_a_callback_difyq_signed(block: Any) -> None:
    """The receiver's snippet, run as printed (with the secret filled in) on a callback signed by difyq's own
    signing code, accepts it and reads the job; a tampered body is refused."""
    from datetime import UTC, datetime

    from standardwebhooks.webhooks import WebhookVerificationError

    from difyq.worker.callbacks.signing import signature_headers

    secret = "whsec_" + base64.b64encode(b"docs test receiver secret 32 b!").decode()
    body = json.dumps({"type": "job.succeeded", "timestamp": datetime.now(UTC).isoformat(),
                       "data": {"id": "job_docs", "status": "succeeded"}}).encode()
    headers = signature_headers([secret], "job_docs", datetime.now(UTC), body)
    code = block.text.replace("whsec_…", secret)
    scope: dict[str, Any] = {"request_body": body, "request_headers": headers}
    exec(compile(code, block.where, "exec"), scope)
    assert scope["job"] == {"id": "job_docs", "status": "succeeded"}, f"{block.where} did not read the job"
    with pytest.raises(WebhookVerificationError):
        exec(compile(code, block.where, "exec"), {**scope, "request_body": body.replace(b"job_docs", b"job_evil")})


# --------------------------------------------------------------------------------------------- the job resource

def test_job_field_values_match_the_model() -> None:
    from difyq.worker.jobs.schema import SOURCES, JobStatus

    documented = {unquote(row[0]): row[1].split(", ") for row in table(HTTP_API, *VALUES_COLUMNS).rows}
    expected = {"status": [status.value for status in JobStatus], "source": list(SOURCES)}
    assert documented == expected, (f"{relative(HTTP_API)}: the job's field values table must read {expected} "
                                    "(worker/jobs/model.py)")


def _keys(document: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every key of the objects nested in ``document`` (``result.usage`` is not descended)."""
    if not isinstance(document, dict):
        return set()
    found = set()
    for key, value in document.items():
        found.add(f"{prefix}{key}")
        if key not in ("usage", "inputs", "metadata"):
            found |= _keys(value, f"{prefix}{key}.")
    return found


def test_the_job_resource_example_has_the_fields_of_a_real_job(ran_job: dict[str, Any]) -> None:
    """The example of docs/http-api.md names exactly the fields `GET /v1/jobs/{id}` returns for a job a worker
    ran on the emulator (the request, result and callback blocks included)."""
    example = next(json.loads(block.text) for block in blocks(HTTP_API, "json") if '"callback"' in block.text)
    documented, real = _keys(example), _keys(ran_job)
    assert documented == real, (f"{relative(HTTP_API)}: the job resource example lacks {sorted(real - documented)} "
                                f"and names {sorted(documented - real)} that the API does not return")


def test_every_redis_key_of_a_job_is_in_the_architecture_doc(ran_job: dict[str, Any], docs_runtime: Runtime) -> None:
    """The keys a submitted, run and finished job leaves match rows of docs/architecture.md's Redis table (the
    observability run checks hooks, schedules and limits too)."""
    keys = sorted(key.decode() for key in docs_runtime.raw_redis.scan_iter(match=f"{docs_runtime.namespace}:*"))
    assert len(keys) > 3, keys
    undocumented = undocumented_redis_keys(keys, docs_runtime.namespace)
    assert not undocumented, (f"{relative(ARCHITECTURE)}: add a row to the Redis table for these keys "
                              f"(`{{ns}}` = {docs_runtime.namespace}):\n" + "\n".join(undocumented))


def test_the_error_example_has_the_fields_of_the_error_body() -> None:
    from difyq.producers.api.errors import ErrorDetail

    example = next(json.loads(block.text) for block in blocks(HTTP_API, "json") if '"error"' in block.text
                   and '"callback"' not in block.text)
    assert set(example) == {"error"} and set(example["error"]) == set(ErrorDetail.model_fields), (
        f"{relative(HTTP_API)}: the error example must have exactly the fields of producers/api/errors.py")


def _choice_comments(text: str) -> Iterator[tuple[str, list[str]]]:
    """(dotted key path, the choices) of each YAML line whose comment lists choices (``# chat | agent``); for a
    flow mapping (``verify: {scheme: github, …}  # github | stripe``) the path is that of its first key."""
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        match = re.match(r"^(\s*)([\w-]+):\s*(.*?)\s*#\s*([\w-]+(?: \| [\w-]+)+)\s*$", line)
        key_match = re.match(r"^(\s*)([\w-]+):", line)
        if key_match:
            indent = len(key_match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, key_match.group(2)))
        if match:
            path = [key for _, key in stack]
            flow = re.match(r"\{\s*([\w-]+):", match.group(3))
            yield ".".join(path + ([flow.group(1)] if flow else [])), match.group(4).split(" | ")


def test_choices_listed_in_yaml_comments_are_the_allowed_values() -> None:
    """A comment such as `mode: chat  # chat | agent | …` lists exactly the values the model allows there."""
    patterns = [(re.compile(re.escape(setting.path).replace(re.escape(MAP_SEGMENT), "[^.]+")), setting)
                for setting in settings(Config)]
    wrong, checked = [], 0
    for path in documentation_files():
        for block in blocks(path, "yaml"):
            for key, choices in _choice_comments(block.text):
                checked += 1
                setting = next((setting for regex, setting in patterns if regex.fullmatch(key)), None)
                assert setting is not None and setting.type_name == "one of", f"{block.where}: {key} has no choices"
                if choices != setting.allowed.split(", "):
                    wrong.append(f"{block.where}: {key}: write `# {' | '.join(setting.allowed.split(', '))}`")
    assert checked >= 2, "the docs' YAML examples no longer list the choices of apps.*.mode and verify.scheme"
    assert not wrong, "YAML comments that list other choices than worker/config.py allows:\n" + "\n".join(wrong)


@pytest.mark.e2e
def test_the_check_config_sample_is_what_check_config_prints(tmp_path: Path) -> None:
    """The sample output of docs/configuration.md, from the config it describes."""
    sample = blocks(CONFIGURATION, "text")[0].text
    file = tmp_path / "difyq.yaml"
    file.write_text("apps:\n  support:\n    api_key: ${DIFY_SUPPORT_KEY}\n    mode: chatbot\n    timeout: 600\n")
    result = subprocess.run([sys.executable, "-m", "difyq.producers.cli", "check-config", "--config", file.name],
                            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == sample, (
        f"{relative(CONFIGURATION)}: the check-config sample should read:\n{result.stderr}")


def test_the_chart_schema_of_the_config_is_generated_from_the_model() -> None:
    """helm/difyq/values.schema.json checks `config` at `helm install` with the keys, types, bounds and allowed
    values of worker/config.py (also in tests/test_helm_chart.py, which needs helm; this one runs everywhere)."""
    from tests.support.config_schema import CHART_SCHEMA, config_schema

    chart = json.loads(CHART_SCHEMA.read_text(encoding="utf-8"))
    assert chart["properties"]["config"] == config_schema(), (
        f"{relative(CHART_SCHEMA)}'s `config` differs from the config model in worker/config.py: run "
        "`.venv/bin/python -m tests.support.config_schema --write` and commit the result")


def _keys_redis_keys_builds(namespace: str) -> list[str]:
    """Every key ``worker/redis_keys.py`` can name (each method called with placeholder arguments, with and without
    its optional ones), and a limiter's keys."""
    import inspect

    from difyq.worker.jobs.messages import JOBS_QUEUE
    from difyq.worker.limits.keys import KeyNames
    from difyq.worker.redis_keys import RedisKeys

    def argument(parameter: inspect.Parameter) -> str:
        return JOBS_QUEUE if parameter.name == "queue_name" else f"{parameter.name}0"

    names = RedisKeys(namespace)
    built: list[str] = list(KeyNames.of(namespace, "kid0").acquire("tenant0"))
    for name, member in inspect.getmembers(RedisKeys):
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            built.append(getattr(names, name))
        elif inspect.isfunction(member):
            parameters = list(inspect.signature(member).parameters.values())[1:]
            required = [argument(p) for p in parameters if p.default is inspect.Parameter.empty]
            built += [member(names, *required), member(names, *map(argument, parameters))]
    return sorted({key for key in built if isinstance(key, str)})


def test_every_key_redis_keys_names_is_in_the_architecture_doc() -> None:
    keys = _keys_redis_keys_builds("ns0")
    assert len(keys) > 15, keys
    undocumented = undocumented_redis_keys(keys, "ns0")
    assert not undocumented, (f"{relative(ARCHITECTURE)}: worker/redis_keys.py names keys the Redis table does not "
                              "describe (`{ns}` = ns0); add a row for each:\n" + "\n".join(undocumented))


def test_every_difyq_command_the_docs_name_is_accepted_by_the_cli() -> None:
    """`difyq emulator --dify-version 1.x`, `difyq dlq replay ID`: each command written in the docs (synopses with
    `[…]` aside, which the CLI table test reads) parses with the real argument parser; capitals stand for values."""
    import contextlib
    import io
    import shlex

    from difyq.producers.cli import build_parser

    known = set(_parser_commands())
    refused = []
    for path in documentation_files():
        text = path.read_text(encoding="utf-8")
        commands = [span for span in code_spans(text) if span.startswith("difyq ") and not re.search(r"[\[<]", span)
                    and span not in known]  # naming a command (`difyq enqueue`) needs none of its options
        commands += [line for block in blocks(path, "sh") for line in block.text.splitlines()
                     if line.startswith("difyq ")]
        for command in commands:
            words = [re.sub(r"^[A-Z]+$", "x", word) for word in shlex.split(command.partition("#")[0])[1:]]
            with contextlib.redirect_stderr(io.StringIO()) as error:
                try:
                    build_parser().parse_args(words)
                except SystemExit:
                    refused.append(f"{relative(path)}: `{command}`: {error.getvalue().strip().splitlines()[-1]}")
    assert not refused, "commands in the docs that `difyq` refuses:\n" + "\n".join(refused)
