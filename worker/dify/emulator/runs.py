"""Workflow runs that outlive their stream, as Dify's do: a run goes on when its client leaves, its events can be
followed again (`GET /workflow/{id}/events`, Dify 1.14+) and its record read (`GET /workflows/run/{id}`).

A `RunLog` keeps every event of one workflow or chatflow run, appended by the task that drives the run on the
server's event loop; any number of followers read it from any position and wait for what comes next.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from email.utils import formatdate
from typing import Any

from difyq.worker.dify.emulator import wire
from difyq.worker.dify.emulator.streams import Event, Run, events

MAX_RUN_LOGS = 10_000
_RECORD_FIELDS = ("id", "workflow_id", "status", "inputs", "outputs", "error", "total_steps", "total_tokens",
                  "created_at", "finished_at", "elapsed_time")


class RunLog:
    """The events of one run so far, and whether the run has ended."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.events: list[Event] = []
        self.ended = False
        self.task: asyncio.Future[None] | None = None  # the driving task, kept so it is not collected
        self._changed = asyncio.Event()

    def append(self, event: Event) -> None:
        self.events.append(event)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(self, start: int = 0, *, stop_after_first: bool = False,
                     stop_at_pause: bool = False) -> AsyncGenerator[Event, None]:
        """The events from index `start` on, waiting for new ones until the run ends (`stop_after_first`: only
        the first one, for a stream the network cuts right after `workflow_started`; `stop_at_pause`: up to a
        `workflow_paused`, where Dify closes the run's own stream and a snapshot reattach)."""
        index = start
        while True:
            while index < len(self.events):
                event = self.events[index]
                yield event
                index += 1
                if stop_after_first or (stop_at_pause and event["event"] == "workflow_paused"):
                    return
            if self.ended:
                return
            await self._changed.wait()

    def finished_event(self) -> Event:
        """The run's `workflow_finished` (what a reattach to an ended run sends alone); a run that ended without
        one (the emulator's cut-stream fault, a shutdown) failed."""
        for event in reversed(self.events):
            if event["event"] == "workflow_finished":
                return event
        record = self.record(version="1.x")
        return self.run.workflow_chunk("workflow_finished", {**record, "inputs": None, "outputs": None})

    def status(self) -> str:
        if not self.ended:
            phases = [e["event"] for e in self.events if e["event"] in ("workflow_started", "workflow_paused")]
            return "paused" if phases and phases[-1] == "workflow_paused" else "running"
        finished = next((e for e in reversed(self.events) if e["event"] == "workflow_finished"), None)
        return finished["data"]["status"] if finished else "failed"

    def record(self, *, version: str) -> dict[str, Any]:
        """`GET /workflows/run/{id}`: `inputs` a JSON string; 0.15.8 also encodes `outputs` and gives dates as
        HTTP dates, 1.x gives `outputs` as an object and unix seconds; 1.x shows a stopped run as `running` for
        good, as 1.14.2 did (`w1_stop_s20_run_detail_later`)."""
        run = self.run
        status = self.status()
        finished = next((e["data"] for e in reversed(self.events) if e["event"] == "workflow_finished"), None)
        if version == "1.x" and status == "stopped":  # 1.14.2 never finalises a stopped run's record
            status, finished = "running", None
        started = next((e["data"] for e in self.events if e["event"] == "workflow_started"), {})
        outputs = finished["outputs"] if finished and finished.get("outputs") is not None else {}
        error = finished["error"] if finished else (None if status == "running" else wire.STREAM_INTERNAL_ERROR)
        finished_at = finished["finished_at"] if finished else (None if status == "running" else int(time.time()))
        record = {
            "id": run.workflow_run_id,
            "workflow_id": run.workflow_id,
            "status": status,
            "inputs": json.dumps(started.get("inputs", run.inputs)),
            "outputs": outputs,
            "error": error,
            "total_steps": finished["total_steps"] if finished else 0,
            "total_tokens": finished["total_tokens"] if finished else 0,
            "created_at": run.created_at,
            "finished_at": finished_at,
            "elapsed_time": finished["elapsed_time"] if finished else (0.0 if status == "running" else run.elapsed()),
        }
        if version == "0.15":
            record["outputs"] = json.dumps(outputs)
            record["created_at"] = formatdate(run.created_at)
            record["finished_at"] = None if finished_at is None else formatdate(finished_at)
        return {name: record[name] for name in _RECORD_FIELDS}


class RunLogs:
    """The runs of every app by run id, the oldest forgotten beyond `MAX_RUN_LOGS`. Used on the loop only."""

    def __init__(self) -> None:
        self._logs: OrderedDict[str, RunLog] = OrderedDict()

    def start(self, run: Run, on_end: Callable[[], None]) -> RunLog:
        """Drive `run` in a task of its own, whoever listens; `on_end()` runs when it has ended."""
        log = RunLog(run)
        self._logs[run.workflow_run_id] = log
        while len(self._logs) > MAX_RUN_LOGS:
            self._logs.popitem(last=False)

        async def drive() -> None:
            try:
                async for event in events(run):
                    log.append(event)
            finally:
                log.end()
                on_end()

        log.task = asyncio.ensure_future(drive())
        return log

    def get(self, run_id: str, app_name: str) -> RunLog | None:
        log = self._logs.get(run_id)
        return log if log is not None and log.run.app.name == app_name else None
