"""The console's job list query on a real Redis: cursor paging sees every job once, filters and searches, a
walk bounded per page; and what a page may show of a request."""

from __future__ import annotations

import time

from difyq.producers.console import jobs_query
from difyq.producers.console.dead_letters_page import letter_rows
from difyq.producers.console.job_view import job_page, shown_url
from difyq.producers.console.jobs_query import JobFilter, JobsQuery
from difyq.producers.console.redact import REDACTED, Redactor
from difyq.worker.jobs.callback_block import CallbackAttempt, CallbackBlock
from difyq.worker.jobs.model import JobRequest, NewJob, trace_id_for
from difyq.worker.jobs.schema import JobStatus
from tests.support.stack import make_runtime
from tests.support.waiting import wait_for

APPS = {"support": {"api_key": "app-a", "mode": "chat"}, "report": {"api_key": "app-b", "mode": "workflow"}}


def test_pages_cover_every_job_once_and_filters_apply(redis_url: str, namespace: str, monkeypatch) -> None:
    runtime = make_runtime(redis_url, namespace, APPS)
    made = []
    for n in range(23):
        new = NewJob(app="support" if n % 3 else "report", source="api", scope="client:full",
                     idempotency_key=f"key-{n}", request=JobRequest(query=f"q{n}"))
        made.append(runtime.store.submit(new).job["id"])
    query = JobsQuery(runtime.store, runtime.threads, runtime.config)
    seen, cursor = [], ""
    while True:
        page = query.page(JobFilter(), cursor, limit=5)
        seen += [row["id"] for row in page.rows]
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    newest_first = [member.decode() for member in runtime.store.redis.zrevrange(runtime.store.index_key(), 0, -1)]
    assert sorted(seen) == sorted(made) and seen == newest_first  # each once, in the index's order (ties too)

    report = query.page(JobFilter(app="report"))
    assert {row["app"] for row in report.rows} == {"report"} and len(report.rows) == 8
    assert query.page(JobFilter(client="full")).rows and not query.page(JobFilter(client="other")).rows
    acme = runtime.store.submit(NewJob(app="support", source="api", scope="client:full", tenant="acme",
                                       request=JobRequest(query="q"))).job["id"]
    assert [row["id"] for row in query.page(JobFilter(tenant="acme")).rows] == [acme]
    assert len(query.page(JobFilter(tenant="full")).rows) == 23  # stored without one: the client's name
    assert not query.page(JobFilter(tenant="globex")).rows
    assert [row["id"] for row in query.page(JobFilter(q="key-7")).rows] == [made[7]]
    assert [row["id"] for row in query.page(JobFilter(q=made[3])).rows] == [made[3]]
    assert [row["id"] for row in query.page(JobFilter(q=trace_id_for(made[4]))).rows] == [made[4]]

    monkeypatch.setattr(jobs_query, "EXAMINE_LIMIT", 10)
    monkeypatch.setattr(jobs_query, "_BATCH", 5)
    short = query.page(JobFilter(status="failed"))
    assert short.rows == [] and short.examined == 10 and short.reached and short.next_cursor


def test_a_dify_id_names_its_jobs_however_old(redis_url: str, namespace: str, monkeypatch) -> None:
    """A search by Dify id is a lookup, not a match among the jobs a page looks at: it finds the oldest of many
    jobs, a conversation's jobs newest first, a running call's task and run ids; its entries expire like jobs."""
    runtime = make_runtime(redis_url, namespace, APPS)
    made = [runtime.store.submit(NewJob(app="support", source="api", scope="client:full",
                                        request=JobRequest(query=f"q{n}"))).job["id"] for n in range(30)]
    monkeypatch.setattr(jobs_query, "EXAMINE_LIMIT", 10)
    monkeypatch.setattr(jobs_query, "_BATCH", 5)
    query = JobsQuery(runtime.store, runtime.threads, runtime.config)
    runtime.store.start_attempt(made[0], lease_s=30)
    assert runtime.store.record_task_ids({made[0]: ("task-0", "run-0")}) == []
    for dify_id in ("task-0", "run-0"):
        assert [row["id"] for row in query.page(JobFilter(q=dify_id)).rows] == [made[0]], dify_id
    runtime.store.finish(made[0], JobStatus.SUCCEEDED, result={"answer": "hi", "conversation_id": "conv-42",
                                                              "message_id": "msg-0", "usage": None})
    # The index orders by the finish's millisecond; in a tie, by job id (the order the jobs were made in).
    first_finished_ms = int(time.time() * 1000)
    wait_for(lambda: int(time.time() * 1000) > first_finished_ms, timeout=5, what="the next millisecond")
    runtime.store.finish(made[1], JobStatus.SUCCEEDED, result={"answer": "hi", "conversation_id": "conv-42",
                                                              "message_id": "msg-1", "workflow_run_id": "run-1"})
    for dify_id, expected in (("msg-0", [made[0]]), ("run-1", [made[1]]), (" conv-42 ", [made[1], made[0]])):
        page = query.page(JobFilter(q=dify_id, status="failed"))
        assert page.searched and [row["id"] for row in page.rows] == expected, dify_id
    assert query.page(JobFilter(q="conv-nope")).rows == []
    ttl_ms = runtime.store.redis.pttl(runtime.store.keys.dify_id("msg-0"))
    assert 0 < ttl_ms <= runtime.config.jobs.result_ttl * 1000


def test_a_thread_names_its_jobs_in_every_app(redis_url: str, namespace: str) -> None:
    runtime = make_runtime(redis_url, namespace, APPS)
    made = [runtime.store.submit(NewJob(app=app, source="api", scope="client:full", thread=thread,
                                        request=JobRequest(query=f"q{n}"))).job["id"]
            for n, (app, thread) in enumerate((("support", "ticket 42/#a"), ("support", "other"),
                                               ("report", "ticket 42/#a"), ("support", "ticket 42/#a")))]
    query = JobsQuery(runtime.store, runtime.threads, runtime.config)
    page = query.page(JobFilter(q="ticket 42/#a"))
    assert page.searched and [row["id"] for row in page.rows] == [made[3], made[2], made[0]]
    assert [row["id"] for row in query.page(JobFilter(q="ticket 42/#a"), limit=2).rows] == [made[3], made[2]]
    assert query.page(JobFilter(q="ticket 43")).rows == []


def test_source_status_and_time_range_filters(redis_url: str, namespace: str) -> None:
    runtime = make_runtime(redis_url, namespace, APPS)
    origins = [("api", "client:full", None), ("hook", "hook:tickets", None),
               ("schedule", "schedule", "sched:nightly:x"), ("cli", "cli", None), ("api", "client:full", None)]
    made = []
    for source, scope, key in origins:
        made.append(runtime.store.submit(NewJob(app="support", source=source, scope=scope, idempotency_key=key,
                                                request=JobRequest(query="q"))).job)
    query = JobsQuery(runtime.store, runtime.threads, runtime.config)

    def ids(wanted: JobFilter) -> list[str]:
        return [row["id"] for row in query.page(wanted).rows]

    assert ids(JobFilter(source="hook")) == ids(JobFilter(source="hook:tickets")) == [made[1]["id"]]
    assert ids(JobFilter(source="schedule:nightly")) == [made[2]["id"]]
    assert ids(JobFilter(source="cli")) == [made[3]["id"]] and ids(JobFilter(source="hook:other")) == []
    runtime.store.finish(made[0]["id"], JobStatus.FAILED, error={"code": "x"})
    assert ids(JobFilter(status="failed")) == [made[0]["id"]]
    since, until = made[1]["created_at"], made[3]["created_at"]
    within = {job["id"] for job in made if since <= job["created_at"] <= until}  # and jobs of the same ms
    assert {made[1]["id"], made[3]["id"]} <= within
    assert set(ids(JobFilter(since=since, until=until))) == within
    assert set(ids(JobFilter(until=made[0]["created_at"]))) == {job["id"] for job in made
                                                                if job["created_at"] == made[0]["created_at"]}


def test_bad_filters_name_the_field(redis_url: str, namespace: str) -> None:
    runtime = make_runtime(redis_url, namespace, APPS)
    query = JobsQuery(runtime.store, runtime.threads, runtime.config)
    for wanted, cursor, field in ((JobFilter(since="yesterday"), "", "since"), (JobFilter(), "12x", "cursor")):
        try:
            query.page(wanted, cursor)
        except ValueError as exc:
            assert str(exc).startswith(f"{field}:")
        else:
            raise AssertionError(f"{field} accepted")


def test_the_timeline_has_each_callback_attempt_and_the_next_retry(redis_url: str, namespace: str) -> None:
    runtime = make_runtime(redis_url, namespace, APPS)
    job_id = runtime.store.submit(NewJob(app="support", source="api", scope="client:full",
                                         callback_url="https://hooks.example.com/cb?token=s3cret",
                                         request=JobRequest(query="q"))).job["id"]
    runtime.store.start_attempt(job_id, lease_s=30)
    runtime.store.finish(job_id, JobStatus.SUCCEEDED, result={"answer": "hi", "time_to_first_token_s": 0.0})
    sent = CallbackAttempt(time.time(), "job.succeeded", 503, "HTTP 503", 0.05, "retry")
    runtime.store.callback_attempted(job_id, "succeeded", CallbackBlock("pending").attempted(503, 60, False), sent,
                                     retry_in_s=60, lease_of_run=None, lock=None)
    page = job_page(runtime.store.fields(job_id), [], Redactor([]), "http://api")
    events = [(event["what"], event["detail"]) for event in page["timeline"]]
    assert ("callback retry", "job.succeeded: HTTP 503 in 50 ms") in events
    assert events[-1] == ("callback retry due", "attempt 2") and page["job"]["callback"]["next_attempt_at"]
    assert [event["what"] for event in page["timeline"]][:4] == ["submitted", "attempt 1", "first token", "succeeded"]
    assert "s3cret" not in str(page)


def test_a_failed_attempt_shows_its_first_token(redis_url: str, namespace: str) -> None:
    """A stream cut mid-answer: the attempt's row and the timeline say when its first token came."""
    runtime = make_runtime(redis_url, namespace, APPS)
    job_id = runtime.store.submit(NewJob(app="support", source="api", scope="client:full",
                                         request=JobRequest(query="q"))).job["id"]
    runtime.store.start_attempt(job_id, lease_s=30)
    cut = {"code": "stream_incomplete", "message": "the stream broke off", "status": None,
           "time_to_first_token_s": 0.25}
    runtime.store.requeue(job_id, delay_s=60, error=cut)
    page = job_page(runtime.store.fields(job_id), [], Redactor([]), "http://api")
    [row] = page["attempts"]
    assert (row["outcome"], row["code"], row["first_token_s"]) == ("error", "stream_incomplete", 0.25)
    assert ("first token", "250 ms after attempt 1 started") in [(e["what"], e["detail"]) for e in page["timeline"]]


def test_dead_callbacks_are_grouped_by_their_last_answer() -> None:
    def dead(status_code: int | None, outcome: str, error: str) -> dict[str, object]:
        history = [{"status_code": status_code, "outcome": outcome, "error": error}]
        return {"job_id": f"job_{outcome}", "app": "support", "callback": {
            "url": "https://hooks.example.com/cb?token=s3cret", "attempts": 5, "last_status_code": status_code,
            "history": history}}

    rows = letter_rows({"jobs": [], "callbacks": [dead(503, "failed", "HTTP 503"),
                                                  dead(None, "failed", "connection failed: Connection refused"),
                                                  dead(None, "blocked", "resolves to a private address")]})
    assert [row["code"] for row in rows] == ["callback_http_503", "callback_no_answer", "callback_blocked"]
    assert rows[1]["message"] == "5 attempt(s) to hooks.example.com; the last: connection failed: Connection refused"
    assert "s3cret" not in str(rows)


def test_redaction_and_shown_urls() -> None:
    redactor = Redactor(["Customer_Email"])
    shown = redactor.request({"query": "hi", "inputs": {"customer_email": "a@b.c", "nested": {"api_key": "k"},
                                                        "topic": "x"},
                              "metadata": {"GitHub-Token": "t", "ticket": 4}})
    assert shown["inputs"] == {"customer_email": REDACTED, "nested": {"api_key": REDACTED}, "topic": "x"}
    assert shown["metadata"] == {"GitHub-Token": REDACTED, "ticket": 4} and shown["query"] == "hi"
    assert shown_url("https://user:pw@hooks.example.com:8443/cb?token=s3cret") == \
        f"https://hooks.example.com:8443/cb?{REDACTED}"


def test_the_timeline_names_the_limit_of_each_deferral(redis_url: str, namespace: str) -> None:
    runtime = make_runtime(redis_url, namespace, APPS)
    job_id = runtime.store.submit(NewJob(app="support", source="api", scope="client:full",
                                         request=JobRequest(query="q"))).job["id"]
    since = time.time()
    for n, limit in enumerate(("tokens", "tokens", "tokens", "concurrency", "tokens"), start=1):
        assert runtime.store.defer(job_id, "support", delay_s=5, waiting_since=since, limit=limit) == f"queued:{n}"
    page = job_page(runtime.store.fields(job_id), [], Redactor([]), "http://api")
    deferred = [event["detail"] for event in page["timeline"] if event["what"] == "deferred"]
    assert [detail.partition(" times until")[0] for detail in deferred] == [
        "by the tokens limit, 3", "by the concurrency limit", "by the tokens limit"]
    assert page["next_attempt"]
