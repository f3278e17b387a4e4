"""/v1/threads: read a conversation thread (its Dify conversation, user and jobs), page through its conversation's
history at Dify, and forget it (optionally deleting the conversation at Dify).

A thread's name goes in the path percent-encoded (``github:acme/app#123`` → ``github%3Aacme%2Fapp%23123``): ``#``
and ``?`` must be, ``/`` may stay as it is. The name is read from the raw path, so an encoded ``/`` is part of it
and a thread whose name ends in ``/messages`` is still told from its history."""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import APIRouter, Query, Request

from difyq.producers.api.auth import authenticate
from difyq.producers.api.errors import ApiError, error_responses
from difyq.producers.api.jobs import short_call_client
from difyq.producers.submission import THREAD_NAME_PATTERN
from difyq.worker.dify.errors import DifyError
from difyq.worker.jobs.threads import MAX_THREAD_NAME
from difyq.worker.runtime import Runtime

PREFIX = "/v1/threads/"
MESSAGES = "/messages"
MESSAGE_ID_PATTERN = r"^[A-Za-z0-9-]{1,64}$"

AppQuery = Annotated[str, Query(min_length=1, max_length=200, description="the app the thread belongs to")]


def _raw_rest(request: Request) -> str:
    """The part of the request's raw (still percent-encoded) path after ``/v1/threads/``."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    return raw.decode("latin-1").split(PREFIX, 1)[1]


def _thread_name(encoded: str) -> str:
    try:
        name = unquote(encoded, errors="strict")
    except UnicodeDecodeError:
        name = ""
    if not 1 <= len(name) <= MAX_THREAD_NAME or not re.fullmatch(THREAD_NAME_PATTERN, name):
        raise ApiError(422, "invalid_thread", f"a thread name is percent-encoded UTF-8 of 1 to {MAX_THREAD_NAME} "
                       "characters, none a control character", "thread")
    return name


def build_threads_router(runtime: Runtime) -> APIRouter:
    router = APIRouter(prefix="/v1/threads", tags=["threads"], responses=error_responses(401, 503))
    config = runtime.config

    def usable(request: Request, app: str) -> None:
        _, client = authenticate(config, request)
        if not client.may_use(app) or app not in config.apps:
            if app not in config.apps:
                raise ApiError(404, "unknown_app", f"no app named {app!r} is configured", "app")
            raise ApiError(403, "forbidden", f"this client may not use app {app!r}", "app")

    def known(app: str, thread: str) -> dict[str, Any]:
        state = runtime.threads.get(app, thread)
        if state is None:
            raise ApiError(404, "thread_not_found", f"app {app!r} has no thread {thread!r} (never used, forgotten, "
                           "or idle past threads.ttl)")
        return state

    @router.get("/{thread:path}/messages", responses=error_responses(403, 404, 422, 502))
    def thread_messages(request: Request, thread: str, app: AppQuery,
                        limit: Annotated[int, Query(ge=1, le=100)] = 20,
                        cursor: Annotated[str | None, Query(pattern=MESSAGE_ID_PATTERN)] = None) -> dict[str, Any]:
        """A page of the thread's conversation history at Dify, newest page first (oldest message first within
        it); ``next_cursor`` asks for the page before."""
        usable(request, app)
        rest = _raw_rest(request)
        if not rest.endswith(MESSAGES):  # an encoded name ending in "/messages": the thread itself
            return known(app, _thread_name(rest))
        name = _thread_name(rest.removesuffix(MESSAGES))
        state = known(app, name)
        conversation_id = state["conversation_id"]
        page: dict[str, Any] = {"thread": name, "app": app, "conversation_id": conversation_id, "messages": [],
                                "has_more": False, "next_cursor": None}
        if not conversation_id:
            return page
        try:
            answer = short_call_client(runtime, app).messages(conversation_id, state["user"], first_id=cursor,
                                                              limit=limit)
        except DifyError as exc:
            if exc.status == 404:
                raise ApiError(404, "conversation_not_found", f"Dify no longer has the thread's conversation or "
                               f"the cursor's message: {exc.message}") from None
            raise ApiError(502, "dify_error", f"Dify failed the history call: {exc}") from None
        messages = list(answer.get("data") or [])
        has_more = bool(answer.get("has_more"))
        page.update(messages=messages, has_more=has_more,
                    next_cursor=messages[0].get("id") if has_more and messages else None)
        return page

    @router.get("/{thread:path}", responses=error_responses(403, 404, 422))
    def get_thread(request: Request, thread: str, app: AppQuery) -> dict[str, Any]:
        """The thread: its conversation, its user, its line of unfinished jobs and its jobs, newest first."""
        usable(request, app)
        return known(app, _thread_name(_raw_rest(request)))

    @router.delete("/{thread:path}", responses=error_responses(403, 404, 422, 502))
    def forget_thread(request: Request, thread: str, app: AppQuery,
                      delete_conversation: Annotated[bool, Query()] = False) -> dict[str, Any]:
        """Forget the thread; with ``delete_conversation=true`` its conversation is deleted at Dify first (a
        failure there forgets nothing)."""
        usable(request, app)
        name = _thread_name(_raw_rest(request))
        state = known(app, name)
        conversation_id = state["conversation_id"]
        deleted = None
        if delete_conversation and conversation_id:
            try:
                deleted = short_call_client(runtime, app).delete_conversation(conversation_id, state["user"])
            except DifyError as exc:
                raise ApiError(502, "dify_error", f"Dify failed to delete the conversation: {exc}") from None
        runtime.threads.forget(app, name)
        return {"thread": name, "app": app, "forgotten": True, "conversation_id": conversation_id,
                "conversation_deleted": deleted}

    return router
