"""Two ``difyq worker`` processes on one host: each writes its Prometheus samples to a directory of its own, so the
second one's start leaves the first one's metrics alone; a directory named for two workers is refused."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.embedded_redis import free_port
from tests.support.processes import DifyqProcesses, difyq_processes, wait_for_port

pytestmark = pytest.mark.e2e

APP = EmulatedApp(name="demo", key="app-metrics-dir-key-01", mode="chat", answer_tokens=4)


@pytest.fixture(scope="module")
def emulator() -> Iterator:
    with start_emulator([APP]) as running:
        yield running


def succeeded_jobs(port: int) -> float:
    """``difyq_jobs_finished_total{status="succeeded"}`` of the worker whose metrics listen on ``port``."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "difyq_jobs_finished" for sample in family.samples
               if sample.name == "difyq_jobs_finished_total" and sample.labels.get("status") == "succeeded")


def start_worker(difyq: DifyqProcesses, name: str, env: dict[str, str] | None = None) -> int:
    port = free_port()
    process = difyq.start(name, "worker", "--processes", "1", "--threads", "2",
                          env={"DIFYQ_METRICS_PORT": str(port), **(env or {})})
    wait_for_port(port, process=process)
    return port


def metrics_directory(difyq: DifyqProcesses, name: str) -> str:
    for line in difyq.logs(name).splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "worker_metrics_directory":
            return json.loads(line)["path"]
    raise AssertionError(f"{name} logged no worker_metrics_directory line:\n{difyq.logs(name)}")


@pytest.mark.slow
def test_a_second_worker_on_the_host_keeps_the_first_ones_metrics(
    tmp_path: Path, redis_url: str, namespace: str, emulator
) -> None:
    config = {"apps": {APP.name: {"api_key": APP.key, "mode": "chat", "base_url": emulator.base_url}},
              "redis": {"namespace": namespace}}
    with difyq_processes(tmp_path, redis_url, config) as difyq:
        difyq.env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the default: each worker picks its own directory
        first_port = start_worker(difyq, "first")
        enqueued = difyq.run("enqueue", "--app", APP.name, "--query", "counted once", "--wait", "--timeout", "30")
        assert enqueued.returncode == 0, enqueued.stdout + enqueued.stderr
        deadline = time.monotonic() + 10
        while succeeded_jobs(first_port) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert succeeded_jobs(first_port) == 1

        second_port = start_worker(difyq, "second")
        assert succeeded_jobs(first_port) == 1, "the second worker's start erased the first one's metrics"
        assert metrics_directory(difyq, "first") != metrics_directory(difyq, "second")
        assert succeeded_jobs(second_port) == 0

        shared = {"PROMETHEUS_MULTIPROC_DIR": metrics_directory(difyq, "first")}
        refused = difyq.start("third", "worker", env={"DIFYQ_METRICS_PORT": str(free_port()), **shared})
        assert refused.wait(timeout=60) == 2
        assert "is in use by another difyq worker" in difyq.logs("third")
        assert succeeded_jobs(first_port) == 1
