"""What the user documentation's metrics and Redis tables say, and how a live run differs from them: shared by
tests/test_docs.py and the end-to-end run of tests/test_observability_e2e.py, which has every metric and key."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from tests.support.markdown import DOCS, table, tables, unquote

METRICS = DOCS / "metrics.md"
ARCHITECTURE = DOCS / "architecture.md"
METRIC_COLUMNS = ("metric", "type", "labels", "meaning")
REDIS_COLUMNS = ("key", "type", "holds")


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """metric name (counters with ``_total``) -> (type, label names), from every metrics table of docs/metrics.md."""
    found = {}
    for documented in (t for t in tables(METRICS) if t.header == METRIC_COLUMNS):
        for name, kind, labels, _ in documented.rows:
            found[unquote(name)] = (kind, {label.strip() for label in labels.split(",") if label.strip()})
    return found


def exposed_families(text: str) -> dict[str, tuple[str, set[str] | None]]:
    """difyq_* and dramatiq_* families of a scrape: name (counters with ``_total``) -> (type, label names of its
    samples, None when it has none)."""
    found: dict[str, tuple[str, set[str] | None]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(("difyq_", "dramatiq_")) or family.name.endswith("_created"):
            continue
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {label for sample in family.samples for label in sample.labels if label != "le"}
        found[name] = (family.type, labels if family.samples else None)
    return found


def metrics_table_problems(scrapes: dict[str, str]) -> list[str]:
    """How docs/metrics.md differs from what the processes expose in ``scrapes`` (process -> scrape text). A
    Dramatiq family appears only once a worker touched it, so a documented one missing from the scrapes is no
    problem; every difyq family must be there."""
    documented = documented_metrics()
    exposed: dict[str, tuple[str, set[str] | None]] = {}
    for text in scrapes.values():
        for name, (kind, labels) in exposed_families(text).items():
            known = exposed.get(name, (kind, None))[1]
            exposed[name] = (kind, labels if labels is not None else known)
    problems = []
    for name, (kind, labels) in sorted(exposed.items()):
        if name not in documented:
            problems.append(f"add | `{name}` | {kind} | {', '.join(sorted(labels or []))} | <meaning> |")
            continue
        documented_kind, documented_labels = documented[name]
        if documented_kind != kind:
            problems.append(f"`{name}`: the table says {documented_kind}, the registry {kind}")
        if labels is not None and labels != documented_labels:
            problems.append(f"`{name}`: the table says labels {sorted(documented_labels)}, the samples carry "
                            f"{sorted(labels)}")
    for name in sorted(set(documented) - set(exposed)):
        if name.startswith("difyq_"):
            problems.append(f"`{name}` is in the table but no process exposes it: remove its row")
    return problems


def _placeholder(name: str) -> str:
    """What a ``{placeholder}`` of the Redis table stands for: a queue is one of difyq's queues (or its delay or
    dead-letter queue), a scope, a fire time or a worker id (``host:pid:token``) may hold colons, anything else is one
    key segment."""
    from difyq.worker.jobs.messages import CALLBACKS_QUEUE, JOBS_QUEUE

    if name == "ns":
        return "(?P<ns>[^:]+)"
    if name == "queue":
        return f"(?:{JOBS_QUEUE}|{CALLBACKS_QUEUE})(?:\\.DQ|\\.XQ)?"
    if name in ("scope", "time", "worker"):
        return ".+"
    return "[^:]+"


def redis_key_patterns() -> list[tuple[str, re.Pattern[str]]]:
    """docs/architecture.md's Redis keys as (pattern, regex); see ``_placeholder`` for the ``{…}`` parts."""
    found = []
    for row in table(ARCHITECTURE, *REDIS_COLUMNS).rows:
        pattern = unquote(row[0])
        parts = re.split(r"\{([^}]*)\}", pattern)
        regex = "".join(_placeholder(part) if index % 2 else re.escape(part) for index, part in enumerate(parts))
        found.append((pattern, re.compile(regex)))
    return found


def undocumented_redis_keys(keys: list[str], namespace: str) -> list[str]:
    """The keys under ``namespace`` that no row of the Redis table describes."""
    patterns = redis_key_patterns()
    return sorted(key for key in keys
                  if not any((m := regex.fullmatch(key)) and m.group("ns") == namespace for _, regex in patterns))

