"""The Dify Service API routes under /v1, checked in the order Dify 0.15.8 checks them.

Order of checks for a generation call, as the real server runs them: the API key (401/403), the JSON body and its
`user` (415/400), the app mode for the route (`not_chat_app`, `app_unavailable`, `not_workflow_app`), the
request fields (`inputs`, then `query`, `response_mode`, `conversation_id`), agent + blocking, empty query, the
conversation (404), the required inputs. Then an http* fault answers in place of Dify (taking no concurrency
slot, like a proxy or Dify's own limiter would), then the concurrency cap, then the answer: hung, streamed or
blocking.
Every call is recorded (see `state.CallRecord`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from difyq.worker.dify.emulator import wire
from difyq.worker.dify.emulator.apps import CHAT_MODES, WORKFLOW_MODES, EmulatedApp
from difyq.worker.dify.emulator.blocking import blocking_answer
from difyq.worker.dify.emulator.faults import FAULT_HEADER, Plan, plan_for
from difyq.worker.dify.emulator.files import SIZE_LIMITS_MB, check_local_files, described_file, upload
from difyq.worker.dify.emulator.responses import CutResponse, EventStreamResponse, HangResponse, SilentStreamResponse
from difyq.worker.dify.emulator.runs import RunLogs
from difyq.worker.dify.emulator.state import CallRecord, Conversation, ConversationMessage, EmulatorState, RunControl
from difyq.worker.dify.emulator.streams import HUMAN_INPUT_ACTIONS, Run, events

Handler = Callable[[Request, CallRecord], Awaitable[Response | ASGIApp]]

_MODE_ERRORS = {
    "chat": ("not_chat_app", wire.MODE_MISMATCH),
    "completion": ("app_unavailable", wire.APP_UNAVAILABLE),
    "workflow": ("not_workflow_app", wire.MODE_MISMATCH),
}


def _route_accepts(route: str, mode: str) -> bool:
    return mode in CHAT_MODES if route == "chat" else mode == route


def _too_many_requests(app: EmulatedApp, status: int) -> wire.ApiError:
    message = (
        "Too many requests. Please try again later. The current maximum concurrent requests allowed for "
        f"{app.app_id} is {app.max_concurrency or 1}."
    )
    code = {429: "too_many_requests", 400: "invalid_param"}.get(status, "internal_server_error")
    return wire.error(status, code, message)


def _fault_error(app: EmulatedApp, fault: str | None) -> wire.ApiError | None:
    if fault == "http429":
        return _too_many_requests(app, 429)
    if fault == "http400-too-many":
        return _too_many_requests(app, 400)
    if fault == "http500":
        return wire.error(500, "internal_server_error", wire.INTERNAL_SERVER_ERROR)
    if fault == "http500-too-many":
        return _too_many_requests(app, 500)
    if fault == "http429-quota":
        return wire.error(429, "rate_limit_error", wire.QUOTA_EXCEEDED)
    if fault == "http403-version":
        return wire.error(403, "workflow_version_execution_not_allowed", wire.VERSION_NOT_ALLOWED)
    if fault == "http429-text":
        return wire.ApiError(Response("error code: 1015", 429, media_type="text/plain"), None)
    return None


@dataclass(frozen=True)
class _GenerationCall:
    """A generation request that passed every check."""

    app: EmulatedApp
    user: str
    query: str
    inputs: dict[str, Any]
    streaming: bool
    conversation_id: str
    plan: Plan
    silent: bool = False  # Dify 1.x fails this streaming call silently (see `_generation_call`)


class _Admission:
    """An admitted generation call: its concurrency slot, its stoppable run and its record, ended once."""

    def __init__(
        self, state: EmulatorState, app: EmulatedApp, record: CallRecord, control: RunControl, task_id: str
    ) -> None:
        self._state = state
        self._app = app
        self._record = record
        self._task_id = task_id
        self._ended = False
        state.register_run(task_id, control)

    def end(self, status: int | None, outcome: str, code: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._state.unregister_run(self._task_id)
        self._state.end_call(self._record, status, outcome, code)
        self._state.release(self._app.name)  # last: an app seen idle has all its records closed


class ServiceApi:
    """Handlers for the /v1 routes, over one `EmulatorState`."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self.run_logs = RunLogs()
        self.forms: dict[str, Run] = {}  # human-input form token → its run

    def recorded(self, handler: Handler) -> Callable[[Request], Awaitable[Response | ASGIApp]]:
        """Record the call; an `ApiError` becomes its response. Streams end their record themselves."""

        async def endpoint(request: Request) -> Response | ASGIApp:
            record = self.state.begin_call(request.method, request.url.path)
            record.traceparent = request.headers.get("traceparent")
            record.trace_id = request.headers.get("x-trace-id")
            try:
                response = await handler(request, record)
            except wire.ApiError as error:
                self.state.end_call(record, error.response.status_code, "error", error.code)
                return error.response
            if isinstance(response, Response) and record.outcome is None:
                self.state.end_call(record, response.status_code, "ok")
            return response

        return endpoint

    # checks shared by the routes

    def _authenticate(self, request: Request, record: CallRecord) -> EmulatedApp:
        header = request.headers.get("authorization")
        if header is None or " " not in header:
            raise wire.error(401, "unauthorized", wire.AUTH_MISSING)
        parts = header.split(None, 1)
        if len(parts) < 2:  # "Bearer " with no token: Dify's unpacking ValueError
            raise wire.error(400, "invalid_param", "not enough values to unpack (expected 2, got 1)")
        scheme, record.key = parts
        if scheme.lower() != "bearer":
            raise wire.error(401, "unauthorized", wire.AUTH_SCHEME)
        app = self.state.app_for_key(record.key)
        if app is None:
            raise wire.error(401, "unauthorized", wire.AUTH_INVALID)
        self.state.attach_app(record, app)
        if not app.api_enabled:
            raise wire.error(403, "forbidden", wire.API_DISABLED)
        return app

    @staticmethod
    async def _json_body(request: Request, record: CallRecord) -> dict[str, Any]:
        raw = await request.body()
        try:
            record.body = json.loads(raw)
        except ValueError:
            record.body = raw.decode("utf-8", "replace")
        mimetype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))):
            raise wire.error(415, "unsupported_media_type", wire.UNSUPPORTED_MEDIA_TYPE)
        if not isinstance(record.body, dict):
            raise wire.error(400, "bad_request", wire.BAD_REQUEST)
        return record.body

    @staticmethod
    def _user(body: dict[str, Any]) -> str:
        if not body.get("user"):
            raise wire.error(400, "invalid_param", wire.USER_REQUIRED)
        return str(body["user"])

    @staticmethod
    def _check_mode(app: EmulatedApp, route: str) -> None:
        if not _route_accepts(route, app.mode):
            code, message = _MODE_ERRORS[route]
            raise wire.error(400, code, message)

    # generation

    async def chat_messages(self, request: Request, record: CallRecord) -> Response | ASGIApp:
        return await self._generate(request, record, "chat")

    async def completion_messages(self, request: Request, record: CallRecord) -> Response | ASGIApp:
        return await self._generate(request, record, "completion")

    async def workflows_run(self, request: Request, record: CallRecord) -> Response | ASGIApp:
        """`POST /workflows/run`, and (1.x) `POST /workflows/{workflow_id}/run` for a published version."""
        return await self._generate(request, record, "workflow")

    async def _generate(self, request: Request, record: CallRecord, route: str) -> Response | ASGIApp:
        call = await self._generation_call(request, record, route)
        app = call.app
        record.concurrency_at_start = self.state.open_count(app.name)
        fault_error = _fault_error(app, call.plan.fault)
        if fault_error is not None:
            raise fault_error
        if not self.state.admit(app):
            raise _too_many_requests(app, int(app.concurrency_error))
        record.concurrency_at_start = self.state.open_count(app.name)
        run = self._start_run(call, route)
        record.task_id = run.task_id
        admission = _Admission(self.state, app, record, run.control, run.task_id)
        if call.silent:
            return SilentStreamResponse(
                run.control.stopped, app.silent_close_s,
                lambda disconnected: admission.end(200, "disconnected" if disconnected else "silent"),
            )
        if call.plan.fault == "hang":
            return HangResponse(
                run.control.stopped,
                lambda disconnected: admission.end(
                    None, "hung" if disconnected else "shutdown" if run.shutting_down else "stopped"
                ),
            )
        if call.streaming and app.mode in WORKFLOW_MODES:
            return self._detached_stream(run, call.plan, admission)
        if call.streaming:
            return EventStreamResponse(
                events(run),
                app.ping_interval_s,
                lambda disconnected: admission.end(
                    200, "disconnected" if disconnected else run.outcome, run.error_code
                ),
                ping_first=self.state.version == "1.x",
            )
        try:
            response = await blocking_answer(run)
        except wire.ApiError as error:
            admission.end(error.response.status_code, "error", error.code)
            return error.response
        except BaseException:
            admission.end(500, "error", "unknown")
            raise
        if response is None:
            return CutResponse(wire.dumps({"task_id": run.task_id}).encode(), lambda _: admission.end(200, run.outcome))
        admission.end(response.status_code, run.outcome)
        return response

    def _detached_stream(self, run: Run, plan: Plan, admission: _Admission) -> EventStreamResponse:
        """A workflow run goes on whether its client listens or not, as in Dify: the stream follows the run's
        log, the run holds its concurrency slot and call record until it ends, and its record reads
        `disconnected` when the client left first."""
        client_left = False

        def run_ended() -> None:
            admission.end(200, "disconnected" if client_left else run.outcome, run.error_code)

        def stream_closed(disconnected: bool) -> None:
            nonlocal client_left
            client_left = disconnected and not log.ended

        log = self.run_logs.start(run, run_ended)
        if run.app.human_input:
            self.forms[run.form_token] = run
        return EventStreamResponse(
            log.follow(stop_after_first=plan.fault == "cut-after-start", stop_at_pause=True),
            run.app.ping_interval_s,
            stream_closed,
            ping_first=self.state.version == "1.x",
        )

    async def _generation_call(self, request: Request, record: CallRecord, route: str) -> _GenerationCall:
        """Every check before the answer, in Dify's order (see the module docstring)."""
        app = self._authenticate(request, record)
        body = await self._json_body(request, record)
        user = self._user(body)
        self._check_mode(app, route)
        inputs = body.get("inputs")
        if inputs is None:
            raise wire.param_error(wire.MISSING_PARAMETER, "inputs")
        if not isinstance(inputs, dict):
            raise wire.param_error(f"{wire.dumps(inputs)} is not a valid dict", "inputs")
        if route == "chat" and body.get("query") is None:
            raise wire.param_error(wire.MISSING_PARAMETER, "query")
        query = "" if route == "workflow" or body.get("query") is None else str(body["query"])
        response_mode = body.get("response_mode")
        if response_mode not in (None, "blocking", "streaming"):
            raise wire.param_error(f"{response_mode} is not a valid choice", "response_mode")
        conversation_id = str(body.get("conversation_id") or "") if route == "chat" else ""
        if conversation_id:
            try:
                uuid.UUID(conversation_id)
            except ValueError:
                raise wire.param_error(f"{conversation_id} is not a valid uuid.", "conversation_id") from None
        streaming = response_mode == "streaming"
        if app.mode == "agent" and not streaming:
            raise wire.error(400, "invalid_param", "Agent Chat App does not support blocking mode")
        if route == "chat" and not query:
            raise wire.error(400, "invalid_param", "query is required")
        # Dify 1.x checks these two in its worker: a streaming call then gets one ping and nothing else.
        silent = streaming and self.state.version == "1.x"
        check_local_files(self.state, body, inputs, user)
        if conversation_id and self.state.conversation(app.name, conversation_id, user) is None:
            if not silent:
                raise wire.error(404, "not_found", wire.CONVERSATION_NOT_EXISTS)
        elif any(not inputs.get(variable) for variable in app.required_inputs):
            if not silent:
                missing = next(variable for variable in app.required_inputs if not inputs.get(variable))
                raise wire.error(400, "invalid_param", f"{missing} is required in input form")
        else:
            silent = False
        header_fault, app_fault = request.headers.get(FAULT_HEADER), app.active_fault()
        record.fault = header_fault or app_fault
        text = " ".join([query, *(value for value in inputs.values() if isinstance(value, str))])
        try:
            plan = plan_for(text, header_fault, app_fault)
        except ValueError as error:
            raise wire.error(400, "invalid_param", str(error)) from None
        if "workflow_id" in request.path_params:  # POST /workflows/{workflow_id}/run
            self._check_workflow_version(app, request.path_params["workflow_id"])
        elif route == "chat" and body.get("workflow_id") is not None and self.state.version == "1.x":
            self._check_workflow_version(app, str(body["workflow_id"]))
        return _GenerationCall(app, user, query, inputs, streaming, conversation_id, plan, silent)

    @staticmethod
    def _check_workflow_version(app: EmulatedApp, workflow_id: str) -> None:
        """Dify 1.x runs a published version by id; a draft, an unknown id or one that is no UUID is refused."""
        try:
            uuid.UUID(workflow_id)
        except ValueError:
            raise wire.error(400, "bad_request", f"Invalid workflow_id format: '{workflow_id}'. ") from None
        if workflow_id == app.draft_workflow_id:
            raise wire.error(400, "bad_request", f"Cannot use draft workflow version. Workflow ID: {workflow_id}. "
                             "Please use a published workflow version or leave workflow_id empty.")
        if workflow_id != app.workflow_id:
            raise wire.error(404, "not_found", f"Workflow not found with id: {workflow_id}")

    def _start_run(self, call: _GenerationCall, route: str) -> Run:
        """The run of an admitted call; a chat call without a conversation starts one."""
        conversation_id: str | None = None
        conversation: Conversation | None = None
        dialogue_count = 0
        if route == "chat":
            conversation_id = call.conversation_id or self.state.start_conversation(call.app.name, call.user)
            conversation = self.state.conversation(call.app.name, conversation_id, call.user)
            if conversation is not None:
                dialogue_count = conversation.dialogue_count
                conversation.dialogue_count += 1
        run = Run(
            app=call.app,
            user=call.user,
            query=call.query,
            inputs=call.inputs,
            plan=call.plan,
            streaming=call.streaming,
            control=RunControl(call.app.name, call.user),
            conversation_id=conversation_id,
            dialogue_count=dialogue_count,
            sequence_number=self.state.next_workflow_run_number(call.app.name),
            dify_version=self.state.version,
            previous_query=conversation.previous_query if conversation is not None else None,
        )
        if conversation is not None:
            conversation.remember(ConversationMessage(run.message_id, call.query, run.answer_text(), call.inputs,
                                                      run.created_at))
        if route != "workflow":
            self.state.remember_message(run.message_id, call.app.name, call.user)
        run.files = {name: described_file(self.state, call.inputs[name], call.user) for name in call.app.file_inputs
                     if isinstance(call.inputs.get(name), dict)}
        return run

    # workflow runs: their record, and (1.x) following their events again

    async def run_detail(self, request: Request, record: CallRecord) -> Response:
        """`GET /workflows/run/{id}`: 0.15.8 answers an unknown id with 200 and null fields, 1.x with 404."""
        app = self._authenticate(request, record)
        log = self.run_logs.get(request.path_params["run_id"], app.name)
        if log is not None:
            return wire.json_response(log.record(version=self.state.version))
        if self.state.version == "1.x":
            raise wire.error(404, "not_found", "Workflow run not found.")
        return wire.json_response(dict.fromkeys(("id", "workflow_id", "status", "inputs", "outputs", "error",
                                                 "total_steps", "total_tokens", "created_at", "finished_at",
                                                 "elapsed_time")))

    async def workflow_events(self, request: Request, record: CallRecord) -> Response | ASGIApp:
        """`GET /workflow/{id}/events?user=…` (1.14+): an ended run sends its `workflow_finished` alone; a running
        one its future events (`include_state_snapshot=true`: every event so far first). Another user's run, or
        an unknown one, is 404."""
        app = self._authenticate(request, record)
        user = request.query_params.get("user")
        if not user:
            raise wire.error(400, "invalid_param", wire.USER_REQUIRED)
        log = self.run_logs.get(request.path_params["run_id"], app.name)
        if log is None or log.run.user != user:
            raise wire.error(404, "not_found", "Workflow run not found")
        record.task_id = log.run.task_id
        if log.ended:
            finished = log.finished_event()

            async def alone() -> AsyncGenerator[dict[str, Any], None]:
                yield finished

            events_to_send = alone()
        else:
            snapshot = request.query_params.get("include_state_snapshot") == "true"
            until_pause = snapshot and request.query_params.get("continue_on_pause") != "true"
            events_to_send = log.follow(0 if snapshot else len(log.events), stop_at_pause=until_pause)
        return EventStreamResponse(
            events_to_send, app.ping_interval_s,
            lambda disconnected: self.state.end_call(record, 200, "disconnected" if disconnected else "ok"),
            ping_first=not log.ended,
        )

    # human input (1.x): a paused run's form

    def _form_run(self, app: EmulatedApp, token: str) -> Run:
        run = self.forms.get(token)
        if run is None or run.app.name != app.name:
            raise wire.error(404, "not_found", "Form not found")
        if run.form_answered:
            raise wire.error(412, "human_input_form_submitted",
                             f"This form has already been submitted by another user, form_id={run.form_id}")
        if time.time() >= run.form_expires_at:
            raise wire.error(412, "human_input_form_expired", f"This form has expired, form_id={run.form_id}")
        return run

    async def form_get(self, request: Request, record: CallRecord) -> Response:
        app = self._authenticate(request, record)
        form = self._form_run(app, request.path_params["token"]).form()
        return wire.json_response({"form_content": form["form_content"], "inputs": form["inputs"],
                                   "resolved_default_values": {}, "user_actions": form["actions"],
                                   "expiration_time": form["expiration_time"]})

    async def form_submit(self, request: Request, record: CallRecord) -> Response:
        """Accepted once, by the run's own user: the run resumes."""
        app = self._authenticate(request, record)
        body = await self._json_body(request, record)
        self._user(body)
        run = self._form_run(app, request.path_params["token"])
        inputs, action = body.get("inputs") or {}, str(body.get("action") or "")
        if action not in HUMAN_INPUT_ACTIONS:
            raise wire.error(400, "invalid_form_data", f"Invalid action: {action}")
        if not isinstance(inputs, dict) or "comment" not in inputs:
            raise wire.error(400, "invalid_form_data", "Missing required inputs: comment")
        run.submit_form(inputs, action)
        return wire.json_response({})

    # stop, parameters, info

    async def chat_stop(self, request: Request, record: CallRecord) -> Response:
        return await self._stop(request, record, "chat")

    async def completion_stop(self, request: Request, record: CallRecord) -> Response:
        return await self._stop(request, record, "completion")

    async def workflow_stop(self, request: Request, record: CallRecord) -> Response:
        return await self._stop(request, record, "workflow")

    async def _stop(self, request: Request, record: CallRecord, route: str) -> Response:
        """Always `{"result": "success"}`; the run stops only if it belongs to this app and user, as in Dify. A
        running run ends `stopped`, and so does a paused one (its form is no longer answerable). An app's
        `http500` fault fails the stop too (Dify down for a while)."""
        app = self._authenticate(request, record)
        user = self._user(await self._json_body(request, record))
        self._check_mode(app, route)
        if app.active_fault() == "http500":
            raise wire.error(500, "internal_server_error", wire.INTERNAL_SERVER_ERROR)
        self.state.stop_run(request.path_params["task_id"], app.name, user)
        return wire.json_response({"result": "success"})

    # files and feedback

    async def files_upload(self, request: Request, record: CallRecord) -> Response:
        """`POST /files/upload`: 201 with the file's id, name, size, extension and mime type."""
        app = self._authenticate(request, record)
        return wire.json_response(await upload(request, record, app, self.state), 201)

    async def message_feedback(self, request: Request, record: CallRecord) -> Response:
        """`POST /messages/{id}/feedbacks`: rate a message the user was answered (`like`, `dislike`, null)."""
        app = self._authenticate(request, record)
        body = await self._json_body(request, record)
        user = self._user(body)
        rating = body.get("rating")
        if rating not in (None, "like", "dislike"):
            raise wire.param_error(f"{rating} is not a valid choice", "rating")
        message = self.state.message(request.path_params["message_id"], app.name, user)
        if message is None:
            raise wire.error(404, "not_found", "Message Not Exists.")
        message.feedback = None if rating is None else {"rating": rating, "content": body.get("content")}
        return wire.json_response({"result": "success"})

    # conversations

    async def messages(self, request: Request, record: CallRecord) -> Response:
        """`GET /messages?conversation_id=&user=&first_id=&limit=`: a page of the user's conversation, the newest
        `limit` (1..100, 20) messages older than `first_id`, oldest first; 404 for a conversation (or a first
        message) the user does not have."""
        app = self._authenticate(request, record)
        self._check_mode(app, "chat")
        params = request.query_params
        user = params.get("user") or ""
        if not user:
            raise wire.error(400, "invalid_param", wire.USER_REQUIRED)
        try:
            limit = int(params.get("limit") or 20)
        except ValueError:
            raise wire.param_error("invalid literal for int() with base 10", "limit") from None
        if not 1 <= limit <= 100:
            raise wire.param_error(f"Invalid limit: {limit}, must be between 1 and 100", "limit")
        conversation = self.state.conversation(app.name, params.get("conversation_id") or "", user)
        if conversation is None:
            raise wire.error(404, "not_found", wire.CONVERSATION_NOT_EXISTS)
        page = conversation.page(params.get("first_id") or None, limit)
        if page is None:
            raise wire.error(404, "not_found", "First Message Not Exists.")
        messages, has_more = page
        answer = wire.json_response({"limit": limit, "has_more": has_more,
                                     "data": [self._message_item(app, params["conversation_id"], message, user)
                                              for message in messages]})
        self.state.checked(app.name, params["conversation_id"])
        return answer

    def _message_item(self, app: EmulatedApp, conversation_id: str, message: ConversationMessage, user: str,
                      ) -> dict[str, Any]:
        rated = self.state.message(message.id, app.name, user)
        feedback = rated.feedback if rated is not None else None
        item: dict[str, Any] = {
            "id": message.id, "conversation_id": conversation_id,
            "parent_message_id": "00000000-0000-0000-0000-000000000000", "inputs": message.inputs,
            "query": message.query, "answer": message.answer, "message_files": [],
            "feedback": {"rating": feedback["rating"]} if feedback else None, "retriever_resources": [],
            "created_at": message.created_at, "agent_thoughts": [], "status": "normal", "error": None}
        if self.state.version == "1.x":
            item["extra_contents"] = []
        return item

    async def delete_conversation(self, request: Request, record: CallRecord) -> Response:
        """`DELETE /conversations/{id}` with `{"user"}`: 0.15 answers 200 `{"result": "success"}`, 1.x 204; 404
        for a conversation the user does not have."""
        app = self._authenticate(request, record)
        self._check_mode(app, "chat")
        user = self._user(await self._json_body(request, record))
        if not self.state.delete_conversation(app.name, request.path_params["conversation_id"], user):
            raise wire.error(404, "not_found", wire.CONVERSATION_NOT_EXISTS)
        if self.state.version == "1.x":
            return Response(status_code=204)
        return wire.json_response({"result": "success"})

    async def parameters(self, request: Request, record: CallRecord) -> Response:
        app = self._authenticate(request, record)
        return wire.json_response(_parameters(app))

    async def info(self, request: Request, record: CallRecord) -> Response:
        app = self._authenticate(request, record)
        info: dict[str, Any] = {"name": app.name, "description": f"emulated {app.mode} app", "tags": []}
        if self.state.version == "1.x":  # 1.x names the mode
            info.update(mode=app.mode, author_name="emulator")
        return wire.json_response(info)

    # routing errors: werkzeug's HTML pages, as Flask answers a URL or method no route knows

    async def routing_error(self, request: Request, exc: Exception) -> Response:
        record = self.state.begin_call(request.method, request.url.path)
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            response = wire.html_error(
                405, "Method Not Allowed", "The method is not allowed for the requested URL.", headers=exc.headers
            )
        else:
            response = wire.html_error(
                404,
                "Not Found",
                "The requested URL was not found on the server. If you entered the URL manually "
                "please check your spelling and try again.",
            )
        self.state.end_call(
            record, response.status_code, "error", "not_found" if response.status_code == 404 else "method_not_allowed"
        )
        return response


def _parameters(app: EmulatedApp) -> dict[str, Any]:
    """`GET /parameters` as 0.15.8 answers it: model-config apps (chat, agent, completion) and workflow apps
    (workflow, chatflow) differ in a few fields."""
    workflow_based = app.mode in ("workflow", "advanced-chat")
    if workflow_based:
        form = [
            {
                "paragraph": {
                    "variable": name,
                    "label": name,
                    "type": "paragraph",
                    "required": True,
                    "max_length": 4000,
                    "options": [],
                }
            } if name not in app.file_inputs else {
                "file": {
                    "variable": name,
                    "label": name,
                    "type": "file",
                    "required": True,
                    "allowed_file_types": ["document"],
                    "allowed_file_extensions": [],
                    "allowed_file_upload_methods": ["local_file", "remote_url"],
                }
            }
            for name in app.required_inputs
        ]
        moderation: dict[str, Any] = {"enabled": False}
        image: dict[str, Any] = {"enabled": False, "number_limits": 3, "transfer_methods": ["local_file", "remote_url"]}
    else:
        form = [
            {"paragraph": {"label": name, "variable": name, "required": True, "default": "", "max_length": 4000}}
            for name in app.required_inputs
        ]
        moderation = {"enabled": False, "type": "", "configs": []}
        image = {
            "enabled": False,
            "number_limits": 3,
            "detail": "high",
            "transfer_methods": ["remote_url", "local_file"],
        }
    return {
        "opening_statement": None if app.mode == "completion" else "",
        "suggested_questions": [],
        "suggested_questions_after_answer": {"enabled": False},
        "speech_to_text": {"enabled": False},
        "text_to_speech": {"enabled": False, "voice": "", "language": ""},
        "retriever_resource": {"enabled": app.mode == "completion"},
        "annotation_reply": {"enabled": False},
        "more_like_this": {"enabled": False},
        "user_input_form": form,
        "sensitive_word_avoidance": moderation,
        "file_upload": {"image": image},
        "system_parameters": {**SIZE_LIMITS_MB, "workflow_file_upload_limit": 10},
    }
