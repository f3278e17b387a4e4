"""The job record's schema, defined once: job statuses, the record's field names, the callback statuses, and the
Lua preamble that hands them to the scripts (``STATUS.running``, ``FIELD.callback_url``, ``CALLBACK.pending``,
``is_final(status)``), so no script spells one."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"  # the Dify run waits for human input (`pause` holds its forms); no worker holds the job
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
SOURCES = ("api", "hook", "schedule", "cli")


class JobField(StrEnum):
    """The fields of a job record (a Redis hash, ``RedisKeys.job``)."""

    ID = "id"
    APP = "app"
    SOURCE = "source"
    STATUS = "status"
    SCOPE = "scope"
    IDEMPOTENCY_KEY = "idempotency_key"
    REQUEST = "request"
    REQUEST_ID = "request_id"
    CALLBACK_URL = "callback_url"
    CREATED_AT = "created_at"
    STARTED_AT = "started_at"  # the first attempt's start
    ATTEMPT_STARTED_AT = "attempt_started_at"  # the latest attempt's start
    FINISHED_AT = "finished_at"
    NEXT_ATTEMPT_AT = "next_attempt_at"
    ATTEMPTS = "attempts"
    WORKER = "worker"
    RESULT = "result"
    ERROR = "error"
    ATTEMPT_ERRORS = "attempt_errors"  # every failed attempt's error, oldest first, with its attempt number
    CALLBACK = "callback"  # the callback block (``callback_block.CallbackBlock``)
    CALLBACK_ATTEMPTS = "callback_attempts"  # the last callback attempts, oldest first (``CallbackAttempt``)
    CANCEL_REQUESTED = "cancel_requested"
    TASK_ID = "task_id"
    WAITING_SINCE = "waiting_since"
    DEFERRALS = "deferrals"
    DEFERRED_BY = "deferred_by"  # what deferred the job last (requests, tokens, concurrency, upstream, quota, budget)
    # The job's deferrals, the last MAX_DEFERRAL_RUNS runs of consecutive ones by one limit: [{limit, first_at,
    # last_at, count}], oldest first.
    DEFERRAL_HISTORY = "deferral_history"
    WORKER_LOSSES = "worker_losses"
    DIFY_RUN_ID = "dify_run_id"  # the attempt's workflow run: a lost worker's run is followed, not run again
    PAUSE = "pause"  # the paused Dify run: its id, forms and cost so far (``runner.pause_block``); kept once resumed
    TRACEPARENT = "traceparent"  # the job's W3C trace context (``difyq.worker.tracing``)
    FILES = "files"  # the files the worker uploaded to Dify (``files.transfer.uploaded_file``): kept for retries
    PRIORITY = "priority"  # an integer level, higher first (``config.Priority``)
    TENANT = "tenant"  # whose job it is, for fair shares and tenant limits of an app (``model.default_tenant``)
    THREAD = "thread"  # the conversation thread the job belongs to (``worker.threads``)
    HELD_MESSAGE = "held_message"  # a thread job's run_job message while an earlier job of its thread is unfinished
    CONVERSATION_RESTARTED = "conversation_restarted"  # the thread's conversation was gone: this job began a new one
    MESSAGE = "message"  # the Redis id of the job's latest run_job message, which the orphan sweep looks for
    CALLBACK_MESSAGE = "callback_message"  # the Redis id of its latest deliver_callback message (the same sweep's)


class ThreadField(StrEnum):
    """The fields of a thread's state (a Redis hash, ``RedisKeys.thread``)."""

    NAME = "name"
    APP = "app"
    USER = "user"  # the Dify user the thread's conversation belongs to: its first job's
    CONVERSATION_ID = "conversation_id"
    CREATED_AT = "created_at"
    LAST_JOB_AT = "last_job_at"


CallbackStatus = Literal["none", "pending", "delivered", "failed"]  # of a job's callback block

MAX_ATTEMPT_ERRORS = 20
MAX_CALLBACK_ATTEMPTS = 20
MAX_DEFERRAL_RUNS = 20


def _lua_table(name: str, values: dict[str, str]) -> str:
    items = ", ".join(f"{key} = '{value}'" for key, value in values.items())
    return f"local {name} = {{{items}}}"


_REMEMBER_ERROR = """\
local function remember_error(job, error_json, ran, now)
  local errors = cjson.decode(redis.call('HGET', job, FIELD.attempt_errors) or '[]')
  local entry = cjson.decode(error_json)
  entry.attempt = tonumber(redis.call('HGET', job, FIELD.attempts) or '0')
  local started = redis.call('HGET', job, FIELD.attempt_started_at)
  if ran and started then
    entry.started_at = started
    entry.duration_s = math.max(tonumber(now) - tonumber(started), 0)
  end
  table.insert(errors, entry)
  while #errors > MAX_ATTEMPT_ERRORS do
    table.remove(errors, 1)
  end
  redis.call('HSET', job, FIELD.attempt_errors, cjson.encode(errors))
end"""


_LEAVE_PENDING = """\
local function leave_pending(id, app_pending, client_pending)
  redis.call('ZREM', app_pending, id)
  if client_pending ~= '' then
    redis.call('ZREM', client_pending, id)
  end
end"""


_MESSAGE_LIVE = """\
local function message_live(bodies, delayed_bodies, message_id, bound)
  if redis.call('HEXISTS', bodies, message_id) == 1 then
    return true
  end
  local delayed = redis.call('HGET', delayed_bodies, message_id)
  return delayed and (tonumber((cjson.decode(delayed).options or {}).eta) or 0) > bound or false
end"""


_CALLBACK_WAITS = """\
local function callback_waits(status, callback)
  local announced = status and (is_final(status) or status == STATUS.paused)
  return announced and callback and cjson.decode(callback)['status'] == CALLBACK.pending or false
end"""


_ENQUEUE_CALLBACK = """\
local function enqueue_callback(job, id, queue, bodies, due_index, message_id, body, due_ms)
  redis.call('HSET', bodies, message_id, body)
  redis.call('RPUSH', queue, message_id)
  redis.call('HSET', job, FIELD.callback_message, message_id)
  redis.call('ZADD', due_index, due_ms, id)
end"""


_END_RUN = """\
local function end_run(job, leases, id)
  redis.call('ZREM', leases, id)
  redis.call('HDEL', job, FIELD.message)
end"""


_QUEUE_AFTER_EXPRESS = """\
local function queue_after_express(queue, express_tail, message_id)
  local tail = redis.call('GET', express_tail)
  if not (tail and redis.call('LINSERT', queue, 'AFTER', tail, message_id) > 0) then
    redis.call('LPUSH', queue, message_id)
  end
end"""


_WAKE = """\
local function wake(token)
  if redis.call('LLEN', token) == 0 then
    redis.call('RPUSH', token, '1')
  end
end"""


_LEAVE_THREAD = """\
local function hand_on_thread(line, job_prefix, queue, bodies, wake_token)
  while true do
    local next_id = redis.call('LINDEX', line, 0)
    if not next_id then
      return
    end
    local next_job = job_prefix .. next_id
    local next_status = redis.call('HGET', next_job, FIELD.status)
    if next_status and not is_final(next_status) then
      local held = redis.call('HGET', next_job, FIELD.held_message)
      if held then
        local message = cjson.decode(held)
        redis.call('HSET', bodies, message.id, message.body)
        redis.call('RPUSH', queue, message.id)
        wake(wake_token)
        redis.call('HDEL', next_job, FIELD.held_message)
      end
      return
    end
    redis.call('LPOP', line)
  end
end

local function leave_thread(id, line, job_prefix, queue, bodies, wake_token)
  if line == '' then
    return
  end
  local was_first = redis.call('LINDEX', line, 0) == id
  redis.call('LREM', line, 1, id)
  if was_first then
    hand_on_thread(line, job_prefix, queue, bodies, wake_token)
  end
end"""


def lua_preamble() -> str:
    """The Lua that opens every job script: the job statuses, the field names, the callback statuses,
    ``is_final(status)``,
    ``remember_error(job key, error json, ran, now)`` (appends to the record's ``attempt_errors``; with ``ran``,
    the error ended the attempt under way, whose start and duration up to ``now`` it keeps) and
    ``leave_pending(id, app pending key, client pending key or '')`` (a finished job no longer counts against
    ``max_pending``) and
    ``end_run(job key, leases key, id)`` (a final job's run is over: its lease goes, and the record forgets its
    last ``run_job`` message, which only the orphan sweep of unfinished jobs reads; ``worker`` stays, naming the
    process that ran the last attempt) and
    ``queue_after_express(queue key, express tail key, message id)`` (the message goes right after the express
    tail's, when that one is still on the queue, else at the head: Dramatiq takes from the head) and
    ``message_live(queue bodies key, delay queue bodies key, message id, bound ms)`` (the message waits on the queue
    or is fetched by a worker, or is a delayed message due after the bound; one due long before was dropped by the
    consumer that held it) and
    ``callback_waits(status, callback block json)`` (the callback is pending and the job's status announces it:
    final, or paused for its ``job.paused``) and
    ``enqueue_callback(job key, id, queue key, bodies key, due index key, message id, body, due ms)`` (a
    ``deliver_callback`` message on its queue or delay queue, named by the record and put in the callbacks' due
    index, which the orphan sweep reads) and
    ``wake(wake token key)`` (leaves the token, one at most, that wakes an idle consumer of a queue:
    ``worker.wakeup``) and
    ``hand_on_thread(thread line key, job key prefix, jobs queue key, jobs bodies key, wake token key)`` (the line
    drops finished or missing jobs from its front, and the first unfinished one gets the message it holds, if it
    holds one) and
    ``leave_thread(id, thread line key or '', job key prefix, jobs queue key, jobs bodies key, wake token key)`` (a
    thread job leaves its thread's line; when it was the first, the line is handed on)."""
    final = " or ".join(f"status == STATUS.{status.value}" for status in sorted(FINAL_STATUSES))
    return "\n".join([
        "-- Generated from difyq.worker.jobs.schema: the job statuses and record fields.",
        _lua_table("STATUS", {status.value: status.value for status in JobStatus}),
        _lua_table("FIELD", {field.value: field.value for field in JobField}),
        _lua_table("THREAD", {field.value: field.value for field in ThreadField}),
        _lua_table("CALLBACK", {status: status for status in get_args(CallbackStatus)}),
        f"local MAX_ATTEMPT_ERRORS = {MAX_ATTEMPT_ERRORS}",
        f"local MAX_CALLBACK_ATTEMPTS = {MAX_CALLBACK_ATTEMPTS}",
        f"local MAX_DEFERRAL_RUNS = {MAX_DEFERRAL_RUNS}",
        "local function is_final(status)",
        f"  return {final}",
        "end",
        _REMEMBER_ERROR,
        _LEAVE_PENDING,
        _END_RUN,
        _QUEUE_AFTER_EXPRESS,
        _MESSAGE_LIVE,
        _CALLBACK_WAITS,
        _ENQUEUE_CALLBACK,
        _WAKE,
        _LEAVE_THREAD,
    ])
