"""A real Redis Sentinel deployment on loopback for failover tests: a primary, a replica and three sentinels
(``redis-server --sentinel``), each on a free port with its own directory, no persistence, all stopped at the end.

The sentinels judge a server down after ``DOWN_AFTER_MS`` of silence and need two of three to agree, as a
production quorum would; only that delay is shortened (production setups use 5 to 30 s)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from difyq.worker.embedded_redis import free_port
from tests.support.waiting import wait_for

MASTER_NAME = "difyq-primary"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
QUORUM = 2
SENTINELS = 3


class SentinelDeployment:
    """The servers and sentinels of one test; ``servers`` maps a name ("a", "b") to its port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers = {"a": free_port(), "b": free_port()}
        self.sentinel_ports = [free_port() for _ in range(SENTINELS)]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.directory / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def start_server(self, name: str, replica_of: str | None = None) -> None:
        workdir = self.directory / name
        workdir.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.servers[name]), "--bind", "127.0.0.1", "--dir", str(workdir),
                "--save", "", "--appendonly", "no", "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(self.servers[replica_of])]
        self._spawn(name, argv)
        wait_for(lambda: self._answers(self.servers[name]), 10, what=f"redis {name} starting")

    def start_sentinels(self) -> None:
        for index, port in enumerate(self.sentinel_ports):
            config = self.directory / f"sentinel-{index}.conf"
            config.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {self.directory}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.servers['a']} {QUORUM}",
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                f"sentinel parallel-syncs {MASTER_NAME} 1", ""]))
            self._spawn(f"sentinel-{index}", ["redis-server", str(config), "--sentinel"])
        for port in self.sentinel_ports:
            wait_for(lambda port=port: self._knows_everyone(port), 30, what=f"sentinel {port} discovering the others")

    def _answers(self, port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _knows_everyone(self, port: int) -> bool:
        try:  # a sentinel still starting refuses connections: not yet, rather than an error
            with redis.Redis(port=port, socket_timeout=0.5, decode_responses=True) as sentinel:
                replicas = sentinel.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
                peers = sentinel.execute_command("SENTINEL", "SENTINELS", MASTER_NAME)
        except redis.ConnectionError:
            return False
        return len(replicas) >= 1 and len(peers) == SENTINELS - 1

    def primary_port(self) -> int:
        """The primary's port as the first sentinel names it."""
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=0.5, decode_responses=True) as sentinel:
            return int(sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)[1])

    def name_of(self, port: int) -> str:
        return next(name for name, server_port in self.servers.items() if server_port == port)

    def replicas_of(self, name: str) -> int:
        with redis.Redis(port=self.servers[name], socket_timeout=0.5, decode_responses=True) as client:
            return int(client.info("replication")["connected_slaves"])

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def sentinel_deployment(directory: Path) -> Iterator[SentinelDeployment]:
    """Server "a" the primary, "b" its replica, three sentinels watching "a"."""
    deployment = SentinelDeployment(directory)
    try:
        deployment.start_server("a")
        deployment.start_server("b", replica_of="a")
        wait_for(lambda: deployment.replicas_of("a") == 1, 10, what="the replica connecting")
        deployment.start_sentinels()
        yield deployment
    finally:
        deployment.stop_all()
