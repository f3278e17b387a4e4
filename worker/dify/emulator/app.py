"""The emulator's ASGI app: the Dify Service API routes under /v1 and the control routes under /_emulator/."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from difyq.worker.dify.emulator.apps import VERSIONS, EmulatedApp, default_apps
from difyq.worker.dify.emulator.control import ControlApi
from difyq.worker.dify.emulator.routes import ServiceApi
from difyq.worker.dify.emulator.sample_document import sample_file
from difyq.worker.dify.emulator.state import EmulatorState


class _VersionHeader:
    """Answers with the emulated Dify's `X-Version` wherever a response carries one."""

    def __init__(self, app: ASGIApp, version: str) -> None:
        self._app = app
        self._version = version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_versioned(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "x-version" in headers:
                    headers["X-Version"] = self._version
            await send(message)

        await self._app(scope, receive, send_versioned)


def create_app(apps: list[EmulatedApp] | None = None, dify_version: str = "0.15") -> Starlette:
    """An ASGI app emulating Dify `dify_version` ("0.15" or "1.x", see `apps.VERSIONS`) for `apps` (the demo
    apps when None). Its `EmulatorState` is `app.state.emulator`."""
    state = EmulatorState(default_apps() if apps is None else apps, dify_version)
    api = ServiceApi(state)
    control = ControlApi(state)
    routes = [
        Route("/v1/chat-messages", api.recorded(api.chat_messages), methods=["POST"]),
        Route("/v1/completion-messages", api.recorded(api.completion_messages), methods=["POST"]),
        Route("/v1/workflows/run", api.recorded(api.workflows_run), methods=["POST"]),
        Route("/v1/chat-messages/{task_id}/stop", api.recorded(api.chat_stop), methods=["POST"]),
        Route("/v1/completion-messages/{task_id}/stop", api.recorded(api.completion_stop), methods=["POST"]),
        Route("/v1/workflows/tasks/{task_id}/stop", api.recorded(api.workflow_stop), methods=["POST"]),
        Route("/v1/parameters", api.recorded(api.parameters), methods=["GET"]),
        Route("/v1/files/upload", api.recorded(api.files_upload), methods=["POST"]),
        Route("/v1/messages/{message_id}/feedbacks", api.recorded(api.message_feedback), methods=["POST"]),
        Route("/v1/info", api.recorded(api.info), methods=["GET"]),
        Route("/v1/messages", api.recorded(api.messages), methods=["GET"]),
        Route("/v1/conversations/{conversation_id}", api.recorded(api.delete_conversation), methods=["DELETE"]),
        Route("/v1/workflows/run/{run_id}", api.recorded(api.run_detail), methods=["GET"]),
        Route("/_emulator/calls", control.calls, methods=["GET", "DELETE"]),
        Route("/_emulator/stats", control.stats, methods=["GET"]),
        Route("/_emulator/apps", control.apps, methods=["GET"]),
        Route("/_emulator/apps/{name}", control.app, methods=["GET", "PUT"]),
        Route("/_emulator/files/{name}", sample_file, methods=["GET"]),
        Route("/_emulator/apps/{name}/conversations/{conversation_id}/delete-once-checked",
              control.delete_once_checked, methods=["POST"]),
    ]
    if dify_version == "1.x":
        routes += [
            Route("/v1/workflows/{workflow_id}/run", api.recorded(api.workflows_run), methods=["POST"]),
            Route("/v1/workflow/{run_id}/events", api.recorded(api.workflow_events), methods=["GET"]),
            Route("/v1/form/human_input/{token}", api.recorded(api.form_get), methods=["GET"]),
            Route("/v1/form/human_input/{token}", api.recorded(api.form_submit), methods=["POST"]),
        ]
    middleware = [] if dify_version == "0.15" else [Middleware(_VersionHeader, version=VERSIONS[dify_version])]
    app = Starlette(routes=routes, exception_handlers={404: api.routing_error, 405: api.routing_error},
                    middleware=middleware)
    app.router.redirect_slashes = False  # Flask answers 404 for a trailing slash; it does not redirect
    app.state.emulator = state
    return app
