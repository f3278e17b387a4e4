"""Conversation threads on real processes (``difyq api``, ``difyq worker``, ``difyq enqueue``), a real Redis and
the emulator: a thread of five jobs submitted at once runs them one at a time in submit order in one Dify
conversation while another thread's jobs run alongside; a thread whose conversation Dify lost (0.15 and 1.x, whose
streaming call would only ping) begins a new one at once and says so in the job, as does one whose conversation
went between the check and the call (after one silent wait), while a call silent for another reason still fails;
a worker SIGKILLed mid-thread loses neither a job nor the order (the lease is 2 s here, ``DIFYQ_JOB_LEASE``)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from difyq.worker.config import parse_config
from difyq.worker.dify.emulator import EmulatedApp, RunningEmulator, start_emulator
from difyq.worker.jobs.schema import FINAL_STATUSES
from difyq.worker.leases import LEASE_ENV
from difyq.worker.runtime import Runtime
from tests.support.processes import DifyqProcesses, difyq_processes
from tests.support.stack import CLIENT_TOKEN, auth
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

APPS = [EmulatedApp(name="support", key="app-support-e2e-001", mode="chat", recalls=True, tokens_per_second=16,
                    answer_tokens=6)]


@dataclass
class Stack:
    runtime: Runtime
    emulator: RunningEmulator
    difyq: DifyqProcesses
    api: str

    def submit(self, body: dict[str, Any]) -> str:
        answer = requests.post(f"{self.api}/v1/jobs", json={"app": "support", **body}, headers=auth(), timeout=10)
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]

    def finals(self, job_ids: list[str], timeout: float = 60.0) -> list[dict[str, Any]]:
        def finished() -> list[dict[str, Any]] | None:
            jobs = [self.runtime.store.get(job_id) for job_id in job_ids]
            return jobs if all(job and job["status"] in FINAL_STATUSES for job in jobs) else None

        return wait_for(finished, timeout, interval=0.1, what=f"{len(job_ids)} jobs ending")

    def chat_calls(self, queries: list[str]) -> list[dict[str, Any]]:
        """The emulator's chat calls for these queries, in the order they began."""
        return sorted((call for call in self.emulator.calls()
                       if call["path"] == "/v1/chat-messages" and (call["body"] or {}).get("query") in queries),
                      key=lambda call: call["started_at"])


@contextmanager
def _stack(tmp_path: Path, redis_url: str, namespace: str, dify_version: str = "0.15",
           env: dict[str, str] | None = None, idle_read_timeout_s: float = 120) -> Iterator[Stack]:
    with start_emulator(APPS, dify_version=dify_version) as emulator:
        config = {"apps": {app.name: {"api_key": app.key, "mode": app.mode, "base_url": emulator.base_url}
                           for app in APPS},
                  "clients": {"full": {"token": CLIENT_TOKEN, "apps": ["*"]}},
                  "jobs": {"retry_min_backoff": "0.1s", "retry_max_backoff": "0.5s"},
                  "dify": {"idle_read_timeout_s": idle_read_timeout_s},
                  "redis": {"namespace": namespace}}
        with difyq_processes(tmp_path, redis_url, config) as difyq:
            difyq.env.update(env or {})
            api = difyq.start_api()
            difyq.start_worker(processes=1, threads=8)
            yield Stack(Runtime(parse_config(config), redis_url), emulator, difyq, api)


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, namespace: str) -> Iterator[Stack]:
    with _stack(tmp_path, redis_url, namespace) as running:
        yield running


def _in_order_one_at_a_time(jobs: list[dict[str, Any]], calls: list[dict[str, Any]], queries: list[str]) -> None:
    """The thread's Dify calls began in submit order, and each job started only once the one before it had
    finished (the job records' times: the emulator notes a call's end only once its connection is closed)."""
    assert [call["body"]["query"] for call in calls] == queries, "the thread's calls began in submit order"
    for earlier, later in pairwise(jobs):
        assert earlier["finished_at"] <= later["started_at"], (
            f"{later['request']['query']} started before {earlier['request']['query']} finished")


def test_a_thread_of_five_runs_in_order_in_one_conversation_beside_another_thread(stack: Stack) -> None:
    ticket = [f"ticket comment {n}" for n in range(5)]
    chat = [f"chat message {n}" for n in range(5)]
    job_ids = {}
    for first, second in zip(ticket, chat, strict=True):  # both threads' jobs submitted at once, interleaved
        job_ids[first] = stack.submit({"query": first, "thread": "github:acme/app#7", "user": "triage"})
        job_ids[second] = stack.submit({"query": second, "thread": "slack:T1/C2:1700000000.1"})
    jobs = dict(zip(job_ids, stack.finals(list(job_ids.values())), strict=True))
    assert {job["status"] for job in jobs.values()} == {"succeeded"}, jobs
    for queries in (ticket, chat):
        calls = stack.chat_calls(queries)
        _in_order_one_at_a_time([jobs[query] for query in queries], calls, queries)
        conversation = jobs[queries[0]]["result"]["conversation_id"]
        assert [call["body"].get("conversation_id") for call in calls] == [None] + [conversation] * 4
        assert {jobs[query]["result"]["conversation_id"] for query in queries} == {conversation}
        assert f"(turn 5; you asked before: '{queries[3]}')" in jobs[queries[4]]["result"]["answer"]
    overlapping = [(a, b) for a in ticket for b in chat if jobs[a]["started_at"] < jobs[b]["finished_at"]
                   and jobs[b]["started_at"] < jobs[a]["finished_at"]]
    assert overlapping, "the two threads' jobs ran alongside each other"
    assert {call["body"]["user"] for call in stack.chat_calls(ticket)} == {"triage"}


@pytest.mark.parametrize("dify_version", ["0.15", "1.x"])
def test_a_thread_whose_conversation_is_gone_begins_a_new_one_at_once(
        tmp_path: Path, redis_url: str, namespace: str, dify_version: str) -> None:
    """Dify 0.15 answers a call to a deleted conversation 404; 1.x streams one ping and then nothing for minutes
    (the emulator's `silent_close_s`, 300 s). The worker asks Dify for the conversation first (`GET /messages`,
    404 at once on both) and never makes that call."""
    with _stack(tmp_path, redis_url, namespace, dify_version) as stack:
        first = stack.finals([stack.submit({"query": "first turn", "thread": "ops:incident/42"})])[0]
        gone = first["result"]["conversation_id"]
        deleted = requests.delete(f"{stack.emulator.base_url}/conversations/{gone}", json={"user": "difyq"},
                                  headers={"Authorization": f"Bearer {APPS[0].key}"}, timeout=10)
        assert deleted.status_code in (200, 204), deleted.text
        second = stack.finals([stack.submit({"query": "second turn", "thread": "ops:incident/42"})], timeout=30)[0]
        assert second["status"] == "succeeded", second
        fresh = second["result"]["conversation_id"]
        assert fresh not in (None, gone)
        assert second["conversation_restarted"]["previous_conversation_id"] == gone
        assert second["conversation_restarted"]["detected_by"] == "messages_check"
        assert "you asked before" not in second["result"]["answer"]
        assert [call["body"].get("conversation_id") for call in stack.chat_calls(["second turn"])] == [None]
        shown = requests.get(f"{stack.api}/v1/threads/{quote('ops:incident/42', safe='')}",
                             params={"app": "support"}, headers=auth(), timeout=10).json()
        assert shown["conversation_id"] == fresh
        assert [job["conversation_restarted"] for job in shown["jobs"]] == [True, False]
        third = stack.finals([stack.submit({"query": "third turn", "thread": "ops:incident/42"})])[0]
        assert third["result"]["conversation_id"] == fresh and third["conversation_restarted"] is None


def test_a_conversation_deleted_between_the_check_and_the_call_is_begun_again_in_the_same_attempt(
        tmp_path: Path, redis_url: str, namespace: str) -> None:
    """Dify 1.x answers the call to a conversation deleted just after the worker's `GET /messages` with one ping
    and silence: once `dify.idle_read_timeout_s` (3 s here) passes, the worker asks again, finds it gone and
    begins a new conversation in the same attempt (the emulator's control deletes it right after the check)."""
    with _stack(tmp_path, redis_url, namespace, "1.x", idle_read_timeout_s=3) as stack:
        first = stack.finals([stack.submit({"query": "first turn", "thread": "ops:incident/43"})])[0]
        gone = first["result"]["conversation_id"]
        armed = requests.post(f"{stack.emulator.base_url.removesuffix('/v1')}/_emulator/apps/support/conversations/"
                              f"{gone}/delete-once-checked", timeout=10)
        assert armed.status_code == 204, armed.text
        second = stack.finals([stack.submit({"query": "second turn", "thread": "ops:incident/43"})], timeout=60)[0]
        assert second["status"] == "succeeded", second
        assert second["attempts"] == 1, "the new conversation was begun within the attempt, not on a retry"
        fresh = second["result"]["conversation_id"]
        assert fresh not in (None, gone)
        assert second["conversation_restarted"]["previous_conversation_id"] == gone
        assert second["conversation_restarted"]["detected_by"] == "silent_call"
        assert [call["body"].get("conversation_id") for call in stack.chat_calls(["second turn"])] == [gone, None]
        checks = [call for call in stack.emulator.calls() if call["path"] == "/v1/messages"]
        assert [call["status"] for call in checks][-2:] == [200, 404], "checked before the call and after its silence"


def test_a_silent_continuation_of_a_conversation_still_there_fails_as_before(
        tmp_path: Path, redis_url: str, namespace: str) -> None:
    """A 1.x call that falls silent for another reason (here a required input the app now asks for) while the
    conversation is still there fails `no_first_event` after the second question, without a new conversation."""
    with _stack(tmp_path, redis_url, namespace, "1.x", idle_read_timeout_s=3) as stack:
        first = stack.finals([stack.submit({"query": "first turn", "thread": "ops:incident/44"})])[0]
        stack.emulator.set_app("support", required_inputs=["topic"])
        second = stack.finals([stack.submit({"query": "second turn", "thread": "ops:incident/44"})], timeout=60)[0]
        assert second["status"] == "failed", second
        assert second["error"]["code"] == "no_first_event"
        assert second.get("conversation_restarted") is None
        assert [call["body"].get("conversation_id") for call in stack.chat_calls(["second turn"])] == [
            first["result"]["conversation_id"]]
        checks = [call for call in stack.emulator.calls() if call["path"] == "/v1/messages"]
        assert [call["status"] for call in checks][-2:] == [200, 200], "asked again after the silence: still there"


def test_a_worker_killed_mid_thread_loses_neither_a_job_nor_the_order(
        tmp_path: Path, redis_url: str, namespace: str) -> None:
    with _stack(tmp_path, redis_url, namespace, env={LEASE_ENV: "2s"}) as stack:
        pod = stack.difyq.processes[-1][1]
        queries = [f"step {n}" for n in range(5)]
        job_ids = [stack.submit({"query": query, "thread": "deploy:web#9"}) for query in queries]
        wait_for(lambda: stack.runtime.store.get(job_ids[1])["status"] == "running", 30,
                 what="the thread's second job runs")
        os.killpg(pod.pid, signal.SIGKILL)
        pod.wait()
        stack.difyq.start_worker(processes=1, threads=8, name="worker-2")
        jobs = stack.finals(job_ids, timeout=90)
        assert [job["status"] for job in jobs] == ["succeeded"] * 5, jobs
        assert jobs[1]["attempts"] >= 2
        for earlier, later in pairwise(jobs):
            assert earlier["finished_at"] <= later["started_at"], (earlier, later)
        conversation = jobs[0]["result"]["conversation_id"]
        assert {job["result"]["conversation_id"] for job in jobs} == {conversation}
        calls = stack.chat_calls(queries)
        firsts = list(dict.fromkeys(call["body"]["query"] for call in calls))
        assert firsts == queries
        assert [call["body"].get("conversation_id") for call in calls][1:] == [conversation] * (len(calls) - 1)
        assert stack.runtime.threads.get("support", "deploy:web#9")["line"] == []


def test_difyq_enqueue_thread_continues_the_thread(stack: Stack) -> None:
    first = stack.difyq.run("enqueue", "--app", "support", "--thread", "cli:ticket/1", "--query", "from the shell",
                            "--wait", "--timeout", "60")
    assert first.returncode == 0, first.stderr
    second = stack.difyq.run("enqueue", "--app", "support", "--thread", "cli:ticket/1", "--query", "once more",
                             "--wait", "--timeout", "60")
    assert second.returncode == 0, second.stderr
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert one["thread"] == two["thread"] == "cli:ticket/1"
    assert two["result"]["conversation_id"] == one["result"]["conversation_id"]
    assert "you asked before: 'from the shell'" in two["result"]["answer"]
    refused = stack.difyq.run("enqueue", "--app", "support", "--thread", "", "--query", "x")
    assert refused.returncode == 2 and refused.stderr.startswith("--thread:"), refused.stderr
