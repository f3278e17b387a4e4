"""Every producer can give a job ``files``: the API body, a hook's templates, a schedule's templates and
``difyq enqueue --file``; each becomes the same job request (one JobSubmission model)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import requests

import difyq.worker.runtime as worker_runtime
from difyq.producers.cli import main as difyq
from difyq.producers.scheduler_command import submit_fire_for
from difyq.producers.schedules.fires import render_fire
from difyq.worker.runtime import Runtime
from tests.support.stack import auth, make_runtime, serving_api

IMAGE = {"type": "image", "transfer_method": "remote_url", "url": "https://files.example.com/a.png"}
FILE_TEMPLATE = {"type": "image", "transfer_method": "remote_url", "url": "{{ body.image }}"}


@pytest.fixture
def runtime(redis_url: str, namespace: str) -> Runtime:
    app = {"api_key": "app-files-key-00001", "mode": "chat", "base_url": "http://127.0.0.1:9/v1"}
    return make_runtime(
        redis_url, namespace, {"support": app},
        hooks={"shots": {"app": "support", "verify": {"scheme": "none"}, "query": "{{ body.text }}",
                         "files": [FILE_TEMPLATE]},
               "mail": {"app": "support", "verify": {"scheme": "none"}, "query": "{{ body.subject }}",
                        "files": [{"url": "{{ body.attachment }}"}]}},
        schedules={"daily": {"app": "support", "cron": "0 9 * * *", "query": "digest",
                             "files": [{"type": "document", "transfer_method": "remote_url",
                                        "url": "https://files.example.com/{{ fire_time.date() }}.pdf"}]}})


def test_the_api_and_a_hook_give_a_job_files(runtime: Runtime) -> None:
    with serving_api(runtime) as base:
        by_api = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10,
                               json={"app": "support", "query": "look", "files": [IMAGE]})
        by_hook = requests.post(f"{base}/hooks/shots", timeout=10,
                                json={"text": "look", "image": IMAGE["url"]})
    assert by_api.status_code == 202 and by_hook.status_code == 202, (by_api.text, by_hook.text)
    for answer in (by_api, by_hook):
        assert runtime.store.get(answer.json()["id"])["request"]["files"] == [IMAGE]


def test_a_hook_maps_an_attachment_url_alone_to_a_file(runtime: Runtime) -> None:
    with serving_api(runtime) as base:
        delivered = requests.post(f"{base}/hooks/mail", timeout=10, json={
            "subject": "contract", "attachment": "https://files.example.com/mail/contract.pdf"})
    assert delivered.status_code == 202, delivered.text
    assert runtime.store.get(delivered.json()["id"])["request"]["files"] == [
        {"type": "document", "transfer_method": "remote_url", "url": "https://files.example.com/mail/contract.pdf"}]


def test_a_schedule_s_fire_gives_its_job_files(runtime: Runtime) -> None:
    fire_time = datetime(2026, 12, 5, 9, tzinfo=UTC)
    schedule = runtime.config.schedules["daily"]
    outcome = submit_fire_for(runtime)("daily", schedule, fire_time, render_fire("daily", schedule, fire_time))
    assert runtime.store.get(outcome.job["id"])["request"]["files"] == [
        {"type": "document", "transfer_method": "remote_url", "url": "https://files.example.com/2026-12-05.pdf"}]


def test_difyq_enqueue_gives_a_job_files(runtime: Runtime, capsys, monkeypatch) -> None:
    monkeypatch.setattr(worker_runtime, "_current", runtime)
    assert difyq(["enqueue", "--app", "support", "--query", "look", "--file", IMAGE["url"],
                  "--file", "https://files.example.com/notes.txt?v=2"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert runtime.store.get(job["id"])["request"]["files"] == [
        IMAGE, {"type": "document", "transfer_method": "remote_url", "url": "https://files.example.com/notes.txt?v=2"}]
