"""What a page may show of a job's request: secret-looking and configured sensitive input names redacted."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "[redacted]"
# Names that hold secrets whatever the config says: matched anywhere in an input or metadata key.
_SECRET_NAME = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|authorization|credential|private[_-]?key",
                          re.IGNORECASE)


class Redactor:
    """Replaces the values of sensitive keys (at any depth of inputs and metadata) with ``[redacted]``."""

    def __init__(self, sensitive_inputs: Iterable[str]):
        self.sensitive = {name.lower() for name in sensitive_inputs}

    def is_sensitive(self, name: str) -> bool:
        return name.lower() in self.sensitive or bool(_SECRET_NAME.search(name))

    def value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: REDACTED if self.is_sensitive(str(key)) else self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value

    def request(self, request: dict[str, Any] | None) -> dict[str, Any]:
        """A job's stored request with ``inputs``, ``metadata`` and ``files`` redacted; other fields as stored."""
        shown = dict(request or {})
        for section in ("inputs", "metadata", "files"):
            if shown.get(section) is not None:
                shown[section] = self.value(shown[section])
        return shown
