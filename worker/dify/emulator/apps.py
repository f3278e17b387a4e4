"""Emulated Dify apps: each has an API key and a mode, and knobs and a fault that shape how it answers.

An app is plain data. The server keeps its own copies and swaps a whole new copy in when the app is changed at
runtime (`with_changes`), so a request always sees one consistent version of an app.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

MODES: frozenset[str] = frozenset({"chat", "agent", "advanced-chat", "completion", "workflow"})
CHAT_MODES: frozenset[str] = frozenset({"chat", "agent", "advanced-chat"})
WORKFLOW_MODES: frozenset[str] = frozenset({"workflow", "advanced-chat"})
VERSIONS: dict[str, str] = {"0.15": "0.15.8", "1.x": "1.14.2"}  # `--dify-version` → the X-Version it answers

FAULTS: frozenset[str] = frozenset(
    {
        "http429",  # JSON 429 too_many_requests, as Dify's own concurrency handler sends it
        "http429-text",  # a proxy's non-JSON 429 ("error code: 1015", Cloudflare)
        "http400-too-many",  # the concurrency cap as Dify 0.15 really sends it: 400 invalid_param
        "http500",  # JSON 500 internal_server_error
        "http500-too-many",  # the concurrency cap as some 1.x versions send it: 500 with the "Too many requests" text
        "http429-quota",  # JSON 429 rate_limit_error: Dify Cloud's plan quota (1.x)
        "http403-version",  # JSON 403 workflow_version_execution_not_allowed (Dify Cloud's free plan, 1.x)
        "provider429",  # the model provider answers 429 (what FAIL429 in the text does)
        "provider500",  # the model provider answers 500 (FAIL500)
        "midstream-error",  # an `error` event halfway through the answer, no terminal event
        "cut-stream",  # the stream closes halfway with no terminal event (a workflow run then failed at Dify)
        "cut-after-start",  # a workflow/chatflow stream closes after its first event; the run goes on at Dify
        "slow-stream",  # tokens come slowly (SLOW)
        "hang",  # the request is accepted and never answered
    }
)

_APP_ID_NAMESPACE = uuid.UUID("8a6c7f0e-1d2b-4c1e-9f57-2f0d3c7a9b10")
_WORKFLOW_ID_NAMESPACE = uuid.UUID("0b5d8e2a-6f43-4f0e-8d2c-5a1e7c9b3f21")


@dataclass
class EmulatedApp:
    """One Dify app as the emulator plays it.

    `fault` applies to every generation call (chat, completion, workflow) until `fault_until` (unix time) passes,
    or for good when `fault_until` is None. `api_enabled=False` answers 403 like an app whose "Backend service
    API" switch is off. `max_concurrency` None means no cap, as Dify's default.
    """

    name: str
    key: str
    mode: str
    required_inputs: list[str] = field(default_factory=list)
    file_inputs: list[str] = field(default_factory=list)  # required inputs that take a file (a workflow's)
    time_to_first_token_s: float = 0.0
    tokens_per_second: float = 0.0
    answer_tokens: int = 8
    max_concurrency: int | None = None
    concurrency_error: Literal["429", "400"] = "429"
    fault: str | None = None
    ping_interval_s: float = 10.0
    fault_until: float | None = None
    api_enabled: bool = True
    silent_close_s: float = 300.0
    human_input: bool = False  # a workflow app that pauses at a human-input form (Dify 1.13+; served as 1.x only)
    recalls: bool = False  # a chat app whose answer in a continued conversation tells its turn and the last query
    form_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        self.concurrency_error = str(self.concurrency_error)  # type: ignore[assignment]  # YAML gives 429
        if not self.name or not self.key:
            raise ValueError("an app needs a name and a key")
        if self.mode not in MODES:
            raise ValueError(f"app {self.name}: mode must be one of {sorted(MODES)}, not {self.mode!r}")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"app {self.name}: fault must be one of {sorted(FAULTS)}, not {self.fault!r}")
        if self.concurrency_error not in ("429", "400"):
            raise ValueError(f"app {self.name}: concurrency_error must be '429' or '400'")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"app {self.name}: max_concurrency must be at least 1 (or null for no cap)")
        if self.answer_tokens < 0 or self.time_to_first_token_s < 0 or self.tokens_per_second < 0:
            raise ValueError(f"app {self.name}: answer_tokens and the timings cannot be negative")
        if self.silent_close_s <= 0:
            raise ValueError(f"app {self.name}: silent_close_s must be positive")
        if self.ping_interval_s <= 0:
            raise ValueError(f"app {self.name}: ping_interval_s must be positive")
        if not isinstance(self.required_inputs, list) or not all(isinstance(v, str) for v in self.required_inputs):
            raise ValueError(f"app {self.name}: required_inputs must be a list of variable names")
        if not set(self.file_inputs) <= set(self.required_inputs):
            raise ValueError(f"app {self.name}: file_inputs must be among the required_inputs")

    @property
    def app_id(self) -> str:
        """A stable UUID for the app, as Dify shows in `sys.app_id` and the concurrency message."""
        return str(uuid.uuid5(_APP_ID_NAMESPACE, self.name))

    @property
    def workflow_id(self) -> str:
        """The id of the app's published workflow version (workflow and chatflow apps)."""
        return str(uuid.uuid5(_WORKFLOW_ID_NAMESPACE, self.name))

    @property
    def draft_workflow_id(self) -> str:
        """The id of the app's draft version, which Dify 1.x refuses to run by id."""
        return str(uuid.uuid5(_WORKFLOW_ID_NAMESPACE, f"{self.name}:draft"))

    def active_fault(self, now: float | None = None) -> str | None:
        """The configured fault if it has not expired."""
        if self.fault is None:
            return None
        if self.fault_until is not None and (time.time() if now is None else now) >= self.fault_until:
            return None
        return self.fault

    def with_changes(self, changes: Mapping[str, Any]) -> EmulatedApp:
        """A validated copy with `changes` applied. `until` is accepted for `fault_until`; setting `fault`
        without an `until` makes the fault permanent. The name cannot change."""
        updates = dict(changes)
        if "until" in updates:
            updates["fault_until"] = updates.pop("until")
        elif "fault" in updates:
            updates.setdefault("fault_until", None)
        known = {f.name for f in dataclasses.fields(self)} - {"name"}
        unknown = sorted(set(updates) - known)
        if unknown:
            raise ValueError(f"unknown app setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "app_id": self.app_id, "workflow_id": self.workflow_id,
                "draft_workflow_id": self.draft_workflow_id}


def default_apps() -> list[EmulatedApp]:
    """One demo app per mode. The chat app `demo` has key `app-demo` (what `difyq dev` uses); completion and
    workflow need an input `text`, like the apps the reference captures came from; the workflow
    `summarize-document` needs a file, its input `document`; the chat app `support` recalls the conversation so
    far in its answers."""
    return [
        EmulatedApp(name="demo", key="app-demo", mode="chat"),
        EmulatedApp(name="demo-agent", key="app-demo-agent", mode="agent"),
        EmulatedApp(name="demo-chatflow", key="app-demo-chatflow", mode="advanced-chat"),
        EmulatedApp(name="demo-completion", key="app-demo-completion", mode="completion", required_inputs=["text"]),
        EmulatedApp(name="demo-workflow", key="app-demo-workflow", mode="workflow", required_inputs=["text"]),
        EmulatedApp(name="summarize-document", key="app-summarize-document", mode="workflow",
                    required_inputs=["document"], file_inputs=["document"]),
        EmulatedApp(name="support", key="app-support", mode="chat", recalls=True),
    ]


def load_apps(path: str | Path) -> list[EmulatedApp]:
    """Apps from a YAML or JSON file: a list of app mappings, or `apps:` holding such a list or a mapping of
    name to settings.

    ```yaml
    apps:
      support: {key: app-support, mode: chat, tokens_per_second: 40, max_concurrency: 4}
      report: {key: app-report, mode: workflow, required_inputs: [text]}
    ```
    """
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    entries = document.get("apps") if isinstance(document, dict) else document
    if isinstance(entries, dict):
        entries = [{"name": name, **(settings or {})} for name, settings in entries.items()]
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{path}: expected a list of apps, or `apps:` with a list or a mapping of apps")
    apps = []
    for index, entry in enumerate(entries):
        try:
            apps.append(EmulatedApp(**entry))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: app #{index + 1}: {error}") from error
    names = [app.name for app in apps]
    keys = [app.key for app in apps]
    if len(set(names)) != len(names) or len(set(keys)) != len(keys):
        raise ValueError(f"{path}: app names and keys must be unique")
    return apps
