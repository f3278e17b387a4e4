"""Value types of the Dify client: what one call asks Dify for, and what it got back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

CHAT_MODES = frozenset({"chat", "agent", "advanced-chat"})
MODES = CHAT_MODES | {"completion", "workflow"}
# The modes whose calls are workflow runs: `workflow_started` comes first, and a run id can be followed.
WORKFLOW_MODES = frozenset({"workflow", "advanced-chat"})


@dataclass(frozen=True)
class DifyRequest:
    """One call's input. `query`, when given, goes to chat modes and to completion (where Dify 0.15.8 makes it
    the prompt's user message, see the `completion_with_query_ignored` capture), never to a workflow;
    `conversation_id` (when set) and `auto_generate_name` go only to chat modes; `files` only when given.
    `workflow_id` pins a published workflow version (the path of a workflow run, a body field of a chatflow's);
    `trace_id` (32 hex digits) goes with every call as W3C `traceparent` and `X-Trace-Id`."""

    query: str | None
    inputs: dict[str, Any]
    user: str
    conversation_id: str | None = None
    files: list[dict[str, Any]] | None = None
    auto_generate_name: bool = False
    workflow_id: str | None = None
    trace_id: str | None = None


@dataclass(frozen=True)
class Usage:
    """Dify's token and cost accounting. Prices stay Dify's decimal strings ("0E-7" included); a workflow run
    reports only `total_tokens` (and its elapsed time as `latency`)."""

    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    total_price: str | None
    currency: str | None
    latency: float | None

    def price(self) -> Decimal | None:
        """`total_price` as a Decimal (None when Dify reported none)."""
        return None if self.total_price is None else Decimal(self.total_price)

    @classmethod
    def from_llm_usage(cls, usage: Mapping[str, Any]) -> Usage:
        """From `message_end.metadata.usage` (Dify's LLMUsage)."""
        return cls(
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
            total_tokens=_int(usage.get("total_tokens")),
            total_price=_decimal_string(usage.get("total_price")),
            currency=usage.get("currency") if isinstance(usage.get("currency"), str) else None,
            latency=_float(usage.get("latency")),
        )

    @classmethod
    def from_workflow_run(cls, data: Mapping[str, Any], spend: NodeSpend | None = None) -> Usage:
        """From `workflow_finished.data` (or a blocking workflow response's `data`, or the run detail), priced by
        the sum of its nodes' `execution_metadata` (`spend`): a workflow run reports no price of its own."""
        return cls(
            prompt_tokens=None,
            completion_tokens=None,
            total_tokens=_int(data.get("total_tokens")),
            total_price=spend.total_price() if spend else None,
            currency=spend.currency if spend else None,
            latency=_float(data.get("elapsed_time")),
        )


class NodeSpend:
    """The price of a workflow run as the sum of its nodes' `node_finished.data.execution_metadata`
    (`total_price`, `currency`). Each node execution counts once, by its `id`: a reattach with a state snapshot
    replays nodes already seen."""

    def __init__(self) -> None:
        self._prices: dict[str, Decimal] = {}
        self.currency: str | None = None

    def add(self, key: str, price: str | None, currency: str | None) -> None:
        """Count `price` once under `key` (a node execution id, or what a run cost before it paused)."""
        if price is None:
            return
        self._prices[key] = Decimal(price)
        if currency:
            self.currency = currency

    def add_node(self, node: Mapping[str, Any]) -> None:
        metadata = node.get("execution_metadata")
        if not isinstance(metadata, Mapping):
            return
        currency = metadata.get("currency")
        self.add(str(node.get("id") or len(self._prices)), _decimal_string(metadata.get("total_price")),
                 currency if isinstance(currency, str) else None)

    def total_price(self) -> str | None:
        """The sum as a decimal string, None when no node reported a price."""
        if not self._prices:
            return None
        return format(sum(self._prices.values(), Decimal(0)), "f")


@dataclass(frozen=True)
class PausedRun:
    """A workflow run paused for human input (Dify 1.13+): its id, the forms it waits on (each
    `human_input_required.data`: `form_token`, `form_id`, `node_id`, `node_title`, `form_content`, `inputs`,
    `actions`, `expiration_time`…), what its nodes cost so far (`price`, `currency`) and the task id of the call
    that started it (`task_id`: what Dify's stop endpoint takes, to stop the run while it waits)."""

    run_id: str
    forms: list[dict[str, Any]]
    price: str | None
    currency: str | None
    task_id: str | None = None


@dataclass(frozen=True)
class DifyResult:
    """One successful call, aggregated from its stream. `answer` is the streamed text (None for a workflow that
    streamed none); `outputs` the workflow's or chatflow's final outputs; `stopped` is true when Dify reported the
    run stopped (a workflow's status; a stopped chat message ends like a finished one and cannot be told apart)."""

    answer: str | None
    outputs: dict[str, Any] | None
    conversation_id: str | None
    message_id: str | None
    workflow_run_id: str | None
    task_id: str | None
    usage: Usage | None
    time_to_first_token_s: float | None
    duration_s: float
    stopped: bool
    paused: PausedRun | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _decimal_string(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    text = str(value)
    try:
        return text if Decimal(text).is_finite() else None
    except InvalidOperation:
        return None
