"""``difyq worker``: prepares the environment (metrics directory, fetch latency, prefetch) and execs Dramatiq's
CLI, so the Dramatiq master is this very process and receives SIGTERM exactly once."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import structlog

from difyq.producers.metrics_directory import MetricsDirectoryInUse, claim_metrics_directory

DEFAULT_METRICS_PORT = "9191"


def worker_environment(base: dict[str, str], threads: int, metrics_dir: str) -> dict[str, str]:
    env = dict(base)
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    env["prometheus_multiproc_dir"] = metrics_dir
    env["dramatiq_prom_db"] = metrics_dir
    env["dramatiq_prom_port"] = env.get("DIFYQ_METRICS_PORT") or DEFAULT_METRICS_PORT
    env.setdefault("dramatiq_prom_host", "0.0.0.0")
    env.setdefault("dramatiq_worker_timeout", "1000")
    # A process fetches only as many messages as it has threads (Dramatiq's default is twice as many): a message
    # then waits in Redis for any process with a free thread, not behind the busy threads of the one that took it.
    env.setdefault("dramatiq_queue_prefetch", str(threads))
    env["DIFYQ_WORKER_METRICS"] = "1"
    return env


def exec_worker(processes: int, threads: int, gevent: bool) -> int:
    if gevent and importlib.util.find_spec("gevent") is None:
        print("difyq worker: --gevent needs gevent: pip install 'difyq[gevent]'", file=sys.stderr)
        return 2
    try:
        claimed = claim_metrics_directory(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    except MetricsDirectoryInUse as exc:
        print(f"difyq worker: {exc}", file=sys.stderr)
        return 2
    structlog.get_logger("difyq.worker").info("worker_metrics_directory", path=str(claimed.path))
    env = worker_environment(dict(os.environ), threads, str(claimed.path))
    program = "dramatiq-gevent" if gevent else "dramatiq"
    executable = shutil.which(program, path=os.path.dirname(sys.executable)) or shutil.which(program)
    if executable is None:
        print(f"difyq worker: {program} is not installed", file=sys.stderr)
        return 2
    grace_ms = env.get("DIFYQ_WORKER_SHUTDOWN_TIMEOUT_MS", "600000")
    args = [program, "difyq.worker.actors", "--processes", str(processes), "--threads", str(threads),
            "--worker-shutdown-timeout", grace_ms, "--skip-logging"]
    os.execve(executable, args, env)
    return 0
