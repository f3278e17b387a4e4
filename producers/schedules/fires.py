"""What one cron fire hands to ``submit()``: its idempotency key and its mapping rendered for the fire time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from difyq.worker.config import ScheduleConfig
from difyq.worker.templating import compile_template


def fire_iso(fire_time: datetime) -> str:
    """A fire time as UTC ISO 8601 to the second (``2024-03-31T01:00:00Z``): one spelling for every zone."""
    return fire_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fire_idempotency_key(name: str, fire_time: datetime) -> str:
    """The job idempotency key of a fire (docs/guarantees.md): ``schedule:{name}:{fire time}``."""
    return f"schedule:{name}:{fire_iso(fire_time)}"


def render_fire(name: str, schedule: ScheduleConfig, fire_time: datetime) -> dict[str, Any]:
    """The schedule's mapping with every template rendered; templates see ``fire_time`` (aware, in the schedule's
    zone) and ``schedule`` (the name). Raises what Jinja raises for a template that cannot render."""
    context = {"fire_time": fire_time, "schedule": name}

    def render(value: Any) -> Any:
        return compile_template(value).render(context) if isinstance(value, str) else value

    return {
        "app": schedule.app,
        "query": render(schedule.query),
        "inputs": {key: render(value) for key, value in schedule.inputs.items()},
        "user": render(schedule.user),
        "conversation_id": render(schedule.conversation_id),
        "thread": render(schedule.thread) or None,
        "files": [{key: render(value) for key, value in file.items()} for file in schedule.files]
        if schedule.files is not None else None,
        "callback_url": render(schedule.callback_url),
        "metadata": {key: render(value) for key, value in schedule.metadata.items()},
        "schedule": name,
        "idempotency_key": fire_idempotency_key(name, fire_time),
        "priority": schedule.priority,
        "tenant": render(schedule.tenant) or None,
    }
