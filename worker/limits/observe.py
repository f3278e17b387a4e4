"""Recording the limiter in Prometheus: ``difyq_rate_limited_total``, ``difyq_rate_limit_remaining`` and the fair
line's ``difyq_fair_tenants_waiting`` and ``difyq_fair_largest_backlog``.

Labels are the configured app name and the limit, never a key or key id, and never a tenant (tenants are
unbounded: customer ids).
"""

from __future__ import annotations

from difyq.worker.limits.admission import Admission
from difyq.worker.limits.limiter import FairLine
from difyq.worker.metrics import fair_largest_backlog, fair_tenants_waiting, rate_limit_remaining, rate_limited


def record_deferral(app: str, admission: Admission) -> None:
    """Count one job deferred by ``admission.limit`` (nothing for an admitted job)."""
    if not admission.admitted and admission.limit:
        rate_limited.labels(app=app, limit=admission.limit).inc()


def record_upstream_limited(app: str) -> None:
    """Count one Dify or provider 429 that put the key in cooldown."""
    rate_limited.labels(app=app, limit="upstream").inc()


def publish_remaining(app: str, remaining: dict[str, float]) -> None:
    """Set the remaining-capacity gauge of each configured limit of ``app``."""
    for limit, value in remaining.items():
        rate_limit_remaining.labels(app=app, limit=limit).set(value)


def publish_fair_line(app: str, line: FairLine) -> None:
    """Set the fair-line gauges of ``app`` (``fairness: tenant``)."""
    fair_tenants_waiting.labels(app=app).set(line.tenants)
    fair_largest_backlog.labels(app=app).set(line.largest_backlog)
