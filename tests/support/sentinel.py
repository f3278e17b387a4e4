"""A real Redis Sentinel deployment on loopback for failover tests: a primary, a replica and three sentinels
(``redis-server --sentinel``), each on a free port with its own directory, no persistence, all stopped at the end.

The sentinels judge a server down after ``DOWN_AFTER_MS`` of silence and need two of three to agree, as a
production quorum would; only that delay is shortened (production setups use 5 to 30 s).

On a busy machine a free port can be taken between the moment it is chosen and the moment the process binds it:
a process that exits before it answers is started again on another port while the deployment is being set up
(a server restarted later keeps its port, which the sentinels know). Every question to a process still starting
tolerates refused connections and slow answers."""

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
PORT_TRIES = 3
ANSWER_TIMEOUT_S = 2.0


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

    def _started(self, name: str, argv: list[str], port: int) -> bool:
        """Start ``argv`` as ``name`` and wait until it answers on ``port``; False when it exited first (its log
        says why: most often the port was taken meanwhile)."""
        log = (self.directory / f"{name}.log").open("ab")
        process = self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

        def settled() -> str | None:  # asked after the answer too: a server of someone else's may hold the port
            if process.poll() is None and self._answers(port) and process.poll() is None:
                return "answers"
            return "exited" if process.poll() is not None else None

        return wait_for(settled, 30, what=f"{name} starting on port {port}") == "answers"

    def _log_tail(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")[-2000:]

    def start_server(self, name: str, replica_of: str | None = None) -> None:
        """Start server ``name``; one the sentinels do not know yet moves to another port if its own was taken."""
        workdir = self.directory / name
        workdir.mkdir(parents=True, exist_ok=True)
        may_move = not any(process_name.startswith("sentinel") for process_name in self.processes)
        for _ in range(PORT_TRIES if may_move else 1):
            argv = ["redis-server", "--port", str(self.servers[name]), "--bind", "127.0.0.1", "--dir", str(workdir),
                    "--save", "", "--appendonly", "no", "--repl-diskless-sync", "yes",
                    "--repl-diskless-sync-delay", "0"]
            if replica_of is not None:
                argv += ["--replicaof", "127.0.0.1", str(self.servers[replica_of])]
            if self._started(name, argv, self.servers[name]):
                return
            self.servers[name] = free_port()
        raise RuntimeError(f"redis {name} did not start: {self._log_tail(name)}")

    def start_sentinels(self) -> None:
        for index in range(SENTINELS):
            self._start_sentinel(index)
        for index, port in enumerate(self.sentinel_ports):
            wait_for(lambda index=index, port=port: self._knows_everyone(index, port), 30,
                     what=f"sentinel {port} discovering the others")

    def _start_sentinel(self, index: int) -> None:
        name = f"sentinel-{index}"
        for _ in range(PORT_TRIES):
            port = self.sentinel_ports[index]
            config = self.directory / f"{name}.conf"
            config.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {self.directory}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.servers['a']} {QUORUM}",
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                f"sentinel parallel-syncs {MASTER_NAME} 1", ""]))
            if self._started(name, ["redis-server", str(config), "--sentinel"], port):
                return
            self.sentinel_ports[index] = free_port()
        raise RuntimeError(f"{name} did not start: {self._log_tail(name)}")

    def _answers(self, port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=ANSWER_TIMEOUT_S,
                             socket_connect_timeout=ANSWER_TIMEOUT_S) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _knows_everyone(self, index: int, port: int) -> bool:
        """Whether the sentinel knows the replica and the other sentinels; a refused connection or a slow answer is
        a not yet, a sentinel that has exited an error with its log."""
        if self.processes[f"sentinel-{index}"].poll() is not None:
            raise RuntimeError(f"sentinel {port} exited: {self._log_tail(f'sentinel-{index}')}")
        try:
            with redis.Redis(port=port, socket_timeout=ANSWER_TIMEOUT_S, socket_connect_timeout=ANSWER_TIMEOUT_S,
                             decode_responses=True) as sentinel:
                replicas = sentinel.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
                peers = sentinel.execute_command("SENTINEL", "SENTINELS", MASTER_NAME)
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        return len(replicas) >= 1 and len(peers) == SENTINELS - 1

    def primary_port(self) -> int:
        """The primary's port as the first sentinel names it."""
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=ANSWER_TIMEOUT_S,
                         decode_responses=True) as sentinel:
            return int(sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)[1])

    def name_of(self, port: int) -> str:
        return next(name for name, server_port in self.servers.items() if server_port == port)

    def replicas_of(self, name: str) -> int:
        with redis.Redis(port=self.servers[name], socket_timeout=ANSWER_TIMEOUT_S, decode_responses=True) as client:
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
