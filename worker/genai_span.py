"""The Dify call as an OpenTelemetry GenAI client span.

Follows the GenAI semantic conventions of OpenTelemetry semantic-conventions v1.41.0 (status: Development):
``gen_ai.operation.name`` (``chat`` for chat, agent and chatflow apps, ``text_completion`` for completion apps,
``invoke_workflow`` for workflows), ``gen_ai.provider.name`` ``dify``, ``gen_ai.conversation.id``,
``gen_ai.response.id``, ``gen_ai.usage.input_tokens`` / ``output_tokens``, ``server.address`` / ``server.port``
and ``error.type`` (the difyq error code) on failure. The span is named ``{operation} {app}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from difyq.worker import tracing
from difyq.worker.dify.errors import DifyError
from difyq.worker.dify.models import CHAT_MODES, DifyRequest, DifyResult

SEMCONV_VERSION = "1.41.0"
PROVIDER = "dify"


def operation_name(mode: str) -> str:
    """The GenAI operation of an app mode."""
    if mode in CHAT_MODES:
        return "chat"
    return "invoke_workflow" if mode == "workflow" else "text_completion"


class DifyCall:
    """The open span of one Dify call: ``finished`` records what Dify answered."""

    def __init__(self, span: tracing.Span):
        self._span = span

    def finished(self, result: DifyResult) -> None:
        self._span.set("gen_ai.conversation.id", result.conversation_id)
        self._span.set("gen_ai.response.id", result.message_id or result.workflow_run_id)
        if result.usage is not None:
            self._span.set("gen_ai.usage.input_tokens", result.usage.prompt_tokens)
            self._span.set("gen_ai.usage.output_tokens", result.usage.completion_tokens)
            self._span.set("difyq.usage.total_tokens", result.usage.total_tokens)


@contextmanager
def dify_call(app_name: str, mode: str, base_url: str, request: DifyRequest) -> Iterator[DifyCall]:
    """The client span around one call to Dify; a DifyError raised inside marks it with its code."""
    operation = operation_name(mode)
    url = urlsplit(base_url)
    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.conversation.id": request.conversation_id,
        "server.address": url.hostname,
        "server.port": url.port or (443 if url.scheme == "https" else 80),
        "difyq.app": app_name,
        "difyq.app.mode": mode,
    }
    if operation == "invoke_workflow":
        attributes["gen_ai.workflow.name"] = app_name
    with tracing.span(f"{operation} {app_name}", "client", attributes=attributes) as span:
        try:
            yield DifyCall(span)
        except DifyError as error:
            span.fail(error.code)
            raise
