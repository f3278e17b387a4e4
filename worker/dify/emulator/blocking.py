"""Blocking answers: run a call's events to the end and fold them into one JSON answer, as Dify's blocking
pipeline does.

An `error` event becomes the HTTP error it stands for (a provider failure is 400 `completion_request_error`, an
internal error is werkzeug's 500); a workflow answers its `workflow_finished` data with HTTP 200 whatever the
run's status; chat, chatflow and completion answer the whole text with `message_end`'s metadata. A run that
ended without a terminal event (cut-stream, shutdown) has no answer: the caller drops the connection.
"""

from __future__ import annotations

from starlette.responses import Response

from difyq.worker.dify.emulator import wire
from difyq.worker.dify.emulator.streams import Event, Run, events

_WORKFLOW_BLOCKING_FIELDS = (
    "id",
    "workflow_id",
    "status",
    "outputs",
    "error",
    "elapsed_time",
    "total_tokens",
    "total_steps",
    "created_at",
    "finished_at",
)


async def blocking_answer(run: Run) -> Response | None:
    """The blocking response for `run`, None when it ended without a terminal event. Raises `wire.ApiError`
    when the run failed with an error event."""
    collected: list[Event] = [event async for event in events(run)]
    by_name = {event["event"]: event for event in collected}
    if "error" in by_name:
        error = by_name["error"]
        internal = error["code"] == "internal_server_error"
        raise wire.error(error["status"], error["code"], wire.INTERNAL_SERVER_ERROR if internal else error["message"])
    if run.app.mode == "workflow" and "workflow_finished" in by_name:
        finished = by_name["workflow_finished"]["data"]
        data = {name: finished[name] for name in _WORKFLOW_BLOCKING_FIELDS}
        body = {"task_id": run.task_id, "workflow_run_id": run.workflow_run_id, "data": data}
        return wire.json_response(body, newline=False)
    if run.app.mode != "workflow" and "message_end" in by_name:
        answer = "".join(event["answer"] for event in collected if event["event"] == "message")
        body = {"event": "message", "task_id": run.task_id, "id": run.message_id, "message_id": run.message_id}
        if run.conversation_id is not None:
            body["conversation_id"] = run.conversation_id
        body.update(
            mode=run.app.mode, answer=answer, metadata=by_name["message_end"]["metadata"], created_at=run.created_at
        )
        return wire.json_response(body, newline=False)
    return None
