"""Dify Service API client on urllib3: one streaming call per job, aggregated into a `DifyResult`.

`run` always asks for `response_mode: "streaming"` (agent apps accept nothing else, no proxy cuts a long
answer, and the first token can be timed) and reads the event stream as it arrives. Time is bounded three ways:
`connect_timeout` for the TCP/TLS connect; `idle_read_timeout` between two reads (Dify pings every 10 s while
the model is silent, so a longer gap means the peer is gone); `total_timeout` for the whole call, checked as data
arrives (a silent peer is caught by the idle timeout, so the call ends at most `idle_read_timeout` past it);
and, for workflow runs, `first_event_timeout` for the first event (Dify 1.x fails a streaming call with a
missing input or an unknown conversation silently: pings and nothing else). A call is done at its terminal event
(the stream's end is read when it follows at once, keeping the connection; else the connection is dropped).
Once a workflow or chatflow run id is known, a stream that breaks is followed to the run's end (`follow`), so a
cut never runs a workflow twice. Each call carries the job's trace (`tracing.dify_headers`).
Every failure is a `DifyError` (see `difyq.worker.dify.errors`); the API key never appears in one.

Transport: plain urllib3 (requests' per-call Request/PreparedRequest, hooks and cookie jar cost CPU the worker
needs). Every client in the process sends through one shared `urllib3.PoolManager`, made on first use, that all
threads and gevent greenlets draw from; it keeps up to `_POOL_MAXSIZE` connections per host and never blocks
(`block=False`), so each concurrent call gets its own kept-alive connection. The environment is read once per
base URL (`environment_settings`), as requests would read it: HTTP(S)_PROXY/ALL_PROXY minus NO_PROXY choose a
`urllib3.ProxyManager` (one per proxy URL, shared the same way), and TLS is verified against REQUESTS_CA_BUNDLE
or CURL_CA_BUNDLE when set, else certifi's bundle. Calls are sent without retries or redirects, the body left
unread (`preload_content=False`). A connection goes back to the pool only when its response was read to the end;
one left part-read (an error, an early return) is closed first, so it never carries another request.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

import certifi
import urllib3
from requests.utils import get_auth_from_url, get_environ_proxies, prepend_scheme_if_needed, select_proxy
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError
from urllib3.exceptions import HTTPError as TransportError

from difyq.worker import tracing
from difyq.worker.dify.aggregate import StreamAggregator
from difyq.worker.dify.errors import CANCELED, NO_FIRST_EVENT, DifyError
from difyq.worker.dify.models import CHAT_MODES, WORKFLOW_MODES, DifyRequest, DifyResult, PausedRun, Usage
from difyq.worker.dify.sse import SSEParser
from difyq.worker.json_codec import dumps, loads
from difyq.worker.retry_after import parse_retry_after

__all__ = ["DifyClient", "DifyError", "DifyRequest", "DifyResult", "Usage", "shared_pool"]

_RUN_PATHS = dict.fromkeys(CHAT_MODES, "/chat-messages") | {
    "completion": "/completion-messages",
    "workflow": "/workflows/run",
}
_STOP_PATHS = dict.fromkeys(CHAT_MODES, "/chat-messages/{}/stop") | {
    "completion": "/completion-messages/{}/stop",
    "workflow": "/workflows/tasks/{}/stop",
}
# A stream that breaks (or falls silent) this way, once the run id is known, is followed rather than run again.
_BROKEN_STREAM_CODES = frozenset({"stream_incomplete", "timeout", "connection_error"})
# The run statuses of `GET /workflows/run/{id}` that end a run (`running` and `paused` do not).
FINISHED_RUN_STATUSES = frozenset({"succeeded", "failed", "stopped", "partial-succeeded"})
_READ_SIZE = 64 * 1024
# How often a reattached stream asks whether its job was canceled (as data, pings included, arrives).
_CANCELED_CHECK_S = 1.0
# How long the end of a stream is awaited after its terminal event before the connection is dropped instead.
_END_GRACE_S = 0.02
_ERROR_BODY_LIMIT = 64 * 1024
_ERROR_SNIPPET_CHARS = 200
_WHITESPACE = re.compile(r"\s+")

# Connections kept per host: above the greenlets one `difyq worker --gevent` process runs (5,000 each for 10,000
# streams on a two-process host), so none is closed for lack of room and reopened by the next job.
_POOL_MAXSIZE = 16384
# Host pools kept per manager (apps may sit on different hosts); the least recently used one beyond is closed.
_POOL_HOSTS = 64


def _user_agent() -> str:
    try:
        return f"difyq/{importlib.metadata.version('difyq')}"
    except importlib.metadata.PackageNotFoundError:
        return "difyq"


USER_AGENT = _user_agent()


class TransportSettings(NamedTuple):
    """What the environment says about reaching one base URL: the proxy URL (None: connect directly) and the
    CA bundle (a file or a directory) that verifies TLS."""

    proxy: str | None
    ca_bundle: str


def environment_settings(url: str) -> TransportSettings:
    """The proxy (HTTP(S)_PROXY/ALL_PROXY, honouring NO_PROXY) and the CA bundle (REQUESTS_CA_BUNDLE,
    CURL_CA_BUNDLE, else certifi's) that requests would take from the environment for `url`."""
    proxy = select_proxy(url, get_environ_proxies(url))
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
    return TransportSettings(prepend_scheme_if_needed(proxy, "http") if proxy else None, ca_bundle)


_pools: dict[TransportSettings, urllib3.PoolManager] = {}
_pools_lock = threading.Lock()


def shared_pool(settings: TransportSettings) -> urllib3.PoolManager:
    """The process-wide pool for `settings`, made on first use: a `PoolManager`, or a `ProxyManager` (a
    `SOCKSProxyManager` for socks URLs, which needs PySocks) when a proxy applies."""
    pool = _pools.get(settings)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(settings)
            if pool is None:
                pool = _pools[settings] = _new_pool(settings)
    return pool


def _new_pool(settings: TransportSettings) -> urllib3.PoolManager:
    tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
    tls["ca_cert_dir" if os.path.isdir(settings.ca_bundle) else "ca_certs"] = settings.ca_bundle
    sizes: dict[str, Any] = {"num_pools": _POOL_HOSTS, "maxsize": _POOL_MAXSIZE, "block": False}
    if settings.proxy is None:
        return urllib3.PoolManager(**sizes, **tls)
    username, password = get_auth_from_url(settings.proxy)
    if settings.proxy.lower().startswith("socks"):
        from urllib3.contrib.socks import SOCKSProxyManager

        return SOCKSProxyManager(settings.proxy, username or None, password or None, **sizes, **tls)
    auth = urllib3.make_headers(proxy_basic_auth=f"{username}:{password}") if username else None
    return urllib3.ProxyManager(settings.proxy, proxy_headers=auth, **sizes, **tls)


def _forget_pools() -> None:
    """In a forked child: the parent's connections are not ours to use (or close)."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


def _request_body(mode: str, request: DifyRequest) -> dict[str, Any]:
    """The JSON body of a run call for `mode`: always streaming, optional fields only when set."""
    body: dict[str, Any] = {"inputs": request.inputs, "response_mode": "streaming", "user": request.user}
    if mode != "workflow" and request.query is not None:
        body["query"] = request.query
    if mode in CHAT_MODES:
        body["auto_generate_name"] = request.auto_generate_name
        if request.conversation_id:
            body["conversation_id"] = request.conversation_id
    if mode == "advanced-chat" and request.workflow_id:
        body["workflow_id"] = request.workflow_id
    if request.files:
        body["files"] = request.files
    return body


class DifyClient:
    """Calls one Dify app with one API key. Thread- and greenlet-safe: calls share the process-wide pool, or
    `pool` when given (tests), which then serves every call whatever the environment says about proxies."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        connect_timeout: float = 10.0,
        idle_read_timeout: float = 60.0,
        total_timeout: float = 600.0,
        first_event_timeout: float = 60.0,
        run_poll_interval: float = 2.0,
        pool: urllib3.PoolManager | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._connect_timeout = connect_timeout
        self._idle_read_timeout = idle_read_timeout
        self._total_timeout = total_timeout
        self._first_event_timeout = first_event_timeout
        self._run_poll_interval = run_poll_interval
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=self._read_timeout)
        self._pool = pool
        self._settings = environment_settings(self._base_url)

    def __repr__(self) -> str:
        return f"DifyClient({self._base_url!r})"

    @property
    def pool(self) -> urllib3.PoolManager:
        """The pool calls go through: the one given, else the process-wide one for this base URL's settings
        (looked up per call, so a forked child makes its own)."""
        return self._pool if self._pool is not None else shared_pool(self._settings)

    def run(self, mode: str, request: DifyRequest, *, on_task_id: Callable[[str], None] | None = None,
            on_run_id: Callable[[str], None] | None = None, canceled: Callable[[], bool] | None = None,
            ) -> DifyResult:
        """Run the app once and aggregate its stream; `on_task_id` gets the task id (for `stop`) and `on_run_id`
        the workflow run id (to follow the run should this call be lost) as soon as an event carries them. A
        workflow or chatflow stream that breaks once the run id is known is followed to the run's end
        (`follow`, while `canceled()` is false), never run again. Raises `DifyError`."""
        path = _route(_RUN_PATHS, mode)
        if mode == "workflow" and request.workflow_id:
            path = f"/workflows/{quote(request.workflow_id, safe='')}/run"
        started = time.monotonic()
        deadline = started + self._total_timeout
        aggregator = StreamAggregator(mode, started=started, on_task_id=on_task_id, on_run_id=on_run_id)
        headers = tracing.dify_headers(request.trace_id)
        response = self._request("POST", path, _request_body(mode, request), accept="text/event-stream",
                                 headers=headers)
        try:
            if not _is_success(response):
                raise self._error_from(response)
            if response.headers.get("Content-Type", "").startswith("application/json"):
                aggregator.add_blocking(self._blocking_body(response))
            else:
                # A workflow run's first event comes at once; a chat's only with its first token (pings before).
                first_event_by = started + (self._first_event_timeout if mode in WORKFLOW_MODES else math.inf)
                self._read_stream(response, aggregator, deadline=deadline, first_event_by=first_event_by)
            return aggregator.result()
        except DifyError as error:
            run_id = aggregator.workflow_run_id
            if error.code not in _BROKEN_STREAM_CODES or run_id is None:
                error.time_to_first_token_s = aggregator.time_to_first_token_s  # the job's attempt record shows it
                raise
            _release(response)
            self.follow(run_id, request.user, aggregator, deadline=deadline, headers=headers, canceled=canceled)
        finally:
            _release(response)
        return aggregator.result()

    def follow_run(self, mode: str, run_id: str, request: DifyRequest, paused: PausedRun | None = None, *,
                   canceled: Callable[[], bool] | None = None) -> DifyResult:
        """Follow a run an earlier attempt started to its end (or its next pause), instead of running the app
        again: a run whose worker was lost (with the state so far, so every node's price counts), or, `paused`,
        a run that paused for human input and was resumed (a plain reattach streams the resumed run; what its
        nodes cost before the pause is counted)."""
        started = time.monotonic()
        aggregator = StreamAggregator(mode, started=started, spent_before=paused)
        self.follow(run_id, request.user, aggregator, deadline=started + self._total_timeout,
                    headers=tracing.dify_headers(request.trace_id), snapshot=paused is None, canceled=canceled)
        return aggregator.result()

    def submit_form(self, form_token: str, inputs: Mapping[str, Any], action: str, user: str, *,
                    trace_id: str | None = None) -> None:
        """Submit a human-input form (`POST /form/human_input/{token}`, Dify 1.14+; accepted once): the run
        resumes. Raises `DifyError` (`invalid_form_data`, `human_input_form_submitted`, `not_found`…)."""
        response = self._request("POST", f"/form/human_input/{quote(form_token, safe='')}",
                                 {"inputs": dict(inputs), "action": action, "user": user},
                                 accept="application/json", headers=tracing.dify_headers(trace_id))
        try:
            if not _is_success(response):
                raise self._error_from(response)
        finally:
            _release(response)

    def follow(self, run_id: str, user: str, aggregator: StreamAggregator, *, deadline: float,
               headers: Mapping[str, str], snapshot: bool = True, canceled: Callable[[], bool] | None = None) -> None:
        """Follow a run whose stream broke to its end: reattach to its events (`GET /workflow/{id}/events`, Dify
        1.14+, with the state so far so every node's price is counted), else (an older Dify, or the reattach
        broke too) poll its record (`GET /workflows/run/{id}`) every `run_poll_interval` until it ends, and take
        the outputs from the record. `snapshot=False` takes only what comes next (a resumed run: the replay would
        repeat its pause). Raises `DifyError`: `run_timeout` when the run is still going at the deadline,
        `not_found` when Dify does not know the run, `canceled` as soon as `canceled()` says the job was canceled
        (difyq stopped the run, and Dify 1.14.2 never ends a stopped run's record: following it would wait out the
        deadline)."""
        aggregator.follows(run_id)
        _check_canceled(canceled)
        try:
            self._reattach(run_id, user, aggregator, deadline=deadline, headers=headers, snapshot=snapshot,
                           canceled=canceled)
        except DifyError as error:
            if error.status != 404 and error.code not in _BROKEN_STREAM_CODES:
                raise
        if aggregator.complete:
            return
        aggregator.add_run_detail(self._await_run_end(run_id, deadline=deadline, headers=headers, canceled=canceled))

    def get(self, path: str, *, headers: Mapping[str, str] | None = None) -> Mapping[str, Any]:
        """A JSON object from `GET path` (`/info`, `/parameters`, a run's record…). Raises `DifyError`."""
        response = self._request("GET", path, None, accept="application/json", headers=headers)
        try:
            if not _is_success(response):
                raise self._error_from(response)
            return self._blocking_body(response)
        finally:
            _release(response)

    def run_detail(self, run_id: str, *, headers: Mapping[str, str] | None = None) -> Mapping[str, Any]:
        """The run's record, `GET /workflows/run/{id}`. Dify 0.15 answers an unknown id with 200 and null fields,
        1.x with 404: both raise `not_found`."""
        detail = self.get(f"/workflows/run/{quote(run_id, safe='')}", headers=headers)
        if detail.get("status") is None:
            raise DifyError("not_found", f"Dify has no workflow run {run_id}", 404)
        return detail

    def _reattach(self, run_id: str, user: str, aggregator: StreamAggregator, *, deadline: float,
                  headers: Mapping[str, str], snapshot: bool, canceled: Callable[[], bool] | None) -> None:
        query = urlencode({"user": user, **({"include_state_snapshot": "true"} if snapshot else {})})
        response = self._request("GET", f"/workflow/{quote(run_id, safe='')}/events?{query}", None,
                                 accept="text/event-stream", headers=headers)
        try:
            if not _is_success(response):
                raise self._error_from(response)
            self._read_stream(response, aggregator, deadline=deadline, first_event_by=None, canceled=canceled)
        finally:
            _release(response)

    def _await_run_end(self, run_id: str, *, deadline: float, headers: Mapping[str, str],
                       canceled: Callable[[], bool] | None) -> Mapping[str, Any]:
        """Poll the run's record until it ends (or pauses, or the job is canceled); Dify being briefly unreachable
        is waited out."""
        while True:
            _check_canceled(canceled)
            try:
                detail = self.run_detail(run_id, headers=headers)
            except DifyError as error:
                if error.code not in _BROKEN_STREAM_CODES and (error.status or 0) < 500:
                    raise
            else:
                if detail.get("status") in FINISHED_RUN_STATUSES:
                    return detail
                if detail.get("status") == "paused":
                    raise DifyError("workflow_paused", "the run paused for human input")
            if time.monotonic() + self._run_poll_interval > deadline:
                raise DifyError("run_timeout", f"the run {run_id} had not ended after {self._total_timeout} s")
            time.sleep(self._run_poll_interval)

    def upload_file(self, name: str, content: bytes, mime_type: str, user: str, *,
                    trace_id: str | None = None) -> Mapping[str, Any]:
        """Upload one file for `user` (`POST /files/upload`, multipart `file` and `user`); Dify's answer (`id`,
        `name`, `size`, `extension`, `mime_type`…). Only requests of the same `user` may reference it. Raises
        `DifyError` (`file_too_large` 413, `unsupported_file_type` 415…)."""
        body, content_type = urllib3.encode_multipart_formdata(
            {"file": (name, content, mime_type), "user": user})
        response = self._request("POST", "/files/upload", None, accept="application/json",
                                 headers=tracing.dify_headers(trace_id), raw=(body, content_type))
        try:
            if not _is_success(response):
                raise self._error_from(response)
            answer = self._blocking_body(response)
        finally:
            _release(response)
        if not isinstance(answer.get("id"), str):
            raise DifyError("invalid_response", "an upload answer without the file's id")
        return answer

    def feedback(self, message_id: str, rating: str | None, content: str | None, user: str) -> None:
        """Rate a message (`POST /messages/{id}/feedbacks`: `like`, `dislike`, or None to withdraw a rating).
        Raises `DifyError` (`not_found` for a message Dify does not know)."""
        body: dict[str, Any] = {"rating": rating, "user": user}
        if content is not None:
            body["content"] = content
        response = self._request("POST", f"/messages/{quote(message_id, safe='')}/feedbacks", body,
                                 accept="application/json")
        try:
            if not _is_success(response):
                raise self._error_from(response)
        finally:
            _release(response)

    def messages(self, conversation_id: str, user: str, *, first_id: str | None = None, limit: int = 20,
                 ) -> Mapping[str, Any]:
        """A page of a conversation's history (`GET /messages`): `{limit, has_more, data}`, the newest `limit`
        messages older than `first_id` (all, without it), oldest first. Raises `DifyError` (`not_found` 404 for a
        conversation Dify does not have for this user: deleted, expired or another user's)."""
        query: dict[str, Any] = {"conversation_id": conversation_id, "user": user, "limit": limit}
        if first_id:
            query["first_id"] = first_id
        return self.get(f"/messages?{urlencode(query)}")

    def conversation_exists(self, conversation_id: str, user: str) -> bool:
        """Whether Dify still has the user's conversation (one `GET /messages` of one message). Asked before
        continuing a thread: a 1.x streaming call to a missing conversation fails silently (a ping, then nothing
        for minutes), where this answers 404 at once. Raises `DifyError` for any other failure."""
        try:
            self.messages(conversation_id, user, limit=1)
        except DifyError as error:
            if error.status == 404:
                return False
            raise
        return True

    def delete_conversation(self, conversation_id: str, user: str) -> bool:
        """Delete the user's conversation (`DELETE /conversations/{id}`; 204, or 200 from an older Dify); False
        when Dify does not have it (404). Raises `DifyError` for any other failure."""
        response = self._request("DELETE", f"/conversations/{quote(conversation_id, safe='')}", {"user": user},
                                 accept="application/json")
        try:
            if response.status == 404:
                return False
            if not _is_success(response):
                raise self._error_from(response)
            return True
        finally:
            _release(response)

    def stop(self, mode: str, task_id: str, user: str) -> None:
        """Ask Dify to stop a running task (Dify answers success even for an unknown or finished task)."""
        path = _route(_STOP_PATHS, mode).format(quote(task_id, safe=""))
        response = self._request("POST", path, {"user": user}, accept="application/json")
        try:
            if not _is_success(response):
                raise self._error_from(response)
        finally:
            _release(response)

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None, *, accept: str,
                 headers: Mapping[str, str] | None = None,
                 raw: tuple[bytes, str] | None = None) -> urllib3.BaseHTTPResponse:
        """One call; the body is `body` as JSON, or `raw` (bytes and their content type)."""
        sent = {
            "Authorization": f"Bearer {self._api_key}",
            "Accept": accept,
            "User-Agent": USER_AGENT,
            **(headers or {}),
        }
        payload: bytes | None = None
        if raw is not None:
            payload, sent["Content-Type"] = raw
        elif body is not None:
            payload, sent["Content-Type"] = dumps(body), "application/json"
        try:
            return self.pool.urlopen(
                method,
                self._base_url + path,
                body=payload,
                headers=sent,
                retries=False,
                redirect=False,
                preload_content=False,
                timeout=self._timeout,
            )
        # NewConnectionError (refused, unreachable, DNS) subclasses ConnectTimeoutError: it goes first.
        except NewConnectionError as exc:
            raise DifyError("connection_error", self._redact(f"cannot reach {self._host}: {exc}")) from exc
        except ConnectTimeoutError as exc:
            raise DifyError("timeout", f"connecting to {self._host} timed out after {self._connect_timeout} s") from exc
        except ReadTimeoutError as exc:
            raise DifyError("timeout", f"no response from {self._host} within {self._read_timeout} s") from exc
        except (TransportError, OSError) as exc:  # proxy, TLS, protocol (peer closed, garbage status line)
            raise DifyError("connection_error", self._redact(f"cannot reach {self._host}: {exc}")) from exc

    def _read_stream(
        self, response: urllib3.BaseHTTPResponse, aggregator: StreamAggregator, *, deadline: float,
        first_event_by: float | None, canceled: Callable[[], bool] | None = None,
    ) -> None:
        """Read events until the terminal one (the call is done there: Dify 1.x keeps the connection open about
        a second longer). `first_event_by` (a new call; None for a reattach): Dify failed silently when only
        pings came by then, or when the stream fell silent before any event (a missing input or an unknown
        conversation in 1.x streaming mode: one ping, then nothing for 300 s; a live call pings every 10 s).
        `canceled` (a reattach): asked at most every `_CANCELED_CHECK_S` as data (pings included) arrives; a
        canceled job stops reading (a run difyq stopped may never end its stream)."""
        canceled_check_at = time.monotonic() + _CANCELED_CHECK_S
        parser = SSEParser()
        # A chunked stream (Dify's) is read chunk by chunk: one event per chunk, with less work per read than
        # read1's; anything else as it arrives.
        chunks = (response.read_chunked(decode_content=True) if response.chunked
                  else iter(partial(response.read1, _READ_SIZE, decode_content=True), b""))
        try:
            for chunk in chunks:
                for event in parser.feed(chunk):
                    aggregator.add(_decode_event(event.data))
                if aggregator.complete:
                    _finish_quietly(response, chunks)
                    return
                now = time.monotonic()
                if canceled is not None and now > canceled_check_at:
                    _check_canceled(canceled)
                    canceled_check_at = now + _CANCELED_CHECK_S
                if first_event_by is not None and aggregator.events_seen == 0 and now > first_event_by:
                    raise self._silent_failure()
                if now > deadline:
                    raise DifyError("timeout", f"the stream ran past the total timeout of {self._total_timeout} s")
        except ReadTimeoutError as exc:
            if first_event_by is not None and aggregator.events_seen == 0:
                raise self._silent_failure() from exc
            raise DifyError("timeout", f"no data from {self._host} for {self._read_timeout} s") from exc
        except TransportError as exc:
            raise DifyError("stream_incomplete", self._redact(f"the stream broke off: {exc}")) from exc
        if not (aggregator.complete or aggregator.failed):
            raise DifyError("stream_incomplete", "the stream ended before its terminal event")

    def _silent_failure(self) -> DifyError:
        return DifyError(NO_FIRST_EVENT, "Dify accepted the streaming call but sent no event (only pings, or "
                         "silence): it failed before the run started (a missing required input, an unknown "
                         "conversation or a broken worker)")

    def _blocking_body(self, response: urllib3.BaseHTTPResponse) -> Mapping[str, Any]:
        try:
            body = _json_object(response.read(decode_content=True))
        except ReadTimeoutError as exc:
            raise DifyError("timeout", f"no data from {self._host} for {self._read_timeout} s") from exc
        except TransportError as exc:
            raise DifyError("stream_incomplete", self._redact(f"the response broke off: {exc}")) from exc
        if body is None:
            raise DifyError("invalid_response", "a 200 application/json response without a JSON object")
        return body

    def _error_from(self, response: urllib3.BaseHTTPResponse) -> DifyError:
        """A non-2xx response as a DifyError: Dify's JSON `{code, message, status[, params]}`, else `http_<status>`."""
        status = response.status
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        try:
            raw_body = response.read(_ERROR_BODY_LIMIT, decode_content=True)
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


def _check_canceled(canceled: Callable[[], bool] | None) -> None:
    if canceled is not None and canceled():
        raise DifyError(CANCELED, "the job was canceled and its run stopped: the run is not followed")


def _finish_quietly(response: urllib3.BaseHTTPResponse, chunks: Iterator[bytes]) -> None:
    """After the terminal event: read the stream's end if it is already on its way (`_END_GRACE_S`), so the
    connection goes back to the pool; a server that holds the stream open (Dify 1.x, about a second) is not
    waited for: the connection is closed instead."""
    sock = getattr(response.connection, "sock", None)
    if sock is None:
        return
    timeout = sock.gettimeout()
    sock.settimeout(_END_GRACE_S)
    try:
        for _ in chunks:
            pass
    except (TransportError, OSError):
        return
    with contextlib.suppress(OSError):
        sock.settimeout(timeout)


def _release(response: urllib3.BaseHTTPResponse) -> None:
    """Give the response's connection back to its pool: as it is when the body was read to the end (urllib3 has
    then released it already), closed first when bytes may be left unread, so the next call gets a clean one."""
    if not response.closed:
        response.close()
    response.release_conn()


def _is_success(response: urllib3.BaseHTTPResponse) -> bool:
    """2xx only: redirects are not followed, and a 3xx is not Dify's answer."""
    return 200 <= response.status < 300


def _route(paths: Mapping[str, str], mode: str) -> str:
    if mode not in paths:
        raise ValueError(f"unknown Dify app mode {mode!r}; expected one of {sorted(paths)}")
    return paths[mode]


def _decode_event(data: str) -> Mapping[str, Any]:
    try:
        payload = loads(data)
    except ValueError as exc:
        raise DifyError("invalid_response", f"an event whose data is not JSON: {data[:100]!r}") from exc
    if not isinstance(payload, dict):
        raise DifyError("invalid_response", f"an event whose data is not a JSON object: {data[:100]!r}")
    return payload


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
