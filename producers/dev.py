"""``difyq dev``: embedded Redis (unless REDIS_URL is set), the emulator-backed ``demo`` app when no real Dify is
configured, the API in this process and a worker and a scheduler as child processes."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
import yaml

from difyq.producers.api.app import create_app
from difyq.worker.config import ConfigError, load_config
from difyq.worker.dify.emulator.sample_document import SAMPLE_NAME
from difyq.worker.embedded_redis import EmbeddedRedis, free_port, port_is_free
from difyq.worker.logs import configure_logging
from difyq.worker.runtime import Runtime, install_runtime

DEV_TOKEN = "dev-token"
DEV_CONSOLE_TOKEN = "dev-console-token"
LOOPBACK = ["127.0.0.0/8", "::1/128", "localhost"]
DOCUMENT_APP = "summarize-document"
SUPPORT_APP = "support"  # a chat app whose answers show the conversation so far (for threads)


def _dev_config(raw: dict[str, Any], emulator_url: str | None) -> dict[str, Any]:
    """The config file's content plus what dev adds: the demo apps, a dev client, a console operator, loopback
    callbacks (and file URLs)."""
    config = dict(raw)
    if emulator_url:
        config["apps"] = {**(config.get("apps") or {}),
                          "demo": {"api_key": "app-demo", "mode": "chat", "base_url": emulator_url},
                          DOCUMENT_APP: {"api_key": "app-summarize-document", "mode": "workflow",
                                         "base_url": emulator_url},
                          SUPPORT_APP: {"api_key": "app-support", "mode": "chat", "base_url": emulator_url}}
    if not config.get("clients"):
        config["clients"] = {"dev": {"token": DEV_TOKEN, "apps": ["*"]}}
    console = dict(config.get("console") or {})
    if not console.get("users"):
        console["users"] = {"dev": {"token": DEV_CONSOLE_TOKEN, "role": "operator"}}
        config["console"] = console
    callbacks = dict(config.get("callbacks") or {})
    callbacks["allow_hosts"] = list(callbacks.get("allow_hosts") or []) + LOOPBACK
    callbacks.setdefault("signing_secret", "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode())
    config["callbacks"] = callbacks
    return config


def _needs_emulator(raw: dict[str, Any]) -> bool:
    return not raw.get("apps")


def _scheduler_environment(env: dict[str, str], metrics_port: int) -> dict[str, str]:
    """The scheduler is one process with its own /metrics: it keeps its samples in memory. In the worker's
    multiprocess directory it would fail to start before the worker has made the directory, have its files
    deleted by the worker's reset, and have its samples summed into the worker's /metrics."""
    scheduler_env = {name: value for name, value in env.items() if name.lower() != "prometheus_multiproc_dir"}
    scheduler_env["DIFYQ_METRICS_PORT"] = str(metrics_port)
    return scheduler_env


def scheduler_metrics_port(worker_metrics_port: int, taken: set[int]) -> int:
    """The port after the worker's when it is free and not one dev serves on itself, else any free one: the port
    after a fixed one may be a client connection's local port on a busy host, and the scheduler cannot bind it."""
    preferred = worker_metrics_port + 1
    if preferred not in taken and port_is_free(preferred):
        return preferred
    return next(port for port in iter(free_port, None) if port not in taken | {worker_metrics_port})


def _stop_when_a_child_exits(children: dict[str, subprocess.Popen[bytes]], server: uvicorn.Server) -> None:
    """dev without its worker or scheduler would take jobs and never run them: say which one exited, and stop."""
    while not server.should_exit:
        for name, child in children.items():
            if child.poll() is not None and not server.should_exit:
                print(f"difyq dev: the {name} exited with code {child.returncode}; stopping", file=sys.stderr,
                      flush=True)
                server.should_exit = True
        time.sleep(0.5)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run_dev(api_port: int = 8080, emulator_port: int = 5001) -> int:
    configure_logging("dev")
    path = Path(os.environ.get("DIFYQ_CONFIG", "difyq.yaml"))
    raw = yaml.safe_load(path.read_text()) if path.exists() else {}
    redis_server = None
    if not os.environ.get("REDIS_URL"):
        redis_server = EmbeddedRedis().start()
        os.environ["REDIS_URL"] = redis_server.url
    emulator = None
    if _needs_emulator(raw or {}):
        from difyq.worker.dify.emulator import default_apps, start_emulator

        emulator = start_emulator(default_apps(), port=emulator_port)
    effective = _dev_config(raw or {}, emulator.base_url if emulator else None)
    workdir = Path(tempfile.mkdtemp(prefix="difyq-dev-"))
    config_file = workdir / "difyq.yaml"
    config_file.write_text(yaml.safe_dump(effective))
    config_file.chmod(0o600)
    os.environ["DIFYQ_CONFIG"] = str(config_file)

    def release() -> None:
        """Stop what dev started in this process and remove what it wrote (the effective config holds the
        callbacks' signing secret)."""
        if emulator:
            emulator.stop()
        if redis_server:
            redis_server.close()
        shutil.rmtree(workdir, ignore_errors=True)

    try:
        runtime = Runtime(load_config(config_file), os.environ["REDIS_URL"])
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        release()
        return 2
    install_runtime(runtime)
    worker_metrics_port = int(os.environ.get("DIFYQ_METRICS_PORT") or 9191)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus"),
           "DIFYQ_METRICS_PORT": str(worker_metrics_port)}
    scheduler_port = scheduler_metrics_port(worker_metrics_port, {api_port, emulator_port})
    difyq = [sys.executable, "-m", "difyq.producers.cli"]
    children = {
        "worker": subprocess.Popen([*difyq, "worker", "--processes", "1", "--threads", "8"], env=env),
        "scheduler": subprocess.Popen([*difyq, "scheduler"], env=_scheduler_environment(env, scheduler_port)),
    }
    app_name = "demo" if emulator else next(iter(runtime.config.apps))
    token = runtime.config.clients["dev"].token.get_secret_value() if "dev" in runtime.config.clients else "<token>"
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=api_port, log_config=None,
                                           access_log=False))

    console = runtime.config.console
    dev_operator = console.users.get("dev")
    sign_in = f"  (sign in with {DEV_CONSOLE_TOKEN})" if dev_operator and \
        dev_operator.token.get_secret_value() == DEV_CONSOLE_TOKEN else ""
    console_line = f"  Console    http://127.0.0.1:{api_port}{console.path_prefix}/console{sign_in}\n" \
        if console.enabled else ""

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        print(
            f"\ndifyq dev is up\n"
            f"  API        http://127.0.0.1:{api_port}  (docs: /docs, metrics: /metrics)\n"
            + console_line
            + f"  Redis      {os.environ['REDIS_URL']}\n"
            + (f"  Emulator   {emulator.base_url} (Dify-compatible, app key app-demo)\n" if emulator else "")
            + f"  Metrics    worker http://127.0.0.1:{worker_metrics_port}/metrics, "
            f"scheduler http://127.0.0.1:{scheduler_port}/metrics\n"
            f"  Config     {config_file} (the callback signing secret is there)\n\n"
            f"Try it:\n"
            f"  curl -s -X POST http://127.0.0.1:{api_port}/v1/jobs -H 'Authorization: Bearer {token}' "
            f"-H 'Content-Type: application/json' -d '{{\"app\": \"{app_name}\", \"query\": \"Hello from difyq\"}}'\n"
            f"  curl -s http://127.0.0.1:{api_port}/v1/jobs/<id> -H 'Authorization: Bearer {token}'\n"
            + (f"  curl -s -X POST http://127.0.0.1:{api_port}/v1/jobs -H 'Authorization: Bearer {token}' "
               f"-H 'Content-Type: application/json' -d '{{\"app\": \"{DOCUMENT_APP}\", \"inputs\": {{\"document\": "
               f"{{\"url\": \"{emulator.file_url(SAMPLE_NAME)}\"}}}}}}'\n" if emulator else ""),
            flush=True,
        )

    threading.Thread(target=announce, name="difyq-dev-banner", daemon=True).start()
    threading.Thread(target=_stop_when_a_child_exits, args=(children, server), name="difyq-dev-children",
                     daemon=True).start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # uvicorn re-raises the signal that stopped it once it has shut down; exit through `finally` then, so
        # the worker and scheduler are stopped too.
        signal.signal(signum, _exit_on_signal)
    try:
        server.run()
    finally:
        exited = [name for name, child in children.items() if child.poll() is not None]
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children.values():
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        release()
    return 1 if exited else 0
