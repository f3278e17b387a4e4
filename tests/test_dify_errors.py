"""Fail-now or retry for every error the Dify reference lists, the provider texts inside them, Retry-After."""

from __future__ import annotations

import pickle

import pytest

from difyq.worker.dify.errors import DifyError, classify, classify_upstream_text
from tests.support.captures import iter_captures

VERSION_NOT_ALLOWED = "Workflow version execution is not available on your current plan. Please upgrade to a paid plan."
CONCURRENCY_CAP = (
    "Too many requests. Please try again later. The current maximum concurrent requests allowed for "
    "6b9a0d8e-1f2a-4c3b-9d4e-5f6a7b8c9d0e is 8."
)

FAIL_NOW = [
    ("invalid_param", "query is required", 400),
    ("invalid_param", "Missing required parameter in the JSON body (params: query)", 400),
    ("invalid_param", "Agent Chat App does not support blocking mode", 400),
    ("invalid_param", "text is required in input form", 400),
    ("invalid_param", "Arg user must be provided.", 400),
    ("bad_request", "The browser (or proxy) sent a request that this server could not understand.", 400),
    ("app_unavailable", "App unavailable, please check your app configurations.", 400),
    ("not_chat_app", "Please check if your app mode matches the right API route.", 400),
    ("not_workflow_app", "Please check if your app mode matches the right API route.", 400),
    ("not_completion_app", "Please check if your Completion app mode matches the right API route.", 400),
    ("conversation_completed", "The conversation has ended. Please start a new conversation.", 400),
    ("provider_not_initialize", "No valid model provider credentials found.", 400),
    ("provider_quota_exceeded", "Your quota for Dify Hosted OpenAI has been exhausted.", 400),
    ("model_currently_not_support", "Dify Hosted OpenAI trial currently not support the GPT-4 model.", 400),
    ("no_file_uploaded", "Please upload your file.", 400),
    ("too_many_files", "Only one file is allowed.", 400),
    ("unauthorized", "Access token is invalid", 401),
    ("forbidden", "The app's API service has been disabled.", 403),
    ("app_not_found", "App not found.", 403),
    ("app_abnormal_status", "The app's status is abnormal.", 403),
    ("app_api_disabled", "The app's API service has been disabled.", 403),
    ("workspace_not_found", "Workspace not found.", 403),
    ("workspace_archived", "The workspace's status is archived.", 403),
    ("not_found", "Conversation Not Exists.", 404),
    ("file_too_large", "File size exceeded. 15 MB", 413),
    ("audio_too_large", "Audio size exceeded.", 413),
    ("unsupported_file_type", "File type not allowed.", 415),
    ("unsupported_audio_type", "Audio type not allowed.", 415),
    ("unsupported_media_type", "Did not attempt to load JSON data", 415),
    ("http_404", "HTTP 404 NOT FOUND: <!doctype html> ...", 404),
    ("http_403", "HTTP 403 Forbidden", 403),
    ("invalid_param", "Run failed: Variable #sys.query# not found", 400),
    ("completion_request_error", "[openai] Error: API request failed with status code 400: bad temperature", 400),
    ("completion_request_error", "[openai] Incorrect model credentials provided, please check and try again. ", 400),
    ("completion_request_error", "Error code: 401 - {'error': {'message': 'Incorrect API key provided'}}", 400),
    ("completion_request_error", "[anthropic] Bad Request Error, prompt is too long", 400),
    ("workflow_failed", "Node LLM run failed: [openai] Error code: 400 - context_length_exceeded", None),
    ("workflow_failed", "Variable #1733.text# not found", None),
    # Dify 1.x (the error guide and the Service API reference of dify-docs, the 1.14.2 captures)
    ("workflow_version_execution_not_allowed", VERSION_NOT_ALLOWED, 403),
    ("bad_request", "Cannot use draft workflow version. Workflow ID: 24711a86-3ba5-4c03-be82-cd7c76e413e0.", 400),
    ("bad_request", "Invalid workflow_id format: 'not-a-uuid'. ", 400),
    ("not_found", "Workflow not found with id: 00000000-0000-0000-0000-000000000000", 404),
    ("not_found", "Workflow run not found.", 404),
    ("agent_not_published", "Agent has not been published. Please publish the Agent before using the API.", 400),
    ("end_user_not_found", "End user not found.", 404),
    ("file_access_denied", "Access to the requested file is denied.", 403),
    ("file_not_found", "File not found.", 404),
    ("invalid_action", "Invalid action.", 400),
    ("invalid_form_data", "Missing required inputs: comment", 400),
    ("human_input_form_submitted", "This form has already been submitted by another user, form_id=x", 412),
    ("human_input_form_expired", "This form has expired, form_id=x", 412),
    ("invalid_metadata", "Invalid metadata.", 400),
    ("no_first_event", "Dify sent only pings for 60.0 s", None),
    ("run_timeout", "the run had not ended after 600.0 s", None),
    ("workflow_paused", "the run paused for human input", None),
]

QUOTA = [
    ("rate_limit_error", "Rate Limit Error", 429),
    ("rate_limit_error", "Workflow execution quota limit reached for tenant 42", 429),
]

# Every code of Dify 1.x's error guide (dify-docs en/api-reference/guides/errors.mdx) and of the Service API
# reference's error examples (en/api-reference/openapi_service.json) that a run, its record or its form can answer.
DIFY_1X_CODES = {
    "invalid_param", "bad_request", "app_unavailable", "provider_not_initialize", "provider_quota_exceeded",
    "model_currently_not_support", "completion_request_error", "unauthorized", "forbidden", "not_found",
    "file_too_large", "unsupported_file_type", "too_many_requests", "rate_limit_error", "internal_server_error",
    "workflow_version_execution_not_allowed", "conversation_completed", "not_chat_app", "not_workflow_app",
    "agent_not_published", "end_user_not_found", "file_access_denied", "file_not_found", "invalid_action",
    "invalid_form_data", "human_input_form_submitted", "human_input_form_expired", "no_file_uploaded",
    "too_many_files", "audio_too_large", "unsupported_audio_type", "invalid_metadata",
}

RETRY = [
    ("too_many_requests", CONCURRENCY_CAP, 429, True),
    ("invalid_param", CONCURRENCY_CAP, 400, True),
    ("internal_server_error", CONCURRENCY_CAP, 500, True),
    ("http_429", "HTTP 429 Too Many Requests: error code: 1015", 429, True),
    ("invalid_param", "anything at all", 429, True),
    ("internal_server_error", "The server encountered an internal error and was unable to complete", 500, False),
    ("unknown", "Internal Server Error", 500, False),
    ("http_502", "HTTP 502 Bad Gateway", 502, False),
    ("http_503", "HTTP 503 Service Unavailable", 503, False),
    ("not_found", "an odd 5xx with a 4xx code", 504, False),
    ("timeout", "no data from dify.internal for 60.0 s", None, False),
    ("connection_error", "cannot reach dify.internal: Connection refused", None, False),
    ("stream_incomplete", "the stream ended before its terminal event", None, False),
    ("invalid_response", "an event whose data is not JSON", None, False),
    ("completion_request_error", "[openai] Rate Limit Error, Error code: 429 - insufficient_quota", 400, True),
    ("completion_request_error", "[models] Rate Limit Error", 400, True),
    ("completion_request_error", "[models] Server Unavailable Error, upstream 503", 400, False),
    ("completion_request_error", "[models] Connection Error, HTTPSConnectionPool: Read timed out.", 400, False),
    ("completion_request_error", "Error code: 529 - {'type': 'overloaded_error', 'message': 'Overloaded'}", 400, False),
    ("completion_request_error", "Request timed out.", 400, False),
    ("completion_request_error", "[ollama] Connection refused", 400, False),
    ("completion_request_error", "status_code=502 from upstream", 400, False),
    ("completion_request_error", "a 400 body but the HTTP status was 500", 500, False),
    ("workflow_failed", "[openai] Error: API request failed with status code 503: unavailable", None, False),
    ("invalid_param", "Run failed: [openai] Error: API request failed with status code 429: {}", 400, True),
]


def test_every_1x_code_is_classified() -> None:
    tested = {row[0] for row in FAIL_NOW + RETRY + QUOTA}
    assert tested >= DIFY_1X_CODES, sorted(DIFY_1X_CODES - tested)


@pytest.mark.parametrize(("code", "message", "status"), QUOTA)
def test_quota_is_neither_retried_nor_a_cooldown(code: str, message: str, status: int) -> None:
    error = DifyError(code, message, status)
    assert (error.retryable, error.rate_limited, error.quota) == (False, False, True)


@pytest.mark.parametrize(("code", "message", "status"), FAIL_NOW)
def test_fail_now(code: str, message: str, status: int | None) -> None:
    error = DifyError(code, message, status)
    assert (error.retryable, error.rate_limited) == (False, False)


@pytest.mark.parametrize(("code", "message", "status", "rate_limited"), RETRY)
def test_retry(code: str, message: str, status: int | None, rate_limited: bool) -> None:
    error = DifyError(code, message, status)
    assert (error.retryable, error.rate_limited) == (True, rate_limited)


def _captured_provider_texts() -> dict[str, str]:
    """The provider error text of every llm_fail* capture, wherever Dify put it."""
    texts = {}
    for capture in iter_captures():
        if not capture.name.startswith("llm_fail"):
            continue
        body = capture.body.decode()
        start = body.index("[openai_api_compatible]")
        texts[capture.name] = body[start : body.index('}}"', start) + 2].replace('\\"', '"')
    return texts


@pytest.mark.parametrize(("name", "text"), sorted(_captured_provider_texts().items()))
def test_captured_provider_failures_retry(name: str, text: str) -> None:
    rate_limited = "fail429" in name
    assert classify_upstream_text(text) == (True, rate_limited)
    assert classify("completion_request_error", text, 400) == (True, rate_limited)
    assert classify("workflow_failed", text, None) == (True, rate_limited)
    assert classify("invalid_param", f"Run failed: {text}", 400) == (True, rate_limited)


@pytest.mark.parametrize(
    ("upstream_status", "expected"),
    [(400, (False, False)), (401, (False, False)), (403, (False, False)), (404, (False, False)),
     (408, (True, False)), (429, (True, True)), (500, (True, False)), (502, (True, False)), (529, (True, False))],
)  # fmt: skip
def test_the_upstream_status_in_the_text_decides(upstream_status: int, expected: tuple[bool, bool]) -> None:
    text = f'[openai_api_compatible] Error: API request failed with status code {upstream_status}: {{"error": {{}}}}'
    assert classify("completion_request_error", text, 400) == expected


def test_a_provider_400_mentioning_a_timeout_parameter_still_fails() -> None:
    text = "[openai] Error: API request failed with status code 400: Unrecognized request argument: timeout"
    assert classify("completion_request_error", text, 400) == (False, False)


def test_as_dict_str_and_pickle() -> None:
    error = DifyError("not_found", "Conversation Not Exists.", 404, retry_after=3.0)
    assert error.as_dict() == {"code": "not_found", "message": "Conversation Not Exists.", "status": 404}
    assert str(error) == "not_found (HTTP 404): Conversation Not Exists."
    assert str(DifyError("timeout", "slow")) == "timeout: slow"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.message, copy.status, copy.retry_after, copy.retryable) == (
        "not_found",
        "Conversation Not Exists.",
        404,
        3.0,
        False,
    )
