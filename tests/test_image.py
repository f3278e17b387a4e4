"""The Dockerfile built and run with a real container engine (podman): the image of this checkout runs the API, a
worker and the emulator as containers on the host's network, against the test Redis; a job submitted with curl
succeeds, the processes run as uid 10001, the image holds no compiler and no wheelhouse, the HEALTHCHECK passes for
the API and the worker, and SIGTERM to the worker drains the job it is running. Image size and timings are printed.

The base is a local Debian bookworm image standing in for ``python:3.11-slim`` (tests/support/container_engine.py);
``make tools`` installs podman and builds it once. A machine that cannot run containers skips this test and says why.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from difyq.worker.embedded_redis import free_port
from difyq.worker.jobs.schema import FINAL_STATUSES, JobStatus
from tests.support.container_engine import ContainersUnavailable, ensure_base, podman
from tests.support.processes import wait_for_port
from tests.support.stack import CLIENT_TOKEN
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
IMAGE_UID = 10001
BUILD_TIMEOUT_S = 900
HEALTHY_WITHIN_S = 30.0
CONFIG_IN_CONTAINER = "/etc/difyq/difyq.yaml"
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "make", "ld")
# The interpreter's own ensurepip wheels (pip, setuptools), present in every Python image: not a wheelhouse.
INTERPRETER_WHEEL_DIRS = ("/usr/share/python-wheels/", "/ensurepip/_bundled/")
WHEEL_SCAN = (
    "import os, sys\n"
    "for root, dirs, files in os.walk('/'):\n"
    "    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ('/proc', '/sys', '/dev')]\n"
    "    for name in files:\n"
    "        if name.endswith('.whl'):\n"
    "            print(os.path.join(root, name))\n"
)


def _dangling() -> set[str]:
    listed = podman("images", "--quiet", "--no-trunc", "--filter", "dangling=true").stdout
    return set(listed.split())


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image of this checkout, built once for the module on the local base; removed afterwards with any
    build-stage image the build left dangling."""
    started = time.monotonic()
    try:
        base = ensure_base()
    except ContainersUnavailable as unavailable:
        pytest.skip(f"containers cannot run on this machine: {unavailable}")
    base_ready = time.monotonic()
    tag = f"localhost/difyq-test:{uuid.uuid4().hex[:12]}"
    dangling_before = _dangling()
    try:
        podman("build", "--format", "docker", "--layers=false", "--network=host", "--pull=never",
               "--build-arg", f"PYTHON_IMAGE={base}", "--tag", tag, str(REPO), timeout=BUILD_TIMEOUT_S)
        print(f"\nimage: base ready in {base_ready - started:.0f} s, built in {time.monotonic() - base_ready:.0f} s")
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)
        left_behind = _dangling() - dangling_before
        if left_behind:
            podman("rmi", "--force", *left_behind, check=False)


@dataclass
class Deployment:
    """The containers of one test, named by a common prefix and removed at the end."""

    image: str
    prefix: str
    config: Path
    redis_url: str

    def run(self, role: str, *args: str, env: dict[str, str] | None = None) -> str:
        """Start ``difyq args`` detached as container ``<prefix>-<role>``, on the host's network."""
        name = f"{self.prefix}-{role}"
        options = ["--env", f"REDIS_URL={self.redis_url}", "--env", f"DIFYQ_CONFIG={CONFIG_IN_CONTAINER}",
                   "--volume", f"{self.config}:{CONFIG_IN_CONTAINER}:ro"]
        for key, value in (env or {}).items():
            options += ["--env", f"{key}={value}"]
        podman("run", "--detach", "--name", name, "--network=host", *options, self.image, *args)
        return name

    def remove_all(self) -> None:
        names = podman("ps", "--all", "--quiet", "--filter", f"name=^{self.prefix}-", check=False).stdout.split()
        if names:
            podman("rm", "--force", "--time", "0", *names, check=False, timeout=120)

    def logs(self, name: str) -> str:
        result = podman("logs", name, check=False)
        return result.stdout + result.stderr


def _exec(container: str, *argv: str) -> str:
    return podman("exec", container, *argv).stdout


def _job(api: str, job_id: str) -> dict:
    response = requests.get(f"{api}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {CLIENT_TOKEN}"},
                            timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_for_status(api: str, job_id: str, statuses: set[str], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    job = _job(api, job_id)
    while job["status"] not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} is {job['status']} after {timeout} s, not {statuses}"
        time.sleep(0.1)
        job = _job(api, job_id)
    return job


def _submit_with_curl(api: str, query: str) -> str:
    body = json.dumps({"app": "support", "query": query, "user": "image-test"})
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "10", "--write-out", "\n%{http_code}",
         "--header", f"Authorization: Bearer {CLIENT_TOKEN}", "--header", "Content-Type: application/json",
         "--data", body, f"{api}/v1/jobs"],
        capture_output=True, text=True, check=True, timeout=30)
    text, _, status = result.stdout.rpartition("\n")
    assert status == "202", result.stdout
    return json.loads(text)["id"]


def _health(container: str) -> str:
    """Run the image's HEALTHCHECK in ``container`` now; the engine's verdict (exit code and recorded status)."""
    result = podman("healthcheck", "run", container, check=False)
    status = podman("inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip()
    return f"{result.returncode} {status}"


def _wait_until_healthy(deployment: Deployment, container: str) -> None:
    """Run the HEALTHCHECK until the engine reports ``container`` healthy, as its own retries would (the Dockerfile
    allows three failures); on a deadline, fail with every check's output and the container's log."""
    verdicts: list[str] = []

    def healthy_now() -> bool:
        verdicts.append(_health(container))
        return verdicts[-1] == "0 healthy"

    try:
        wait_for(healthy_now, timeout=HEALTHY_WITHIN_S, interval=1.0, what=f"{container} healthy")
    except AssertionError as unhealthy:
        checks = podman("inspect", "--format", "{{json .State.Health.Log}}", container, check=False).stdout
        raise AssertionError(f"{unhealthy}; verdicts {verdicts}; checks {checks}; "
                             f"log {deployment.logs(container)[-3000:]}") from None
    if len(verdicts) > 1:
        print(f"image: {container} healthy at check {len(verdicts)} ({verdicts[:-1]} before)")


def test_image_runs_api_worker_and_emulator_as_containers(image: str, tmp_path: Path, redis_url: str,
                                                          namespace: str) -> None:
    started = time.monotonic()
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    api_port, worker_metrics_port, emulator_port = ports
    config = tmp_path / "difyq.yaml"
    config.write_text(yaml.safe_dump({
        "apps": {"support": {"api_key": "app-demo", "mode": "chat",
                             "base_url": f"http://127.0.0.1:{emulator_port}/v1"}},
        "clients": {"crm": {"token": CLIENT_TOKEN, "apps": ["*"]}},
        "redis": {"namespace": namespace},
    }), encoding="utf-8")
    config.chmod(0o644)
    deployment = Deployment(image, f"difyq-test-{uuid.uuid4().hex[:8]}", config, redis_url)
    try:
        emulator = deployment.run("emulator", "emulator", "--host", "127.0.0.1", "--port", str(emulator_port))
        api = deployment.run("api", "api", "--host", "127.0.0.1", "--port", str(api_port),
                             env={"DIFYQ_HEALTHCHECK_URL": f"http://127.0.0.1:{api_port}/healthz"})
        worker = deployment.run("worker", "worker", "--processes", "1", "--threads", "2",
                                env={"DIFYQ_METRICS_PORT": str(worker_metrics_port),
                                     "DIFYQ_HEALTHCHECK_URL": f"http://127.0.0.1:{worker_metrics_port}/healthz"})
        for port in (emulator_port, api_port, worker_metrics_port):
            wait_for_port(port, timeout=60)
        api_url = f"http://127.0.0.1:{api_port}"
        print(f"image: containers up in {time.monotonic() - started:.1f} s")

        # A job submitted with curl runs through the worker container against the emulator container.
        job = _wait_for_status(api_url, _submit_with_curl(api_url, "Hello from a container"), set(FINAL_STATUSES))
        assert job["status"] == JobStatus.SUCCEEDED, job
        assert job["result"]["answer"], job

        # Every process runs as the image's non-root user: PID 1 (difyq) in each container, and the exec default.
        for container in (api, worker, emulator):
            status = _exec(container, "cat", "/proc/1/status")
            uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
            assert set(uids) == {str(IMAGE_UID)}, (container, uids)
        assert _exec(api, "id", "-u").strip() == str(IMAGE_UID)

        # No compiler and no wheelhouse in the final image.
        found = _exec(api, "python", "-c",
                      f"import shutil; print(' '.join(t for t in {COMPILERS!r} if shutil.which(t)))").split()
        assert found == [], f"compilers in the final image: {found}"
        wheels = _exec(api, "python", "-c", WHEEL_SCAN).split()
        foreign = [path for path in wheels if not any(marker in path for marker in INTERPRETER_WHEEL_DIRS)]
        assert foreign == [], f"wheels in the final image: {foreign}"
        assert not any("difyq" in Path(path).name for path in wheels)

        # The image's HEALTHCHECK, run by the engine (without systemd podman never runs it on a timer).
        _wait_until_healthy(deployment, api)
        _wait_until_healthy(deployment, worker)

        # SIGTERM (podman stop) while the worker runs a 4 s call: the job finishes, then the worker exits 0.
        slow_job = _submit_with_curl(api_url, "Hold on WAIT4")
        _wait_for_status(api_url, slow_job, {JobStatus.RUNNING})
        stop_started = time.monotonic()
        podman("stop", "--time", "60", worker, timeout=90)
        stop_took = time.monotonic() - stop_started
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", worker).stdout.strip()
        assert exit_code == "0", deployment.logs(worker)[-3000:]
        assert _job(api_url, slow_job)["status"] == JobStatus.SUCCEEDED, deployment.logs(worker)[-3000:]

        size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
        print(f"image: {size / 1e6:.0f} MB; worker drained a running job in {stop_took:.1f} s after SIGTERM; "
              f"run and checks took {time.monotonic() - started:.1f} s")
    finally:
        deployment.remove_all()
