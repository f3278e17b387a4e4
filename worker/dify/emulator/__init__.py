"""A Dify Service API emulator: per-app keys and modes, blocking and streaming answers byte-shaped like a real
Dify 0.15.8 server's, knobs for latency, answer length and concurrency, and faults on demand.

Faults come three ways: words in the request text as the captures' fake LLM knew them (FAIL429, FAIL500, MIDFAIL,
SLOW, WAIT<n>), the `X-Emulator-Fault` header on one call, or an app's `fault` setting, changeable at runtime
with `PUT /_emulator/apps/{name}`. `GET /_emulator/calls` and `GET /_emulator/stats` show what was served;
`DELETE /_emulator/calls` forgets the calls and answers them. For tests,
`POST /_emulator/apps/{name}/conversations/{id}/delete-once-checked` deletes a conversation right after its next
`GET /messages` answer (a conversation deleted between a client's check and its call).
"""

from difyq.worker.dify.emulator.app import create_app
from difyq.worker.dify.emulator.apps import FAULTS, EmulatedApp, default_apps, load_apps
from difyq.worker.dify.emulator.faults import FAULT_HEADER
from difyq.worker.dify.emulator.server import RunningEmulator, serve, start_emulator

__all__ = [
    "FAULTS",
    "FAULT_HEADER",
    "EmulatedApp",
    "RunningEmulator",
    "create_app",
    "default_apps",
    "load_apps",
    "serve",
    "start_emulator",
]
