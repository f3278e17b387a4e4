"""Recording the limiter in Prometheus: ``difyq_rate_limited_total`` and ``difyq_rate_limit_remaining``.

Labels are the configured app name and the limit, never a key or key id.
"""

from __future__ import annotations

from difyq.worker.limits.admission import Admission
from difyq.worker.metrics import rate_limit_remaining, rate_limited


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
