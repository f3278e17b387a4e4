"""Real ``difyq`` processes for end-to-end tests: started with their own config and ports, logs kept in files,
stopped with one SIGTERM (as an orchestrator would)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from difyq.worker.embedded_redis import free_port


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def terminate_together(processes: Sequence[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """One SIGTERM to each of ``processes`` still running, all at once, then wait for each (SIGKILL to its process
    group after ``timeout``)."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class DifyqProcesses:
    """Starts difyq commands sharing one config file, REDIS_URL and log directory."""

    def __init__(self, directory: Path, redis_url: str, config: dict[str, Any]):
        self.directory = directory
        self.config_path = directory / "difyq.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, "DIFYQ_CONFIG": str(self.config_path), "REDIS_URL": redis_url,
                    "DIFYQ_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "difyq.producers.cli", *args]

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.directory / f"{name}.log").open("ab")
        process = subprocess.Popen(self.command(*args), env={**self.env, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process))
        return process

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def start_api(self) -> str:
        port = free_port()
        process = self.start("api", "api", "--port", str(port))
        wait_for_port(port, process=process)
        return f"http://127.0.0.1:{port}"

    def launch_worker(self, processes: int = 1, threads: int = 8, name: str = "worker") -> tuple[
            subprocess.Popen[bytes], int]:
        """``difyq worker`` on a metrics port of its own, without waiting for it: the process and that port (which
        answers once the worker is up)."""
        metrics_port = free_port()
        process = self.start(name, "worker", "--processes", str(processes), "--threads", str(threads), env={
            "DIFYQ_METRICS_PORT": str(metrics_port),
            "PROMETHEUS_MULTIPROC_DIR": str(self.directory / f"{name}-prometheus"),
        })
        return process, metrics_port

    def start_worker(self, processes: int = 1, threads: int = 8, name: str = "worker") -> tuple[
            subprocess.Popen[bytes], int]:
        """``launch_worker``, once its metrics port answers."""
        process, metrics_port = self.launch_worker(processes, threads, name)
        wait_for_port(metrics_port, process=process)
        return process, metrics_port

    def logs(self, *names: str) -> str:
        """The named processes' logs (every difyq process's when no name is given)."""
        paths = [self.directory / f"{name}.log" for name in names] or sorted(self.directory.glob("*.log"))
        return "\n".join(path.read_text(errors="replace") for path in paths if path.exists())

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def stop_all(self, timeout: float = 30.0) -> None:
        """``terminate_together`` for every process started here (on leaving ``difyq_processes``): their shutdowns
        overlap."""
        terminate_together([process for _, process in self.processes], timeout)


@contextmanager
def difyq_processes(directory: Path, redis_url: str, config: dict[str, Any]) -> Iterator[DifyqProcesses]:
    processes = DifyqProcesses(directory, redis_url, config)
    try:
        yield processes
    finally:
        processes.stop_all()
