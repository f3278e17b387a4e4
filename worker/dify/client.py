"""Dify Service API client on requests: one streaming call per job, aggregated into a `DifyResult`.

`run` always asks for `response_mode: "streaming"` (agent apps accept nothing else, no proxy cuts a long
answer, and the first token can be timed) and reads the event stream as it arrives. Time is bounded three ways:
`connect_timeout` for the TCP/TLS connect; `idle_read_timeout` between two reads (Dify pings every 10 s while
the model is silent, so a longer gap means the peer is gone); `total_timeout` for the whole call, checked as data
arrives (a silent peer is caught by the idle timeout, so the call ends at most `idle_read_timeout` past it).
Every failure is a `DifyError` (see `worker.dify.errors`); the API key never appears in one.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from urllib3.exceptions import HTTPError as TransportError
from urllib3.exceptions import ReadTimeoutError

from worker.dify.aggregate import StreamAggregator
from worker.dify.errors import DifyError, parse_retry_after
from worker.dify.models import CHAT_MODES, DifyRequest, DifyResult, Usage
from worker.dify.sse import SSEParser

__all__ = ["DifyClient", "DifyError", "DifyRequest", "DifyResult", "Usage", "thread_session"]

_RUN_PATHS = dict.fromkeys(CHAT_MODES, "/chat-messages") | {
    "completion": "/completion-messages",
    "workflow": "/workflows/run",
}
_STOP_PATHS = dict.fromkeys(CHAT_MODES, "/chat-messages/{}/stop") | {
    "completion": "/completion-messages/{}/stop",
    "workflow": "/workflows/tasks/{}/stop",
}
_READ_SIZE = 64 * 1024
_ERROR_BODY_LIMIT = 64 * 1024
_ERROR_SNIPPET_CHARS = 200
_WHITESPACE = re.compile(r"\s+")

_local = threading.local()


def thread_session() -> requests.Session:
    """This thread's pooled `requests.Session` (greenlet's, under gevent), created on first use.

    It does not read the environment on each request (proxy variables, netrc, CA bundle: a scan of every variable
    per call); `DifyClient` resolves those once per base URL instead (`environment_settings`)."""
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
        session.trust_env = False
    return session


def environment_settings(url: str) -> tuple[dict[str, str], bool | str]:
    """The proxies (honouring NO_PROXY) and the TLS verification (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) that
    requests would take from the environment for `url`."""
    verify: bool | str = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    return requests.utils.get_environ_proxies(url), verify


def _request_body(mode: str, request: DifyRequest) -> dict[str, Any]:
    """The JSON body of a run call for `mode`: always streaming, optional fields only when set."""
    body: dict[str, Any] = {"inputs": request.inputs, "response_mode": "streaming", "user": request.user}
    if mode != "workflow" and request.query is not None:
        body["query"] = request.query
    if mode in CHAT_MODES:
        body["auto_generate_name"] = request.auto_generate_name
        if request.conversation_id:
            body["conversation_id"] = request.conversation_id
    if request.files:
        body["files"] = request.files
    return body


class DifyClient:
    """Calls one Dify app with one API key. Thread-safe without a `session` (each thread uses its own)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        connect_timeout: float = 10.0,
        idle_read_timeout: float = 60.0,
        total_timeout: float = 600.0,
        session: requests.Session | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._connect_timeout = connect_timeout
        self._idle_read_timeout = idle_read_timeout
        self._total_timeout = total_timeout
        self._session = session
        self._proxies, self._verify = environment_settings(self._base_url)

    def __repr__(self) -> str:
        return f"DifyClient({self._base_url!r})"

    def run(self, mode: str, request: DifyRequest, *, on_task_id: Callable[[str], None] | None = None) -> DifyResult:
        """Run the app once and aggregate its stream; `on_task_id` gets the task id (for `stop`) as soon as
        an event carries it. Raises `DifyError`."""
        path = _route(_RUN_PATHS, mode)
        started = time.monotonic()
        aggregator = StreamAggregator(mode, started=started, on_task_id=on_task_id)
        with self._post(path, _request_body(mode, request), accept="text/event-stream") as response:
            if not _is_success(response):
                raise self._error_from(response)
            if response.headers.get("Content-Type", "").startswith("application/json"):
                aggregator.add_blocking(self._blocking_body(response))
            else:
                self._read_stream(response, aggregator, deadline=started + self._total_timeout)
        return aggregator.result()

    def stop(self, mode: str, task_id: str, user: str) -> None:
        """Ask Dify to stop a running task (Dify answers success even for an unknown or finished task)."""
        path = _route(_STOP_PATHS, mode).format(quote(task_id, safe=""))
        with self._post(path, {"user": user}, accept="application/json") as response:
            if not _is_success(response):
                raise self._error_from(response)

    def _post(self, path: str, body: Mapping[str, Any], *, accept: str) -> requests.Response:
        session = self._session or thread_session()
        try:
            return session.post(
                self._base_url + path,
                json=body,
                headers={"Authorization": f"Bearer {self._api_key}", "Accept": accept},
                timeout=(self._connect_timeout, self._read_timeout),
                stream=True,
                allow_redirects=False,
                proxies=self._proxies,
                verify=self._verify,
            )
        except requests.ConnectTimeout as exc:
            raise DifyError("timeout", f"connecting to {self._host} timed out after {self._connect_timeout} s") from exc
        except requests.Timeout as exc:
            raise DifyError("timeout", f"no response from {self._host} within {self._read_timeout} s") from exc
        except requests.ConnectionError as exc:
            raise DifyError("connection_error", self._redact(f"cannot reach {self._host}: {exc}")) from exc

    def _read_stream(self, response: requests.Response, aggregator: StreamAggregator, *, deadline: float) -> None:
        parser = SSEParser()
        try:
            while chunk := response.raw.read1(_READ_SIZE, decode_content=True):
                for event in parser.feed(chunk):
                    aggregator.add(_decode_event(event.data))
                if time.monotonic() > deadline:
                    if aggregator.complete:
                        return
                    raise DifyError("timeout", f"the stream ran past the total timeout of {self._total_timeout} s")
        except ReadTimeoutError as exc:
            if aggregator.complete:
                return
            raise DifyError("timeout", f"no data from {self._host} for {self._read_timeout} s") from exc
        except TransportError as exc:
            if aggregator.complete:
                return
            raise DifyError("stream_incomplete", self._redact(f"the stream broke off: {exc}")) from exc
        if not aggregator.complete:
            raise DifyError("stream_incomplete", "the stream ended before its terminal event")

    def _blocking_body(self, response: requests.Response) -> Mapping[str, Any]:
        try:
            body = _json_object(response.raw.read(decode_content=True))
        except ReadTimeoutError as exc:
            raise DifyError("timeout", f"no data from {self._host} for {self._read_timeout} s") from exc
        except TransportError as exc:
            raise DifyError("stream_incomplete", self._redact(f"the response broke off: {exc}")) from exc
        if body is None:
            raise DifyError("invalid_response", "a 200 application/json response without a JSON object")
        return body

    def _error_from(self, response: requests.Response) -> DifyError:
        """A non-2xx response as a DifyError: Dify's JSON `{code, message, status[, params]}`, else `http_<status>`."""
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        try:
            raw_body = response.raw.read(_ERROR_BODY_LIMIT, decode_content=True)
        except TransportError:
            raw_body = b""
        body = _json_object(raw_body)
        if body is not None and isinstance(body.get("code"), str):
            message = str(body.get("message") or "")
            if body.get("params"):
                message = f"{message} (params: {body['params']})"
            return DifyError(body["code"], self._redact(message), status, retry_after=retry_after)
        snippet = _WHITESPACE.sub(" ", raw_body.decode("utf-8", errors="replace")).strip()[:_ERROR_SNIPPET_CHARS]
        message = f"HTTP {status} {response.reason}" + (f": {snippet}" if snippet else "")
        return DifyError(f"http_{status}", self._redact(message), status, retry_after=retry_after)

    @property
    def _read_timeout(self) -> float:
        return min(self._idle_read_timeout, self._total_timeout)

    @property
    def _host(self) -> str:
        return urlsplit(self._base_url).hostname or self._base_url

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[api key]") if self._api_key else text


def _is_success(response: requests.Response) -> bool:
    """2xx only: redirects are not followed, and a 3xx is not Dify's answer."""
    return 200 <= response.status_code < 300


def _route(paths: Mapping[str, str], mode: str) -> str:
    if mode not in paths:
        raise ValueError(f"unknown Dify app mode {mode!r}; expected one of {sorted(paths)}")
    return paths[mode]


def _decode_event(data: str) -> Mapping[str, Any]:
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise DifyError("invalid_response", f"an event whose data is not JSON: {data[:100]!r}") from exc
    if not isinstance(payload, dict):
        raise DifyError("invalid_response", f"an event whose data is not a JSON object: {data[:100]!r}")
    return payload


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
