"""The events one generation call emits, per app mode, in Dify 0.15.8's order and field layout.

A fake LLM (`_tokens`) paces the answer (time to first token, tokens per second, WAIT<n>, SLOW), fails like a
provider (FAIL429/FAIL500) or stops early (MIDFAIL, the stop API). Each mode wraps it as the captures show:

* chat, completion: `message`* (the last with answer ""), `message_end`;
* agent: `agent_thought`, `agent_message`*, `agent_thought`, `message_end`;
* workflow: `workflow_started`, start node, LLM node with `text_chunk`*, end node, `workflow_finished`;
* chatflow: like workflow with `message` deltas, then `workflow_finished`, then `message_end`.

A blocking call runs the same events and `blocking_answer` folds them into one answer, as Dify's blocking
pipeline does. `Run.outcome` tells the call record how the run ended.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from decimal import Decimal
from typing import Any

from difyq.worker.dify.emulator import wire
from difyq.worker.dify.emulator.apps import EmulatedApp
from difyq.worker.dify.emulator.faults import MIDFAIL_TOKENS, SLOW_TOKEN_INTERVAL_S, Plan, provider_error_message
from difyq.worker.dify.emulator.state import RunControl

Event = dict[str, Any]
_STOPPED_BY_USER = "Stopped by user."
HUMAN_INPUT_TIMED_OUT = "Human input form timed out."  # not captured: what a real 1.x says is unverified
HUMAN_INPUT_ACTIONS = ("approve", "reject")
_MODEL = {"model_provider": "openai_api_compatible", "model_name": "fake-gpt"}


class _ProviderFailure(Exception):
    """The model provider answered with an error status."""


class _MidstreamFailure(Exception):
    """The `midstream-error` fault fired."""


class _StreamCut(Exception):
    """The `cut-stream` fault fired."""


def _uuid() -> str:
    return str(uuid.uuid4())


class Run:
    """One generation call: its ids, its app's knobs, its fault plan and its stop control."""

    def __init__(
        self,
        *,
        app: EmulatedApp,
        user: str,
        query: str,
        inputs: dict[str, Any],
        plan: Plan,
        streaming: bool,
        control: RunControl,
        conversation_id: str | None,
        dialogue_count: int,
        sequence_number: int,
        dify_version: str = "0.15",
        previous_query: str | None = None,
    ) -> None:
        self.app = app
        self.user = user
        self.query = query
        self.inputs = inputs
        self.plan = plan
        self.streaming = streaming
        self.control = control
        self.conversation_id = conversation_id
        self.dialogue_count = dialogue_count
        self.previous_query = previous_query
        self.sequence_number = sequence_number
        self.dify_version = dify_version
        self.task_id = _uuid()
        self.message_id = _uuid()
        self.workflow_run_id = _uuid()
        self.files: dict[str, dict[str, Any]] = {}  # each file input, as the workflow's output tells of it
        self.workflow_id = app.workflow_id
        self.created_at = int(time.time())
        self.started = time.monotonic()
        self.outcome = "cut"
        self.answer_complete = False
        self.error_code: str | None = None
        self.form_token = secrets.token_urlsafe(16)
        self.form_id = _uuid()
        self.form_expires_at = int(time.time() + app.form_timeout_s)
        self._form_answer: asyncio.Future[tuple[dict[str, Any], str]] | None = None

    def form(self) -> Event:
        """The `human_input_required` data of the run's form (also what `GET /form/human_input/{token}` shows)."""
        return {
            "form_id": self.form_id, "node_id": "human-input", "node_title": "Human Input",
            "form_content": f"Please review: {self.prompt}\n\n{{{{#$output.comment#}}}}",
            "inputs": [{"output_variable_name": "comment", "type": "paragraph",
                        "default": {"type": "constant", "selector": [], "value": ""}}],
            "actions": [{"id": action, "title": action.title(), "button_style": "primary" if index == 0
                         else "default"} for index, action in enumerate(HUMAN_INPUT_ACTIONS)],
            "display_in_ui": True, "form_token": self.form_token, "resolved_default_values": {},
            "expiration_time": self.form_expires_at,
        }

    @property
    def form_answered(self) -> bool:
        return self._form_answer is not None and self._form_answer.done()

    def submit_form(self, inputs: dict[str, Any], action: str) -> None:
        """The form's answer: the paused run resumes (accepted once; the route checks first)."""
        if self._form_answer is None:
            self._form_answer = asyncio.get_running_loop().create_future()
        if not self._form_answer.done():
            self._form_answer.set_result((inputs, action))

    async def await_form(self) -> tuple[dict[str, Any], str] | None:
        """The form's answer, or None when it expired first or the run was stopped."""
        if self._form_answer is None:
            self._form_answer = asyncio.get_running_loop().create_future()
        stopped = asyncio.ensure_future(self.control.stopped.wait())
        try:
            done, _ = await asyncio.wait({self._form_answer, stopped}, return_when=asyncio.FIRST_COMPLETED,
                                         timeout=max(self.form_expires_at - time.time(), 0.0))
        finally:
            stopped.cancel()
        return self._form_answer.result() if self._form_answer in done else None

    @property
    def prompt(self) -> str:
        """What the fake LLM echoes: the query, else the string inputs (completion and workflow apps)."""
        return self.query or " ".join(str(value) for value in self.inputs.values() if isinstance(value, str))

    @property
    def stopped(self) -> bool:
        return self.control.reason is not None

    @property
    def shutting_down(self) -> bool:
        return self.control.reason == "shutdown"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def usage(self, completion_tokens: int) -> dict[str, Any]:
        return wire.usage(len(self.prompt.split()) + 5, completion_tokens, self.elapsed())

    def answer_tokens(self) -> list[str]:
        words = [f" {word}" for word in self.prompt.split()]
        filler = (f" word{index}" for index in range(self.app.answer_tokens))
        recall = self._recall()
        return (["FAKE-LLM", " says:", *recall, *words, *filler])[: self.app.answer_tokens + len(recall)]

    def _recall(self) -> list[str]:
        """What a `recalls` app's answer in a continued conversation says of it first: one token."""
        if not self.app.recalls or self.previous_query is None:
            return []
        return [f" (turn {self.dialogue_count + 1}; you asked before: {self.previous_query!r})"]

    def answer_text(self) -> str:
        return "".join(self.answer_tokens())

    def message_envelope(self, event: str) -> Event:
        """The chat/completion chunk envelope: completion streams carry no conversation_id."""
        envelope: Event = {"event": event}
        if self.conversation_id is not None:
            envelope["conversation_id"] = self.conversation_id
        envelope.update(message_id=self.message_id, created_at=self.created_at)
        return envelope

    def message_chunk(self, event: str, **fields: Any) -> Event:
        return {**self.message_envelope(event), "task_id": self.task_id, **fields}

    def workflow_chunk(self, event: str, data: dict[str, Any]) -> Event:
        if self.app.mode == "workflow":
            return {"event": event, "workflow_run_id": self.workflow_run_id, "task_id": self.task_id, "data": data}
        return {**self.message_chunk(event), "workflow_run_id": self.workflow_run_id, "data": data}

    def error_event(self, code: str, status: int, message: str) -> Event:
        """Dify's stream error: the envelope without task_id, then code, status and message."""
        self.outcome = "error"
        self.error_code = code
        if self.app.mode == "workflow":
            envelope: Event = {"event": "error", "workflow_run_id": self.workflow_run_id}
        else:
            envelope = self.message_envelope("error")
        return {**envelope, "code": code, "status": status, "message": message}


async def _tokens(run: Run) -> AsyncIterator[str]:
    """The fake LLM. Ends early when the run is stopped; raises for provider failures and transport faults."""
    app, plan = run.app, run.plan
    if await run.control.pause(app.time_to_first_token_s + plan.wait_s):
        return
    if plan.provider_status is not None:
        raise _ProviderFailure(provider_error_message(plan.provider_status))
    tokens = run.answer_tokens()
    if plan.midfail and run.streaming:
        tokens = tokens[:MIDFAIL_TOKENS]
    interval = 1 / app.tokens_per_second if app.tokens_per_second else 0.0
    if plan.slow:
        interval = max(interval, SLOW_TOKEN_INTERVAL_S)
    halfway = len(tokens) // 2
    for index, token in enumerate(tokens):
        if index and await run.control.pause(interval):
            return
        if index == halfway and plan.fault == "midstream-error":
            raise _MidstreamFailure
        if index == halfway and plan.fault == "cut-stream":
            raise _StreamCut
        yield token


def events(run: Run) -> AsyncGenerator[Event, None]:
    """The run's events for its app's mode."""
    if run.app.mode == "workflow" and run.app.human_input:
        return _human_input_events(run)
    if run.app.mode == "workflow" or run.app.mode == "advanced-chat":
        return _workflow_events(run)
    if run.app.mode == "agent":
        return _agent_events(run)
    return _message_events(run)


def _message_end(run: Run, completion_tokens: int, files: list[Any] | None) -> Event:
    run.outcome = "stopped" if run.stopped else "ok"
    return run.message_chunk(
        "message_end", id=run.message_id, metadata={"usage": run.usage(completion_tokens)}, files=files
    )


async def _answer_deltas(run: Run, event: str, answer: list[str], **fields: Any) -> AsyncGenerator[Event, None]:
    """The answer's delta events (each token also appended to ``answer``); a provider failure or a mid-stream
    error ends them with Dify's ``error`` event. ``run.outcome`` is left unset only when the answer completed."""
    try:
        async for token in _tokens(run):
            answer.append(token)
            yield run.message_chunk(event, id=run.message_id, answer=token, **fields)
    except _ProviderFailure as failure:
        yield run.error_event("completion_request_error", 400, str(failure))
        return
    except _MidstreamFailure:
        yield run.error_event("internal_server_error", 500, wire.STREAM_INTERNAL_ERROR)
        return
    except _StreamCut:
        return
    if run.shutting_down:
        run.outcome = "shutdown"
        return
    run.answer_complete = True


async def _message_events(run: Run) -> AsyncGenerator[Event, None]:
    answer: list[str] = []
    async for event in _answer_deltas(run, "message", answer, from_variable_selector=None):
        yield event
    if not run.answer_complete:
        return
    if not run.stopped:
        yield run.message_chunk("message", id=run.message_id, answer="", from_variable_selector=None)
    yield _message_end(run, len(answer), None)


async def _agent_events(run: Run) -> AsyncGenerator[Event, None]:
    thought_id = _uuid()

    def thought(text: str) -> Event:
        return run.message_chunk(
            "agent_thought",
            id=thought_id,
            position=1,
            thought=text,
            observation="",
            tool="",
            tool_labels={},
            tool_input="",
            message_files=[],
        )

    yield thought("")
    answer: list[str] = []
    async for event in _answer_deltas(run, "agent_message", answer):
        yield event
    if not run.answer_complete:
        return
    yield thought("".join(answer))
    yield _message_end(run, len(answer), None)


class _Node:
    """One node execution of the emulated graph start → LLM → end (workflow) or answer (chatflow)."""

    _NULL_PARALLEL = {
        "parallel_id": None,
        "parallel_start_node_id": None,
        "parent_parallel_id": None,
        "parent_parallel_start_node_id": None,
        "iteration_id": None,
    }

    def __init__(self, run: Run, node_type: str, title: str, index: int, predecessor: str | None) -> None:
        self.run = run
        self.id = _uuid()
        self.node_type = node_type
        self.head = {
            "id": self.id,
            "node_id": node_type,
            "node_type": node_type,
            "title": title,
            "index": index,
            "predecessor_node_id": predecessor,
        }
        self.started = time.monotonic()
        self.created_at = int(time.time())

    def started_event(self) -> Event:
        if self.run.dify_version == "1.x":  # the 1.14.2 layout: truncation flags, loops, no parallel branches
            data = {**self.head, "inputs": None, "inputs_truncated": False, "created_at": self.created_at,
                    "extras": {}, "iteration_id": None, "loop_id": None, "agent_strategy": None}
        else:
            data = {**self.head, "inputs": None, "created_at": self.created_at, "extras": {}, **self._NULL_PARALLEL,
                    "parallel_run_id": None}
        return self.run.workflow_chunk("node_started", data)

    def finished_event(
        self,
        *,
        inputs: Any = None,
        process_data: Any = None,
        outputs: Any = None,
        error: str | None = None,
        execution_metadata: Any = None,
    ) -> Event:
        layout_1x = self.run.dify_version == "1.x"
        data = {
            **self.head,
            "inputs": inputs,
            **({"inputs_truncated": False} if layout_1x else {}),
            "process_data": process_data,
            **({"process_data_truncated": False} if layout_1x else {}),
            "outputs": outputs,
            **({"outputs_truncated": False} if layout_1x else {}),
            "status": "failed" if error else "succeeded",
            "error": error,
            "elapsed_time": round(time.monotonic() - self.started, 6),
            "execution_metadata": execution_metadata,
            "created_at": self.created_at,
            "finished_at": int(time.time()),
            "files": [],
            **({"iteration_id": None, "loop_id": None} if layout_1x else self._NULL_PARALLEL),
        }
        return self.run.workflow_chunk("node_finished", data)


def _system_inputs(run: Run) -> dict[str, Any]:
    chatflow = run.app.mode == "advanced-chat"
    system: dict[str, Any] = {"sys.query": run.query} if chatflow else {}
    system["sys.files"] = []
    if chatflow:
        system["sys.conversation_id"] = run.conversation_id
    system["sys.user_id"] = run.user
    if chatflow:
        system["sys.dialogue_count"] = run.dialogue_count
    system.update(
        {"sys.app_id": run.app.app_id, "sys.workflow_id": run.workflow_id, "sys.workflow_run_id": run.workflow_run_id}
    )
    return {**run.inputs, **system}


def _workflow_finished(run: Run, status: str, *, outputs: Any, error: str | None, tokens: int, steps: int) -> Event:
    run.outcome = {"succeeded": "ok", "stopped": "stopped"}.get(status, "failed")
    now = int(time.time())
    return run.workflow_chunk(
        "workflow_finished",
        {
            "id": run.workflow_run_id,
            "workflow_id": run.workflow_id,
            **({} if run.dify_version == "1.x" else {"sequence_number": run.sequence_number}),
            "status": status,
            "outputs": outputs,
            "error": error,
            "elapsed_time": run.elapsed(),
            "total_tokens": tokens,
            "total_steps": steps,
            "created_by": {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, run.user)), "user": run.user},
            "created_at": run.created_at,
            "finished_at": now,
            "exceptions_count": 0,
            "files": [],
        },
    )


def _workflow_started(run: Run, system_inputs: dict[str, Any], reason: str = "initial") -> Event:
    return run.workflow_chunk(
        "workflow_started",
        {
            "id": run.workflow_run_id,
            "workflow_id": run.workflow_id,
            **({} if run.dify_version == "1.x" else {"sequence_number": run.sequence_number}),
            "inputs": system_inputs,
            "created_at": run.created_at,
            **({"reason": reason} if run.dify_version == "1.x" else {}),
        },
    )


async def _human_input_events(run: Run) -> AsyncGenerator[Event, None]:
    """A workflow app with `human_input` (Dify 1.13+, as the H1 captures show it): start → Human Input (a
    `comment` field, actions approve and reject) → end. The run pauses at the form and resumes when it is
    submitted (`Run.submit_form`); a form not answered within the app's `form_timeout_s` ends the run failed."""
    system_inputs = _system_inputs(run)
    yield _workflow_started(run, system_inputs)
    start = _Node(run, "start", "Start", 1, None)
    yield start.started_event()
    yield start.finished_event(inputs=system_inputs, outputs=system_inputs)
    node = _Node(run, "human-input", "Human Input", 2, "start")
    yield node.started_event()
    form = run.form()
    yield run.workflow_chunk("human_input_required", form)
    reason = {"TYPE": "human_input_required", **{key: form[key] for key in (
        "form_id", "form_content", "inputs", "actions", "node_id", "node_title", "resolved_default_values",
        "form_token", "expiration_time")}}
    yield run.workflow_chunk("workflow_paused", {
        "workflow_run_id": run.workflow_run_id, "paused_nodes": [node.node_type], "outputs": {}, "reasons": [reason],
        "status": "paused", "created_at": run.created_at, "elapsed_time": run.elapsed(), "total_tokens": 0,
        "total_steps": 2})
    answer = await run.await_form()
    if answer is None:
        if run.shutting_down:
            run.outcome = "shutdown"
        elif run.stopped:
            yield _workflow_finished(run, "stopped", outputs=None, error=_STOPPED_BY_USER, tokens=0, steps=2)
        else:
            yield run.workflow_chunk("human_input_form_timeout", {
                "node_id": node.node_type, "node_title": "Human Input", "expiration_time": form["expiration_time"]})
            yield _workflow_finished(run, "failed", outputs=None, error=HUMAN_INPUT_TIMED_OUT, tokens=0, steps=2)
        return
    inputs, action = answer
    comment = str(inputs.get("comment", ""))
    yield _workflow_started(run, system_inputs, "resumption")
    yield node.started_event()
    yield run.workflow_chunk("human_input_form_filled", {
        "node_id": node.node_type, "node_title": "Human Input", "rendered_content": f"Please review\n\n{comment}",
        "action_id": action, "action_text": action.title()})
    yield run.workflow_chunk("text_chunk", {"text": comment, "from_variable_selector": ["human-input", "comment"]})
    yield node.finished_event(inputs={"comment": comment}, outputs={"comment": comment, "__action_id": action})
    end = _Node(run, "end", f"End {action}", 3, "human-input")
    outputs = {"comment": comment, "action": action}
    yield end.started_event()
    yield end.finished_event(inputs=outputs, outputs=outputs)
    yield _workflow_finished(run, "succeeded", outputs=outputs, error=None, tokens=0, steps=4)


async def _workflow_events(run: Run) -> AsyncGenerator[Event, None]:
    """Workflow and chatflow runs: the graph start → LLM → end/answer, as the 0.15.8 captures show it."""
    chatflow = run.app.mode == "advanced-chat"
    system_inputs = _system_inputs(run)
    yield _workflow_started(run, system_inputs)
    start = _Node(run, "start", "Start", 1, None)
    yield start.started_event()
    yield start.finished_event(inputs=system_inputs, outputs=system_inputs)
    llm = _Node(run, "llm", "LLM", 2, "start")
    yield llm.started_event()
    process_data = {
        "model_mode": "chat",
        "prompts": [
            {"role": "system", "text": f"You are a test {'chatflow' if chatflow else 'workflow'}.", "files": []},
            {"role": "user", "text": run.prompt, "files": []},
        ],
        **_MODEL,
    }

    def delta(text: str) -> Event:
        if chatflow:
            return run.message_chunk("message", id=run.message_id, answer=text, from_variable_selector=["llm", "text"])
        return run.workflow_chunk("text_chunk", {"text": text, "from_variable_selector": ["llm", "text"]})

    answer: list[str] = []
    try:
        async for token in _tokens(run):
            answer.append(token)
            yield delta(token)
    except _ProviderFailure as failure:
        yield llm.finished_event(process_data=process_data, error=str(failure))
        yield _workflow_finished(run, "failed", outputs=None, error=str(failure), tokens=0, steps=2)
        if chatflow:
            yield run.error_event("invalid_param", 400, f"Run failed: {failure}")
        return
    except _MidstreamFailure:
        yield run.error_event("internal_server_error", 500, wire.STREAM_INTERNAL_ERROR)
        return
    except _StreamCut:
        return
    if run.shutting_down:
        run.outcome = "shutdown"
        return
    usage = run.usage(len(answer))
    text = "".join(answer)
    if run.stopped:
        yield _workflow_finished(
            run, "stopped", outputs=None, error=_STOPPED_BY_USER, tokens=usage["total_tokens"], steps=2
        )
    else:
        yield delta("")
        yield llm.finished_event(
            process_data=process_data,
            outputs={"text": text, "usage": usage, "finish_reason": "stop"},
            execution_metadata={
                "total_tokens": usage["total_tokens"],
                "total_price": format(Decimal(usage["total_price"]), "f"),
                "currency": "USD",
            },
        )
        end = _Node(run, "answer" if chatflow else "end", "Answer" if chatflow else "End", 3, "llm")
        outputs = {"answer": text} if chatflow else {"result": text, **run.files}
        yield end.started_event()
        if chatflow:
            yield end.finished_event(outputs={"answer": text, "files": []})
        else:
            yield end.finished_event(inputs=outputs, outputs=outputs)
        if chatflow and run.dify_version == "1.x":  # 1.x: message_end, then workflow_finished
            yield _message_end(run, len(answer), [])
        yield _workflow_finished(run, "succeeded", outputs=outputs, error=None, tokens=usage["total_tokens"], steps=3)
        if chatflow and run.dify_version == "1.x":
            return
    if chatflow:
        yield _message_end(run, len(answer), [])
