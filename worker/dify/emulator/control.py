"""Runtime control over HTTP under /_emulator/: read and clear the call records, read the per-app stats, and
change an app's knobs or fault while the emulator runs (e.g. `{"fault": "http500", "until": <unix time>}` to fail
for a while and then recover), and, for tests, have a conversation deleted right after its next check
(`GET /messages`). These calls are not recorded."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from difyq.worker.dify.emulator.state import EmulatorState


class ControlApi:
    """Handlers for /_emulator/, over the same `EmulatorState` as the Service API routes."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    async def calls(self, request: Request) -> Response:
        """GET: every call served, oldest first. DELETE: forget them and restart the stats' counts; answers the
        calls it forgot."""
        if request.method == "DELETE":
            return JSONResponse(self.state.reset_calls())
        return JSONResponse(self.state.calls())

    async def stats(self, request: Request) -> Response:
        """Per app: `calls`, `open` (generation calls in flight) and `max_concurrent` (the peak of `open`)."""
        return JSONResponse(self.state.stats())

    async def apps(self, request: Request) -> Response:
        return JSONResponse([app.to_dict() for app in self.state.apps()])

    async def app(self, request: Request) -> Response:
        """GET: one app's settings. PUT: change them with a JSON object of settings; answers the new settings."""
        name = request.path_params["name"]
        if request.method == "GET":
            app = self.state.app(name)
            return JSONResponse(app.to_dict()) if app else JSONResponse({"error": f"no app {name}"}, 404)
        try:
            changes = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "the body must be a JSON object of app settings"}, 400)
        if not isinstance(changes, dict):
            return JSONResponse({"error": "the body must be a JSON object of app settings"}, 400)
        try:
            updated = self.state.update_app(name, changes)
        except KeyError:
            return JSONResponse({"error": f"no app {name}"}, 404)
        except (TypeError, ValueError) as error:
            return JSONResponse({"error": str(error)}, 400)
        return JSONResponse(updated.to_dict())

    async def delete_once_checked(self, request: Request) -> Response:
        """POST: the conversation's next `GET /messages` succeeds, then the conversation is deleted (as if deleted
        between a client's check and its call); 204, or 404 for an unknown app or conversation."""
        name, conversation_id = request.path_params["name"], request.path_params["conversation_id"]
        if not self.state.delete_once_checked(name, conversation_id):
            return JSONResponse({"error": f"no conversation {conversation_id} of app {name}"}, 404)
        return Response(status_code=204)
