"""The emulator's ASGI app: the Dify Service API routes under /v1 and the control routes under /_emulator/."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Route

from difyq.worker.dify.emulator.apps import EmulatedApp, default_apps
from difyq.worker.dify.emulator.control import ControlApi
from difyq.worker.dify.emulator.routes import ServiceApi
from difyq.worker.dify.emulator.state import EmulatorState


def create_app(apps: list[EmulatedApp] | None = None) -> Starlette:
    """An ASGI app emulating Dify for `apps` (the demo apps when None). Its `EmulatorState` is
    `app.state.emulator`."""
    state = EmulatorState(default_apps() if apps is None else apps)
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
        Route("/v1/info", api.recorded(api.info), methods=["GET"]),
        Route("/_emulator/calls", control.calls, methods=["GET", "DELETE"]),
        Route("/_emulator/stats", control.stats, methods=["GET"]),
        Route("/_emulator/apps", control.apps, methods=["GET"]),
        Route("/_emulator/apps/{name}", control.app, methods=["GET", "PUT"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: api.routing_error, 405: api.routing_error})
    app.router.redirect_slashes = False  # Flask answers 404 for a trailing slash; it does not redirect
    app.state.emulator = state
    return app
