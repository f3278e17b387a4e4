"""RequiredInputs: each app's required input variables, from Dify's `GET /parameters`, kept for `TTL_S` so that
`POST /v1/jobs` refuses a job that lacks one (422 naming `inputs.<name>`) without a Dify call per job.

Lookups never hold a request: a missing or stale entry is refreshed by a background thread while the job at hand
is judged by what is known (nothing: accepted, Dify decides). An app whose Dify cannot be asked stays unknown and
is asked again after `RETRY_S`. Without this check, Dify 1.x fails a streaming call with a missing input
silently (one ping, then nothing for 300 s).
"""

from __future__ import annotations

import threading
import time

import structlog

from difyq.worker.config import Config
from difyq.worker.dify.app_form import required_inputs
from difyq.worker.dify.client import DifyClient
from difyq.worker.dify.errors import DifyError

TTL_S = 300.0
RETRY_S = 30.0
_LOOKUP_TIMEOUT_S = 10.0

log = structlog.get_logger("difyq.api")


class RequiredInputs:
    """Thread-safe; one per API process."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._known: dict[str, tuple[float, list[str] | None]] = {}
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def of(self, app: str) -> list[str] | None:
        """The app's required variables as last seen (None: not known yet, or Dify could not be asked); starts a
        refresh when the entry is missing or older than `TTL_S`."""
        known = self._known.get(app)
        if known is None or known[0] <= time.monotonic():
            self._refresh_soon(app)
        return known[1] if known is not None else None

    def warm(self) -> None:
        """Ask Dify about every configured app now, in the background."""
        for app in self._config.apps:
            self._refresh_soon(app)

    def _refresh_soon(self, app: str) -> None:
        with self._lock:
            if app in self._refreshing or app not in self._config.apps:
                return
            self._refreshing.add(app)
        threading.Thread(target=self._refresh, args=(app,), name=f"difyq-parameters-{app}", daemon=True).start()

    def _refresh(self, app: str) -> None:
        settings = self._config.apps[app]
        client = DifyClient(self._config.app_base_url(app), settings.api_key.get_secret_value(),
                            connect_timeout=min(self._config.dify.connect_timeout_s, _LOOKUP_TIMEOUT_S),
                            total_timeout=_LOOKUP_TIMEOUT_S)
        try:
            entry: tuple[float, list[str] | None] = (time.monotonic() + TTL_S,
                                                      required_inputs(client.get("/parameters")))
        except DifyError as exc:
            log.info("app_parameters_unavailable", app=app, code=exc.code)
            entry = (time.monotonic() + RETRY_S, self._known.get(app, (0.0, None))[1])
        finally:
            with self._lock:
                self._refreshing.discard(app)
        self._known[app] = entry
