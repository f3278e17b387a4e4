"""submit(): the one path by which the API, webhook routes, the scheduler and the CLI create jobs."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from worker import metrics
from worker.callbacks.ssrf import BlockedDestination, check_destination
from worker.jobs.model import JobRequest, NewJob
from worker.jobs.store import SubmitOutcome
from worker.runtime import Runtime

log = structlog.get_logger("difyq.producers")


@dataclass(frozen=True)
class SubmitRejected(Exception):
    """A submission that cannot become a job; ``status`` is the HTTP status a producer answers with."""

    status: int
    code: str
    message: str
    field: str | None = None


def submit(
    runtime: Runtime,
    *,
    app: str,
    source: str,
    request: JobRequest,
    callback_url: str | None = None,
    idempotency_key: str | None = None,
    scope: str,
    request_id: str | None = None,
) -> SubmitOutcome:
    """Validate, claim the idempotency key, store and enqueue; raise SubmitRejected or IdempotencyConflict."""
    if app not in runtime.config.apps:
        raise SubmitRejected(404, "unknown_app", f"no app named {app!r} is configured", "app")
    if callback_url:
        if not runtime.config.callbacks.signing_secrets():
            raise SubmitRejected(422, "callbacks_not_configured",
                                 "callbacks.signing_secret is not set, so no callback can be signed", "callback_url")
        try:
            check_destination(callback_url, runtime.config.callbacks.allow_hosts)
        except BlockedDestination as exc:
            raise SubmitRejected(422, "callback_url_blocked", str(exc), "callback_url") from None
    outcome = runtime.store.submit(
        NewJob(app=app, source=source, request=request, callback_url=callback_url,
               idempotency_key=idempotency_key, scope=scope, request_id=request_id)
    )
    if outcome.created:
        metrics.jobs_submitted.labels(app=app, source=source).inc()
        log.info("job_submitted", job_id=outcome.job["id"], app=app, source=source)
    else:
        metrics.jobs_deduplicated.labels(app=app, source=source).inc()
        log.info("job_deduplicated", job_id=outcome.job["id"], app=app, source=source)
    return outcome
