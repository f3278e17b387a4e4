"""End to end with real processes: ``difyq emulator``, ``difyq api`` and ``difyq worker``; submit and read over
HTTP, the signed callback verified by a receiver, the CLI against the same Redis, metrics scraped."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from difyq.worker.embedded_redis import free_port
from tests.support.processes import difyq_processes, wait_for_port
from tests.support.receiver import CallbackReceiver
from tests.support.stack import CLIENT_TOKEN, SIGNING_SECRET

pytestmark = pytest.mark.e2e


def config_for(namespace: str, emulator_url: str) -> dict:
    return {
        "apps": {
            "support": {"api_key": "app-demo", "mode": "chat", "base_url": emulator_url},
            "report": {"api_key": "app-demo-workflow", "mode": "workflow", "base_url": emulator_url},
        },
        "clients": {"crm": {"token": CLIENT_TOKEN, "apps": ["*"]}},
        "callbacks": {"signing_secret": SIGNING_SECRET, "allow_hosts": ["127.0.0.0/8"],
                      "retry_schedule": ["0.2s", "0.5s"]},
        "jobs": {"retry_min_backoff": "0.1s", "retry_max_backoff": "0.5s"},
        "redis": {"namespace": namespace},
    }


def wait_for_status(base: str, job_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{base}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {CLIENT_TOKEN}"},
                           timeout=10).json()
        if job["status"] in ("succeeded", "failed", "canceled") and job["callback"]["status"] != "pending":
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.mark.slow
def test_submit_run_callback_and_read_back(tmp_path: Path, redis_url: str, namespace: str) -> None:
    emulator_port = free_port()
    with difyq_processes(tmp_path, redis_url, {}) as bootstrap:
        emulator = bootstrap.start("emulator", "emulator", "--port", str(emulator_port))
        wait_for_port(emulator_port, process=emulator)
        emulator_url = f"http://127.0.0.1:{emulator_port}/v1"
        with difyq_processes(tmp_path, redis_url, config_for(namespace, emulator_url)) as difyq, \
                CallbackReceiver() as receiver:
            base = difyq.start_api()
            _, metrics_port = difyq.start_worker(processes=2, threads=4)
            headers = {"Authorization": f"Bearer {CLIENT_TOKEN}", "X-Request-ID": "req-e2e-1"}
            submitted = requests.post(f"{base}/v1/jobs", headers=headers, timeout=10, json={
                "app": "support", "query": "Hello end to end", "user": "e2e-user", "callback_url": receiver.url,
                "metadata": {"ticket": 42}})
            assert submitted.status_code == 202, submitted.text
            job = wait_for_status(base, submitted.json()["id"])
            assert job["status"] == "succeeded" and job["result"]["answer"]
            assert job["callback"]["status"] == "delivered" and job["callback"]["attempts"] == 1

            receiver.wait_for(1, timeout=10)
            assert receiver.verify(SIGNING_SECRET)
            delivered = json.loads(receiver.requests[0].body)
            assert delivered["type"] == "job.succeeded" and delivered["data"]["id"] == job["id"]
            assert delivered["data"]["request"]["metadata"] == {"ticket": 42}
            assert receiver.requests[0].webhook_id == job["id"]

            workflow = difyq.run("enqueue", "--app", "report", "--input", "text=from the CLI", "--wait")
            assert workflow.returncode == 0, workflow.stderr
            cli_job = json.loads(workflow.stdout)
            assert cli_job["status"] == "succeeded" and cli_job["source"] == "cli" and cli_job["result"]["outputs"]

            refused = difyq.run("enqueue", "--app", "support", "--query", "hi", "--user", "")
            assert refused.returncode == 2 and refused.stderr.startswith("--user: "), refused.stderr
            unknown = difyq.run("enqueue", "--app", "nope", "--query", "hi")
            assert unknown.returncode == 2 and unknown.stderr.startswith("--app: no app named 'nope'"), unknown.stderr

            shown = difyq.run("jobs", "show", job["id"])
            assert json.loads(shown.stdout)["id"] == job["id"]
            listed = json.loads(difyq.run("jobs", "list", "--status", "succeeded").stdout)
            assert {j["id"] for j in listed["jobs"]} >= {job["id"], cli_job["id"]}

            scrape = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            assert 'difyq_jobs_finished_total{app="support",status="succeeded"}' in scrape
            assert "dramatiq_messages_total" in scrape and "difyq_queue_messages" in scrape
            assert 'difyq_callback_deliveries_total{outcome="delivered"}' in scrape

            logs = difyq.logs("api", "worker")
            worker_lines = [entry for entry in (json.loads(line) for line in logs.splitlines() if line.startswith("{"))
                            if entry.get("job_id") == job["id"]]
            assert any(line.get("request_id") == "req-e2e-1" and line["event"] == "job_finished"
                       and line.get("callback") == "delivered" for line in worker_lines)
            for secret in ("app-demo", CLIENT_TOKEN, SIGNING_SECRET):
                assert secret not in logs
