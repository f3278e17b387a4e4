"""submit(): the one path by which the API, webhook routes, the scheduler and the CLI create jobs; submit_async()
is the same path for the API's event loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import redis
import redis.asyncio
import structlog

from difyq.producers.submission import JobSubmission
from difyq.worker import metrics, tracing
from difyq.worker.callbacks.ssrf import (
    BlockedDestination,
    UnresolvableDestination,
    addresses_of,
    check_destination,
    is_ip_literal,
    resolve_host,
)
from difyq.worker.dify.models import CHAT_MODES
from difyq.worker.files.references import file_references
from difyq.worker.jobs.messages import JOBS_QUEUE
from difyq.worker.jobs.model import NewJob, job_id_of_trace
from difyq.worker.jobs.store import SubmitOutcome, TooManyPending
from difyq.worker.memory_guard import MemoryGuard
from difyq.worker.runtime import Runtime

log = structlog.get_logger("difyq.producers")

# How long an event-loop submit waits for Redis (the sync clients' socket timeout, worker.runtime), counting only
# the time the loop has to spare: a turn of it within _BUSY_TURN_S.
REDIS_REPLY_TIMEOUT_S = 2.0
_BUSY_TURN_S = 0.05

# The Retry-After of a submit refused for backpressure: a max_pending cap frees as jobs finish, Redis memory as
# results expire or an operator acts, which takes longer.
TOO_MANY_PENDING_RETRY_AFTER_S = 30
MEMORY_GUARD_RETRY_AFTER_S = 60

T = TypeVar("T")


@dataclass(eq=False)  # not frozen: raising sets the exception's __traceback__
class SubmitRejected(Exception):
    """A submission that cannot become a job; ``status`` is the HTTP status a producer answers with, and
    ``retry_after`` (seconds) its ``Retry-After`` when trying again later may succeed."""

    status: int
    code: str
    message: str
    field: str | None = None
    retry_after: int | None = None

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None


def submit(runtime: Runtime, submission: JobSubmission, *, source: str, scope: str,
           request_id: str | None = None) -> SubmitOutcome:
    """Validate, claim the idempotency key, store and enqueue; raise SubmitRejected or IdempotencyConflict (or
    pydantic's ValidationError for a request the job model refuses)."""
    new = _new_job(runtime, submission.new_job(source=source, scope=scope, request_id=request_id))
    for guarded in _guarded_urls(runtime, new):
        _reject_blocked(guarded, _verdict(guarded))
    if _observed(runtime.memory_guard, runtime.memory_guard.full(runtime.redis)):
        raise _memory_guard_refusal(new.app, source)
    with tracing.submitting(_span_attributes(new.app, source)) as span:
        try:
            outcome = runtime.store.submit(_traced(new, span))
        except TooManyPending as exc:
            raise _pending_refusal(exc, new.app, source) from None
        return _counted(outcome, new.app, source, span)


async def submit_async(runtime: Runtime, client: redis.asyncio.Redis, submission: JobSubmission, *, source: str,
                       scope: str, request_id: str | None = None) -> SubmitOutcome:
    """``submit`` on an event loop over ``client`` (a ``Runtime.async_redis``), never blocking it: a callback
    host that is a name is resolved by the loop (off its thread), an IP literal is checked in line (and cached)."""
    new = _new_job(runtime, submission.new_job(source=source, scope=scope, request_id=request_id))
    app = new.app
    for guarded in _guarded_urls(runtime, new):
        try:
            blocked = _literal_verdict(guarded)
        except _NeedsLookup as lookup:
            addresses = await _resolve_on_loop(lookup.host, lookup.port)
            blocked = _verdict(guarded, lambda _host, _port, found=addresses: found)
        _reject_blocked(guarded, blocked)
    guard = runtime.memory_guard
    if _observed(guard, await _within(REDIS_REPLY_TIMEOUT_S, guard.full_async(client))):
        raise _memory_guard_refusal(app, source)
    with tracing.submitting(_span_attributes(app, source)) as span:
        try:
            outcome = await _within(REDIS_REPLY_TIMEOUT_S, runtime.store.submit_async(client, _traced(new, span)))
        except TooManyPending as exc:
            raise _pending_refusal(exc, app, source) from None
        return _counted(outcome, app, source, span)


def _observed(guard: MemoryGuard, full: bool) -> bool:
    """``full``, the guard's verdict, after recording it and the reading behind it in the guard's gauges."""
    metrics.redis_memory_guard_active.set(1 if full else 0)
    metrics.redis_memory_used_ratio.set(guard.used_ratio)
    return full


def _memory_guard_refusal(app: str, source: str) -> SubmitRejected:
    """The 503 of a submit while Redis is too full for new jobs (``redis.memory_guard``), counted."""
    metrics.submits_refused.labels(app=app, source=source, reason="memory_guard").inc()
    log.warning("job_refused", app=app, source=source, reason="memory_guard")
    return SubmitRejected(503, "redis_memory_full", "Redis is nearly out of memory (redis.memory_guard): new jobs "
                          "are refused until it frees; retry after Retry-After",
                          retry_after=MEMORY_GUARD_RETRY_AFTER_S)


def _pending_refusal(exc: TooManyPending, app: str, source: str) -> SubmitRejected:
    """The 429 of a submit the job store refused for a ``max_pending`` cap, counted."""
    metrics.submits_refused.labels(app=app, source=source, reason="max_pending").inc()
    log.info("job_refused", app=app, source=source, reason="max_pending", over=exc.over)
    setting = "apps" if exc.over == "app" else "clients"
    return SubmitRejected(429, "too_many_pending", f"{exc.over} {exc.name!r} has {exc.cap} unfinished jobs, its "
                          f"{setting}.{exc.name}.max_pending; retry after Retry-After",
                          "app" if exc.over == "app" else None, retry_after=TOO_MANY_PENDING_RETRY_AFTER_S)


async def _within(seconds: float, call: Awaitable[T]) -> T:
    """Await ``call`` (Redis round trips on the event loop); redis.TimeoutError (the API's 503) once it has waited
    ``seconds`` while the loop was free to read an answer.

    This stands in for the sync clients' socket timeout, which counts Redis' silence only. A plain asyncio timeout
    would also count the time an overloaded loop takes to get to an answer that came, and so answer 503 for a job
    that was stored. So the wait is counted in quarters: at the end of each, one turn of the loop is timed, and
    only a quarter that ends in a quick turn (a loop with time to spare) counts: however long the loop is too busy
    to look for an answer, that is never taken for Redis' silence."""
    loop = asyncio.get_running_loop()
    quarter = seconds / 4
    waiting, free = True, 0.0
    try:
        async with asyncio.timeout(None) as timeout:

            def quarter_ended() -> None:
                if waiting:
                    loop.call_soon(lambda: loop.call_soon(judge, loop.time()))

            def judge(turn_began: float) -> None:
                nonlocal free, next_quarter
                if not waiting:
                    return
                now = loop.time()
                if now - turn_began <= _BUSY_TURN_S:
                    free += quarter
                if free >= seconds:
                    timeout.reschedule(now)
                else:
                    next_quarter = loop.call_later(quarter, quarter_ended)

            next_quarter = loop.call_later(quarter, quarter_ended)
            try:
                return await call
            finally:
                waiting = False
                next_quarter.cancel()
    except TimeoutError:
        raise redis.TimeoutError(f"no answer from Redis in {seconds:g} s") from None


def _traced(new: NewJob, span: tracing.Span) -> NewJob:
    """The job with its trace context, the submit span's; in a trace difyq started (one per request, delivery,
    fire or enqueue, each submitting one job), the job id is the trace id, so either finds the other."""
    trace_id = tracing.naming_trace_id(span.traceparent)
    return new.model_copy(update={"traceparent": span.traceparent,
                                  "id": job_id_of_trace(trace_id) if trace_id else None})


def _span_attributes(app: str, source: str) -> dict[str, str]:
    """The submit span's attributes: the app, the producer, and the queue the job's message goes to."""
    return {"difyq.app": app, "difyq.source": source, "messaging.system": "dramatiq",
            "messaging.destination.name": JOBS_QUEUE, "messaging.operation.type": "send"}


def _new_job(runtime: Runtime, new: NewJob) -> NewJob:
    """``new`` once the config allows it: a configured app, a query within ``api.max_query_chars``, a signing
    secret for a callback."""
    request = new.request
    if new.app not in runtime.config.apps:
        raise SubmitRejected(404, "unknown_app", f"no app named {new.app!r} is configured", "app")
    max_query = runtime.config.api.max_query_chars
    if max_query is not None and request.query is not None and len(request.query) > max_query:
        raise SubmitRejected(422, "query_too_long", f"the query has {len(request.query)} characters, over "
                             f"api.max_query_chars ({max_query})", "query")
    if new.thread and request.conversation_id:
        raise SubmitRejected(422, "thread_with_conversation_id", "a thread job continues its thread's conversation: "
                             "give a thread or a conversation_id, not both", "thread")
    if new.thread:
        app = runtime.config.apps[new.app]
        if app.mode not in CHAT_MODES:
            raise SubmitRejected(422, "thread_needs_chat_app", f"app {new.app!r} is a {app.mode} app: only chat, "
                                 "agent and advanced-chat apps have conversations to continue", "thread")
        new = new.model_copy(update={"thread_user": request.user or app.user})
    if new.callback_url and not runtime.config.callbacks.signing_secrets():
        raise SubmitRejected(422, "callbacks_not_configured",
                             "callbacks.signing_secret is not set, so no callback can be signed", "callback_url")
    return new


@dataclass(frozen=True)
class GuardedUrl:
    """A URL of a job that the SSRF guard judges at submit: where it sits (``callback_url``, ``files[0].url``),
    what it is for and the hosts allowed though private."""

    url: str
    field: str
    subject: str
    allow: tuple[str, ...]
    setting: str
    must_resolve: bool = True  # a file's host may fail to resolve for now: its fetch is retried


def _guarded_urls(runtime: Runtime, new: NewJob) -> list[GuardedUrl]:
    """The job's callback URL and the URL of each of its files."""
    config = runtime.config
    guarded = [GuardedUrl(new.callback_url, "callback_url", "callback", tuple(config.callbacks.allow_hosts),
                          "callbacks.allow_hosts")] if new.callback_url else []
    own = config.apps[new.app].files.allow_hosts is not None
    setting = f"apps.{new.app}.files.allow_hosts" if own else "callbacks.allow_hosts"
    allow = config.file_allow_hosts(new.app)
    for reference in file_references({"files": new.request.files, "inputs": new.request.inputs}):
        url = reference.file.get("url")
        if reference.file.get("transfer_method") == "remote_url" and isinstance(url, str):
            guarded.append(GuardedUrl(url, f"{reference.path}.url", "file", allow, setting, must_resolve=False))
    return guarded


def _verdict(guarded: GuardedUrl, resolver: Callable[[str, int], Sequence[str]] = resolve_host) -> str | None:
    """Why the URL is blocked (the SSRF check against its allow list), or None if it may be used."""
    try:
        check_destination(guarded.url, guarded.allow, resolver=resolver, subject=guarded.subject,
                          setting=guarded.setting)
    except UnresolvableDestination as exc:
        return str(exc) if guarded.must_resolve else None
    except BlockedDestination as exc:
        return str(exc)
    return None


class _NeedsLookup(Exception):
    """The callback host is a name: resolving it may block on DNS."""

    def __init__(self, host: str, port: int):
        super().__init__(host)
        self.host, self.port = host, port


def _resolve_literal(host: str, port: int) -> tuple[str, ...]:
    """``resolve_host`` for an IP literal (no DNS); _NeedsLookup for a host name."""
    if not is_ip_literal(host):
        raise _NeedsLookup(host, port)
    return resolve_host(host, port)


async def _resolve_on_loop(host: str, port: int) -> tuple[str, ...]:
    """``resolve_host`` without blocking the event loop (uvloop resolves in libuv's pool, asyncio in a thread);
    no addresses when the name does not resolve, which check_destination reports like resolve_host."""
    try:
        answers = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                               proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return ()
    return addresses_of(answers)


@lru_cache(maxsize=1024)
def _literal_verdict(guarded: GuardedUrl) -> str | None:
    """``_verdict`` of a URL whose host is an IP literal: no DNS, a pure function of its arguments, so cached.
    _NeedsLookup (never cached) for a host name."""
    return _verdict(guarded, _resolve_literal)


def _reject_blocked(guarded: GuardedUrl, blocked: str | None) -> None:
    if blocked is not None:
        raise SubmitRejected(422, f"{guarded.subject}_url_blocked", blocked, guarded.field)


def _counted(outcome: SubmitOutcome, app: str, source: str, span: tracing.Span) -> SubmitOutcome:
    """Count, log and trace a submit's outcome (a replay names the job, and the trace, its key already named)."""
    job_id, trace_id = outcome.job["id"], outcome.job.get("trace_id")
    span.set("difyq.job.id", job_id)
    span.set("difyq.deduplicated", not outcome.created)
    if outcome.created:
        metrics.jobs_submitted.labels(app=app, source=source).inc()
        log.info("job_submitted", job_id=job_id, app=app, source=source, trace_id=trace_id)
    else:
        metrics.jobs_deduplicated.labels(app=app, source=source).inc()
        log.info("job_deduplicated", job_id=job_id, app=app, source=source, trace_id=trace_id)
    return outcome
