"""The Helm chart (helm/difyq), checked with the real helm binary and the Kubernetes API schemas.

Renders the chart with its default values and with each values file in helm/difyq/ci/ (one turns every option
on), then checks: ``helm lint --strict``; every core manifest against the Kubernetes OpenAPI schemas of
kubernetes-validate (strict: unknown fields are errors); the custom resources (ServiceMonitor, PodMonitor,
PrometheusRule, ScaledObject), whose CRD schemas are not available offline, against structural schemas written
here for the fields the chart uses; and the properties that matter in production: non-root everywhere, probes on
every container, a grace period above the job time limit, scheduler replicas only with the lease, no secret in
a ConfigMap, wrong values rejected at install. Where a property depends on the processes (CLI arguments, the
worker's shutdown timeout, the config model), the check runs the project's own code on the rendered output.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import subprocess
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.config_reference import MAP_SEGMENT, Setting, settings
from tests.support.config_schema import config_schema
from tests.support.helm_binary import ToolFetchError, ensure_tools

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "difyq"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.35.0"
RELEASE = "rel"

CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
DIFYQ_COMPONENTS = ("api", "worker", "scheduler")
SECRET_FIELD_PATHS = (
    "config.apps.support.api_key",
    "config.clients.crm.token",
    "config.hooks.gh.verify.secret",
    "config.callbacks.signing_secret",
    "config.console.users.alice.token",
    "config.redis.sentinel.password",
)


# --------------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    """One ``helm template`` output: its name, the values it came from and the parsed manifests."""

    name: str
    values: dict[str, Any]
    docs: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        matches = [doc for doc in self.of_kind(kind) if doc["metadata"]["name"] == name]
        assert len(matches) == 1, f"{self.name}: expected one {kind} {name}, found {len(matches)}"
        return matches[0]

    def deployment(self, component: str) -> dict[str, Any]:
        return self.one("Deployment", f"{RELEASE}-difyq-{component}")

    def container(self, component: str) -> dict[str, Any]:
        return self.deployment(component)["spec"]["template"]["spec"]["containers"][0]


class Helm:
    """The helm binary with a private home, so tests neither read nor write the user's helm settings."""

    def __init__(self, binary: Path, home: Path):
        self.binary = binary
        self.env = dict(os.environ)
        for name in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            self.env[name] = str(home / name.lower())
        self.env.pop("KUBECONFIG", None)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=self.env,
                              timeout=60, check=False)

    def template(self, *options: str) -> subprocess.CompletedProcess[str]:
        return self.run("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *options)

    def render(self, name: str, *options: str) -> Rendered:
        result = self.template(*options)
        assert result.returncode == 0, f"helm template ({name}) failed:\n{result.stderr}"
        docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return Rendered(name, _effective_values(options), docs)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _effective_values(options: tuple[str, ...]) -> dict[str, Any]:
    """Chart defaults merged with the ``-f`` files among ``options`` (the tests use ``--set`` only for probes)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    for flag, argument in itertools.pairwise(options):
        if flag == "-f":
            values = _deep_merge(values, yaml.safe_load(Path(argument).read_text(encoding="utf-8")))
    return values


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The real helm: $HELM if set, else the pinned binary fetched once into ./.tools/bin."""
    override = os.environ.get("HELM")
    try:
        binary = Path(override) if override else ensure_tools()["helm"]
    except ToolFetchError as exc:
        pytest.fail(f"cannot get helm: {exc}")
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def renders(helm: Helm) -> dict[str, Rendered]:
    """The chart rendered with the default values and with every values file in ci/."""
    found = {"default": helm.render("default")}
    for path in CI_VALUES:
        name = path.name.removesuffix("-values.yaml")
        found[name] = helm.render(name, "-f", str(path))
    return found


@pytest.fixture(scope="session")
def all_on(renders: dict[str, Rendered]) -> Rendered:
    return renders["all-on"]


def _all_renders(renders: dict[str, Rendered]) -> Iterator[Rendered]:
    yield from renders.values()


def _pod_specs(rendered: Rendered) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, pod metadata, pod spec) of every pod the manifests create, helm test hooks included."""
    for doc in rendered.docs:
        if doc["kind"] in WORKLOAD_KINDS:
            template = doc["spec"]["template"]
            yield f"{doc['kind']}/{doc['metadata']['name']}", template["metadata"], template["spec"]
        elif doc["kind"] == "Pod":
            yield f"Pod/{doc['metadata']['name']}", doc["metadata"], doc["spec"]


def _is_test_hook(metadata: dict[str, Any]) -> bool:
    return (metadata.get("annotations") or {}).get("helm.sh/hook") == "test"


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's literal env values (valueFrom entries map to '')."""
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


# ------------------------------------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "default")
def test_helm_lint_strict(helm: Helm, values_file: Path | None) -> None:
    options = ["-f", str(values_file)] if values_file else []
    result = helm.run("lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *options)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_every_option_file_turns_the_options_on(all_on: Rendered) -> None:
    """The all-on render really contains every optional resource kind (so the checks below see them all)."""
    kinds = {doc["kind"] for doc in all_on.docs}
    expected = {"Ingress", "HorizontalPodAutoscaler", "ScaledObject", "NetworkPolicy", "ServiceMonitor",
                "PodMonitor", "PrometheusRule", "StatefulSet", "PodDisruptionBudget", "Secret", "ServiceAccount"}
    assert expected <= kinds, f"missing: {sorted(expected - kinds)}"
    assert any(doc["metadata"]["name"].endswith("-dashboard") for doc in all_on.of_kind("ConfigMap"))


def test_core_manifests_validate_against_kubernetes_schemas(renders: dict[str, Rendered]) -> None:
    errors: list[str] = []
    validated = 0
    for rendered in _all_renders(renders):
        for doc in rendered.docs:
            if doc["kind"] in CUSTOM_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
                validated += 1
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                errors.append(f"{rendered.name}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{rendered.name}: {exc.message}")
    assert errors == []
    assert validated >= 40, f"only {validated} manifests validated"


def test_kubernetes_validation_catches_a_misspelt_field(renders: dict[str, Rendered]) -> None:
    """Negative control: strict validation rejects an unknown field, so a clean run above means something."""
    deployment = json.loads(json.dumps(renders["default"].deployment("worker")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"tcpSocket": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


# Structural schemas for the custom resources, limited to (and strict about) the fields the chart renders.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1},
                                                                  "labels": _STRING_MAP}}
_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
_DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          "(([0-9]+)s)?(([0-9]+)ms)?)$"}
_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "labelmap", "LabelMap"]},
    "targetLabel": {"type": "string"}, "replacement": {"type": "string"}, "regex": {"type": "string"},
    "sourceLabels": {"type": "array", "items": {"type": "string"}}}}
_ENDPOINT = {"type": "object", "required": ["port"], "additionalProperties": False, "properties": {
    "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"}, "interval": _DURATION,
    "scrapeTimeout": _DURATION, "relabelings": {"type": "array", "items": _RELABEL}}}
_NAMESPACE_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}}


def _custom_resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _META,
                           "spec": spec}}


CUSTOM_RESOURCE_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _custom_resource("monitoring.coreos.com/v1", "ServiceMonitor", {
        "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
        "properties": {"selector": _SELECTOR, "namespaceSelector": _NAMESPACE_SELECTOR,
                       "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}}),
    "PodMonitor": _custom_resource("monitoring.coreos.com/v1", "PodMonitor", {
        "type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
        "properties": {"selector": _SELECTOR, "namespaceSelector": _NAMESPACE_SELECTOR,
                       "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}}),
    "PrometheusRule": _custom_resource("monitoring.coreos.com/v1", "PrometheusRule", {
        "type": "object", "required": ["groups"], "additionalProperties": False,
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "rules"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                           "rules": {"type": "array", "items": {
                               "type": "object", "required": ["expr"], "additionalProperties": False,
                               "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                               "properties": {"alert": {"type": "string"}, "record": {"type": "string"},
                                              "expr": {"type": ["string", "integer"]}, "for": _DURATION,
                                              "keep_firing_for": _DURATION, "labels": _STRING_MAP,
                                              "annotations": _STRING_MAP}}}}}}}}),
    "ScaledObject": _custom_resource("keda.sh/v1alpha1", "ScaledObject", {
        "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
        "properties": {
            "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                               "properties": {"name": {"type": "string"}, "envSourceContainerName": {"type": "string"},
                                              "kind": {"type": "string"}, "apiVersion": {"type": "string"}}},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "advanced": {"type": "object", "additionalProperties": False, "properties": {
                "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                  "properties": {"behavior": {"type": "object"}}}}},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                # KEDA's CRD types trigger metadata as a map of strings: an unquoted number is rejected.
                "properties": {"type": {"enum": ["redis", "redis-sentinel", "prometheus"]}, "metadata": _STRING_MAP}}},
        }}),
}


def test_custom_resources_match_structural_schemas(renders: dict[str, Rendered]) -> None:
    checked: set[str] = set()
    for rendered in _all_renders(renders):
        for doc in rendered.docs:
            if doc["kind"] in CUSTOM_KINDS:
                jsonschema.Draft7Validator(CUSTOM_RESOURCE_SCHEMAS[doc["kind"]]).validate(doc)
                checked.add(doc["kind"])
    assert checked == CUSTOM_KINDS


def test_scaledobject_triggers_carry_what_each_scaler_requires(all_on: Rendered) -> None:
    triggers = all_on.one("ScaledObject", f"{RELEASE}-difyq-worker")["spec"]["triggers"]
    required = {"redis": {"address", "listName", "listLength"}, "prometheus": {"serverAddress", "query", "threshold"}}
    for trigger in triggers:
        assert required[trigger["type"]] <= set(trigger["metadata"]), trigger


# ---------------------------------------------------------------------------------------------------- hardening


def test_every_pod_runs_as_non_root_and_hardened(renders: dict[str, Rendered]) -> None:
    problems: list[str] = []
    for rendered in _all_renders(renders):
        for name, _metadata, spec in _pod_specs(rendered):
            where = f"{rendered.name}: {name}"
            pod_context = spec.get("securityContext", {})
            if spec.get("automountServiceAccountToken") is not False:
                problems.append(f"{where}: service account token mounted")
            if pod_context.get("runAsUser") == 0 or spec.get("hostNetwork") or spec.get("hostPID"):
                problems.append(f"{where}: root user or host namespaces")
            for container in spec["containers"] + spec.get("initContainers", []):
                context = {**pod_context, **container.get("securityContext", {})}
                label = f"{where}/{container['name']}"
                if context.get("runAsNonRoot") is not True or context.get("runAsUser") == 0:
                    problems.append(f"{label}: not runAsNonRoot")
                if context.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{label}: root filesystem writable")
                if context.get("allowPrivilegeEscalation") is not False or context.get("privileged"):
                    problems.append(f"{label}: privilege escalation allowed")
                if "ALL" not in context.get("capabilities", {}).get("drop", []) or \
                        context.get("capabilities", {}).get("add"):
                    problems.append(f"{label}: capabilities not all dropped")
                if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                    problems.append(f"{label}: seccomp profile is not RuntimeDefault")
                resources = container.get("resources", {})
                if not {"cpu", "memory"} <= set(resources.get("requests", {})) or \
                        "memory" not in resources.get("limits", {}):
                    problems.append(f"{label}: needs cpu and memory requests and a memory limit")
    assert problems == []


def test_every_long_running_container_has_probes_on_its_own_ports(renders: dict[str, Rendered]) -> None:
    problems: list[str] = []
    for rendered in _all_renders(renders):
        for name, metadata, spec in _pod_specs(rendered):
            if _is_test_hook(metadata):
                continue  # a one-shot `helm test` pod: it runs check-config and exits
            for container in spec["containers"]:
                label = f"{rendered.name}: {name}/{container['name']}"
                ports = {port["name"] for port in container.get("ports", [])}
                for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                    probe = container.get(kind)
                    if probe is None:
                        problems.append(f"{label}: no {kind}")
                        continue
                    target = probe.get("httpGet") or probe.get("tcpSocket")
                    if target is not None and target["port"] not in ports:
                        problems.append(f"{label}: {kind} uses port {target['port']!r}, not one of {sorted(ports)}")
    assert problems == []


def test_read_only_root_filesystem_leaves_the_needed_paths_writable(renders: dict[str, Rendered]) -> None:
    """/tmp is an emptyDir everywhere; the worker's multiprocess directory lies inside an emptyDir, below its
    mount point (the worker deletes and recreates the directory at start, which a mount point refuses)."""
    for rendered in _all_renders(renders):
        for name, _metadata, spec in _pod_specs(rendered):
            volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
            for container in spec["containers"]:
                writable = {mount["mountPath"] for mount in container.get("volumeMounts", [])
                            if "emptyDir" in volumes.get(mount["name"], {})}
                assert "/tmp" in writable, f"{rendered.name}: {name}: /tmp is not writable"
        worker = rendered.container("worker")
        worker_volumes = {v["name"]: v for v in rendered.deployment("worker")["spec"]["template"]["spec"]["volumes"]}
        multiproc = Path(_env(worker)["PROMETHEUS_MULTIPROC_DIR"])
        mounts = [Path(mount["mountPath"]) for mount in worker["volumeMounts"]
                  if "emptyDir" in worker_volumes[mount["name"]]]
        assert any(mount in multiproc.parents for mount in mounts), f"{multiproc} is not below an emptyDir mount"


def test_every_deployment_has_a_disruption_budget(renders: dict[str, Rendered]) -> None:
    for rendered in _all_renders(renders):
        budgets = [pdb["spec"]["selector"]["matchLabels"] for pdb in rendered.of_kind("PodDisruptionBudget")]
        for deployment in rendered.of_kind("Deployment"):
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert any(selector.items() <= labels.items() for selector in budgets), deployment["metadata"]["name"]


# --------------------------------------------------------------------------------------- worker shutdown, CLI


@pytest.mark.parametrize("job_time_limit", [None, 60, 3600])
def test_worker_grace_period_exceeds_the_job_time_limit(helm: Helm, job_time_limit: int | None) -> None:
    options = ["--set", f"worker.jobTimeLimitSeconds={job_time_limit}"] if job_time_limit else []
    rendered = helm.render("grace", *options)
    limit = job_time_limit or rendered.values["worker"]["jobTimeLimitSeconds"]
    spec = rendered.deployment("worker")["spec"]["template"]["spec"]
    assert int(_env(spec["containers"][0])["DIFYQ_WORKER_SHUTDOWN_TIMEOUT_MS"]) == limit * 1000
    assert spec["terminationGracePeriodSeconds"] > limit


def test_an_app_slower_than_the_job_time_limit_is_refused(helm: Helm) -> None:
    result = helm.template("--set", "config.apps.slow.api_key=${SLOW_KEY}", "--set", "config.apps.slow.mode=chat",
                           "--set", "config.apps.slow.timeout_s=1200", "--set", "secrets.env.SLOW_KEY=x")
    assert result.returncode != 0
    assert "config.apps.slow.timeout_s (1200 s) exceeds worker.jobTimeLimitSeconds (600 s)" in result.stderr


def test_only_the_worker_master_gets_sigterm(renders: dict[str, Rendered]) -> None:
    """No command override (the image's exec-form ENTRYPOINT stays PID 1), no shell, no shared PID namespace,
    no preStop hook: the kubelet's one SIGTERM goes to the Dramatiq master and nowhere else."""
    for rendered in _all_renders(renders):
        spec = rendered.deployment("worker")["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert "command" not in container
        assert container["args"][0] == "worker"
        assert not {"sh", "bash", "-c", "tini", "dumb-init"} & set(container["args"])
        assert spec.get("shareProcessNamespace") is False
        assert "lifecycle" not in container


def test_chart_arguments_are_accepted_by_the_difyq_cli(renders: dict[str, Rendered]) -> None:
    from difyq.producers.cli import build_parser

    for rendered in _all_renders(renders):
        for _name, _metadata, spec in _pod_specs(rendered):
            for container in spec["containers"]:
                if container["name"] == "redis":
                    continue
                try:
                    build_parser().parse_args(container["args"])
                except SystemExit:
                    pytest.fail(f"{rendered.name}: `difyq {' '.join(container['args'])}` is not a valid command")


@pytest.mark.parametrize("render_name", ["default", "all-on"])
def test_worker_command_hands_the_chart_settings_to_dramatiq(
    renders: dict[str, Rendered], render_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Runs ``difyq worker`` with the rendered args and env up to its exec of Dramatiq, and reads what Dramatiq
    would get: processes, threads, gevent, the shutdown timeout and the metrics port the probes use."""
    from difyq.producers import cli
    from difyq.worker import otel

    rendered = renders[render_name]
    container = rendered.container("worker")
    for name, value in _env(container).items():
        if value and "$(" not in value:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "run" / "prometheus"))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    config = tmp_path / "difyq.yaml"  # the worker reads the config's Redis settings before it execs Dramatiq
    config.write_text("{}\n", encoding="utf-8")
    monkeypatch.setenv("DIFYQ_CONFIG", str(config))
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, list(argv), dict(env))))

    assert cli.main(container["args"]) == 0
    assert otel.recorder() is None, "the worker's master execs Dramatiq: its processes set up their own traces"
    assert len(calls) == 1
    _path, argv, env = calls[0]

    def option(name: str) -> str:
        return argv[argv.index(name) + 1]

    worker = rendered.values["worker"]
    assert argv[0] == ("dramatiq-gevent" if worker["gevent"] else "dramatiq")
    assert int(option("--processes")) == worker["processes"]
    assert int(option("--threads")) == worker["threads"]
    assert env["dramatiq_queue_prefetch"] == str(worker["threads"])
    timeout_ms = int(option("--worker-shutdown-timeout"))
    assert timeout_ms == worker["jobTimeLimitSeconds"] * 1000
    grace = rendered.deployment("worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace * 1000 > timeout_ms
    metrics_port = next(port["containerPort"] for port in container["ports"] if port["name"] == "metrics")
    assert int(env["dramatiq_prom_port"]) == metrics_port


def test_api_listens_on_the_port_its_probes_and_service_use(renders: dict[str, Rendered]) -> None:
    for rendered in _all_renders(renders):
        if not rendered.values["api"]["enabled"]:
            continue
        container = rendered.container("api")
        args = container["args"]
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
        assert int(args[args.index("--port") + 1]) == port
        assert args[args.index("--host") + 1] == "0.0.0.0"
        service = rendered.one("Service", f"{RELEASE}-difyq-api")
        assert service["spec"]["ports"][0]["targetPort"] == "http"


# ----------------------------------------------------------------------------------------------------- scheduler


def test_scheduler_runs_several_replicas_only_with_the_lease(renders: dict[str, Rendered], helm: Helm) -> None:
    assert renders["default"].deployment("scheduler")["spec"]["replicas"] == 2
    for rendered in _all_renders(renders):
        scheduler = rendered.values["scheduler"]
        replicas = rendered.deployment("scheduler")["spec"]["replicas"]
        assert replicas <= 1 or scheduler["leaderLease"] is True, rendered.name
    refused = helm.template("--set", "scheduler.leaderLease=false", "--set", "scheduler.replicaCount=2")
    assert refused.returncode != 0
    assert "/scheduler/replicaCount" in refused.stderr and "maximum" in refused.stderr
    assert helm.template("--set", "scheduler.leaderLease=false", "--set", "scheduler.replicaCount=1").returncode == 0


# ------------------------------------------------------------------------------------------- config and secrets


def _secret_values(rendered: Rendered) -> set[str]:
    """Every value held by a Secret of the render (stringData as is, data base64-decoded)."""
    found: set[str] = set()
    for secret in rendered.of_kind("Secret"):
        found.update(str(value) for value in (secret.get("stringData") or {}).values())
        found.update(base64.b64decode(value).decode() for value in (secret.get("data") or {}).values())
    return {value for value in found if len(value) >= 8}


def test_no_secret_value_appears_outside_its_secret(renders: dict[str, Rendered]) -> None:
    for rendered in _all_renders(renders):
        secrets = _secret_values(rendered)
        values_secrets = {str(v) for v in (rendered.values["secrets"].get("env") or {}).values()}
        if rendered.values["redis"]["url"]:
            values_secrets.add(rendered.values["redis"]["url"])
        assert values_secrets <= secrets, f"{rendered.name}: a secret value is missing from the Secrets"
        for doc in rendered.docs:
            if doc["kind"] == "Secret":
                continue
            text = yaml.safe_dump(doc)
            leaked = [value for value in secrets if value in text]
            assert not leaked, f"{rendered.name}: {doc['kind']}/{doc['metadata']['name']} holds a secret value"


def test_config_map_holds_references_and_the_secret_holds_every_referenced_name(all_on: Rendered) -> None:
    config_text = all_on.one("ConfigMap", f"{RELEASE}-difyq-config")["data"]["difyq.yaml"]
    references = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", config_text))
    assert {"DIFY_SUPPORT_KEY", "DIFYQ_CRM_TOKEN", "GH_HOOK_SECRET", "DIFYQ_CALLBACK_SECRET"} <= references
    env_secret = all_on.one("Secret", f"{RELEASE}-difyq-env")
    assert references <= set(env_secret["stringData"])
    for component in DIFYQ_COMPONENTS:
        sources = [item["secretRef"]["name"] for item in all_on.container(component)["envFrom"]]
        assert env_secret["metadata"]["name"] in sources


def test_rendered_config_is_accepted_by_difyq(renders: dict[str, Rendered], monkeypatch: pytest.MonkeyPatch) -> None:
    """The difyq.yaml the chart renders, with the env the Secret provides, passes the processes' own validation."""
    from difyq.worker.config import parse_config

    for name in ("default", "all-on", "sentinel"):
        rendered = renders[name]
        for secret in rendered.of_kind("Secret"):
            for key, value in (secret.get("stringData") or {}).items():
                monkeypatch.setenv(key, str(value))
        text = rendered.one("ConfigMap", f"{RELEASE}-difyq-config")["data"]["difyq.yaml"]
        config = parse_config(yaml.safe_load(text), source=f"{name} difyq.yaml")
        assert set(config.apps) == set(rendered.values["config"]["apps"])


@pytest.mark.parametrize("field_path", SECRET_FIELD_PATHS)
def test_a_literal_secret_in_the_config_is_refused_without_echoing_it(helm: Helm, field_path: str) -> None:
    literal = "sk-literal-secret-value-0123456789"
    options = ["--set", "config.apps.support.api_key=${KEY}", "--set", "config.apps.support.mode=chat",
               "--set", "config.hooks.gh.app=support", "--set", "config.hooks.gh.verify.scheme=github",
               "--set", "config.hooks.gh.verify.secret=${KEY}", "--set", "config.clients.crm.token=${KEY}",
               "--set", "config.console.users.alice.token=${KEY}", "--set", "config.console.users.alice.role=operator",
               "--set", "config.redis.sentinel.nodes[0]=sentinel:26379",
               "--set", "secrets.env.KEY=value-of-key", "--set", f"{field_path}={literal}"]
    result = helm.template(*options)
    assert result.returncode != 0
    assert f"{field_path} must be a ${{ENV_NAME}} reference" in result.stderr
    assert literal not in result.stderr


def test_a_reference_without_a_secret_is_refused(helm: Helm) -> None:
    result = helm.template("--set", "config.apps.support.api_key=${DIFY_SUPPORT_KEY}",
                           "--set", "config.apps.support.mode=chat")
    assert result.returncode != 0
    assert "config references DIFY_SUPPORT_KEY but neither secrets.env nor extraEnv defines it" in result.stderr
    with_existing = helm.template("--set", "config.apps.support.api_key=${DIFY_SUPPORT_KEY}",
                                  "--set", "config.apps.support.mode=chat", "--set", "secrets.existingSecret=mine")
    assert with_existing.returncode == 0, with_existing.stderr


def _checksums(rendered: Rendered) -> dict[str, dict[str, str]]:
    return {component: {key: value for key, value in
                        rendered.deployment(component)["spec"]["template"]["metadata"]["annotations"].items()
                        if key.startswith("checksum/")}
            for component in DIFYQ_COMPONENTS}


def test_a_config_or_secret_change_rolls_the_pods(helm: Helm) -> None:
    base = ["--set", "redis.bundled.auth.existingSecret=redis-auth"]  # a generated password differs per render
    before = _checksums(helm.render("before", *base))
    unrelated = _checksums(helm.render("unrelated", *base, "--set", "api.replicaCount=5"))
    config = _checksums(helm.render("config", *base, "--set", "config.dify.base_url=https://dify.example/v1"))
    secret = _checksums(helm.render("secret", *base, "--set", "secrets.env.EXTRA=1"))
    for component in DIFYQ_COMPONENTS:
        assert unrelated[component] == before[component]
        assert config[component]["checksum/config"] != before[component]["checksum/config"]
        assert secret[component]["checksum/secret"] != before[component]["checksum/secret"]


# -------------------------------------------------------------------------------------------------------- redis


def test_bundled_redis_is_durable_and_never_evicts(all_on: Rendered) -> None:
    conf = all_on.one("ConfigMap", f"{RELEASE}-difyq-redis-config")["data"]["redis.conf"]
    settings = dict(line.split(maxsplit=1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert settings["appendonly"] == "yes"
    assert settings["maxmemory-policy"] == "noeviction"
    assert settings["dir"] == "/data"
    statefulset = all_on.one("StatefulSet", f"{RELEASE}-difyq-redis")
    assert statefulset["spec"]["replicas"] == 1
    claims = statefulset["spec"]["volumeClaimTemplates"]
    assert claims[0]["metadata"]["name"] == "data"
    assert claims[0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert all("valueFrom" in item for item in container["env"])


def test_difyq_reaches_the_bundled_redis_with_its_password(all_on: Rendered) -> None:
    env = all_on.container("worker")["env"]
    names = [item["name"] for item in env]
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL"), "$(REDIS_PASSWORD) must be defined first"
    assert _env(all_on.container("worker"))["REDIS_URL"] == f"redis://:$(REDIS_PASSWORD)@{RELEASE}-difyq-redis:6379/0"


def test_exactly_one_redis_must_be_chosen(helm: Helm) -> None:
    both = helm.template("--set", "redis.url=redis://r:6379/0")
    neither = helm.template("--set", "redis.bundled.enabled=false")
    for result in (both, neither):
        assert result.returncode != 0
        assert "choose one Redis" in result.stderr


def test_external_redis_url_lives_in_the_secret(renders: dict[str, Rendered]) -> None:
    rendered = renders["external-redis"]
    assert not rendered.of_kind("StatefulSet")
    env_secret = rendered.one("Secret", f"{RELEASE}-difyq-env")["stringData"]
    assert env_secret == {"REDIS_URL": rendered.values["redis"]["url"],
                          "REDIS_PASSWORD": "FAKE-redis-password-must-not-leak"}
    for component in DIFYQ_COMPONENTS:
        sources = [item["secretRef"]["name"] for item in rendered.container(component)["envFrom"]]
        assert sources == [f"{RELEASE}-difyq-env", "difyq-app-secrets"]


def test_sentinel_settings_reach_every_difyq_container(renders: dict[str, Rendered]) -> None:
    """With redis.sentinel.nodes each process gets the sentinels, the master name and the sentinels' password
    (from its Secret), next to the URL that gives the servers' password and database; difyq accepts them."""
    from difyq.worker.redis_connect import sentinel_settings

    rendered = renders["sentinel"]
    sentinel = rendered.values["redis"]["sentinel"]
    assert not rendered.of_kind("StatefulSet")
    for component in DIFYQ_COMPONENTS:
        env = {item["name"]: item for item in rendered.container(component)["env"]}
        assert env["REDIS_SENTINELS"]["value"] == ",".join(sentinel["nodes"])
        assert env["REDIS_SENTINEL_MASTER"]["value"] == sentinel["master"]
        assert env["REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": sentinel["existingSecret"], "key": sentinel["existingSecretPasswordKey"]}
        settings = sentinel_settings(None, {name: item.get("value", "secret") for name, item in env.items()})
        assert settings is not None and settings.master == sentinel["master"]
        assert [f"{host}:{port}" for host, port in settings.addresses()] == sentinel["nodes"]
    config = yaml.safe_load(rendered.one("ConfigMap", f"{RELEASE}-difyq-config")["data"]["difyq.yaml"])
    assert config["redis"]["durable_submit"] is True


def test_tracing_settings_reach_every_difyq_container(renders: dict[str, Rendered]) -> None:
    """tracing.otlpEndpoint turns traces on in every process through the standard OTEL_* variables, which difyq's
    own switch reads; without it no process asks for traces."""
    from difyq.worker import otel

    rendered = renders["all-on"]
    tracing = rendered.values["tracing"]
    for component in DIFYQ_COMPONENTS:
        env = {item["name"]: item for item in rendered.container(component)["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == tracing["otlpEndpoint"]
        assert env["OTEL_SERVICE_NAME"]["value"] == tracing["serviceName"]
        assert env["OTEL_TRACES_SAMPLER"]["value"] == tracing["sampler"]
        assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == tracing["samplerArg"]
        assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"] == {
            "name": tracing["headersSecret"], "key": tracing["headersSecretKey"]}
        assert otel.wanted({name: item.get("value", "secret") for name, item in env.items()})
        default_env = {item["name"]: item.get("value", "") for item in renders["default"].container(component)["env"]}
        assert not otel.wanted(default_env)
        assert not any(name.startswith("OTEL_") for name in default_env)


def test_sentinel_cannot_go_with_the_bundled_redis(helm: Helm) -> None:
    nodes = "redis.sentinel.nodes[0]=sentinel:26379"
    bundled = helm.template("--set", nodes)
    both_urls = helm.template("--set", nodes, "--set", "redis.bundled.enabled=false", "--set",
                              "redis.url=redis://:p@r:6379/0", "--set", "redis.existingSecret=redis-url")
    for result in (bundled, both_urls):
        assert result.returncode != 0
        assert "redis.sentinel.nodes needs redis.bundled.enabled=false" in result.stderr
    alone = helm.template("--set", nodes, "--set", "redis.bundled.enabled=false")
    assert alone.returncode == 0, alone.stderr


# ------------------------------------------------------------------------------------------------------ scaling


def test_keda_scales_on_the_ready_queues_and_the_messages_in_flight(all_on: Rendered) -> None:
    scaled = all_on.one("ScaledObject", f"{RELEASE}-difyq-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == f"{RELEASE}-difyq-worker"
    redis_triggers = [t["metadata"] for t in scaled["triggers"] if t["type"] == "redis"]
    assert [t["listName"] for t in redis_triggers] == ["difyq:jobs", "difyq:low-lane:jobs", "difyq:callbacks"]
    assert all(t["passwordFromEnv"] == "REDIS_PASSWORD" for t in redis_triggers)
    assert all(t["address"] == f"{RELEASE}-difyq-redis.default.svc:6379" for t in redis_triggers)
    in_flight = next(t["metadata"] for t in scaled["triggers"] if t["type"] == "prometheus")
    assert "dramatiq_messages_inprogress" in in_flight["query"]
    worker = all_on.values["worker"]
    assert int(in_flight["threshold"]) == worker["processes"] * worker["threads"]
    assert "replicas" not in all_on.deployment("worker")["spec"]
    assert not [hpa for hpa in all_on.of_kind("HorizontalPodAutoscaler") if hpa["metadata"]["name"].endswith("worker")]


def test_keda_reads_an_external_redis_from_its_url(helm: Helm) -> None:
    rendered = helm.render("keda-external", "-f", str(CHART / "ci" / "external-redis-values.yaml"),
                           "--set", "worker.autoscaling.type=keda")
    trigger = rendered.one("ScaledObject", f"{RELEASE}-difyq-worker")["spec"]["triggers"][0]["metadata"]
    assert trigger == {"address": "redis.example.internal:6380", "listName": "difyq-prod:jobs",
                       "listLength": "10", "activationListLength": "0", "databaseIndex": "2", "enableTLS": "true",
                       "passwordFromEnv": "REDIS_PASSWORD"}


def test_keda_asks_the_sentinels_for_the_primary(renders: dict[str, Rendered]) -> None:
    rendered = renders["sentinel"]
    sentinel = rendered.values["redis"]["sentinel"]
    trigger = rendered.one("ScaledObject", f"{RELEASE}-difyq-worker")["spec"]["triggers"][0]
    assert trigger == {"type": "redis-sentinel", "metadata": {
        "addresses": ",".join(sentinel["nodes"]), "sentinelMaster": sentinel["master"],
        "sentinelPasswordFromEnv": "REDIS_SENTINEL_PASSWORD", "listName": "difyq-ha:jobs", "listLength": "10",
        "activationListLength": "0", "databaseIndex": "3", "enableTLS": "false", "passwordFromEnv": "REDIS_PASSWORD"}}


def test_hpa_mode_scales_the_workers_on_cpu(renders: dict[str, Rendered]) -> None:
    rendered = renders["external-redis"]
    hpa = rendered.one("HorizontalPodAutoscaler", f"{RELEASE}-difyq-worker")["spec"]
    assert hpa["scaleTargetRef"]["name"] == f"{RELEASE}-difyq-worker"
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert not rendered.of_kind("ScaledObject")
    assert "replicas" not in rendered.deployment("worker")["spec"]


# ------------------------------------------------------------------------------------------------ network policy


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    return policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_network_policies_limit_egress(all_on: Rendered) -> None:
    policies = all_on.of_kind("NetworkPolicy")
    private = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}
    covered = set()
    for _name, metadata, _spec in _pod_specs(all_on):
        if _is_test_hook(metadata):
            continue
        mine = [policy for policy in policies if _selects(policy, metadata["labels"])]
        assert len(mine) == 1, metadata["labels"]
        policy = mine[0]["spec"]
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
        component = metadata["labels"]["app.kubernetes.io/component"]
        for rule in policy["egress"]:
            assert rule.get("to") or rule.get("ports"), f"{component}: an egress rule allows everything"
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block and block["cidr"] == "0.0.0.0/0":
                    assert component == "worker", f"{component} may reach the internet"
                    assert private <= set(block.get("except", [])), "private ranges must stay blocked"
        if component == "redis":
            assert policy["egress"] == []
        covered.add(component)
    assert covered == {*DIFYQ_COMPONENTS, "redis"}


# ------------------------------------------------------------------------------------------------ observability


def _alert_job_patterns() -> set[str]:
    text = (CHART / "files" / "difyq-alerts.yaml").read_text(encoding="utf-8")
    return set(re.findall(r'job=~"([^"]+)"', text))


@pytest.mark.parametrize("options", [[], ["--set", "fullnameOverride=acme"]], ids=["default-name", "override"])
def test_scrape_jobs_match_what_the_alerts_and_dashboard_expect(helm: Helm, options: list[str]) -> None:
    rendered = helm.render("monitors", "-f", str(CHART / "ci" / "all-on-values.yaml"), *options)
    jobs = {}
    for doc in rendered.of_kind("PodMonitor") + rendered.of_kind("ServiceMonitor"):
        endpoints = doc["spec"].get("podMetricsEndpoints") or doc["spec"]["endpoints"]
        relabel = next(r for r in endpoints[0]["relabelings"] if r["targetLabel"] == "job")
        jobs[doc["metadata"]["labels"]["app.kubernetes.io/component"]] = relabel["replacement"]
    assert set(jobs) == set(DIFYQ_COMPONENTS)
    patterns = _alert_job_patterns()
    assert patterns, "the alert rules name no scrape job"
    dashboard = json.loads((CHART / "files" / "difyq.json").read_text(encoding="utf-8"))
    patterns |= {v["query"] for v in dashboard.get("templating", {}).get("list", []) if v["name"].endswith("_job")}
    for pattern in patterns:
        component = next((c for c in DIFYQ_COMPONENTS if c in pattern), None)
        assert component, f"cannot tell which component {pattern!r} means"
        assert re.fullmatch(pattern, jobs[component]), f"{jobs[component]!r} does not match {pattern!r}"


def test_service_monitor_scrapes_the_api_service(all_on: Rendered) -> None:
    monitor = all_on.one("ServiceMonitor", f"{RELEASE}-difyq-api")["spec"]
    service = all_on.one("Service", f"{RELEASE}-difyq-api")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {port["name"] for port in service["spec"]["ports"]}
    for component in ("worker", "scheduler"):
        pod_monitor = all_on.one("PodMonitor", f"{RELEASE}-difyq-{component}")["spec"]
        labels = all_on.deployment(component)["spec"]["template"]["metadata"]["labels"]
        assert pod_monitor["selector"]["matchLabels"].items() <= labels.items()


def test_prometheus_rule_carries_the_alert_file(all_on: Rendered) -> None:
    source = yaml.safe_load((CHART / "files" / "difyq-alerts.yaml").read_text(encoding="utf-8"))["groups"]
    rendered = all_on.one("PrometheusRule", f"{RELEASE}-difyq")["spec"]["groups"]
    assert [group["name"] for group in rendered] == [group["name"] for group in source]
    for mine, theirs in zip(rendered, source, strict=True):
        if mine["name"] == "difyq-budget":
            budget = all_on.values["metrics"]["prometheusRule"]["spendBudgetPerHour"]
            assert {(r["labels"]["currency"], r["expr"]) for r in mine["rules"]} == \
                {(currency, f"vector({amount})") for currency, amount in budget.items()}
        else:
            assert mine == theirs


def test_dashboard_config_map_is_labelled_for_the_grafana_sidecar(all_on: Rendered) -> None:
    config_map = all_on.one("ConfigMap", f"{RELEASE}-difyq-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    shipped = json.loads((CHART / "files" / "difyq.json").read_text(encoding="utf-8"))
    assert json.loads(config_map["data"]["difyq.json"]) == shipped


@pytest.mark.parametrize("name", ["difyq.json", "difyq-alerts.yaml"])
def test_chart_copies_of_the_grafana_files_are_identical(name: str) -> None:
    source = REPO / "grafana" / name
    if not source.exists():
        pytest.skip(f"grafana/{name} does not exist yet; the chart carries its own placeholder")
    copy = CHART / "files" / name
    assert copy.read_bytes() == source.read_bytes(), (
        f"helm/difyq/files/{name} differs from grafana/{name}: cp grafana/{name} helm/difyq/files/{name}")


# ------------------------------------------------------------------------------------------- values and schema


@pytest.mark.parametrize(("options", "expected"), [
    (["--set", "worker.threads=0"], "at '/worker/threads': minimum: got 0, want 1"),
    (["--set", "worker.thread=8"], "additional properties 'thread' not allowed"),
    (["--set", "log.format=xml"], "at '/log/format'"),
    (["--set", "image.digest=latest"], "at '/image/digest'"),
    (["--set", "api.readinessPath=/"], "at '/api/readinessPath'"),
    (["--set", "worker.autoscaling.type=vpa"], "at '/worker/autoscaling/type'"),
    (["--set", "worker.gevent=yes"], "at '/worker/gevent'"),
    (["--set", "tracing.sampler=sometimes"], "at '/tracing/sampler'"),
    (["--set", "tracing.otlpEndpoint=collector:4318"], "at '/tracing/otlpEndpoint'"),
    (["--set", "redis.url=http://redis:6379"], "at '/redis/url'"),
    (["--set", "config.apps.a.mode=chatbot", "--set", "config.apps.a.api_key=${K}"], "at '/config/apps/a/mode'"),
    (["--set", "config.jobs.result_ttl=forever"], "at '/config/jobs/result_ttl'"),
    (["--set", "config.redis.prefix=x"], "additional properties 'prefix' not allowed"),
    (["--set", "worker.autoscaling.type=hpa", "--set", "worker.autoscaling.minReplicas=0"],
     "at '/worker/autoscaling/minReplicas'"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_a_wrong_value_is_rejected_by_the_schema(helm: Helm, options: list[str], expected: str) -> None:
    result = helm.template(*options)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert expected in result.stderr, result.stderr


def test_default_ingress_exposes_only_the_jobs_api_and_the_hooks(helm: Helm) -> None:
    rendered = helm.render("ingress", "--set", "api.ingress.enabled=true")
    paths = {p["path"] for rule in rendered.one("Ingress", f"{RELEASE}-difyq-api")["spec"]["rules"]
             for p in rule["http"]["paths"]}
    assert paths == {"/v1", "/hooks"}


def _value_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _value_paths(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", readme, flags=re.MULTILINE))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    leaves = list(_value_paths(values))
    undocumented = [leaf for leaf in leaves if not any(leaf == d or leaf.startswith(f"{d}.") for d in documented)]
    assert undocumented == []
    stale = [d for d in documented if not any(leaf == d or leaf.startswith(f"{d}.") for leaf in leaves)]
    assert stale == []


def test_values_schema_config_is_generated_from_the_config_model() -> None:
    """values.schema.json checks `config` at install: it holds exactly the keys, types, bounds and allowed values
    of worker/config.py, as tests/support/config_schema.py generates them."""
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert schema["properties"]["config"] == config_schema(), (
        "helm/difyq/values.schema.json's `config` differs from the config model in worker/config.py: run "
        "`.venv/bin/python -m tests.support.config_schema --write` and commit the result")


def _enum_settings() -> list[Setting]:
    from difyq.worker.config import Config

    return [setting for setting in settings(Config) if setting.type_name == "one of"]


def _document_at(path: str, value: Any) -> tuple[dict[str, Any], list[str]]:
    """A config holding ``value`` at ``path`` (map names become ``x``), and the JSON path of that value."""
    parts = ["x" if part == MAP_SEGMENT else part for part in path.split(".")]
    document: dict[str, Any] = {}
    node = document
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return document, parts


@pytest.mark.parametrize("setting", _enum_settings(), ids=lambda setting: setting.path)
def test_the_chart_schema_takes_every_allowed_value_and_refuses_others(setting: Setting) -> None:
    """Each allowed value of the model passes the chart's schema at its place, and a value outside them fails."""
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator({**schema["properties"]["config"], "definitions": schema["definitions"]})
    values = setting.allowed.split(", ")
    for value in [*values, "not-an-allowed-value"]:
        document, location = _document_at(setting.path, value)
        at_value = [error.message for error in validator.iter_errors(document) if list(error.absolute_path) == location]
        assert bool(at_value) == (value not in values), f"{setting.path} = {value!r}: {at_value}"


def test_every_app_mode_of_the_model_installs(helm: Helm) -> None:
    """`helm template` (the schema check of `helm install`) accepts an app of every mode the model allows."""
    from difyq.worker.config import AppConfig

    modes = typing.get_args(AppConfig.model_fields["mode"].annotation)
    options = ["--set", "secrets.env.KEY=value-of-key"]
    for index, mode in enumerate(modes):
        options += ["--set", f"config.apps.app{index}.api_key=${{KEY}}", "--set", f"config.apps.app{index}.mode={mode}"]
    result = helm.template(*options)
    assert result.returncode == 0, result.stderr
