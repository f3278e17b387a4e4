"""Conversation threads on a real Redis, the emulator, the API over HTTP and an in-process worker: a thread's jobs
continue one Dify conversation, one at a time; reading and forgetting a thread by its percent-encoded name; its
conversation's history page by page; a canceled waiting job does not hold its thread up; what a submit refuses.
(A thread under load, a lost conversation and a killed worker: tests/test_threads_e2e.py, on real processes.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import quote

import pytest
import requests

from difyq.producers.scheduler_command import submit_fire_for
from difyq.producers.schedules.fires import render_fire
from difyq.producers.submission import JobSubmission
from difyq.producers.submit import submit
from difyq.worker.dify.emulator import EmulatedApp, RunningEmulator, start_emulator
from difyq.worker.jobs.messages import JOBS_QUEUE
from difyq.worker.jobs.schema import JobField, JobStatus
from difyq.worker.redis_keys import RedisKeys
from difyq.worker.runtime import Runtime
from tests.support.stack import LIMITED_TOKEN, auth, make_runtime, running_worker, serving_api, wait_for_final
from tests.support.waiting import wait_for

APPS = [EmulatedApp(name="support", key="app-support", mode="chat", recalls=True),
        EmulatedApp(name="slow", key="app-slow", mode="chat", tokens_per_second=10, answer_tokens=8),
        EmulatedApp(name="report", key="app-report", mode="workflow", required_inputs=["text"])]
TICKET = "github:acme/app#123"


HOOKS = {"issue-comments": {"app": "support", "verify": {"scheme": "none"}, "query": "{{ body.comment.body }}",
                            "user": "{{ body.comment.user.login }}",
                            "thread": "github:{{ body.repository.full_name }}#{{ body.issue.number }}"}}
SCHEDULES = {"standup": {"app": "support", "cron": "0 9 * * 1-5", "query": "what changed since yesterday?",
                         "thread": "standup:{{ fire_time.strftime('%Y-%m') }}"}}


@pytest.fixture
def stack(redis_url: str, namespace: str) -> Iterator[tuple[Runtime, str, RunningEmulator]]:
    with start_emulator(APPS) as emulator:
        apps = {app.name: {"api_key": app.key, "mode": app.mode, "base_url": emulator.base_url} for app in APPS}
        runtime = make_runtime(redis_url, namespace, apps, hooks=HOOKS, schedules=SCHEDULES)
        with running_worker(runtime, threads=4), serving_api(runtime) as base:
            yield runtime, base, emulator


def _submit(base: str, body: dict) -> dict:
    answer = requests.post(f"{base}/v1/jobs", json=body, headers=auth(), timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()


def _thread_url(base: str, thread: str, tail: str = "") -> str:
    return f"{base}/v1/threads/{quote(thread, safe='')}{tail}"


def test_a_thread_continues_one_conversation_and_shows_it(stack) -> None:
    runtime, base, emulator = stack
    first = _submit(base, {"app": "support", "query": "my printer is on fire", "thread": TICKET, "user": "ann"})
    assert first["thread"] == TICKET
    first = wait_for_final(runtime, first["id"])
    second = wait_for_final(runtime, _submit(base, {"app": "support", "query": "still burning",
                                                    "thread": TICKET, "user": "bob"})["id"])
    assert first["status"] == second["status"] == "succeeded", (first, second)
    conversation = first["result"]["conversation_id"]
    assert second["result"]["conversation_id"] == conversation
    assert "you asked before: 'my printer is on fire'" in second["result"]["answer"]
    chat_bodies = [call["body"] for call in emulator.calls() if call["path"] == "/v1/chat-messages"]
    assert [(body.get("conversation_id"), body["user"]) for body in chat_bodies] == [(None, "ann"),
                                                                                   (conversation, "ann")]

    shown = requests.get(_thread_url(base, TICKET), params={"app": "support"}, headers=auth(), timeout=10)
    assert shown.status_code == 200, shown.text
    thread = shown.json()
    assert (thread["thread"], thread["app"], thread["conversation_id"], thread["user"]) == (
        TICKET, "support", conversation, "ann")
    assert [job["id"] for job in thread["jobs"]] == [second["id"], first["id"]]
    assert thread["line"] == []
    # `/` may also stay as it is in the path; `#` and `?` must be encoded.
    unencoded_slash = requests.get(f"{base}/v1/threads/github%3Aacme/app%23123", params={"app": "support"},
                                   headers=auth(), timeout=10)
    assert unencoded_slash.status_code == 200 and unencoded_slash.json()["conversation_id"] == conversation

    forgotten = requests.delete(_thread_url(base, TICKET), params={"app": "support", "delete_conversation": "true"},
                                headers=auth(), timeout=10)
    assert forgotten.status_code == 200, forgotten.text
    assert forgotten.json() == {"thread": TICKET, "app": "support", "forgotten": True,
                                "conversation_id": conversation, "conversation_deleted": True}
    deletes = [call for call in emulator.calls() if call["method"] == "DELETE"]
    assert [(call["path"], call["body"], call["status"]) for call in deletes] == [
        (f"/v1/conversations/{conversation}", {"user": "ann"}, 200)]
    assert requests.get(_thread_url(base, TICKET), params={"app": "support"}, headers=auth(),
                        timeout=10).status_code == 404
    third = wait_for_final(runtime, _submit(base, {"app": "support", "query": "hello again", "thread": TICKET})["id"])
    assert third["result"]["conversation_id"] not in (None, conversation)
    assert third["conversation_restarted"] is None


def test_a_thread_named_like_its_history_route_is_still_a_thread(stack) -> None:
    runtime, base, _ = stack
    name = "inbox/messages"
    wait_for_final(runtime, _submit(base, {"app": "support", "query": "hi", "thread": name})["id"])
    shown = requests.get(_thread_url(base, name), params={"app": "support"}, headers=auth(), timeout=10)
    assert shown.status_code == 200 and shown.json()["thread"] == name, shown.text
    history = requests.get(_thread_url(base, name, "/messages"), params={"app": "support"}, headers=auth(),
                           timeout=10)
    assert history.status_code == 200 and [m["query"] for m in history.json()["messages"]] == ["hi"], history.text


def test_the_history_pages_back_from_the_newest_messages(stack) -> None:
    runtime, base, _ = stack
    queries = [f"turn {n}" for n in range(1, 6)]
    for query in queries:
        wait_for_final(runtime, _submit(base, {"app": "support", "query": query, "thread": "pager"})["id"])
    seen, cursor, pages = [], None, 0
    while True:
        params = {"app": "support", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = requests.get(_thread_url(base, "pager", "/messages"), params=params, headers=auth(), timeout=10)
        assert page.status_code == 200, page.text
        body = page.json()
        pages += 1
        seen = [message["query"] for message in body["messages"]] + seen
        assert body["has_more"] == (body["next_cursor"] is not None)
        if not body["has_more"]:
            break
        cursor = body["next_cursor"]
    assert seen == queries and pages == 3
    bad_cursor = requests.get(_thread_url(base, "pager", "/messages"), params={"app": "support", "cursor": "x" * 65},
                              headers=auth(), timeout=10)
    assert bad_cursor.status_code == 422 and bad_cursor.json()["error"]["field"] == "cursor"


def test_a_canceled_waiting_job_leaves_its_thread_to_the_next(stack) -> None:
    runtime, base, emulator = stack
    jobs = [_submit(base, {"app": "slow", "query": f"step {n}", "thread": "cancel-me"}) for n in range(3)]
    wait_for(lambda: runtime.store.get(jobs[0]["id"])["status"] == "running", what="the first job runs")
    assert runtime.store.get(jobs[1]["id"])["status"] == "queued"
    canceled = requests.delete(f"{base}/v1/jobs/{jobs[1]['id']}", headers=auth(), timeout=10)
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    last = wait_for_final(runtime, jobs[2]["id"], timeout=30)
    assert last["status"] == "succeeded"
    queries = [call["body"]["query"] for call in emulator.calls() if call["path"] == "/v1/chat-messages"]
    assert queries == ["step 0", "step 2"]
    assert runtime.threads.get("slow", "cancel-me")["line"] == []


def test_what_a_thread_submit_refuses(stack) -> None:
    _, base, _ = stack
    cases = [
        ({"app": "support", "query": "q", "thread": "t", "conversation_id": "abc"}, "thread"),
        ({"app": "report", "inputs": {"text": "x"}, "thread": "t"}, "thread"),
        ({"app": "support", "query": "q", "thread": ""}, "thread"),
        ({"app": "support", "query": "q", "thread": "a\nb"}, "thread"),
        ({"app": "support", "query": "q", "thread": "t" * 257}, "thread"),
    ]
    for body, field in cases:
        answer = requests.post(f"{base}/v1/jobs", json=body, headers=auth(), timeout=10)
        assert answer.status_code == 422 and answer.json()["error"]["field"] == field, (body, answer.text)
    for url, status in [(_thread_url(base, "nobody"), 404), (f"{base}/v1/threads/bad%00name", 422),
                        (f"{base}/v1/threads/bad%ffname", 422)]:
        answer = requests.get(url, params={"app": "support"}, headers=auth(), timeout=10)
        assert answer.status_code == status, (url, answer.text)
        assert answer.json()["error"].get("field") == ("thread" if status == 422 else None)
    no_app = requests.get(_thread_url(base, "t"), headers=auth(), timeout=10)
    assert no_app.status_code == 422 and no_app.json()["error"]["field"] == "app", no_app.text
    limited = requests.get(_thread_url(base, "t"), params={"app": "slow"}, headers=auth(LIMITED_TOKEN), timeout=10)
    assert limited.status_code == 403
    unknown = requests.delete(_thread_url(base, "t"), params={"app": "nope"}, headers=auth(), timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_app"


def test_hooks_and_schedules_name_the_thread_with_a_template(stack) -> None:
    runtime, base, _ = stack
    comments = []
    for login, text in (("ann", "it crashes on start"), ("bob", "same here, on 2.1")):
        delivered = requests.post(f"{base}/hooks/issue-comments", timeout=10, json={
            "repository": {"full_name": "acme/app"}, "issue": {"number": 123},
            "comment": {"body": text, "user": {"login": login}}})
        assert delivered.status_code == 202, delivered.text
        comments.append(wait_for_final(runtime, delivered.json()["id"]))
    assert [job["thread"] for job in comments] == [TICKET, TICKET]
    assert comments[1]["result"]["conversation_id"] == comments[0]["result"]["conversation_id"]
    assert runtime.threads.get("support", TICKET)["user"] == "ann"  # the thread's conversation is its first user's

    schedule = runtime.config.schedules["standup"]
    fires = []
    for day in (7, 8):
        fire_time = datetime(2026, 12, day, 9, tzinfo=UTC)
        outcome = submit_fire_for(runtime)("standup", schedule, fire_time, render_fire("standup", schedule, fire_time))
        fires.append(wait_for_final(runtime, outcome.job["id"]))
    assert [job["thread"] for job in fires] == ["standup:2026-12", "standup:2026-12"]
    assert fires[1]["result"]["conversation_id"] == fires[0]["result"]["conversation_id"]


def test_a_file_sent_with_a_thread_job_is_uploaded_as_the_thread_s_user(stack) -> None:
    """Dify lets only the user who uploaded a file reference it, and a thread's calls run as the thread's user: a
    multipart submit of a later job of the thread uploads its file as that user, whoever the job names."""
    runtime, base, emulator = stack
    opening = _submit(base, {"app": "support", "query": "opening", "thread": "files", "user": "ann"})
    wait_for_final(runtime, opening["id"])
    answer = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10, files={
        "files": ("notes.txt", b"the printer model is X-100", "text/plain")},
        data={"job": json.dumps({"app": "support", "query": "see the notes", "thread": "files", "user": "bob"})})
    assert answer.status_code == 202, answer.text
    job = wait_for_final(runtime, answer.json()["id"])
    assert job["status"] == "succeeded", job
    [upload] = [call for call in emulator.calls() if call["path"] == "/v1/files/upload"]
    assert upload["body"]["user"] == "ann"
    [call] = [call for call in emulator.calls() if call["path"] == "/v1/chat-messages"
              and call["body"]["query"] == "see the notes"]
    assert call["body"]["user"] == "ann" and call["body"]["files"][0]["transfer_method"] == "local_file"


def test_a_line_whose_first_job_ended_without_handing_on_is_handed_on_by_the_next_submit(
        redis_url: str, namespace: str) -> None:
    """No script ends a thread's first job without handing its line on; should a line still be found stalled (its
    first job finished, the next one holding its message), the thread's next submit hands it on first."""
    runtime = make_runtime(redis_url, namespace, {"support": {"api_key": "app-x", "mode": "chat",
                                                              "base_url": "http://127.0.0.1:9/v1"}})
    keys = RedisKeys(namespace)

    def submitted(query: str) -> str:
        return submit(runtime, JobSubmission(app="support", query=query, thread="stalled"), source="api",
                      scope="test").job["id"]

    first, second = submitted("one"), submitted("two")
    held = json.loads(runtime.redis.hget(keys.job(second), JobField.HELD_MESSAGE))
    assert runtime.redis.lrange(keys.queue(JOBS_QUEUE), 0, -1).count(held["id"]) == 0
    runtime.redis.hset(keys.job(first), JobField.STATUS, JobStatus.FAILED)  # ended, as no script leaves it
    third = submitted("three")
    assert runtime.redis.lrange(keys.thread_line("support", "stalled"), 0, -1) == [second, third]
    assert runtime.redis.hget(keys.job(second), JobField.HELD_MESSAGE) is None
    assert held["id"] in runtime.redis.lrange(keys.queue(JOBS_QUEUE), 0, -1)
    assert runtime.redis.hget(keys.job(third), JobField.HELD_MESSAGE) is not None
