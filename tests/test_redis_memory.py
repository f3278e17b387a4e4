"""Redis memory per finished job, as docs/operations.md gives it for sizing ``maxmemory``: measured on a private
Redis (``INFO memory``'s ``used_memory``, so nothing else writes meanwhile) over jobs taken through the worker's
whole path (``tests.support.job_path``)."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import redis

from difyq.worker.embedded_redis import EmbeddedRedis
from difyq.worker.jobs.model import JobRequest, NewJob
from difyq.worker.runtime import Runtime
from tests.support.job_path import JobPath
from tests.support.stack import make_runtime

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
# How the page states the figures: "about 3.4 KB for a job with a short query and answer", "a 10 KB answer made
# it 14 KB".
SHORT_ANSWER = "Your order ships on Monday."
STATED = {SHORT_ANSWER: re.compile(r"about (\d+(?:\.\d+)?) KB for a job with a short query and answer"),
          "x" * 10_000: re.compile(r"a 10 KB answer made it (\d+(?:\.\d+)?) KB")}
JOBS = 400


def stated_bytes(answer: str) -> float:
    found = STATED[answer].search(" ".join(OPERATIONS.read_text(encoding="utf-8").split()))
    assert found, f"{OPERATIONS.name} no longer states the memory of a finished job as the test expects"
    return float(found.group(1)) * 1000


def finished_jobs(runtime: Runtime, count: int, answer: str) -> None:
    """``count`` jobs with a short query, a callback and ``answer``, each through its whole life."""
    path = JobPath(runtime)
    for number in range(count):
        result = {"answer": answer, "conversation_id": str(uuid.uuid4()), "message_id": str(uuid.uuid4()),
                  "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}}
        path.through(NewJob(app="support", source="api", request=JobRequest(query=f"ticket {number}"),
                            scope="client:t", callback_url="https://hooks.example.com/difyq"), result)
    path.close()


@pytest.mark.parametrize("answer", list(STATED), ids=["short answer", "10 KB answer"])
def test_a_finished_job_takes_the_redis_memory_the_operations_page_states(namespace: str, answer: str) -> None:
    server = EmbeddedRedis().start()
    try:
        runtime = make_runtime(server.url, namespace, {"support": {"api_key": "app-x", "mode": "chat"}})
        client = redis.Redis.from_url(server.url)
        finished_jobs(runtime, 50, answer)  # the scripts loaded, the listings' and queues' keys made
        before, keys_before = client.info("memory")["used_memory"], client.dbsize()
        finished_jobs(runtime, JOBS, answer)
        per_job = (client.info("memory")["used_memory"] - before) / JOBS
        assert client.dbsize() - keys_before == 3 * JOBS  # each job: its record and its two Dify ids' index keys
    finally:
        server.close()
    stated = stated_bytes(answer)
    assert abs(per_job - stated) <= 0.15 * stated, f"{per_job:.0f} bytes per finished job; the page says {stated:.0f}"
