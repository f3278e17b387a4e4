"""JobStore: job records, idempotency claims, leases and listing in Redis; every state change is one Lua script."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio

from difyq.worker.config import Config, JobsConfig
from difyq.worker.jobs.callback_block import CallbackAttempt, CallbackBlock, CallbackLock
from difyq.worker.jobs.error_counts import ErrorCounts
from difyq.worker.jobs.index_position import IndexPosition
from difyq.worker.jobs.messages import (
    CALLBACKS_QUEUE,
    JOBS_QUEUE,
    QueuedMessage,
    RunHints,
    build_message,
    run_hints,
)
from difyq.worker.jobs.model import (
    NewJob,
    client_of_scope,
    default_tenant,
    job_id_of_trace,
    job_resource,
    job_tenant,
)
from difyq.worker.jobs.schema import FINAL_STATUSES, JobField, JobStatus
from difyq.worker.jobs.scripts import job_script
from difyq.worker.jobs.threads import DEFAULT_THREAD_TTL_S, NO_THREAD, ThreadConversation, ThreadKeys
from difyq.worker.json_codec import dumps
from difyq.worker.lua_scripts import ScriptCall, run_together
from difyq.worker.redis_keys import RedisKeys
from difyq.worker.tracing import new_trace_id

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from difyq.worker.limits.admission import UpstreamCheck

_LIST_FIELDS = ("id", "app", "source", "status", "tenant", "scope")
# The Dify ids of a job's result that name it in ``RedisKeys.dify_id`` (with its call's task id).
INDEXED_RESULT_IDS = ("conversation_id", "message_id", "workflow_run_id")


def new_job_id() -> str:
    """``job_`` + a ULID: 48 bits of milliseconds then 80 random bits, Crockford base32, sortable by time."""
    return job_id_of_trace(new_trace_id())


INDEX_TRIM_BATCH = 1000  # the most expired entries one upkeep round drops from each job index
INDEX_SCAN_STEP = 1000  # the keys one upkeep round's step of its walk for removed apps' indexes looks at (SCAN COUNT)
# With redis.durable_submit a submit waits, at most this long, until this many replicas hold what it wrote.
DURABLE_SUBMIT_REPLICAS = 1
DURABLE_SUBMIT_TIMEOUT_MS = 1000


class NotReplicated(redis.RedisError):
    """With redis.durable_submit: no replica acknowledged the submit in time. The job is on the primary and may
    run, but a failover now could lose it, so the producer answers 503 (a retry with the same idempotency key
    finds the job instead of making a second one)."""


def _check_replicated(acknowledged: int) -> None:
    if acknowledged < DURABLE_SUBMIT_REPLICAS:
        raise NotReplicated(f"{acknowledged} replica(s) acknowledged the submit within {DURABLE_SUBMIT_TIMEOUT_MS} ms")


class IdempotencyConflict(Exception):
    """The idempotency key was used before for a different request."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"idempotency key already used for a different request (job {job_id})")


@dataclass(frozen=True)
class PendingCaps:
    """The ``max_pending`` caps: unfinished jobs per app and per API client (a name without one has no cap)."""

    apps: dict[str, int]
    clients: dict[str, int]

    @classmethod
    def of(cls, config: Config) -> PendingCaps:
        return cls({name: app.max_pending for name, app in config.apps.items() if app.max_pending},
                   {name: client.max_pending for name, client in config.clients.items() if client.max_pending})


NO_CAPS = PendingCaps({}, {})


class TooManyPending(Exception):
    """The job would take its app (``over`` = ``app``) or its API client (``client``) over ``max_pending``;
    nothing was written."""

    def __init__(self, over: str, name: str, cap: int):
        self.over, self.name, self.cap = over, name, cap
        super().__init__(f"{over} {name!r} has {cap} unfinished jobs, its max_pending")


@dataclass(frozen=True)
class SubmitOutcome:
    job: dict[str, Any]
    created: bool


@dataclass(frozen=True)
class SubmitCall:
    """One submit.lua call: its keys and args, the job hash it writes when the job is created, and with an
    idempotency key the digest of the request it claims the key for (``NewJob.request_hash``)."""

    keys: list[str]
    args: list[Any]
    fields: dict[str, str]
    request_hash: str = ""


@dataclass(frozen=True)
class AttemptStart:
    """What ``start_attempt`` decided: ``started`` (with the attempt number and the job's record, and
    ``upstream_streak`` as an admission has it), ``busy``, ``final`` (with the job's ``status``), ``missing``, or
    ``cooling``: the key's upstream cooldown it was asked to check lasts ``wait_s`` more, so nothing was started."""

    state: str
    attempt: int = 0
    first: bool = False
    status: str | None = None
    fields: dict[str, str] | None = None
    wait_s: float = 0.0
    upstream_streak: bool = False


@dataclass(frozen=True)
class CancelOutcome:
    """What ``cancel`` did: ``state`` (``canceled``, ``running``: the worker ends it once Dify stopped, or the
    final status it already had) and ``task_id``, the Dify task to stop (a running call's, or a paused run's)."""

    state: str
    task_id: str | None = None


# For how many leases a worker process's heartbeat outlives its last renewal round (or job start): a process
# starved that long, or stopped, counts as dead and loses its jobs (``worker/leases.py``).
HEARTBEAT_LEASES = 2


class JobStore:
    """Everything the producers and the worker read or write about jobs, under the ``{namespace}:`` prefix."""

    def __init__(self, client: redis.Redis, namespace: str, config: JobsConfig, durable_submit: bool = False,
                 max_pending: PendingCaps = NO_CAPS, thread_ttl: float = DEFAULT_THREAD_TTL_S):
        self.redis = client
        self.thread_ttl = thread_ttl
        self.max_pending = max_pending
        self.namespace = namespace
        self.keys = RedisKeys(namespace)
        self.config = config
        self.durable_submit = durable_submit
        # host:pid and a token of this process, so a restarted process that gets the same pid (a container's
        # restart) does not pass for the dead one whose leases it would otherwise keep alive.
        self.worker_id = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
        self.error_counts = ErrorCounts(client, self.keys)
        self._index_walk = 0  # the upkeep's SCAN cursor in its walk for the indexes of removed apps
        self._submit = client.register_script(job_script("submit"))
        # submit.lua on each asyncio client (by id: the script holds its client, so the id stays that client's).
        self._async_submits: dict[int, AsyncScript] = {}
        self._start = client.register_script(job_script("start"))
        self._finish = client.register_script(job_script("finish"))
        self._requeue = client.register_script(job_script("requeue"))
        self._pause = client.register_script(job_script("pause"))
        self._cancel = client.register_script(job_script("cancel"))
        self._rerun = client.register_script(job_script("rerun"))
        self._replay_callback = client.register_script(job_script("replay_callback"))
        self._callback_attempted = client.register_script(job_script("callback_attempted"))
        self._resume_callback = client.register_script(job_script("resume_callback"))
        self._files = client.register_script(job_script("files"))
        self._task_id = client.register_script(job_script("task_id"))
        self._conversation_restarted = client.register_script(job_script("conversation_restarted"))
        self._note_message = client.register_script(job_script("note_message"))
        self._orphans = client.register_script(job_script("orphans"))
        self._callback_orphans = client.register_script(job_script("callback_orphans"))
        self._callback_again = client.register_script(job_script("callback_again"))
        self._keep_live_lease = client.register_script(job_script("keep_live_lease"))

    def job_key(self, job_id: str) -> str:
        return self.keys.job(job_id)

    @property
    def leases_key(self) -> str:
        return self.keys.leases

    def index_key(self, app: str | None = None) -> str:
        """The zset of job ids by creation time (ms): every job, or one app's."""
        return self.keys.index(app)

    def idempotency_key(self, scope: str, key: str) -> str:
        """The claim a producer scope's idempotency key holds: ``{job id}|{request hash}``."""
        return self.keys.idempotency(scope, key)

    def pending_keys(self, app: str, scope: str) -> list[str]:
        """The pending-job sets a job of ``app`` submitted in ``scope`` belongs to: its app's, and its API
        client's ('' for another producer's job)."""
        client = client_of_scope(scope)
        return [self.keys.pending_of_app(app), self.keys.pending_of_client(client) if client is not None else ""]

    def thread_keys(self, app: str, thread: str | None) -> ThreadKeys:
        """The keys of ``app``'s thread ``thread`` (all '' for a job of no thread)."""
        if not thread:
            return NO_THREAD
        return ThreadKeys(self.keys.thread(app, thread), self.keys.thread_line(app, thread),
                          self.keys.thread_jobs(app, thread))

    def _placement_of(self, job_id: str, record: dict[str, str] | None = None) -> tuple[list[str], ThreadKeys]:
        """``pending_keys`` and ``thread_keys`` of a stored job (its app, scope and thread never change), from
        ``record`` when the caller holds it, else read; an unknown job's are '' (its script finds no record and
        writes nothing)."""
        if record is not None:
            app, scope, thread = record[JobField.APP], record.get(JobField.SCOPE), record.get(JobField.THREAD)
        else:
            app, scope, thread = (_text(v) if v is not None else None for v in self.redis.hmget(
                self.job_key(job_id), JobField.APP, JobField.SCOPE, JobField.THREAD))
        if app is None:
            return ["", ""], NO_THREAD
        return self.pending_keys(app, scope or ""), self.thread_keys(app, thread)

    @property
    def _jobs_queue_keys(self) -> list[str]:
        """The run_job queue's list, bodies and wake token: where a thread's next job gets its held message."""
        return [self.keys.queue(JOBS_QUEUE), self.keys.queue_bodies(JOBS_QUEUE), self.keys.wake(JOBS_QUEUE)]

    def _thread_outcome(self, conversation: ThreadConversation | None, now: float) -> dict[str, Any]:
        """The ``thread`` argument of finish.lua: how to hand the thread on and what conversation to record."""
        block: dict[str, Any] = {"job_prefix": self.keys.job(""), "now": repr(now),
                                 "ttl_ms": int(self.thread_ttl * 1000)}
        if conversation is not None and conversation.conversation_id:
            block.update(conversation_id=conversation.conversation_id, started_from=conversation.started_from)
        return block

    def message(self, queue: str, job_id: str, delay_s: float = 0.0, hints: dict[str, object] | None = None,
                ) -> QueuedMessage:
        actor = "run_job" if queue == JOBS_QUEUE else "deliver_callback"
        return build_message(self.namespace, queue, actor, job_id, delay_s, hints=hints)

    def submit_call(self, new: NewJob) -> SubmitCall:
        """The submit.lua call that creates ``new`` (a fresh id and timestamp), without running it."""
        job_id = new.id or new_job_id()
        now = time.time()
        fields: dict[str, str] = {
            JobField.ID: job_id,
            JobField.APP: new.app,
            JobField.SOURCE: new.source,
            JobField.STATUS: JobStatus.QUEUED,
            JobField.SCOPE: new.scope,
            JobField.CREATED_AT: repr(now),
            JobField.ATTEMPTS: "0",
            JobField.REQUEST: new.request.model_dump_json(),
            JobField.PRIORITY: str(new.priority),
            JobField.TENANT: new.tenant or default_tenant(new.scope),
        }
        # What a job may not have is left out rather than stored empty: in a record's hash (most outgrow Redis's
        # compact encoding) each field costs about 60 bytes even when empty. Readers take a missing one as none.
        optional = {JobField.IDEMPOTENCY_KEY: new.idempotency_key, JobField.REQUEST_ID: new.request_id,
                    JobField.TRACEPARENT: new.traceparent, JobField.CALLBACK_URL: new.callback_url,
                    JobField.THREAD: new.thread}
        fields.update({name: value for name, value in optional.items() if value})
        message = self.message(JOBS_QUEUE, job_id, hints=run_hints(new.app, priority=new.priority,
                                                                     tenant=fields[JobField.TENANT]))
        fields[JobField.MESSAGE] = message.redis_message_id
        idempotency_key = self.idempotency_key(new.scope, new.idempotency_key) if new.idempotency_key else ""
        request_hash = new.request_hash() if idempotency_key else ""
        created_ms = int(now * 1000)
        header: dict[str, Any] = {"id": job_id, "created_ms": created_ms,
                                  "prune_before_ms": created_ms - int(self.config.result_ttl * 1000),
                                  "message_id": message.redis_message_id, "message_body": message.body.decode()}
        if idempotency_key:
            header.update(claim=f"{job_id}|{request_hash}", claim_ttl_ms=int(self.config.idempotency_ttl * 1000))
        client = client_of_scope(new.scope)
        if (app_cap := self.max_pending.apps.get(new.app)) is not None:
            header["max_pending_app"] = app_cap
        if client is not None and (client_cap := self.max_pending.clients.get(client)) is not None:
            header["max_pending_client"] = client_cap
        if new.thread:
            header["thread"] = {"name": new.thread, "app": new.app, "user": new.thread_user or "",
                                "now": repr(now), "ttl_ms": int(self.thread_ttl * 1000),
                                "job_prefix": self.keys.job("")}
        thread = self.thread_keys(new.app, new.thread)
        pairs = [item for pair in fields.items() for item in pair]
        return SubmitCall(
            keys=[idempotency_key or self.job_key(job_id), self.job_key(job_id), self.index_key(),
                  self.index_key(new.app), message.queue_key, message.bodies_key,
                  *self.pending_keys(new.app, new.scope), self.keys.wake(JOBS_QUEUE), thread.state,
                  thread.line, thread.jobs, self.keys.express_tail(JOBS_QUEUE) if new.priority > 0 else "",
                  self.keys.low_lane(JOBS_QUEUE) if new.priority < 0 else ""],
            args=[dumps(header), *pairs],
            fields=fields,
            request_hash=request_hash,
        )

    @staticmethod
    def submit_reply(call: SubmitCall, reply: list[Any]) -> SubmitOutcome | str:
        """Read submit.lua's reply: the outcome of a created job, or the id of the job the idempotency key already
        names (the caller reads it with ``replayed``); IdempotencyConflict when that job was a different request,
        TooManyPending when a ``max_pending`` cap refused it."""
        state, value = _text(reply[0]), _text(reply[1])
        if state == "created":
            return SubmitOutcome(job_resource(call.fields), created=True)
        if state == "full":
            fields = call.fields
            client = client_of_scope(fields[JobField.SCOPE])
            name = fields[JobField.APP] if value == "app" or client is None else client
            raise TooManyPending(value, name, int(reply[2]))
        existing_id, _, existing_hash = value.partition("|")
        if existing_hash != call.request_hash:
            raise IdempotencyConflict(existing_id)
        return existing_id

    @staticmethod
    def replayed(job_id: str, raw: dict[Any, Any]) -> SubmitOutcome:
        """The replay outcome from the existing job's hash (HGETALL); IdempotencyConflict when it has expired."""
        if not raw:
            raise IdempotencyConflict(job_id)
        return SubmitOutcome(job_resource({_text(k): _text(v) for k, v in raw.items()}), created=False)

    def submit(self, new: NewJob) -> SubmitOutcome:
        """Create the job and enqueue it, or return the job its idempotency key already names."""
        return self.run_submit(self.submit_call(new))

    def run_submit(self, call: SubmitCall) -> SubmitOutcome:
        """Run one submit call; running it again (a retry after a lost reply) answers the same and writes nothing.
        With ``durable_submit`` the script and a WAIT for a replica go in one pipeline, on one connection (WAIT
        counts what its connection wrote); NotReplicated when no replica acknowledged in time."""
        if not self.durable_submit:
            found = self.submit_reply(call, self._submit(keys=call.keys, args=call.args))
        else:
            pipe = self.redis.pipeline(transaction=False)
            self._submit(keys=call.keys, args=call.args, client=pipe)
            pipe.wait(DURABLE_SUBMIT_REPLICAS, DURABLE_SUBMIT_TIMEOUT_MS)
            reply, acknowledged = pipe.execute()
            _check_replicated(acknowledged)
            found = self.submit_reply(call, reply)
        if isinstance(found, SubmitOutcome):
            return found
        return self.replayed(found, self.redis.hgetall(self.job_key(found)))

    async def submit_async(self, client: redis.asyncio.Redis, new: NewJob) -> SubmitOutcome:
        """``submit`` over the API's asyncio client (``Runtime.async_redis``): the same script, keys, args and
        outcome."""
        call = self.submit_call(new)
        script = self._async_submits.get(id(client))
        if script is None:  # registered once per client: the script's digest is not computed again per submit
            script = self._async_submits[id(client)] = client.register_script(self._submit.script)
        if not self.durable_submit:
            found = self.submit_reply(call, await script(keys=call.keys, args=call.args))
        else:
            pipe = client.pipeline(transaction=False)
            await script(keys=call.keys, args=call.args, client=pipe)
            pipe.wait(DURABLE_SUBMIT_REPLICAS, DURABLE_SUBMIT_TIMEOUT_MS)
            reply, acknowledged = await pipe.execute()
            _check_replicated(acknowledged)
            found = self.submit_reply(call, reply)
        if isinstance(found, SubmitOutcome):
            return found
        return self.replayed(found, await client.hgetall(self.job_key(found)))

    def hints_of(self, job_id: str) -> RunHints:
        """The app, the priority and the tenant of a job, for a message that does not name them (the reaper's, or
        one written before messages carried hints); no app for a missing job."""
        values = self.redis.hmget(self.job_key(job_id), JobField.APP, JobField.PRIORITY, JobField.TENANT,
                                  JobField.SCOPE)
        app, priority, tenant, scope = (_text(value) if value is not None else None for value in values)
        return RunHints(app, int(priority or 0), tenant or default_tenant(scope or "anonymous"))

    def fields(self, job_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(self.job_key(job_id))
        return {_text(k): _text(v) for k, v in raw.items()} if raw else None

    def get(self, job_id: str) -> dict[str, Any] | None:
        fields = self.fields(job_id)
        return job_resource(fields) if fields else None

    def walk(
        self,
        app: str | None = None,
        *,
        after: IndexPosition | None = None,
        until_ms: int | None = None,
        since_ms: int | None = None,
        batch: int = 100,
    ) -> Iterator[list[tuple[str, int]]]:
        """The index (every job's, or one app's) newest first, in batches of (job id, created ms): below
        ``after`` (the last job of a previous page), created from ``since_ms`` up to ``until_ms``."""
        index = self.index_key(app)
        upper: int | str = after.score if after else (until_ms if until_ms is not None else "+inf")
        lower: int | str = since_ms if since_ms is not None else "-inf"
        offset = 0
        while True:
            entries = self.redis.zrevrangebyscore(index, upper, lower, start=offset, num=batch, withscores=True)
            offset += len(entries)
            found = [(_text(member), int(score)) for member, score in entries]
            yield [entry for entry in found if after is None or after.precedes(entry[1], entry[0])]
            if len(entries) < batch:
                return

    def list(
        self,
        *,
        allowed_apps: set[str] | None,
        status: str | None = None,
        app: str | None = None,
        source: str | None = None,
        tenant: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first; ``cursor`` is the opaque ``next_cursor`` of the previous page (ValueError if it is not).
        Only ``app`` has an index of its own: the other filters are checked on the index's entries as they come."""
        after = IndexPosition.parse(cursor) if cursor else None
        found: list[dict[str, Any]] = []
        for entries in self.walk(app, after=after, batch=max(limit * 2, 50)):
            pipe = self.redis.pipeline(transaction=False)
            for job_id, _score in entries:
                pipe.hmget(self.job_key(job_id), *_LIST_FIELDS)
            for (job_id, score), summary in zip(entries, pipe.execute(), strict=True):
                stored_id, job_app, job_source, job_status, stored_tenant, scope = (
                    _text(v) if v is not None else None for v in summary)
                if stored_id is None or (allowed_apps is not None and job_app not in allowed_apps):
                    continue
                if (status and job_status != status) or (source and job_source != source):
                    continue
                if tenant and job_tenant({JobField.TENANT: stored_tenant or "", JobField.SCOPE: scope or ""}) != tenant:
                    continue
                resource = self.get(job_id)
                if resource:
                    found.append(resource)
                if len(found) >= limit:
                    return found, str(IndexPosition(score, job_id))
        return found, None

    def start_attempt(self, job_id: str, lease_s: float, upstream: UpstreamCheck | None = None) -> AttemptStart:
        """Begin an attempt (see start.lua); a started attempt comes with the job's record. With ``upstream`` (an
        admission that left the Dify key's cooldown to the start), a job on a cooling key is not started."""
        now = time.time()
        now_ms = int(now * 1000)
        keys = [self.job_key(job_id), self.leases_key, self.keys.paused, self.keys.worker_alive(self.worker_id)]
        args: list[Any] = [repr(now), now_ms + int(lease_s * 1000), self.worker_id, job_id,
                           int(HEARTBEAT_LEASES * lease_s * 1000), now_ms]
        if upstream is not None:
            keys.append(upstream.cool)
            args.append(upstream.now)
        reply = self._start(keys=keys, args=args)
        state = _text(reply[0])
        if state == "started":
            return AttemptStart(state, attempt=int(reply[1]), first=_text(reply[2]) == "1",
                                upstream_streak=bool(int(reply[3])), fields=_record(reply, 4))
        if state == "cooling":
            return AttemptStart(state, wait_s=int(reply[1]) / 1e6)
        return AttemptStart(state, status=_text(reply[1]) if len(reply) > 1 else None)

    def record_task_ids(self, task_ids: dict[str, tuple[str, str | None]]) -> list[str]:
        """Write the Dify task id and workflow run id (if any) of each running job's call (one round trip, see
        task_id.lua); returns the jobs whose cancel was asked before their task id was there."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, (task_id, run_id) in task_ids.items():
            self._task_id(keys=[self.job_key(job_id)], args=[task_id, run_id or ""], client=pipe)
        for job_id, ids in task_ids.items():
            self._index_dify_ids(pipe, job_id, ids)
        replies = pipe.execute()[:len(task_ids)]
        return [job_id for job_id, canceled in zip(task_ids, replies, strict=True) if canceled]

    def _index_dify_ids(self, pipe: redis.client.Pipeline, job_id: str, ids: Iterable[str | None]) -> None:
        """Add to ``pipe`` the writes that make each Dify id name the job (``RedisKeys.dify_id``), for a search
        by Dify id among any number of jobs; entries older than ``jobs.result_ttl`` are dropped as they go."""
        now_ms, ttl_ms = int(time.time() * 1000), int(self.config.result_ttl * 1000)
        for key in self._dify_id_keys(ids):
            pipe.zadd(key, {job_id: now_ms})
            pipe.zremrangebyscore(key, "-inf", now_ms - ttl_ms)
            pipe.pexpire(key, ttl_ms)

    def _dify_id_keys(self, ids: Iterable[str | None]) -> list[str]:
        """The index keys (``RedisKeys.dify_id``) of the given Dify ids, each once, none for a missing id."""
        return [self.keys.dify_id(dify_id) for dify_id in dict.fromkeys(dify_id for dify_id in ids if dify_id)]

    def jobs_of_dify_id(self, dify_id: str, limit: int) -> list[str]:
        """The newest ``limit`` jobs a Dify id names (most recently recorded first)."""
        return [_text(job_id) for job_id in self.redis.zrevrange(self.keys.dify_id(dify_id), 0, limit - 1)]

    def record_conversation_restart(self, job_id: str, restart: dict[str, Any]) -> bool:
        """Note on a running thread job that its thread's conversation was gone and the job began a new one
        (conversation_restarted.lua); False when the job no longer runs."""
        return bool(self._conversation_restarted(keys=[self.job_key(job_id)], args=[dumps(restart)]))

    def record_files(self, job_id: str, files: list[dict[str, Any]]) -> bool:
        """Keep the files a running job uploaded to Dify with the job (files.lua); False when it no longer runs."""
        return bool(self._files(keys=[self.job_key(job_id)], args=[dumps(files)]))

    def callback_lock_key(self, job_id: str) -> str:
        """Held while one callback attempt is under way, so two attempts for one job never overlap."""
        return self.keys.callback_lock(job_id)

    def lock_callback(self, job_id: str, lock: CallbackLock) -> float | None:
        """Take the job's callback ``lock``; None when taken, else the seconds until the lock that another attempt
        holds lapses (at least 0.1)."""
        key = self.callback_lock_key(job_id)
        if self.redis.set(key, lock.holder, nx=True, px=lock.ttl_ms):
            return None
        return max(self.redis.pttl(key), 100) / 1000

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> str:
        """Record the outcome (once) and enqueue the callback; returns the status the job ended with."""
        return _text(self._run_finish(job_id, status, result, error, None, None)[0])

    def finish_keeping_callback(
        self,
        job_id: str,
        status: JobStatus,
        *,
        lease_s: float | None,
        lock: CallbackLock,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        record: dict[str, str] | None = None,
        conversation: ThreadConversation | None = None,
        along: Sequence[ScriptCall] = (),
    ) -> tuple[str, dict[str, str] | None]:
        """Record the outcome like ``finish``, but a job with a callback URL keeps its lease (``lease_s``) and
        takes the callback ``lock`` instead of enqueueing the callback: the caller sends the first
        attempt and records it with ``callback_attempted``. Returns the status and, when the caller owns the
        first attempt, the stored record; else None (no callback URL, the outcome was already stored, or
        ``lease_s`` None: the callback is enqueued as by ``finish``). ``record``: the job's record as its attempt
        started, which names its app, scope and thread (they never change), so they need no read. ``conversation``:
        what a thread job's attempt did with its thread's conversation, recorded with the outcome. ``along``: other
        scripts' calls (the limiter's release) sent before finish.lua in the same round trip (``run_together``)."""
        now = time.time()
        inline = None
        if lease_s is not None:
            inline = {"lease_expiry_ms": int((now + lease_s) * 1000), "lock_ms": lock.ttl_ms,
                      "lock_holder": lock.holder}
        reply = self._run_finish(job_id, status, result, error, inline, now, record, conversation, along)
        final = _text(reply[0])
        return final, (_record(reply, 1) if len(reply) > 1 else None)

    def _run_finish(self, job_id: str, status: JobStatus, result: dict[str, Any] | None,
                    error: dict[str, Any] | None, inline: dict[str, Any] | None, now: float | None = None,
                    record: dict[str, str] | None = None, conversation: ThreadConversation | None = None,
                    along: Sequence[ScriptCall] = ()) -> list[Any]:
        """One finish.lua call, after ``along`` in the same round trip; its arguments are one JSON object (see the
        script)."""
        message = self.message(CALLBACKS_QUEUE, job_id)
        now = time.time() if now is None else now
        pending, thread = self._placement_of(job_id, record)
        outcome: dict[str, Any] = {
            "id": job_id, "status": status.value, "finished_at": repr(now),
            "retention_ms": int(self.config.result_ttl * 1000), "callback": CallbackBlock.pending().stored(),
            "message_id": message.redis_message_id, "message_body": message.body.decode(),
            "message_due_ms": message.due_ms,
        }
        if result is not None:
            outcome["result"] = dumps(result).decode()
        if error is not None:
            outcome["error"] = dumps(error).decode()
        if inline is not None:
            outcome["inline"] = inline
        outcome["indexed_ms"] = int(time.time() * 1000)
        if thread.line:
            outcome["thread"] = self._thread_outcome(conversation, now)
        finish = ScriptCall(
            self._finish,
            [self.job_key(job_id), self.leases_key, message.queue_key, message.bodies_key,
             self.callback_lock_key(job_id), *pending, thread.state, thread.line, *self._jobs_queue_keys,
             self.keys.callbacks_due, *self._dify_id_keys((result or {}).get(name) for name in INDEXED_RESULT_IDS)],
            [dumps(outcome)])
        reply = run_together(self.redis, [*along, finish])[-1]
        if error is not None and status != JobStatus.SUCCEEDED and _text(reply[0]) in FINAL_STATUSES:
            self._count_error(job_id, error)
        return reply

    def _count_error(self, job_id: str, error: dict[str, Any]) -> None:
        """Count an error the record took among its app's failed attempts (``ErrorCounts``)."""
        app = self.redis.hget(self.job_key(job_id), JobField.APP)
        if app is not None:
            self.error_counts.record(_text(app), str(error.get("code") or "unknown"))

    def callback_attempted(self, job_id: str, status: str, block: CallbackBlock, attempt: CallbackAttempt, *,
                           retry_in_s: float | None, lease_of_run: str | None, lock: CallbackLock | None) -> None:
        """Keep ``attempt`` among the job's last callback attempts and store the callback block after an attempt
        that announced ``status``, in the same step as the next
        attempt (a delayed message, ``retry_in_s``) or, for a ``failed`` block of a final job, the dead letter (a
        ``job.paused`` given up is not one: ``POST …/callback/retry`` takes finished jobs only); nothing is stored
        when the job has left ``status`` meanwhile (a paused job resumed). Free the callback ``lock`` the attempt held
        (None: it held none) while it is still the attempt's own. ``lease_of_run``:
        the start (the record's ``attempt_started_at``, '' for a job that never started) of the run under whose lease
        the attempt was made, which then ends (the lease goes, the record forgets the run's message: ``end_run``) unless
        the job was run again since; None when the attempt held no lease."""
        message = self.message(CALLBACKS_QUEUE, job_id, retry_in_s) if retry_in_s is not None else None
        attempted: dict[str, Any] = {
            "id": job_id, "callback": block.stored(), "attempt": attempt.stored(), "now": time.time(),
            "retention_ms": int(self.config.result_ttl * 1000), "status": status,
            "next": "retry" if message else "dead" if block.status == "failed" and status in FINAL_STATUSES
            else "done"}
        if lease_of_run is not None:
            attempted["lease_of_run"] = lease_of_run
        if lock is not None:
            attempted["lock_holder"] = lock.holder
        if message is not None:
            attempted.update(message_id=message.redis_message_id, message_body=message.body.decode(),
                             message_due_ms=message.due_ms)
        self._callback_attempted(
            keys=[self.job_key(job_id), self.leases_key, self.callback_lock_key(job_id),
                  self.callback_dead_letters_key, message.queue_key if message else "",
                  message.bodies_key if message else "", self.keys.callbacks_due],
            args=[dumps(attempted)],
        )

    def enqueue_callback(self, job_id: str, delay_s: float, message_was: str | None = None) -> bool:
        """A (delayed) ``deliver_callback`` message for ``job_id``, while its callback is pending and announced
        (callback_again.lua); ``message_was``: the callback message as read before (nothing is done when another
        was written since). Whether the message was written."""
        message = self.message(CALLBACKS_QUEUE, job_id, delay_s)
        return bool(self._callback_again(
            keys=[self.job_key(job_id), message.queue_key, message.bodies_key, self.keys.callbacks_due],
            args=[job_id, message.redis_message_id, message.body, message.due_ms, message_was or ""]))

    def resume_callback(self, job_id: str) -> bool:
        """Drop a finished job's lease and enqueue its callback if it is still pending (its sender died)."""
        message = self.message(CALLBACKS_QUEUE, job_id)
        return bool(self._resume_callback(
            keys=[self.job_key(job_id), self.leases_key, message.queue_key, message.bodies_key,
                  self.keys.callbacks_due],
            args=[job_id, message.redis_message_id, message.body, message.due_ms],
        ))

    def requeue(
        self, job_id: str, *, delay_s: float, error: dict[str, Any] | None = None, expected: str = JobStatus.RUNNING,
        count_field: str = "", front: bool = False, hints: dict[str, object] | None = None,
        waiting_since: float | None = None, deferred_by: str | None = None, forget_run: bool = False,
        message_was: str | None = None, count_limit: int | None = None,
    ) -> str:
        """Back to ``queued`` with a (delayed) message, at the queue's ``front`` or its end; ``cancel`` when a
        cancel was asked meanwhile. ``hints``: see ``run_hints``; ``waiting_since``: the job's first wait, kept
        once (a job deferred by a limit or a quota); ``deferred_by``: the limit that deferred it;
        ``forget_run``: the next attempt runs the workflow anew instead of following the recorded run (a retry
        after a failure); ``message_was``: the job's message as read before, ``changed`` (nothing done) when
        another one was written since; ``count_limit``: once ``count_field`` goes past it, ``exhausted:<count>``
        and no message (the caller ends the job: no worker can start it meanwhile)."""
        message = self.message(JOBS_QUEUE, job_id, delay_s, hints)
        now = time.time()
        requeue: dict[str, Any] = {"expected": expected, "now": now, "next_attempt_at": repr(now + delay_s),
                                   "message_id": message.redis_message_id, "message_body": message.body.decode(),
                                   "front": front}
        if error:
            requeue["error"] = dumps(error).decode()
        if count_field:
            requeue["count"] = count_field
        if waiting_since is not None:
            requeue["waiting_since"] = repr(waiting_since)
        if deferred_by:
            requeue["deferred_by"] = deferred_by
        if forget_run:
            requeue["forget_run"] = True
        if message_was is not None:
            requeue["message_was"] = message_was
        if count_limit is not None:
            requeue["count_limit"] = count_limit
        reply = _text(self._requeue(keys=[self.job_key(job_id), self.leases_key, message.queue_key,
                                          message.bodies_key, self.keys.paused, message.wake_key],
                                    args=[dumps(requeue)]))
        if error and reply.startswith("queued:"):
            self._count_error(job_id, error)
        return reply

    def pause(self, job_id: str, app: str, pause: dict[str, Any], *, check_in_s: float, priority: int = 0,
              tenant: str | None = None) -> str:
        """A running job's Dify run waits for human input: ``paused`` (returned) with its ``pause`` block and no
        lease, a delayed message in ``check_in_s`` (its forms' expiry) to follow the run then, and with a callback
        URL its ``job.paused`` callback (a pending block and a callbacks message); ``cancel`` when a cancel was
        asked meanwhile."""
        message = self.message(JOBS_QUEUE, job_id, check_in_s, run_hints(app, None, priority, tenant))
        callback = self.message(CALLBACKS_QUEUE, job_id)
        reply = self._pause(
            keys=[self.job_key(job_id), self.leases_key, message.queue_key, message.bodies_key, callback.queue_key,
                  callback.bodies_key, self.keys.paused, self.keys.callbacks_due],
            args=[dumps(pause), message.redis_message_id, message.body, repr(time.time() + check_in_s),
                  CallbackBlock.pending().stored(), callback.redis_message_id, callback.body, int(time.time() * 1000)],
        )
        return _text(reply)

    def resume(self, job_id: str, app: str, priority: int = 0, tenant: str | None = None) -> str:
        """A paused job whose form was submitted: queued at once to follow its run (``queued:…``, else the
        status it had)."""
        return self.requeue(job_id, delay_s=0.0, expected=JobStatus.PAUSED,
                            hints=run_hints(app, None, priority, tenant))

    def defer(self, job_id: str, app: str, *, delay_s: float, waiting_since: float, limit: str | None = None,
              priority: int = 0, tenant: str | None = None) -> str:
        """A queued job waits for a rate limit (``limit``): a delayed message, no attempt spent, the first wait
        remembered."""
        return self.requeue(job_id, delay_s=delay_s, expected=JobStatus.QUEUED, count_field=JobField.DEFERRALS,
                            hints=run_hints(app, waiting_since, priority, tenant), waiting_since=waiting_since,
                            deferred_by=limit)

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for the job (one HGET): a worker following its run stops following."""
        return self.redis.hget(self.job_key(job_id), JobField.CANCEL_REQUESTED) in (b"1", "1")

    def cancel(self, job_id: str) -> CancelOutcome:
        callback = self.message(CALLBACKS_QUEUE, job_id)
        cancel = {"now": repr(time.time()), "retention_ms": int(self.config.result_ttl * 1000),
                  "callback": CallbackBlock.pending().stored(), "message_id": callback.redis_message_id,
                  "message_body": callback.body.decode(), "message_due_ms": callback.due_ms,
                  "job_prefix": self.keys.job("")}
        pending, thread = self._placement_of(job_id)
        reply = self._cancel(keys=[self.job_key(job_id), callback.queue_key, callback.bodies_key, *pending,
                                   self.keys.paused, thread.line, *self._jobs_queue_keys,
                                   self.keys.callbacks_due],
                             args=[dumps(cancel)])
        state = _text(reply[0])
        task_id = _text(reply[1]) if len(reply) > 1 and reply[1] else None
        return CancelOutcome(state, task_id)

    @property
    def callback_dead_letters_key(self) -> str:
        return self.keys.callback_dead_letters

    def rerun(self, job_id: str) -> str:
        """A failed or canceled job runs again (its history of attempts is kept); returns ``queued`` or why not."""
        message = self.message(JOBS_QUEUE, job_id)
        pending, thread = self._placement_of(job_id)
        reply = self._rerun(
            keys=[self.job_key(job_id), message.queue_key, message.bodies_key, *pending, thread.line,
                  self.keys.wake(JOBS_QUEUE)],
            args=[message.redis_message_id, message.body, CallbackBlock.pending().stored(), int(time.time() * 1000)],
        )
        return _text(reply)

    def replay_callback(self, job_id: str) -> bool:
        """Deliver a finished job's callback again, from the first step of the retry schedule."""
        callback = self.message(CALLBACKS_QUEUE, job_id)
        reply = self._replay_callback(
            keys=[self.job_key(job_id), self.callback_dead_letters_key, callback.queue_key, callback.bodies_key,
                  self.keys.callbacks_due],
            args=[callback.redis_message_id, callback.body, CallbackBlock.pending().stored(), callback.due_ms],
        )
        return bool(reply)

    def renew_leases(self, job_ids: list[str], lease_s: float) -> None:
        """Push the lease of every job this process runs ``lease_s`` into the future and set its heartbeat
        (``RedisKeys.worker_alive``: this round's time, for ``HEARTBEAT_LEASES`` leases), in one transaction: a
        lease that ends before this round's time plus a lease is of a job the process no longer runs."""
        now_ms = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.worker_alive(self.worker_id), now_ms, px=int(HEARTBEAT_LEASES * lease_s * 1000))
        if job_ids:
            pipe.zadd(self.leases_key, dict.fromkeys(job_ids, now_ms + int(lease_s * 1000)), xx=True)
        pipe.execute()

    def forget_alive(self) -> None:
        """Drop this process's heartbeat (it stops: whatever lease it still held is the reaper's at once)."""
        self.redis.delete(self.keys.worker_alive(self.worker_id))

    def keep_live_lease(self, job_id: str, lease_s: float) -> bool:
        """Renew the expired lease of a job whose worker process still has its heartbeat (a live but slow process:
        see keep_live_lease.lua); False when the reaper is to take the job back."""
        owner = self.redis.hget(self.job_key(job_id), JobField.WORKER)
        if owner is None:
            return False
        owner = _text(owner)
        return bool(self._keep_live_lease(
            keys=[self.job_key(job_id), self.leases_key, self.keys.worker_alive(owner)],
            args=[owner, int((time.time() + lease_s) * 1000), job_id, int(lease_s * 1000)]))

    def expired_leases(self, limit: int = 100) -> list[str]:
        now_ms = int(time.time() * 1000)
        return [_text(m) for m in self.redis.zrangebyscore(self.leases_key, "-inf", now_ms, start=0, num=limit)]

    def drop_lease(self, job_id: str) -> None:
        self.redis.zrem(self.leases_key, job_id)

    def note_message(self, job_id: str, message_id: str, field: JobField = JobField.MESSAGE) -> None:
        """Record a message Dramatiq enqueued itself as the job's latest of its kind (note_message.lua):
        ``JobField.MESSAGE`` for a ``run_job`` one, ``JobField.CALLBACK_MESSAGE`` for a ``deliver_callback`` one."""
        self._note_message(keys=[self.job_key(job_id)], args=[message_id, field.value])

    def orphans(self, apps: list[str], due_before: float, batch: int = 200) -> list[tuple[str, str, str, str]]:
        """The queued or paused jobs of ``apps`` due before ``due_before`` (unix seconds) whose message is gone (see
        orphans.lua), judged among the apps' unfinished jobs created before then: (job id, app, its message, its
        status)."""
        found: list[tuple[str, str, str, str]] = []
        bodies = [self.keys.queue_bodies(JOBS_QUEUE), self.keys.delayed_bodies(JOBS_QUEUE)]
        for app in apps:
            job_ids = [_text(member) for member in self.redis.zrangebyscore(
                self.keys.pending_of_app(app), "-inf", int(due_before * 1000))]
            for start in range(0, len(job_ids), batch):
                chunk = job_ids[start:start + batch]
                reply = [_text(item) for item in self._orphans(
                    keys=[*bodies, *(self.job_key(job_id) for job_id in chunk)], args=[int(due_before * 1000)])]
                found += [(job_id, app, message, status)
                          for job_id, message, status in zip(reply[::3], reply[1::3], reply[2::3], strict=True)]
        return found

    def callback_orphans(self, due_before: float, batch: int = 200) -> list[tuple[str, str, str]]:
        """The jobs whose callback message was due before ``due_before`` (unix seconds) and is gone (see
        callback_orphans.lua), judged in batches of the callbacks' due index: (job id, its callback message, its
        app). The index loses, on the way, the jobs whose callback no longer waits."""
        found: list[tuple[str, str, str]] = []
        bound_ms = int(due_before * 1000)
        job_ids = [_text(member) for member in self.redis.zrangebyscore(self.keys.callbacks_due, "-inf", bound_ms)]
        keys = [self.keys.callbacks_due, self.keys.queue_bodies(CALLBACKS_QUEUE),
                self.keys.delayed_bodies(CALLBACKS_QUEUE)]
        for start in range(0, len(job_ids), batch):
            chunk = job_ids[start:start + batch]
            reply = [_text(item) for item in self._callback_orphans(
                keys=[*keys, *(self.job_key(job_id) for job_id in chunk)], args=[bound_ms, *chunk])]
            found += list(zip(reply[::3], reply[1::3], reply[2::3], strict=True))
        return found

    def trim_indexes(self, apps: Iterable[str], limit: int = INDEX_TRIM_BATCH) -> int:
        """Drop from the index of every job, from each of ``apps``' indexes and from the callbacks' dead letters up
        to ``limit`` entries older than ``jobs.result_ttl`` (their jobs are gone: a callback is dead-lettered after
        its job ended); the number dropped. submit.lua trims the indexes too, but only as jobs come: this, on the
        upkeep's rounds, empties them on a quiet service, a bounded batch at a time. The indexes of apps no longer
        in ``apps`` (removed from the config) are trimmed too as the walk of the keyspace that each call takes a
        step of finds them (``removed_app_indexes``), and go once their last entry has expired."""
        before_s = time.time() - self.config.result_ttl
        index_cutoff = int(before_s * 1000)  # the indexes are scored in ms, the dead letters in seconds
        indexes = [self.keys.index(None), *(self.keys.index(app) for app in apps)]
        indexes += self.removed_app_indexes(indexes)
        cutoffs = {**dict.fromkeys(indexes, index_cutoff), self.keys.callback_dead_letters: before_s}
        keys = list(cutoffs)
        with self.redis.pipeline(transaction=False) as pipe:
            for key, cutoff in cutoffs.items():
                pipe.zrangebyscore(key, "-inf", cutoff, start=0, num=limit)
            expired = pipe.execute()
        with self.redis.pipeline(transaction=False) as pipe:
            for key, job_ids in zip(keys, expired, strict=True):
                if job_ids:
                    pipe.zrem(key, *job_ids)
            return sum(pipe.execute())

    def removed_app_indexes(self, known: list[str]) -> list[str]:
        """One step (``INDEX_SCAN_STEP`` keys) of a walk of the keyspace that starts again when it ends: the app
        indexes it finds that are not among ``known``."""
        self._index_walk, found = self.redis.scan(self._index_walk, match=self.keys.app_indexes(),
                                                  count=INDEX_SCAN_STEP, _type="zset")
        return [key for key in map(_text, found) if key not in known]

    def take_orphan_turn(self, turn_s: float) -> bool:
        """Whether this process looks for orphaned queued jobs now: no other did in the last ``turn_s``."""
        return bool(self.redis.set(self.keys.orphan_sweep, self.worker_id, nx=True, px=int(turn_s * 1000)))

    def take_reaper_turn(self, turn_s: float) -> bool:
        """Whether this process sweeps expired leases now: no other swept in the last ``turn_s``."""
        return bool(self.redis.set(self.keys.reaper, self.worker_id, nx=True, px=int(turn_s * 1000)))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _record(reply: list[Any], start: int) -> dict[str, str]:
    """The field/value pairs of a script's reply from index ``start`` on, as text (a trailing odd item is not
    a pair)."""
    items = [_text(value) for value in reply[start:]]
    return dict(zip(items[::2], items[1::2], strict=False))
