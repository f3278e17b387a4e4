"""``difyq dev`` on its embedded defaults: it prints a curl line, the line works as printed, the job succeeds."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import redis
import uvicorn

from difyq.producers.dev import _scheduler_environment, _stop_when_a_child_exits, scheduler_metrics_port
from difyq.worker.embedded_redis import EmbeddedRedis, free_port, port_is_free
from difyq.worker.runtime import DEFAULT_REDIS_URL
from tests.support.markdown import ROOT, curl_lines
from tests.support.processes import wait_for_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def _submitted(curl: str) -> str:
    """The id of the job a printed submit line creates (it answers 202)."""
    submitted = subprocess.run(curl + " -w '\\n%{http_code}'", shell=True, capture_output=True, text=True,
                               timeout=30)
    body, status = submitted.stdout.rsplit("\n", 1)
    assert status == "202", submitted.stdout
    return json.loads(body)["id"]


def _finished(read: str, job_id: str) -> dict:
    """The job, read with the printed read line until it ends (or a minute passes)."""
    deadline = time.monotonic() + 60
    job: dict = {}
    while time.monotonic() < deadline:
        shown = subprocess.run(read.replace("<id>", job_id), shell=True, capture_output=True, text=True,
                               timeout=30)
        job = json.loads(shown.stdout)
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    return job


@pytest.mark.slow
def test_dev_prints_a_curl_line_that_works(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "DIFYQ_CONFIG")}
    api_port, emulator_port = free_port(), free_port()
    # The worker's metrics port and the scheduler's (the next one): neither may be the API's or the emulator's.
    metrics_port = wait_for(lambda: next((port for port in [free_port()]
                                          if {port, port + 1}.isdisjoint({api_port, emulator_port})), None),
                            timeout=10, what="a metrics port clear of the API's and the emulator's")
    env.update(DIFYQ_METRICS_PORT=str(metrics_port), DIFYQ_LOG_FORMAT="console",
               TMPDIR=str(tmp_path))  # where dev makes its working directory and its Redis's
    dev = subprocess.Popen([sys.executable, "-m", "difyq.producers.cli", "dev", "--port", str(api_port),
                            "--emulator-port", str(emulator_port)], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len([line for line in lines if line.lstrip().startswith("curl")]) < 3:
            line = dev.stdout.readline()
            if not line:
                break
            lines.append(line)
        curls = [line.strip() for line in lines if line.strip().startswith("curl")]
        assert len(curls) == 3, "".join(lines)
        # Keep reading what dev and its children print: a full pipe would block their logging, and so them.
        threading.Thread(target=lambda: [None for _ in dev.stdout], daemon=True).start()
        documented = [line.command for line in curl_lines(ROOT / "README.md")][:3]
        assert [curl.replace(f":{api_port}/", ":8080/").replace(f":{emulator_port}/", ":5001/")
                for curl in curls] == documented, (
            "README.md's three curl lines must be the ones `difyq dev` prints (on ports 8080 and 5001)")
        submit, read, document = curls
        job = _finished(read, _submitted(submit))
        assert job["status"] == "succeeded", job
        assert job["result"]["answer"]
        # The document job: the PDF dev serves is fetched, uploaded to the emulator and handed to the workflow.
        document_job = _finished(read, _submitted(document))
        assert document_job["status"] == "succeeded", document_job
        [uploaded] = document_job["files"]
        assert uploaded["name"] == "sample.pdf" and uploaded["upload_file_id"], document_job
        assert document_job["result"]["outputs"]["document"]["name"] == "sample.pdf"
        # README's thread lines: the second job of the thread continues the first one's conversation.
        first_turn, second_turn, history = [line.command.replace(":8080/", f":{api_port}/")
                                            for line in curl_lines(ROOT / "README.md")][3:6]
        asked = json.loads(re.search(r"-d '(.*)'", first_turn).group(1))["query"]
        _finished(read, _submitted(first_turn))
        second_job = _finished(read, _submitted(second_turn))
        assert second_job["status"] == "succeeded", second_job
        assert f"(turn 2; you asked before: {asked!r})" in second_job["result"]["answer"], second_job
        pages = subprocess.run(history, shell=True, capture_output=True, text=True, timeout=30)
        turns = json.loads(pages.stdout)["messages"]
        assert [turn["answer"] for turn in turns][1] == second_job["result"]["answer"], turns
        assert re.search(r"Emulator\s+http://127\.0\.0\.1:\d+/v1", "".join(lines))
        # The console is served, and the operator token it prints is the one README.md names.
        console = re.search(r"Console\s+(http://\S+/console)\s+\(sign in with (\S+)\)", "".join(lines))
        assert console is not None, "".join(lines)
        assert urllib.request.urlopen(f"{console.group(1)}/login", timeout=30).status == 200
        assert console.group(2) == "dev-console-token" and "`dev-console-token`" in (ROOT / "README.md").read_text()
        # Without REDIS_URL dev runs its own Redis, never one that happens to listen on the default port.
        redis_url = re.search(r"Redis\s+(redis://\S+)", "".join(lines))
        assert redis_url is not None and redis_url.group(1) != DEFAULT_REDIS_URL, "".join(lines)
        assert list(tmp_path.glob("difyq-redis-*")), "the embedded Redis keeps its data under TMPDIR"
        # The scheduler came up and stayed up: it keeps its metrics in memory, not in the worker's directory. It
        # starts beside the API, so on a busy machine it may still be importing when the job has finished.
        printed = re.search(r"worker http://127\.0\.0\.1:(\d+)/metrics, scheduler http://127\.0\.0\.1:(\d+)/metrics",
                            "".join(lines))
        assert printed is not None and int(printed.group(1)) == metrics_port, "".join(lines)
        scheduler_port = int(printed.group(2))
        wait_for_port(scheduler_port, timeout=60)
        scheduler_metrics = urllib.request.urlopen(f"http://127.0.0.1:{scheduler_port}/metrics", timeout=30).read()
        assert b"difyq_jobs_submitted_total" in scheduler_metrics
    finally:
        dev.terminate()
        dev.wait(timeout=60)
    # What dev wrote for its children (the effective config, with the callbacks' signing secret) goes with it.
    config_file = re.search(r"Config\s+(\S+)", "".join(lines))
    assert config_file is not None and not Path(config_file.group(1)).parent.exists(), "".join(lines)
    assert not list(tmp_path.glob("difyq-redis-*")), "the embedded Redis's data directory goes too"


def test_the_scheduler_keeps_its_metrics_out_of_the_worker_directory() -> None:
    """A scheduler given the worker's multiprocess directory dies at start when the worker has not made it yet."""
    worker_env = {"PROMETHEUS_MULTIPROC_DIR": "/tmp/difyq-dev-x/prometheus", "DIFYQ_METRICS_PORT": "9191",
                  "PATH": "/usr/bin"}
    assert _scheduler_environment(worker_env, 9192) == {"DIFYQ_METRICS_PORT": "9192", "PATH": "/usr/bin"}


def test_the_scheduler_takes_the_port_after_the_workers_unless_it_is_busy_or_dev_serves_on_it() -> None:
    worker_port = wait_for(lambda: next((port for port in [free_port()] if port_is_free(port + 1)), None), timeout=10,
                           what="a port whose next one is free")
    assert scheduler_metrics_port(worker_port, set()) == worker_port + 1
    taken = scheduler_metrics_port(worker_port, {worker_port + 1})
    assert taken not in (worker_port, worker_port + 1)
    with socket.socket() as client:
        # A client connection's local port: the scheduler could not bind it, though nothing listens on it.
        client.bind(("127.0.0.1", worker_port + 1))
        busy = scheduler_metrics_port(worker_port, set())
    assert busy not in (worker_port, worker_port + 1)
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", busy))


def test_dev_stops_and_says_so_when_its_scheduler_exits(capfd: pytest.CaptureFixture[str]) -> None:
    server = uvicorn.Server(uvicorn.Config("difyq.producers.api.app:create_app"))
    scheduler = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        _stop_when_a_child_exits({"scheduler": scheduler}, server)
    finally:
        scheduler.wait(timeout=30)
    assert server.should_exit
    assert "the scheduler exited with code 3; stopping" in capfd.readouterr().err



def test_dev_with_a_bad_config_exits_2_and_leaves_nothing_running_or_written(tmp_path: Path) -> None:
    (tmp_path / "difyq.yaml").write_text("jobs: {max_wait: -1}\n")
    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "DIFYQ_CONFIG")}
    env["TMPDIR"] = str(tmp_path)  # where dev makes its working directory and its Redis's
    dev = subprocess.run([sys.executable, "-m", "difyq.producers.cli", "dev", "--port", str(free_port()),
                          "--emulator-port", str(free_port())], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert dev.returncode == 2, dev.stderr
    assert "max_wait" in dev.stderr
    assert not list(tmp_path.glob("difyq-dev-*")), "the effective config (with the signing secret) is removed"
    assert not list(tmp_path.glob("difyq-redis-*")), "the embedded Redis's data directory is removed"
    running = [process.info["cmdline"] for process in psutil.process_iter(["cmdline"])
               if any(str(tmp_path) in part for part in process.info["cmdline"] or [])]
    assert not running, running


def test_the_embedded_redis_keeps_its_data_across_a_restart_and_removes_the_directory_it_made_when_closed(
        tmp_path: Path) -> None:
    made = EmbeddedRedis(appendonly=True, appendfsync="always").start()
    given = EmbeddedRedis(directory=str(tmp_path)).start()
    try:
        with redis.Redis.from_url(made.url) as client:
            client.set("kept", "1")
        made.stop()
        made.start()
        with redis.Redis.from_url(made.url) as client:
            assert client.get("kept") == b"1"
    finally:
        made.close()
        given.close()
    assert not made.directory.exists()
    assert given.directory == tmp_path and tmp_path.exists(), "a directory it was given is left alone"
