"""The console's job list: one page of jobs, newest first, read from the job store's creation-time index.

A page never scans: it walks the index (every job, or one app's) from the cursor down, reading at most
``EXAMINE_LIMIT`` entries, and says how far it got when filters left the page short, so a rare status among a
million jobs costs the same as a common one. A search is a direct lookup: a job id, a trace id, an idempotency key,
a thread (``RedisKeys.thread_jobs`` of each app), or a Dify conversation, message, workflow run or task id
(``RedisKeys.dify_id``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from difyq.worker.config import Config
from difyq.worker.jobs.callback_block import CallbackBlock
from difyq.worker.jobs.index_position import IndexPosition
from difyq.worker.jobs.model import client_scope, iso_time, job_id_of_trace, job_tenant
from difyq.worker.jobs.schema import JobField
from difyq.worker.jobs.store import JobStore
from difyq.worker.jobs.threads import Threads
from difyq.worker.json_codec import loads

PAGE_SIZE = 50
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
EXAMINE_LIMIT = 2000
_BATCH = 250
ROW_FIELDS = tuple(JobField(name) for name in (
    "id", "app", "source", "scope", "status", "attempts", "created_at", "started_at", "finished_at",
    "idempotency_key", "result", "callback_url", "callback"))
FILTER_FIELDS = tuple(JobField(name) for name in ("id", "source", "scope", "status", "idempotency_key", "tenant"))


@dataclass(frozen=True)
class JobFilter:
    """The list's filters, as the query string carries them (so a filtered list is a link)."""

    status: str = ""
    app: str = ""
    source: str = ""
    client: str = ""
    tenant: str = ""  # a job stored without one has its scope's default (``job_tenant``)
    since: str = ""  # ISO date or date-time, UTC unless it names a zone
    until: str = ""
    q: str = ""

    def query(self, **changes: str) -> dict[str, str]:
        """The non-empty filters (with ``changes``) as query parameters."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__} | changes
        return {name: value for name, value in values.items() if value}


@dataclass
class JobPage:
    rows: list[dict[str, Any]]
    next_cursor: str | None  # where the next (older) page starts; None at the end of the index
    examined: int = 0
    reached: str | None = None  # the creation time the walk reached when it stopped short of a full page
    searched: bool = False  # the rows are what a search found (no filter applies)


def parse_instant(value: str, name: str) -> int | None:
    """Epoch ms of an ISO date or date-time (UTC when it names no zone); ValueError naming the field."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}: not an ISO 8601 date or date-time: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def origin(fields: dict[str, str | None]) -> tuple[str, str]:
    """(source label, client) of a job: ``hook:<name>``, ``schedule:<name>``, ``api``, ``cli``; the API client."""
    source, scope = fields.get(JobField.SOURCE) or "", fields.get(JobField.SCOPE) or ""
    kind, _, name = scope.partition(":")
    if kind == "client":
        return source, name
    if kind == "hook":
        return f"hook:{name}", ""
    if source == "schedule":
        schedule = (fields.get(JobField.IDEMPOTENCY_KEY) or "").split(":")
        return (f"schedule:{schedule[1]}" if len(schedule) > 2 else "schedule"), ""
    return source, ""


def _seconds(later: str | None, earlier: str | None) -> float | None:
    if not later or not earlier:
        return None
    return max(float(later) - float(earlier), 0.0)


def summary(fields: dict[str, str | None]) -> dict[str, Any]:
    """One row of the list from the stored fields ``ROW_FIELDS``."""
    result = loads(fields[JobField.RESULT]) if fields.get(JobField.RESULT) else {}
    usage = (result or {}).get("usage") or {}
    source, client = origin(fields)
    return {
        "id": fields[JobField.ID], "app": fields[JobField.APP], "source": source, "client": client,
        "status": fields[JobField.STATUS],
        "attempts": int(fields.get(JobField.ATTEMPTS) or 0), "created_at": iso_time(fields.get(JobField.CREATED_AT)),
        "queue_wait_s": _seconds(fields.get(JobField.STARTED_AT), fields.get(JobField.CREATED_AT)),
        "duration_s": _seconds(fields.get(JobField.FINISHED_AT), fields.get(JobField.STARTED_AT)),
        "tokens": usage.get("total_tokens"), "cost": usage.get("total_price"), "currency": usage.get("currency"),
        "callback": CallbackBlock.of({name: value for name, value in fields.items() if value is not None}).status,
    }


class JobsQuery:
    """Reads pages of the job list for the console."""

    def __init__(self, store: JobStore, threads: Threads, config: Config):
        self.store = store
        self.threads = threads
        self.config = config

    def _rows(self, job_ids: list[str], names: tuple[str, ...] = ROW_FIELDS) -> list[dict[str, str | None]]:
        """The ``names`` fields of each job that still exists, in the order given."""
        pipe = self.store.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.store.job_key(job_id), *names)
        rows = []
        for values in pipe.execute():
            fields = dict(zip(names, (_text(value) for value in values), strict=True))
            if fields[JobField.ID]:
                rows.append(fields)
        return rows

    def rows_of(self, job_ids: list[str]) -> list[dict[str, Any]]:
        """The list rows of these jobs (those that still exist), in the order given."""
        return [summary(fields) for fields in self._rows(job_ids)]

    def find(self, text: str, limit: int = PAGE_SIZE) -> list[str]:
        """The jobs a search names: the one of a job id, a trace id or an idempotency key (under any producer's
        scope), else the newest ``limit`` of a thread of that name (in any app), then those a Dify id names."""
        text = text.strip()
        if _TRACE_ID.fullmatch(text):
            text = job_id_of_trace(text)
        if text.startswith("job_") and self.store.redis.exists(self.store.job_key(text)):
            return [text]
        scopes = ([client_scope(name) for name in self.config.clients] + [f"hook:{name}" for name in self.config.hooks]
                  + ["schedule", "cli", "anonymous"])
        pipe = self.store.redis.pipeline(transaction=False)
        for scope in scopes:
            pipe.get(self.store.idempotency_key(scope, text))
        for claim in pipe.execute():
            if claim:
                return [_text(claim).partition("|")[0]]
        named = self.threads.job_ids(self.config.apps, text, limit) + self.store.jobs_of_dify_id(text, limit)
        return list(dict.fromkeys(named))[:limit]

    @staticmethod
    def _matches(fields: dict[str, str | None], wanted: JobFilter) -> bool:
        """Whether a job's ``FILTER_FIELDS`` pass the filters the index cannot."""
        if wanted.status and fields[JobField.STATUS] != wanted.status:
            return False
        source, client = origin(fields)
        if wanted.source and source != wanted.source and source.partition(":")[0] != wanted.source:
            return False
        if wanted.tenant and job_tenant(fields) != wanted.tenant:
            return False
        return not wanted.client or client == wanted.client

    def page(self, wanted: JobFilter, cursor: str = "", limit: int = PAGE_SIZE) -> JobPage:
        """One page, newest first, starting below ``cursor``; ValueError names a bad filter."""
        since, until = parse_instant(wanted.since, "since"), parse_instant(wanted.until, "until")
        after = IndexPosition.parse(cursor) if cursor else None
        if wanted.q:
            return JobPage(self.rows_of(self.find(wanted.q, limit)), None, searched=True)
        filtering = any((wanted.status, wanted.source, wanted.client, wanted.tenant))
        rows: list[dict[str, Any]] = []
        examined = 0
        position: IndexPosition | None = None
        for batch in self.store.walk(wanted.app or None, after=after, until_ms=until, since_ms=since, batch=_BATCH):
            scores = dict(batch)
            if filtering:  # read the few fields the filters need, and whole rows only for the jobs that pass
                passed = [fields[JobField.ID] for fields in self._rows(list(scores), FILTER_FIELDS)
                          if self._matches(fields, wanted)]
                found = self.rows_of(passed[:limit - len(rows)])
            else:
                found = self.rows_of(list(scores))
            for row in found:
                rows.append(row)
                if len(rows) >= limit:
                    return JobPage(rows, str(IndexPosition(scores[row["id"]], row["id"])), examined + len(batch))
            examined += len(batch)
            if batch:
                position = IndexPosition(batch[-1][1], batch[-1][0])
            if examined >= EXAMINE_LIMIT:
                reached = iso_time(position.score / 1000) if position else None
                return JobPage(rows, str(position) if position else None, examined, reached=reached)
        return JobPage(rows, None, examined)
