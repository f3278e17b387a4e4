"""What one generation call should suffer: the fake LLM's text triggers, the `X-Emulator-Fault` header and the
app's configured fault, folded into one `Plan`.

The text triggers are those of the fake LLM behind the reference captures: FAIL429 / FAIL500 (the provider answers
with that status), MIDFAIL (the provider's stream stops early, Dify ends the answer normally), SLOW (slow tokens)
and WAIT<n> (n seconds of silence before the first token). The header, when present, takes the place of the app's
configured fault for that call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from difyq.worker.dify.emulator.apps import FAULTS

FAULT_HEADER = "X-Emulator-Fault"
SLOW_TOKEN_INTERVAL_S = 0.25
MIDFAIL_TOKENS = 2
TRANSPORT_FAULTS = frozenset(
    {"http429", "http429-text", "http400-too-many", "http500", "http500-too-many", "http429-quota",
     "http403-version", "hang", "midstream-error", "cut-stream", "cut-after-start"}
)

_WAIT = re.compile(r"WAIT(\d+(?:\.\d+)?)")
_PROVIDER_ERRORS = {
    429: (
        '{"error": {"message": "Rate limit reached for fake-gpt (FAIL429 trigger)", "type": "requests", '
        '"param": null, "code": "rate_limit_exceeded"}}'
    ),
    500: (
        '{"error": {"message": "The server had an error while processing your request (FAIL500 trigger)", '
        '"type": "server_error", "param": null, "code": null}}'
    ),
}


@dataclass(frozen=True)
class Plan:
    """`fault` keeps the faults the transport layer acts on (http*, hang, midstream-error, cut-stream); the
    provider and pacing faults become the other fields."""

    fault: str | None = None
    provider_status: int | None = None
    midfail: bool = False
    slow: bool = False
    wait_s: float = 0.0


def plan_for(text: str, header_fault: str | None, app_fault: str | None) -> Plan:
    """Fold the triggers in `text` (the query and the string inputs) and the fault in force into a Plan.
    Raises ValueError for a header naming no known fault."""
    if header_fault is not None and header_fault not in FAULTS:
        raise ValueError(f"{FAULT_HEADER} must be one of {', '.join(sorted(FAULTS))}")
    fault = header_fault or app_fault
    provider_status = {"provider429": 429, "provider500": 500}.get(fault or "")
    if provider_status is None:
        provider_status = 429 if "FAIL429" in text else 500 if "FAIL500" in text else None
    wait = _WAIT.search(text)
    return Plan(
        fault=fault if fault in TRANSPORT_FAULTS else None,
        provider_status=provider_status,
        midfail="MIDFAIL" in text,
        slow=fault == "slow-stream" or "SLOW" in text,
        wait_s=float(wait.group(1)) if wait else 0.0,
    )


def provider_error_message(status: int) -> str:
    """The text Dify 0.15.8 reports for an OpenAI-compatible provider's failure, as captured."""
    return f"[openai_api_compatible] Error: API request failed with status code {status}: {_PROVIDER_ERRORS[status]}"
