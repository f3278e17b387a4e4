"""`difyq check-config --remote`: the config checked against the real apps. Each app's `GET /info` and `GET
/parameters` tell whether its key works, whether its mode matches (Dify 1.x's `/info` names it), which inputs its
form requires (every hook and schedule that targets it must provide them: a job from the API is checked at
submit) and the instance's file limits."""

from __future__ import annotations

from typing import NamedTuple

from difyq.worker.config import Config
from difyq.worker.dify.app_form import file_limits, required_inputs
from difyq.worker.dify.client import DifyClient
from difyq.worker.dify.errors import DifyError

_TIMEOUT_S = 15.0


class RemoteReport(NamedTuple):
    """What each app said (`notes`, one line per app) and what is wrong (`problems`, each naming a config key)."""

    notes: list[str]
    problems: list[str]


def check_remote(config: Config) -> RemoteReport:
    notes: list[str] = []
    problems: list[str] = []
    for name, app in config.apps.items():
        client = DifyClient(config.app_base_url(name), app.api_key.get_secret_value(),
                            connect_timeout=min(config.dify.connect_timeout_s, _TIMEOUT_S), total_timeout=_TIMEOUT_S)
        try:
            info = client.get("/info")
            parameters = client.get("/parameters")
        except DifyError as exc:
            reason = "the API key is refused" if exc.code == "unauthorized" else "Dify answered"
            problems.append(f"apps.{name}: {reason}: {exc}")
            continue
        mode = info.get("mode")
        if isinstance(mode, str) and mode != app.mode:
            problems.append(f"apps.{name}.mode: {app.mode}, but Dify says the app is {mode}")
        required = required_inputs(parameters)
        for section, mappings in (("hooks", config.hooks), ("schedules", config.schedules)):
            for mapping_name, mapping in mappings.items():
                if mapping.app != name:
                    continue
                for variable in required:
                    if variable not in mapping.inputs:
                        problems.append(f"{section}.{mapping_name}.inputs.{variable}: app {name!r} requires this "
                                        "input (its Dify input form)")
        limits = ", ".join(f"{key} {value}" for key, value in file_limits(parameters).items()) or "not given"
        notes.append(f"apps.{name}: {info.get('name')!r}, mode {mode or 'not given (Dify before 1.x)'}, required "
                     f"inputs: {', '.join(required) or 'none'}; file limits (MB): {limits}")
    return RemoteReport(notes, problems)
