"""Dify call failures and whether retrying can fix them.

Every failed Dify call ends as one `DifyError`. Its `code` is Dify's own (`invalid_param`, `not_found`…), or one of
ours for what happens below Dify's JSON layer: `timeout`, `connection_error`, `stream_incomplete`,
`invalid_response`, `workflow_failed`, and `http_<status>` for a body that is not Dify JSON (a proxy's HTML page).

`classify` decides, once and for all callers, what the worker does with it (docs/guarantees.md):

* retry: HTTP 429 `too_many_requests` (the app's concurrency ceiling) and a 429 without Dify JSON (an edge
  proxy's), any 5xx, `internal_server_error`/`unknown`, the ceiling sent as 400 `invalid_param` or 500 with the
  text "Too many requests…" (whatever the code), and transport failures;
* quota: 429 `rate_limit_error` (a Dify Cloud plan quota) does not clear on a retry: the job fails, or waits for
  the next hour when its app says `on_quota: defer`;
* fail now: every other 4xx (`invalid_param`, `bad_request` — a draft or malformed `workflow_id` —,
  `app_unavailable`, `not_*_app`, `unauthorized`, `forbidden` and the newer `app_*` 403 codes,
  `workflow_version_execution_not_allowed`, `not_found` — an unknown run or workflow id —, upload 413/415 codes,
  provider credentials/quota, `conversation_completed`, `human_input_form_*`…), and ours: `no_first_event` (Dify
  failed silently), `run_timeout` (a followed run did not end in time), `workflow_paused`, `canceled` (the job
  was canceled while its run was followed: it ends `canceled`);
* read the text: Dify reports a model provider's failure as `completion_request_error` (HTTP 400 or an `error`
  event), as a failed workflow (`workflow_failed`, the run's `error`), or in a chatflow as an `error` event
  `invalid_param` "Run failed: …". Those retry only when the text shows an upstream 429/5xx, a rate limit, a
  timeout, an overload or a connection failure; a provider's 400/401 fails at once.

`rate_limited` marks the failures that should cool the API key down for every worker.
"""

from __future__ import annotations

import re
from typing import NamedTuple

QUOTA_CODE = "rate_limit_error"
CANCELED = "canceled"  # ours: the job was canceled (its Dify task stopped) while its run was being followed
NO_FIRST_EVENT = "no_first_event"  # ours: Dify accepted a streaming call but sent no event (it failed silently)
_RETRY_CODES = frozenset(
    {
        "internal_server_error",
        "unknown",
        "timeout",
        "connection_error",
        "stream_incomplete",
        "invalid_response",
    }
)
_UPSTREAM_TEXT_CODES = frozenset({"completion_request_error", "workflow_failed"})
_RUN_FAILED_PREFIX = "run failed:"
_CONCURRENCY_CAP_PREFIX = "too many requests"

_UPSTREAM_STATUS = re.compile(r"(?:status[ _]?code|error[ _]?code|\bhttp)\s*[:=]?\s*([1-5]\d\d)\b", re.IGNORECASE)
_RATE_LIMIT_TEXT = re.compile(r"rate[ _-]?limit|too many requests", re.IGNORECASE)
_TRANSIENT_TEXT = re.compile(
    r"timed? ?out|overloaded|connection (?:error|refused|reset|aborted)|"
    r"server unavailable|service unavailable|temporarily unavailable|bad gateway|internal server error",
    re.IGNORECASE,
)


class Classification(NamedTuple):
    """What the worker does with a failure: retry it (with backoff), and cool the key down first."""

    retryable: bool
    rate_limited: bool


_FAIL = Classification(retryable=False, rate_limited=False)
_RETRY = Classification(retryable=True, rate_limited=False)
_RATE_LIMITED = Classification(retryable=True, rate_limited=True)


def classify(code: str, message: str, status: int | None) -> Classification:
    """Fail-now or retry for one Dify error (see the module docstring for the rules)."""
    if code == QUOTA_CODE:
        return _FAIL
    if status == 429 or code == "too_many_requests" or message.lower().startswith(_CONCURRENCY_CAP_PREFIX):
        return _RATE_LIMITED
    if code in _UPSTREAM_TEXT_CODES or (code == "invalid_param" and message.lower().startswith(_RUN_FAILED_PREFIX)):
        verdict = classify_upstream_text(message)
        if verdict.retryable:
            return verdict
    if code in _RETRY_CODES or (status is not None and status >= 500):
        return _RETRY
    return _FAIL


def classify_upstream_text(text: str) -> Classification:
    """Read a model provider's failure as Dify relays it, e.g.
    "[openai_api_compatible] Error: API request failed with status code 429: {…}".

    A rate limit anywhere in the text wins; otherwise the first upstream HTTP status decides (429, 408 and 5xx
    retry, any other status fails); without a status, words of a transient failure retry.
    """
    upstream = _UPSTREAM_STATUS.search(text)
    upstream_status = int(upstream.group(1)) if upstream else None
    if upstream_status == 429 or _RATE_LIMIT_TEXT.search(text):
        return _RATE_LIMITED
    if upstream_status is not None:
        return _RETRY if upstream_status == 408 or upstream_status >= 500 else _FAIL
    return _RETRY if _TRANSIENT_TEXT.search(text) else _FAIL


class DifyError(Exception):
    """One failed Dify call: Dify's `code`/`message`/`status` (or ours), classified for the worker."""

    def __init__(self, code: str, message: str, status: int | None = None, *, retry_after: float | None = None,
                 retryable: bool | None = None):
        super().__init__(code, message, status)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.retryable, self.rate_limited = classify(code, message, status)
        if retryable is not None:  # a failure beside Dify's API (a job's file) that knows whether it may pass
            self.retryable = retryable
        self.quota = code == QUOTA_CODE  # a plan quota that only time clears (`apps.*.on_quota`)
        # Seconds from the call's start to its first streamed token, when the call failed after one came.
        self.time_to_first_token_s: float | None = None

    def __str__(self) -> str:
        where = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{self.code}{where}: {self.message}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.code, self.message, self.status),
                {"retry_after": self.retry_after, "retryable": self.retryable,
                 "time_to_first_token_s": self.time_to_first_token_s})

    def as_dict(self) -> dict[str, object]:
        """The job resource's `error` object (`time_to_first_token_s` only when a token came before it failed)."""
        document: dict[str, object] = {"code": self.code, "message": self.message, "status": self.status}
        if self.time_to_first_token_s is not None:
            document["time_to_first_token_s"] = round(self.time_to_first_token_s, 3)
        return document
