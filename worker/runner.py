"""JobRunner: one delivery of a ``run_job`` message, read top to bottom in ``run``: the admission (the Dify key's
limits), the attempt's start (the job record, under a lease), the Dify call, the outcome (stored with the release
of the admission in one round trip, or the job requeued for a retry) and the callback's first attempt."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, TypeVar

import structlog

from difyq.worker import metrics, tracing
from difyq.worker.budgets import BudgetGate, Hold, record_over_budget
from difyq.worker.callbacks.sender import CallbackSender
from difyq.worker.config import AppConfig
from difyq.worker.dify.client import DifyClient, DifyRequest, DifyResult
from difyq.worker.dify.errors import CANCELED, NO_FIRST_EVENT, DifyError
from difyq.worker.dify.models import PausedRun
from difyq.worker.files.transfer import FileUploads
from difyq.worker.genai_span import dify_call
from difyq.worker.jobs.messages import run_hints
from difyq.worker.jobs.model import iso_time, job_priority, job_tenant, job_trace_id
from difyq.worker.jobs.schema import JobField, JobStatus
from difyq.worker.jobs.store import AttemptStart
from difyq.worker.jobs.threads import ThreadConversation
from difyq.worker.json_codec import loads
from difyq.worker.leases import LeaseKeeper
from difyq.worker.limits import Admission, deferral_delay, wait_exceeded
from difyq.worker.logs import job_log_context
from difyq.worker.redis_retry import through_blips
from difyq.worker.runtime import Runtime
from difyq.worker.task_ids import TaskIdRecorder
from difyq.worker.throttle import Slot, Throttle

log = structlog.get_logger("difyq.worker")
T = TypeVar("T")

APP_NOT_CONFIGURED = DifyError("app_not_configured", "the app is not in the config")
QUOTA_PERIOD_S = 3600.0  # a plan quota deferred by `on_quota: defer` is tried again at the next full hour
QUOTA_LIMIT = "quota"  # what deferred a job waiting out a plan quota (the record's ``deferred_by``)
BUDGET_LIMIT = "budget"  # what deferred a job waiting for a spend budget's next period
# A paused job is looked at again this long after its forms expire (Dify then ends the run), or after
# PAUSE_CHECK_DEFAULT_S when a form tells no expiry.
PAUSE_CHECK_GRACE_S = 5.0
PAUSE_CHECK_DEFAULT_S = 24 * 3600.0


def retry_delay(attempt: int, min_backoff: float, max_backoff: float, retry_after: float | None = None) -> float:
    """Exponential backoff with ±20 % jitter after the ``attempt``-th failure; a Retry-After wins when given."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), max_backoff)
    base = min(max_backoff, min_backoff * 2 ** max(attempt - 1, 0))
    return base * random.uniform(0.8, 1.2)


def result_document(result: DifyResult) -> dict[str, Any]:
    """The job resource's ``result`` block from Dify's aggregated answer."""
    usage = asdict(result.usage) if result.usage else None
    return {
        "answer": result.answer,
        "outputs": result.outputs,
        "conversation_id": result.conversation_id,
        "message_id": result.message_id,
        "workflow_run_id": result.workflow_run_id,
        "usage": usage,
        "time_to_first_token_s": result.time_to_first_token_s,
    }


def _recorded_wait(fields: dict[str, str]) -> float | None:
    """When the job was first deferred by a limit, from its record (None if it never waited)."""
    return float(fields[JobField.WAITING_SINCE]) if fields.get(JobField.WAITING_SINCE) else None


def _lost_during_call(error: DifyError, client: DifyClient, conversation_id: str, user: str) -> str | None:
    """How a thread's continuation that failed with ``error`` shows its conversation was deleted during the call
    (the ``detected_by`` of ``conversation_restarted``): ``call`` for the call's own 404 (Dify 0.15),
    ``silent_call`` for Dify 1.x's silence (``no_first_event``) with the conversation gone when asked again; None
    when the call failed for another reason (or the question fails: the call's own error then stands)."""
    if error.status == 404 and error.code == "not_found":
        return "call"
    if error.code != NO_FIRST_EVENT:
        return None
    try:
        return None if client.conversation_exists(conversation_id, user) else "silent_call"
    except DifyError:
        return None


@dataclass(frozen=True)
class Outcome:
    """What an attempt comes to: a final ``status`` with its ``result`` or ``error``, or ``queued`` again for a
    retry in ``retry_in_s``, with the attempt's error; ``waiting_since``: the retry waits out a quota, a deferral
    bounded by ``jobs.max_wait`` from then."""

    status: JobStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    retry_in_s: float | None = None
    waiting_since: float | None = None
    pause: dict[str, Any] | None = None
    conversation: ThreadConversation | None = None  # a thread job's: what the thread records with the outcome
    answer: DifyResult | None = None  # a succeeded call's: its metrics wait until its callback is on its way


def pause_block(paused: PausedRun) -> dict[str, Any]:
    """The record's ``pause`` field of a job whose run waits for human input."""
    return {"workflow_run_id": paused.run_id, "forms": paused.forms, "price": paused.price,
            "currency": paused.currency, "task_id": paused.task_id}


def paused_run(block: dict[str, Any]) -> PausedRun:
    return PausedRun(block["workflow_run_id"], block.get("forms") or [], block.get("price"), block.get("currency"),
                     block.get("task_id"))


def pause_check_in(block: dict[str, Any], now: float) -> float:
    """Seconds until the paused job is looked at again: just after its first form expires."""
    expiries = [float(form["expiration_time"]) for form in block.get("forms") or []
                if isinstance(form.get("expiration_time"), int | float)]
    if not expiries:
        return PAUSE_CHECK_DEFAULT_S
    return max(min(expiries) - now, 0.0) + PAUSE_CHECK_GRACE_S


class JobRunner:
    """Runs jobs for one worker process; safe to call from many threads."""

    def __init__(self, runtime: Runtime, leases: LeaseKeeper, throttle: Throttle, sender: CallbackSender,
                 task_ids: TaskIdRecorder, budgets: BudgetGate):
        self.runtime = runtime
        self.task_ids = task_ids
        self.sender = sender
        self.store = runtime.store
        self.config = runtime.config
        self.leases = leases
        self.throttle = throttle
        self.budgets = budgets
        self._clients: dict[str, DifyClient] = {}
        self.files = FileUploads(runtime.config, runtime.store)
        self.threads = runtime.threads

    def run(self, job_id: str, app: str | None = None, waiting_since: float | None = None, priority: int = 0,
            tenant: str | None = None) -> None:
        """``app``, ``waiting_since``, ``priority`` and ``tenant`` are the message's hints (``run_hints``); a message
        without them (the reaper's, or one written by an older version) costs one read of the job's record."""
        if app is None or tenant is None:
            hints = self.store.hints_of(job_id)
            app, priority, tenant = hints.app, hints.priority, hints.tenant
        if app is None:
            log.warning("job_missing", job_id=job_id)
            return
        with structlog.contextvars.bound_contextvars(job_id=job_id, app=app):
            admission = self.throttle.admit(app, job_id, waiting_since, priority, tenant)
            if not admission.admitted:
                self._defer(job_id, app, waiting_since, priority, tenant, admission)
                return
            try:
                hold = self.budgets.reserve(job_id, app, tenant)
            except BaseException:
                self.throttle.give_back(app, admission)
                raise
            if not hold.admitted:
                self.throttle.give_back(app, admission)
                self._over_budget(job_id, app, waiting_since, priority, tenant, hold)
                return
            with self.throttle.slot(app, admission) as slot:
                start, outcome = self._start_and_call(job_id, slot, hold)
                if start.fields is not None and outcome is not None:
                    try:
                        with (structlog.contextvars.bound_contextvars(**job_log_context(job_id, start.fields)),
                              tracing.job(start.fields.get(JobField.TRACEPARENT))):
                            self._conclude(job_id, start.fields, outcome, slot)
                    finally:
                        self.leases.untrack(job_id)
            if start.state == "cooling":  # the start checked the key's cooldown for its admission: refused
                self._defer(job_id, app, waiting_since, priority, tenant, Admission.cooling(start.wait_s))

    def _start_and_call(self, job_id: str, slot: Slot, hold: Hold) -> tuple[AttemptStart, Outcome | None]:
        """The attempt's start and its Dify call in the admission's ``slot``, holding the budget reservations until
        the call ends, then charging the usage it reported. No outcome when the job did not start: it is final,
        missing or runs elsewhere, or (``cooling``) the start found the key cooling down, which the admission left
        to it to check; the budget reservations are then released with nothing charged. A started job's lease
        stays tracked (renewed) until the caller has stored its outcome."""
        with self.budgets.spending(hold) as spend:
            start = self.store.start_attempt(job_id, self.leases.lease_s, slot.admission.upstream_check)
            if start.fields is None:
                slot.called = False
                if start.state != "cooling":
                    log.info("job_not_started", state=start.state, status=start.status)
                return start, None
            if start.upstream_streak:
                slot.admission = replace(slot.admission, upstream_streak=True)
            self.leases.track(job_id)
            try:
                with (structlog.contextvars.bound_contextvars(**job_log_context(job_id, start.fields)),
                      tracing.attempt(job_id, start.fields, start.attempt)):
                    outcome = self._call(job_id, start.fields, start, slot)
                    spend.usage = (outcome.result or {}).get("usage")
                    return start, outcome
            except BaseException:
                self.leases.untrack(job_id)
                raise

    def _defer(self, job_id: str, app: str, waiting_since: float | None, priority: int, tenant: str,
               admission: Admission) -> None:
        """Defer a job a limit refused (no attempt, no worker thread held); a job that would wait past
        ``jobs.max_wait`` fails ``rate_limit_wait_exceeded``."""
        now = time.time()
        since = waiting_since or now
        if self._deferred(job_id, app, since, priority, tenant, admission):
            return
        self.throttle.abandon(app, job_id, tenant)
        self._fail_unstarted(job_id, {
            "code": "rate_limit_wait_exceeded", "status": None,
            "message": f"waited {now - since:.0f}s for the {admission.limit} limit; jobs.max_wait is "
                       f"{self.config.jobs.max_wait:.0f}s"})

    def _over_budget(self, job_id: str, app: str, waiting_since: float | None, priority: int, tenant: str,
                     hold: Hold) -> None:
        """A job a budget has no room for: deferred to the budget's next period like a job a limit refused
        (``on_exhausted: defer``, while that is within ``jobs.max_wait`` of its first wait), else failed
        ``budget_exhausted``."""
        now = time.time()
        since = waiting_since or now
        refusal = Admission(admitted=False, wait_s=hold.wait_s(now), limit=BUDGET_LIMIT, reservation=None)
        deferred = hold.deferrable and self._deferred(job_id, app, since, priority, tenant, refusal)
        record_over_budget(hold, "deferred" if deferred else "failed")
        if deferred:
            return
        reason = hold.describe()
        if hold.deferrable:
            reason += f"; jobs.max_wait ({self.config.jobs.max_wait:.0f}s) ends before that"
        self._fail_unstarted(job_id, {"code": "budget_exhausted", "status": None, "message": reason})

    def _deferred(self, job_id: str, app: str, since: float, priority: int, tenant: str, refusal: Admission,
                  ) -> bool:
        """Defer a job by ``refusal.wait_s`` (and a little jitter) with no attempt spent and no worker thread held,
        unless that takes it past ``jobs.max_wait`` from its first wait (``since``): False then."""
        now = time.time()
        delay = deferral_delay(refusal)
        if wait_exceeded(since, now, delay, self.config.jobs.max_wait):
            return False
        state = self.store.defer(job_id, app, delay_s=delay, waiting_since=since, limit=refusal.limit,
                                 priority=priority, tenant=tenant)
        log.info("job_deferred", limit=refusal.limit, delay_s=round(delay, 3), state=state)
        return True

    def _fail_unstarted(self, job_id: str, error: dict[str, Any]) -> None:
        """End a job that never started this attempt as failed with ``error``."""
        fields = self.store.fields(job_id)
        if fields is not None:
            self._conclude(job_id, fields, Outcome(JobStatus.FAILED, error=error))

    def _call(self, job_id: str, fields: dict[str, str], start: AttemptStart, slot: Slot) -> Outcome:
        """Call Dify for a started attempt; what the call reports goes to ``slot`` (released by the caller)."""
        app_name = fields[JobField.APP]
        app = self.config.apps.get(app_name)
        if app is None:
            return self._failed(start.attempt, APP_NOT_CONFIGURED, None, None)
        if start.first:
            waited = time.time() - float(fields[JobField.CREATED_AT])
            metrics.job_queue_wait.labels(app=app_name).observe(max(waited, 0.0))
        log.debug("dify_call_started", attempt=start.attempt)
        started = time.monotonic()
        client, request = self._client(app_name, app), self._dify_request(fields, app)
        thread = None
        if fields.get(JobField.THREAD):  # the thread's conversation, as the user it belongs to
            thread = self.threads.open(app_name, fields[JobField.THREAD], request.user)
            request = replace(request, user=thread.user, conversation_id=thread.conversation_id)
        pause = loads(fields[JobField.PAUSE]) if fields.get(JobField.PAUSE) else None
        try:
            if pause is None and not fields.get(JobField.DIFY_RUN_ID):
                request = self.files.prepare(job_id, fields, app_name, app, client, request)
            with dify_call(app_name, app.mode, self.config.app_base_url(app_name), request) as call:
                canceled = partial(self.store.cancel_requested, job_id)
                if pause is not None:  # the run paused for human input: follow it (resumed, or ended at expiry)
                    result = client.follow_run(app.mode, pause["workflow_run_id"], request, paused_run(pause),
                                               canceled=canceled)
                elif fields.get(JobField.DIFY_RUN_ID):  # an earlier attempt's worker was lost mid-run: follow it
                    result = client.follow_run(app.mode, fields[JobField.DIFY_RUN_ID], request, canceled=canceled)
                elif thread is not None:
                    result = self._continue(job_id, client, app, request, canceled)
                else:
                    result = self._stream(job_id, client, app, request, canceled)
                call.finished(result)
        except DifyError as error:
            if error.code == CANCELED:  # difyq stopped the run: no attempt follows it
                return Outcome(JobStatus.CANCELED)
            slot.rate_limited = error.rate_limited
            outcome = "timeout" if error.code == "timeout" else "error"
            metrics.dify_request_duration.labels(app=app_name, outcome=outcome).observe(time.monotonic() - started)
            metrics.dify_errors.labels(app=app_name, code=error.code).inc()
            return self._failed(start.attempt, error, app, _recorded_wait(fields))
        if result.paused is not None:
            return Outcome(JobStatus.PAUSED, pause=pause_block(result.paused))
        slot.tokens = result.usage.total_tokens if result.usage else None
        slot.succeeded = True
        conversation = None if thread is None else ThreadConversation(thread.conversation_id or "",
                                                                      result.conversation_id)
        return Outcome(JobStatus.SUCCEEDED, result=result_document(result), conversation=conversation, answer=result)

    def _continue(self, job_id: str, client: DifyClient, app: AppConfig, request: DifyRequest,
                  canceled: Callable[[], bool]) -> DifyResult:
        """A thread job's call: its thread's conversation continued, or a new one begun when Dify no longer has
        it (deleted, or expired). Whether it does is asked first (``GET /messages``, which answers 404 at once):
        Dify 1.x answers a streaming call to a missing conversation with one ping and then silence for minutes.
        A conversation deleted between that question and the call shows in the call's failure: a 404
        ``Conversation Not Exists.`` (0.15), or 1.x's silence (``no_first_event``) with the conversation gone when
        asked again; either way a new one is begun in the same attempt. A job that begins a new conversation notes
        it (``conversation_restarted``)."""
        gone = request.conversation_id
        if gone and client.conversation_exists(gone, request.user):
            try:
                return self._stream(job_id, client, app, request, canceled)
            except DifyError as error:
                detected_by = _lost_during_call(error, client, gone, request.user)
                if detected_by is None:
                    raise
        elif gone:
            detected_by = "messages_check"
        else:
            return self._stream(job_id, client, app, request, canceled)
        restart = {"previous_conversation_id": gone, "detected_by": detected_by, "at": iso_time(time.time())}
        self._durably(lambda: self.store.record_conversation_restart(job_id, restart))
        log.info("thread_conversation_restarted", previous_conversation_id=gone, detected_by=detected_by)
        return self._stream(job_id, client, app, replace(request, conversation_id=None), canceled)

    def _stream(self, job_id: str, client: DifyClient, app: AppConfig, request: DifyRequest,
                canceled: Callable[[], bool]) -> DifyResult:
        """The Dify call, its task id known to ``task_ids`` (for a cancel to stop it) while it lasts."""

        def stop(task_id: str) -> None:
            client.stop(app.mode, task_id, request.user)

        try:
            return client.run(app.mode, request, on_task_id=lambda task_id: self.task_ids.note(job_id, task_id, stop),
                              on_run_id=lambda run_id: self.task_ids.note_run(job_id, run_id), canceled=canceled)
        finally:
            self.task_ids.forget(job_id)

    def _client(self, app_name: str, app: AppConfig) -> DifyClient:
        """The app's client, made once: it resolves proxy settings for the app's URL when created."""
        client = self._clients.get(app_name)
        if client is None:
            client = self._clients[app_name] = DifyClient(
                self.config.app_base_url(app_name),
                app.api_key.get_secret_value(),
                connect_timeout=self.config.dify.connect_timeout_s,
                idle_read_timeout=self.config.dify.idle_read_timeout_s,
                total_timeout=app.timeout_s,
                first_event_timeout=self.config.dify.first_event_timeout_s,
                run_poll_interval=self.config.dify.run_poll_interval_s,
            )
        return client

    def _dify_request(self, fields: dict[str, str], app: AppConfig) -> DifyRequest:
        request = loads(fields[JobField.REQUEST])
        return DifyRequest(
            query=request.get("query"),
            inputs=request.get("inputs") or {},
            user=request.get("user") or app.user,
            conversation_id=request.get("conversation_id"),
            files=request.get("files"),
            auto_generate_name=app.auto_generate_name,
            workflow_id=request.get("workflow_id") or app.workflow_id,
            trace_id=job_trace_id(fields),
        )

    @staticmethod
    def _record_answer(app_name: str, result: DifyResult) -> None:
        """A succeeded call's metrics: its duration, time to first token, tokens and spend."""
        metrics.dify_request_duration.labels(app=app_name, outcome="ok").observe(result.duration_s)
        if result.time_to_first_token_s is not None:
            metrics.dify_time_to_first_token.labels(app=app_name).observe(result.time_to_first_token_s)
        usage = result.usage
        if usage is None:
            return
        if usage.prompt_tokens:
            metrics.tokens.labels(app=app_name, type="prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            metrics.tokens.labels(app=app_name, type="completion").inc(usage.completion_tokens)
        if usage.total_tokens and usage.prompt_tokens is None and usage.completion_tokens is None:
            metrics.tokens.labels(app=app_name, type="total").inc(usage.total_tokens)  # a workflow gives no split
        price = usage.price()
        if price is not None and price > 0:
            metrics.cost.labels(app=app_name, currency=usage.currency or "USD").inc(float(price))

    def _failed(self, attempt: int, error: DifyError, app: AppConfig | None, waiting_since: float | None) -> Outcome:
        """A failed attempt: retried after a backoff while it may succeed and attempts remain, else final. A plan
        quota (429 ``rate_limit_error``) of an app with ``on_quota: defer`` waits for the next full hour instead,
        while that stays within ``jobs.max_wait`` of the job's first wait (``waiting_since``)."""
        jobs = self.config.jobs
        log.warning("dify_call_failed", code=error.code, retryable=error.retryable, attempt=attempt,
                    message=error.message[:500])
        if error.quota and app is not None and app.on_quota == "defer":
            now = time.time()
            delay = QUOTA_PERIOD_S - now % QUOTA_PERIOD_S
            since = waiting_since or now
            if not wait_exceeded(since, now, delay, jobs.max_wait):
                return Outcome(JobStatus.QUEUED, error=error.as_dict(), retry_in_s=delay, waiting_since=since)
        if error.retryable and attempt < jobs.max_attempts:
            delay = retry_delay(attempt, jobs.retry_min_backoff, jobs.retry_max_backoff, error.retry_after)
            return Outcome(JobStatus.QUEUED, error=error.as_dict(), retry_in_s=delay)
        return Outcome(JobStatus.FAILED, error=error.as_dict())

    def _durably(self, write: Callable[[], T]) -> T:
        """A store write after a Dify call, retried through a Redis blip of up to one lease, so a finished call is
        not made again just because Redis was briefly away (the reaper waits a whole lease after an outage)."""
        return through_blips(write, self.leases.lease_s)

    def _conclude(self, job_id: str, fields: dict[str, str], outcome: Outcome, slot: Slot | None = None) -> None:
        """Store the outcome (or requeue the job for its retry), then (``callbacks.first_attempt_inline``) make
        the callback's first attempt here, under the job's lease, instead of handing it to another worker through
        the callbacks queue. A final outcome is stored in the same round trip as the release of the call's
        ``slot``; a paused or requeued job's slot is released as the caller's ``with`` block ends."""
        if outcome.status is JobStatus.PAUSED and outcome.pause is not None:
            block = outcome.pause
            state = self._durably(lambda: self.store.pause(job_id, fields[JobField.APP], block,
                                                           check_in_s=pause_check_in(block, time.time()),
                                                           priority=job_priority(fields),
                                                           tenant=job_tenant(fields)))
            if state != "cancel":
                log.info("job_paused", state=state, workflow_run_id=block["workflow_run_id"])
                return
            outcome = Outcome(JobStatus.CANCELED)
        if outcome.status is JobStatus.QUEUED:
            delay = outcome.retry_in_s or 0.0
            since = outcome.waiting_since
            hints = run_hints(fields[JobField.APP], since or _recorded_wait(fields), job_priority(fields),
                              job_tenant(fields))
            state = self._durably(lambda: self.store.requeue(
                job_id, delay_s=delay, error=outcome.error, hints=hints, waiting_since=since,
                count_field=JobField.DEFERRALS if since is not None else "",
                deferred_by=QUOTA_LIMIT if since is not None else None, forget_run=True))
            if state != "cancel":
                log.info("job_deferred" if since is not None else "job_retry_scheduled", delay_s=round(delay, 3))
                return
            outcome = Outcome(JobStatus.CANCELED, error=outcome.error)
        try:
            self._finish(job_id, fields, outcome, slot)
        finally:
            if outcome.answer is not None:
                self._record_answer(fields[JobField.APP], outcome.answer)

    def _finish(self, job_id: str, fields: dict[str, str], outcome: Outcome, slot: Slot | None) -> None:
        """Store a final outcome, make the callback's first attempt, then count the job: its metrics are not on
        the path the callback's receiver waits on."""
        lease_s = self.leases.lease_s if self.config.callbacks.first_attempt_inline else None
        release = self.throttle.release_call(slot) if slot is not None else None
        lock = self.sender.new_lock()
        stored, record = self._durably(lambda: self.store.finish_keeping_callback(
            job_id, outcome.status, lease_s=lease_s, lock=lock, result=outcome.result, error=outcome.error,
            record=fields, conversation=outcome.conversation, along=[release] if release else []))
        ended = time.time()
        try:
            callback = self.sender.deliver_first(job_id, record, lock) if record is not None else None
        finally:
            self._count_finished(fields, stored, ended)
        self._log_finished(stored, callback)

    @staticmethod
    def _count_finished(fields: dict[str, str], status: str, ended: float) -> None:
        if status.startswith("already:") or status == "missing":
            return
        app_name = fields[JobField.APP]
        metrics.jobs_finished.labels(app=app_name, status=status).inc()
        metrics.job_duration.labels(app=app_name).observe(max(ended - float(fields[JobField.CREATED_AT]), 0.0))

    @staticmethod
    def _log_finished(status: str, callback: str | None = None) -> None:
        """One line per job: its outcome and, when this worker sent the first callback attempt, how it went."""
        if status.startswith("already:") or status == "missing":
            log.info("job_outcome_not_stored", state=status)
        elif callback is None:
            log.info("job_finished", status=status)
        else:
            log.info("job_finished", status=status, callback=callback)
