"""Building blocks for integration tests: a runtime on a private namespace, an in-process Dramatiq worker and
the API served over real HTTP on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from dramatiq import Worker
from dramatiq.middleware import Middleware

from difyq.producers.api.app import create_app
from difyq.worker.app import build_worker_broker
from difyq.worker.config import parse_config
from difyq.worker.embedded_redis import free_port
from difyq.worker.jobs.schema import FINAL_STATUSES
from difyq.worker.runtime import Runtime

CLIENT_TOKEN = "test-client-token-0123456789"
LIMITED_TOKEN = "limited-client-token-0123456789"
SIGNING_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def make_runtime(redis_url: str, namespace: str, apps: dict[str, Any], **sections: Any) -> Runtime:
    """A runtime whose config has ``apps``, a full-access and a limited client, fast retries and loopback
    callbacks allowed; ``sections`` override whole config sections."""
    document: dict[str, Any] = {
        "apps": apps,
        "clients": {
            "full": {"token": CLIENT_TOKEN, "apps": ["*"]},
            "limited": {"token": LIMITED_TOKEN, "apps": [next(iter(apps))] if apps else []},
        },
        "redis": {"namespace": namespace},
        "jobs": {"retry_min_backoff": "0.05s", "retry_max_backoff": "0.2s", "max_attempts": 4},
        "callbacks": {"signing_secret": SIGNING_SECRET, "allow_hosts": ["127.0.0.0/8", "localhost"],
                      "retry_schedule": ["0.2s", "0.2s", "0.2s"], "timeout": "2s"},
        "dify": {"connect_timeout_s": 2, "idle_read_timeout_s": 5},
    }
    document.update(sections)
    return Runtime(parse_config(document, "test config"), redis_url)


@contextmanager
def running_worker(runtime: Runtime, threads: int = 8, middleware: list[Middleware] | None = None,
                   ) -> Iterator[Worker]:
    """A Dramatiq worker in this process, consuming the runtime's namespace, with ``middleware`` added."""
    broker = build_worker_broker(runtime, middleware)
    broker.emit_after("process_boot")
    worker = Worker(broker, worker_threads=threads, worker_timeout=50)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(timeout=10_000)
        broker.close()


@contextmanager
def serving_api(runtime: Runtime) -> Iterator[str]:
    """The API on a free loopback port, in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_config=None,
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("API did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for_final(runtime: Runtime, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
    """Poll the store until the job ends; fail the test with the last state when it does not."""
    deadline = time.monotonic() + timeout
    job = runtime.store.get(job_id)
    while time.monotonic() < deadline:
        job = runtime.store.get(job_id)
        if job and job["status"] in FINAL_STATUSES:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}")


def auth(token: str = CLIENT_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
