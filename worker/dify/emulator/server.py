"""Running the emulator: in a background thread for tests and `difyq dev` (`start_emulator`), or in the
foreground for the `difyq emulator` command (`serve`). Both run uvicorn, whose asyncio loop holds thousands of
open streams in one thread."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette

from difyq.worker.dify.emulator.app import create_app
from difyq.worker.dify.emulator.apps import EmulatedApp, default_apps
from difyq.worker.dify.emulator.state import EmulatorState

_STARTUP_TIMEOUT_S = 10.0
_GRACEFUL_SHUTDOWN_S = 2
# Idle keep-alive connections stay open as long as behind nginx (Dify's own deployment), not uvicorn's 5 s: a
# client then rarely sends on a connection the server is closing, which neither side could tell from a real fault.
_KEEP_ALIVE_S = 75


class _EmulatorServer(uvicorn.Server):
    """uvicorn that ends the emulator's open streams and hung calls as soon as it starts shutting down, instead of
    waiting for them until the graceful-shutdown timeout cancels them."""

    def __init__(self, app: Starlette, log_level: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level,
                lifespan="off",
                backlog=4096,
                timeout_keep_alive=_KEEP_ALIVE_S,
                timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
            )
        )
        self.emulator: EmulatorState = app.state.emulator

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.emulator.shutdown()
        await super().shutdown(sockets)


class RunningEmulator:
    """An emulator serving in a background thread; a context manager that stops it on exit."""

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        self._server = _EmulatorServer(app, "warning")
        self._state = self._server.emulator
        self.host, self.port = sock.getsockname()[:2]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"dify-emulator:{self.port}", daemon=True
        )

    @property
    def base_url(self) -> str:
        """The Service API base, as a client's `base_url`: `http://host:port/v1`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def file_url(self, name: str) -> str:
        """The URL of a sample file the emulator serves (``sample_document.SAMPLE_NAME``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/_emulator/files/{name}"

    def calls(self) -> list[dict[str, Any]]:
        """Every call served, oldest first (see `state.CallRecord`)."""
        return self._state.calls()

    def reset_calls(self) -> list[dict[str, Any]]:
        """Forget the calls served (and restart the stats' counts); the calls forgotten."""
        return self._state.reset_calls()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per app: `calls`, `open` and `max_concurrent`."""
        return self._state.stats()

    def set_app(self, name: str, **changes: Any) -> EmulatedApp:
        """Change an app's knobs or fault for the calls that follow (see `EmulatedApp.with_changes`)."""
        return self._state.update_app(name, changes)

    def stop(self) -> None:
        """End open streams (no terminal event) and hung calls (connection dropped), stop serving, wait."""
        self._server.should_exit = True
        self._thread.join(timeout=_GRACEFUL_SHUTDOWN_S + 5)

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the Dify emulator did not start on {self.host}:{self.port}")
            time.sleep(0.01)


def start_emulator(apps: list[EmulatedApp] | None = None, host: str = "127.0.0.1", port: int = 0,
                   dify_version: str = "0.15") -> RunningEmulator:
    """Serve `apps` (the demo apps when None) in a background thread as Dify `dify_version` ("0.15" or "1.x");
    returns once it accepts connections. Port 0 picks a free port (see `RunningEmulator.port`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    emulator = RunningEmulator(create_app(apps, dify_version), sock)
    emulator._start()
    return emulator


def serve(host: str, port: int, apps: list[EmulatedApp], dify_version: str = "0.15") -> None:
    """Serve `apps` (the demo apps when empty) as Dify `dify_version` in the foreground until interrupted
    (`difyq emulator`)."""
    app = create_app(apps or default_apps(), dify_version)
    print(f"Dify {dify_version} emulator on http://{host}:{port}/v1 (control: http://{host}:{port}/_emulator/)",
          flush=True)
    for emulated in app.state.emulator.apps():
        print(f"  {emulated.name:<24} {emulated.mode:<14} key {emulated.key}", flush=True)
    _EmulatorServer(app, "info", host, port).run()
