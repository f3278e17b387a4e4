"""What a Dify app's `GET /parameters` says a job must bring: the variables its input form requires, and the file
limits of the instance."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def required_inputs(parameters: Mapping[str, Any]) -> list[str]:
    """The variables of `user_input_form` marked `required`, in the form's order. Each entry is
    `{"<type>": {"variable": …, "required": …}}` (`text-input`, `paragraph`, `select`, `number`, `file`…)."""
    required = []
    for entry in parameters.get("user_input_form") or []:
        if not isinstance(entry, Mapping):
            continue
        for field in entry.values():
            if isinstance(field, Mapping) and field.get("required") and isinstance(field.get("variable"), str):
                required.append(field["variable"])
    return required


def missing_inputs(required: list[str], inputs: Mapping[str, Any]) -> list[str]:
    """The required variables `inputs` lacks or leaves empty (Dify refuses both)."""
    return [name for name in required if inputs.get(name) in (None, "", [])]


def file_limits(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """`system_parameters`: the instance's upload limits in MB (`file_size_limit`, `image_file_size_limit`…)."""
    limits = parameters.get("system_parameters")
    return dict(limits) if isinstance(limits, Mapping) else {}
