"""Every difyq Prometheus metric (docs/metrics.md), defined once and imported by whichever process records it.

Labels are bounded: app, source, status, code, queue, limit, outcome, hook, schedule, route. Never a job id, a
user or a key. In worker processes prometheus-client's multiprocess mode is on (PROMETHEUS_MULTIPROC_DIR), so
gauges declare how they aggregate across processes.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from difyq.worker.jobs.schema import FINAL_STATUSES, JobStatus

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

jobs_submitted = Counter("difyq_jobs_submitted_total", "Jobs accepted by a producer.", ["app", "source"])
jobs_deduplicated = Counter(
    "difyq_jobs_deduplicated_total", "Submissions answered with an existing job (idempotency).", ["app", "source"]
)
submits_refused = Counter(
    "difyq_submits_refused_total",
    "Submissions refused to protect the service (reason: max_pending, memory_guard).",
    ["app", "source", "reason"],
)
redis_memory_guard_active = Gauge(
    "difyq_redis_memory_guard_active",
    "1 while Redis' used_memory is over redis.memory_guard of its maxmemory and submits answer 503.",
    multiprocess_mode="max",
)
redis_memory_used_ratio = Gauge(
    "difyq_redis_memory_used_ratio",
    "Redis' used_memory / maxmemory at the last reading (0 without a maxmemory).",
    multiprocess_mode="max",
)
orphaned_jobs_requeued = Counter(
    "difyq_orphaned_jobs_requeued_total",
    "Queued or paused jobs found without a message that would run them, and queued again by the orphan sweep.",
    ["app"],
)
orphaned_callbacks_requeued = Counter(
    "difyq_orphaned_callbacks_requeued_total",
    "Pending callbacks found without a message that would deliver them, and given one by the orphan sweep.",
    ["app"],
)
jobs_finished = Counter("difyq_jobs_finished_total", "Jobs that reached a final status.", ["app", "status"])
job_duration = Histogram(
    "difyq_job_duration_seconds", "Submit to finish, per job.", ["app"], buckets=LATENCY_BUCKETS
)
job_queue_wait = Histogram(
    "difyq_job_queue_wait_seconds", "Submit to first Dify attempt, per job.", ["app"], buckets=LATENCY_BUCKETS
)
dify_request_duration = Histogram(
    "difyq_dify_request_duration_seconds",
    "One Dify call, request to last event.",
    ["app", "outcome"],
    buckets=LATENCY_BUCKETS,
)
dify_time_to_first_token = Histogram(
    "difyq_dify_time_to_first_token_seconds", "Request to first answer delta.", ["app"], buckets=LATENCY_BUCKETS
)
files_transferred = Counter(
    "difyq_files_transferred_total",
    "Job files passed to Dify, by how (transfer) and how it went (outcome: ok or the failure's code).",
    ["app", "transfer", "outcome"],
)
file_bytes = Counter("difyq_file_bytes_total", "Bytes of job files uploaded to Dify.", ["app", "transfer"])
dify_errors = Counter("difyq_dify_errors_total", "Failed Dify calls by Dify's error code.", ["app", "code"])
tokens = Counter("difyq_tokens_total", "Tokens Dify reported, by type.", ["app", "type"])
cost = Counter("difyq_cost_total", "Dify's total_price, summed.", ["app", "currency"])
rate_limited = Counter(
    "difyq_rate_limited_total", "Jobs deferred by a limit (upstream = a Dify or provider 429).", ["app", "limit"]
)
fair_tenants_waiting = Gauge(
    "difyq_fair_tenants_waiting",
    "Tenants with jobs waiting in the fair line of an app's key (fairness: tenant).",
    ["app"],
    multiprocess_mode="mostrecent",
)
fair_largest_backlog = Gauge(
    "difyq_fair_largest_backlog",
    "Rounds of an app's fair line the tenant with the most jobs waiting still holds (fairness: tenant).",
    ["app"],
    multiprocess_mode="mostrecent",
)
rate_limit_remaining = Gauge(
    "difyq_rate_limit_remaining",
    "What is left of each limit of an app's key in the current 60 s window.",
    ["app", "limit"],
    multiprocess_mode="mostrecent",
)
budget_refused = Counter(
    "difyq_budget_refused_total",
    "Jobs a spend budget had no room for, by what became of them (outcome: deferred, failed).",
    ["budget", "outcome"],
)
callback_deliveries = Counter(
    "difyq_callback_deliveries_total", "Callback attempts by outcome.", ["outcome"]
)
callback_duration = Histogram(
    "difyq_callback_duration_seconds", "One callback POST.", buckets=LATENCY_BUCKETS
)
hook_requests = Counter("difyq_hook_requests_total", "Inbound webhook requests by outcome.", ["hook", "outcome"])
schedule_fires = Counter("difyq_schedule_fires_total", "Cron fires by outcome.", ["schedule", "outcome"])
schedule_last_fire = Gauge(
    "difyq_schedule_last_fire_timestamp_seconds",
    "Unix time of a schedule's last fire.",
    ["schedule"],
    multiprocess_mode="max",
)
schedule_paused = Gauge(
    "difyq_schedule_paused",
    "1 while a schedule is paused (from the console): it fires nothing and is not silent.",
    ["schedule"],
    multiprocess_mode="max",
)
schedule_interval = Gauge(
    "difyq_schedule_interval_seconds",
    "The period between a schedule's fires, for the silent-schedule alert.",
    ["schedule"],
    multiprocess_mode="max",
)
http_requests = Counter(
    "difyq_http_requests_total", "API requests by route template and status.", ["method", "route", "status"]
)
http_request_duration = Histogram(
    "difyq_http_request_duration_seconds", "API request duration by route template.", ["method", "route"],
    buckets=LATENCY_BUCKETS,
)

FINISHED_STATUSES = tuple(status.value for status in JobStatus if status in FINAL_STATUSES)
CALLBACK_OUTCOMES = ("delivered", "retried", "failed", "blocked")


def zero_worker_series(apps: Iterable[str]) -> None:
    """Create at 0 the worker's counters that alerts and ratios read: jobs finished per configured app and
    status, callback deliveries per outcome.

    A labelled counter has no series before its first increment, and a series that first shows up at 1 has no
    increase in Prometheus: the first callback given up after a worker start would never reach
    DifyqCallbackDeliveriesFailing, and an app whose every job fails would have no success ratio at all.
    """
    for app in apps:
        for status in FINISHED_STATUSES:
            jobs_finished.labels(app=app, status=status)
    for outcome in CALLBACK_OUTCOMES:
        callback_deliveries.labels(outcome=outcome)
