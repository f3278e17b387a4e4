"""AppParameters: each app's Dify ``GET /parameters`` answer, kept for ``TTL_S``, one cache for two readers.

The API judges each submit by what is known (``cached``: the required input variables, so ``POST /v1/jobs``
refuses a job that lacks one with a 422 naming ``inputs.<name>``, without a Dify call per job); a missing or stale
entry is refreshed by a background thread and never holds a request. The worker, about to upload a job's files,
may wait for the answer (``current``: the instance's file size limits). An app whose Dify cannot be asked stays
unknown and is asked again after ``RETRY_S``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import structlog

from difyq.worker.config import Config
from difyq.worker.dify.client import DifyClient
from difyq.worker.dify.errors import DifyError

TTL_S = 300.0
RETRY_S = 30.0
_LOOKUP_TIMEOUT_S = 10.0

log = structlog.get_logger("difyq.dify")

Parameters = Mapping[str, Any]


class AppParameters:
    """Thread-safe; one per process."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._known: dict[str, tuple[float, Parameters | None]] = {}
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def cached(self, app: str) -> Parameters | None:
        """The app's parameters as last seen (None: not known yet, or Dify could not be asked); starts a
        background refresh when the entry is missing or older than ``TTL_S``."""
        known = self._known.get(app)
        if known is None or known[0] <= time.monotonic():
            self._refresh_soon(app)
        return known[1] if known is not None else None

    def current(self, app: str) -> Parameters | None:
        """The app's parameters, asked of Dify now when missing or stale (None: Dify could not be asked)."""
        known = self._known.get(app)
        if known is None or known[0] <= time.monotonic():
            self._refresh(app)
            known = self._known.get(app)
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
            entry: tuple[float, Parameters | None] = (time.monotonic() + TTL_S, client.get("/parameters"))
        except DifyError as exc:
            log.info("app_parameters_unavailable", app=app, code=exc.code)
            entry = (time.monotonic() + RETRY_S, self._known.get(app, (0.0, None))[1])
        finally:
            with self._lock:
                self._refreshing.discard(app)
        self._known[app] = entry
