"""Folding one Dify response into a `DifyResult`.

The worker always streams; this module turns the stream's decoded `data:` objects into one result per app mode:

* answer: `message` / `agent_message` deltas (`answer`) and workflow `text_chunk` (`data.text`) append,
  `message_replace` / `text_replace` replace; the first non-empty piece times the first token;
* usage: `message_end.metadata.usage`, else the workflow run's `total_tokens`/`elapsed_time` priced by the sum of
  its nodes' `node_finished.data.execution_metadata` (`NodeSpend`);
* outputs, status and error: `workflow_finished.data` (workflow and chatflow), or the run detail when a broken
  stream was followed to its end (`add_run_detail`);
* an `error` event raises its `DifyError` at once; a failed workflow raises `workflow_failed` with the run's
  error text (a chatflow's "Run failed: …" `error` event, which 0.15.8 sends after it, wins when it comes);
* a paused run (`workflow_paused`, Dify 1.13+ human input) keeps its `human_input_required` forms.

The stream is complete at `message_end` (chat, agent, completion), at `workflow_finished` (workflow), at both, in
either order (advanced-chat; `workflow_finished` alone once a run is followed: a reattach does not repeat
`message_end`), at a failed `workflow_finished` (a chatflow's at its `error` event or the stream's end), or at
`workflow_paused`. Every other event (`node_started`, `node_retry`, `iteration_*`, `loop_*`, `agent_log`,
`agent_thought`, `reasoning_chunk`, `message_file`, `tts_*`, `human_input_form_filled`,
`human_input_form_timeout`, `ping`, and any event a later Dify adds) carries nothing the result needs and is
ignored; a failed `node_finished` inside a run that goes on is not a failure: the run's own end decides.
A blocking JSON body, which a 200 `application/json` response holds when something between us
and Dify dropped `response_mode`, is read as the events it stands for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from difyq.worker.dify.errors import DifyError
from difyq.worker.dify.models import DifyResult, NodeSpend, PausedRun, Usage
from difyq.worker.json_codec import loads

_IDS = ("conversation_id", "message_id", "workflow_run_id", "task_id")


class StreamAggregator:
    """Accumulates one call's events; `result()` gives the `DifyResult` or raises the call's `DifyError`."""

    def __init__(self, mode: str, *, started: float, on_task_id: Callable[[str], None] | None = None,
                 on_run_id: Callable[[str], None] | None = None, spent_before: PausedRun | None = None) -> None:
        self._mode = mode
        self._started = started
        self._on_task_id = on_task_id
        self._on_run_id = on_run_id
        self._answer: list[str] | None = None
        self._first_token_at: float | None = None
        self._ids: dict[str, str] = {}
        self._llm_usage: Usage | None = None
        self._workflow_run: Mapping[str, Any] | None = None
        self._message_ended = False
        self._spend = NodeSpend()
        if spent_before is not None:  # a resumed run: what its nodes cost before it paused
            self._spend.add("before-pause", spent_before.price, spent_before.currency)
        self._forms: list[Mapping[str, Any]] = []
        self._paused: Mapping[str, Any] | None = None
        self.events_seen = 0
        self.followed = False

    @property
    def complete(self) -> bool:
        """Whether the terminal event(s) of this mode have arrived."""
        run = self._workflow_run
        if self._paused is not None or (self.failed and (self._mode != "advanced-chat" or self.followed)):
            return True
        if self._mode == "workflow" or (self._mode == "advanced-chat" and self.followed):
            return run is not None
        if self._mode == "advanced-chat":
            return run is not None and self._message_ended
        return self._message_ended

    def follows(self, run_id: str) -> None:
        """From now on the events (or the record) come from following run `run_id`, not from the call."""
        self.followed = True
        self._ids.setdefault("workflow_run_id", run_id)

    @property
    def failed(self) -> bool:
        """The run ended failed. A chatflow's stream then still brings Dify's `error` event (0.15.8: "Run
        failed: …"), which says more, so only its end (or that event) completes it."""
        return self._workflow_run is not None and self._workflow_run.get("status") == "failed"

    @property
    def workflow_run_id(self) -> str | None:
        """The run's id once an event named it (workflow and chatflow): from then on the run can be followed."""
        return self._ids.get("workflow_run_id")

    @property
    def paused(self) -> Mapping[str, Any] | None:
        """`workflow_paused.data` when the run paused (its forms are in `forms`)."""
        return self._paused

    @property
    def forms(self) -> list[Mapping[str, Any]]:
        """The `human_input_required.data` of each form the run waits on."""
        return list(self._forms)

    def add(self, payload: Mapping[str, Any]) -> None:
        """Take one decoded `data:` object of the stream."""
        self.events_seen += 1
        self._remember_ids(payload)
        match payload.get("event"):
            case "message" | "agent_message":
                self._append(payload.get("answer"))
            case "text_chunk":
                self._append(_mapping(payload.get("data")).get("text"))
            case "message_replace":
                self._replace(payload.get("answer"))
            case "text_replace":
                self._replace(_mapping(payload.get("data")).get("text"))
            case "message_end":
                self._message_ended = True
                usage = _mapping(_mapping(payload.get("metadata")).get("usage"))
                if usage:
                    self._llm_usage = Usage.from_llm_usage(usage)
            case "node_finished":
                self._spend.add_node(_mapping(payload.get("data")))
            case "workflow_finished":
                self._workflow_run = _mapping(payload.get("data"))
                self._paused = None
            case "human_input_required":
                self._forms.append(_mapping(payload.get("data")))
            case "workflow_paused":
                self._paused = _mapping(payload.get("data"))
            case "workflow_started":
                self._paused = None
                self._forms.clear()
            case "error":
                status = payload.get("status")
                raise DifyError(
                    str(payload.get("code") or "unknown"),
                    str(payload.get("message") or ""),
                    status if isinstance(status, int) else None,
                )

    def add_blocking(self, body: Mapping[str, Any]) -> None:
        """Take a whole blocking response: a chat/completion message, or a workflow run."""
        if body.get("event") == "message":
            self.add(body)
            self.add({**body, "event": "message_end"})
        elif "event" not in body and isinstance(body.get("data"), Mapping):
            self.add({**body, "event": "workflow_finished"})
        else:
            raise DifyError("invalid_response", "a 200 JSON body that is neither a message nor a workflow run")

    def add_run_detail(self, detail: Mapping[str, Any]) -> None:
        """Take the run's record (`GET /workflows/run/{id}`) as its end: its outputs (a JSON string in 0.15.8)
        replace what the stream said."""
        run = dict(detail)
        if isinstance(run.get("outputs"), str):
            try:
                run["outputs"] = loads(run["outputs"])
            except ValueError:
                run["outputs"] = None
        self._workflow_run = run

    @property
    def time_to_first_token_s(self) -> float | None:
        """Seconds from the call's start to its first token; None before one came."""
        return None if self._first_token_at is None else self._first_token_at - self._started

    def result(self) -> DifyResult:
        run = self._workflow_run or {}
        if run.get("status") == "failed":
            raise DifyError("workflow_failed", str(run.get("error") or "the workflow run failed"))
        outputs = run.get("outputs")
        if self.followed:
            # The text streamed while nobody listened is lost: the outputs are the whole answer.
            answer_output = _mapping(outputs).get("answer")
            self._answer = [answer_output] if self._mode != "workflow" and isinstance(answer_output, str) else None
        if self._answer is not None:
            answer: str | None = "".join(self._answer)
        else:
            answer = None if self._mode == "workflow" else ""
        return DifyResult(
            answer=answer,
            outputs=dict(outputs) if isinstance(outputs, Mapping) else None,
            conversation_id=self._ids.get("conversation_id"),
            message_id=self._ids.get("message_id"),
            workflow_run_id=self._ids.get("workflow_run_id"),
            task_id=self._ids.get("task_id"),
            usage=self._llm_usage or (Usage.from_workflow_run(run, self._spend) if self._workflow_run is not None
                                      else None),
            time_to_first_token_s=self.time_to_first_token_s,
            duration_s=time.monotonic() - self._started,
            stopped=run.get("status") == "stopped",
            paused=self._paused_run(),
        )

    def _paused_run(self) -> PausedRun | None:
        if self._paused is None:
            return None
        run_id = self.workflow_run_id or str(self._paused.get("workflow_run_id") or "")
        forms = [dict(form) for form in self._forms] or [
            dict(reason) for reason in self._paused.get("reasons") or []
            if isinstance(reason, Mapping) and reason.get("form_token")]
        return PausedRun(run_id, forms, self._spend.total_price(), self._spend.currency, self._ids.get("task_id"))

    def _remember_ids(self, payload: Mapping[str, Any]) -> None:
        for key in _IDS:
            value = payload.get(key)
            if key in self._ids or not isinstance(value, str) or not value:
                continue
            self._ids[key] = value
            if key == "task_id" and self._on_task_id is not None:
                self._on_task_id(value)
            elif key == "workflow_run_id" and self._on_run_id is not None:
                self._on_run_id(value)

    def _append(self, text: Any) -> None:
        if not isinstance(text, str):
            return
        if self._answer is None:
            self._answer = []
        if text and self._first_token_at is None:
            self._first_token_at = time.monotonic()
        self._answer.append(text)

    def _replace(self, text: Any) -> None:
        if isinstance(text, str):
            self._answer = [text]


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
