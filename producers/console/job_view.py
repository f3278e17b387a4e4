"""What the job page shows: the redacted request, the timeline, the outcome and a curl line to submit it again."""

from __future__ import annotations

import json
import shlex
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from difyq.producers.console.jobs_query import origin
from difyq.producers.console.redact import REDACTED, Redactor
from difyq.worker.jobs.model import iso_time, job_resource
from difyq.worker.jobs.schema import JobField
from difyq.worker.jobs.store import INDEXED_RESULT_IDS
from difyq.worker.json_codec import dumps, loads

# Stored fields the job page reads besides the resource's own.
_EXTRA_FIELDS = tuple(JobField(name) for name in (
    "scope", "request_id", "waiting_since", "cancel_requested", "deferrals", "deferred_by", "worker_losses",
    "next_attempt_at"))


def shown_url(url: str | None) -> str | None:
    """A URL without its query string or user info (either may carry a credential)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, REDACTED if parts.query else "", ""))


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _event(at: float | str | None, what: str, detail: str = "", kind: str = "") -> dict[str, Any] | None:
    """A timeline event; ``ms`` orders the timeline (a millisecond, as times are shown: within one, events keep
    the order they were added in, which is the order they happen in)."""
    if at in (None, ""):
        return None
    return {"at": float(at), "ms": int(float(at) * 1000), "time": iso_time(at), "what": what, "detail": detail,
            "kind": kind}


def duration_text(value: float | None) -> str:
    """A duration to read: ``850 ms``, ``12.3 s``, ``4 min 5 s``, ``2 h 3 min``; an en dash when unknown."""
    if value is None:
        return "\u2013"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def deferrals(fields: dict[str, str]) -> list[dict[str, Any] | None]:
    """The timeline's deferrals: each run of consecutive ones by one limit (of a record that keeps its deferral
    history), else one event for them all with the limit that deferred the job last."""
    runs = loads(fields[JobField.DEFERRAL_HISTORY]) if fields.get(JobField.DEFERRAL_HISTORY) else []
    if not runs:
        limit, count = fields.get(JobField.DEFERRED_BY) or "rate", fields.get(JobField.DEFERRALS) or 1
        return [_event(fields.get(JobField.WAITING_SINCE), "deferred", f"by the {limit} limit ({count} deferral(s))",
                       "wait")]
    shown = []
    for run in runs:
        detail = f"by the {run['limit']} limit"
        if run["count"] > 1:
            detail += f", {run['count']} times until {iso_time(run['last_at'])[11:23]}"
        shown.append(_event(run["first_at"], "deferred", detail, "wait"))
    return shown


def attempts(fields: dict[str, str], job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every attempt the record knows, oldest first: each failed one (with Dify's status, code and message) and
    the latest one when it did not fail; each with its start, duration and time to first token where known."""
    rows = [{"attempt": error.get("attempt"), "started_at": error.get("started_at"),
             "duration_s": error.get("duration_s"), "outcome": "error", "code": error.get("code"),
             "status": error.get("status"), "message": error.get("message"),
             "first_token_s": error.get("time_to_first_token_s")}
            for error in job["attempt_errors"]]
    failed = {row["attempt"] for row in rows}
    latest = fields.get(JobField.ATTEMPT_STARTED_AT) or (fields.get(JobField.STARTED_AT) if job["attempts"] == 1
                                                         else None)
    if job["attempts"] and job["attempts"] not in failed and latest:
        finished = fields.get(JobField.FINISHED_AT)
        result = job.get("result") or {}
        rows.append({"attempt": job["attempts"], "started_at": iso_time(latest),
                     "duration_s": max(float(finished) - float(latest), 0.0) if finished else None,
                     "outcome": job["status"], "code": None, "status": None, "message": None,
                     "first_token_s": result.get("time_to_first_token_s")})
    return rows


def timeline(fields: dict[str, str], job: dict[str, Any], attempt_rows: list[dict[str, Any]],
             actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's events in time order, from its record, its callback attempts and the operators' actions."""
    source, client = origin(fields)
    submitter = f"by {source}" + (f" (client {client})" if client else "")
    events = [_event(fields.get(JobField.CREATED_AT), "submitted", submitter), *deferrals(fields)]
    for row in attempt_rows:
        if not row["started_at"]:
            continue
        at = _epoch(row["started_at"])
        if row["outcome"] == "error":
            status = f" (Dify HTTP {row['status']})" if row["status"] else ""
            detail = f"failed after {duration_text(row['duration_s'])}: {row['code']}{status}: {row['message'] or ''}"
            events.append(_event(at, f"attempt {row['attempt']}", detail, "bad"))
        else:
            ended = f"{row['outcome']} after {duration_text(row['duration_s'])}" if row["duration_s"] is not None \
                else row["outcome"]
            events.append(_event(at, f"attempt {row['attempt']}", ended))
        if row["first_token_s"] is not None:
            events.append(_event(at + row["first_token_s"], "first token",
                                 f"{row['first_token_s'] * 1000:.0f} ms after attempt {row['attempt']} started"))
    error = job.get("error") or {}
    last = attempt_rows[-1] if attempt_rows else {}
    if error and not (last.get("outcome") == "error" and last.get("started_at")):  # no attempt ran into it
        ended = fields.get(JobField.FINISHED_AT) or fields.get(JobField.CREATED_AT)
        events.append(_event(ended, "error", f"{error.get('code', '')}: {error.get('message', '')}", "bad"))
    outcome = "bad" if job["status"] == "failed" else "ok"
    events.append(_event(fields.get(JobField.FINISHED_AT), job["status"], "", outcome))
    for sent in job["callback"]["history"]:
        answer = f"HTTP {sent['status_code']}" if sent["status_code"] is not None else sent["error"] or "no answer"
        detail = f"{sent['event']}: {answer} in {duration_text(sent['duration_s'])}"
        kind = "ok" if sent["outcome"] == "delivered" else "bad"
        events.append(_event(_epoch(sent["at"]), f"callback {sent['outcome']}", detail, kind))
    callback = job["callback"]
    if callback.get("next_attempt_at"):
        events.append(_event(_epoch(callback["next_attempt_at"]), "callback retry due",
                             f"attempt {callback['attempts'] + 1}", "wait"))
    for action in actions:
        events.append(_event(action["at"], f"{action['action']} by {action['operator']}", action["outcome"], "op"))
    return sorted((event for event in events if event), key=lambda event: event["ms"])


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def curl_line(api_base: str, job: dict[str, Any], request: dict[str, Any]) -> str:
    """A curl command that submits the same (redacted) request; the client token is left as $DIFYQ_TOKEN."""
    body = {"app": job["app"], **{name: value for name, value in request.items() if value not in (None, {}, [])}}
    if job["callback"].get("url"):
        body["callback_url"] = shown_url(job["callback"]["url"])
    return " ".join([
        "curl", "-X", "POST", shlex.quote(f"{api_base}/v1/jobs"),
        "-H", '"Authorization: Bearer $DIFYQ_TOKEN"',
        "-H", shlex.quote("Content-Type: application/json"),
        "-d", shlex.quote(dumps(body).decode()),
    ])


def dify_ids(fields: dict[str, str], result: dict[str, Any]) -> dict[str, str]:
    """The job's Dify ids: its result's, and while it has none, the running call's workflow run; the call's
    task id."""
    ids = {name: result.get(name) or None for name in INDEXED_RESULT_IDS}
    ids["workflow_run_id"] = ids["workflow_run_id"] or fields.get(JobField.DIFY_RUN_ID)
    ids["task_id"] = fields.get(JobField.TASK_ID)
    return {name: value for name, value in ids.items() if value}


def job_page(fields: dict[str, str], actions: list[dict[str, Any]], redactor: Redactor,
             api_base: str) -> dict[str, Any]:
    """Everything the job template renders; nothing secret (see ``Redactor`` and ``shown_url``)."""
    job = job_resource(fields)
    attempt_rows = attempts(fields, job)
    request = redactor.request(job.get("request"))
    result = job.get("result") or {}
    job["callback"] = {**job["callback"], "url": shown_url(job["callback"].get("url"))}
    source, client = origin(fields)
    extra = {name: fields.get(name) or None for name in _EXTRA_FIELDS}
    started, created, finished = (fields.get(name) for name in (
        JobField.STARTED_AT, JobField.CREATED_AT, JobField.FINISHED_AT))
    return {
        "job": job, "submitted": request, "result": result, "usage": result.get("usage") or {},
        "source": source, "client": client, "extra": extra,
        "ids": dify_ids(fields, result),
        "queue_wait_s": float(started) - float(created) if started and created else None,
        "duration_s": float(finished) - float(started) if finished and started else None,
        "attempts": attempt_rows,
        "timeline": timeline(fields, job, attempt_rows, actions),
        "next_attempt": iso_time(fields.get(JobField.NEXT_ATTEMPT_AT)),
        "curl": curl_line(api_base, job, request),
        "outputs_json": pretty_json(result["outputs"]) if result.get("outputs") else None,
    }
