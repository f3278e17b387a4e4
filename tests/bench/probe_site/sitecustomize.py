"""Loaded by every difyq process ``tests.bench.hop_probe`` starts (this folder is their PYTHONPATH): notes the
moments a job passes on its way from its submission to its attempt's start, and from Dify's answer to its callback's
POST, one line per event, in ``$DIFYQ_HOP_PROBE_DIR/{pid}.log``. It wraps difyq's own functions as their modules
load, and nothing else.

Events: ``submitted`` (the API's submit returned), ``woken`` (a consumer took a wake token), ``fetched`` (Dramatiq's
fetch handed a ``run_job`` message to difyq's consumer), ``run`` (a worker thread entered the job's run),
``start_call`` and ``started`` (around the start script's round trip); ``answered`` (the Dify call returned to the
runner), ``finish_call`` and ``finished`` (around the outcome's round trip), ``post`` (the callback's POST begins)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

PROBE_DIR = os.environ.get("DIFYQ_HOP_PROBE_DIR")
_write_lock = threading.Lock()


def note(event: str, job_id: str = "") -> None:
    """Append one event at the wall clock's time now."""
    line = f"{event} {time.time():.6f} {job_id}\n"
    with _write_lock, open(os.path.join(str(PROBE_DIR), f"{os.getpid()}.log"), "a", encoding="utf-8") as log:
        log.write(line)


def _probe_submit(module: ModuleType) -> None:
    submit_async = module.submit_async

    async def noted(*args: Any, **kwargs: Any) -> Any:
        outcome = await submit_async(*args, **kwargs)
        note("submitted", str(outcome.job.get("id", "")))
        return outcome

    module.submit_async = noted


def _probe_wakeup(module: ModuleType) -> None:
    wait_for_token, fetch = module.wait_for_token, module.WakingConsumer.__next__

    def noted_wait(*args: Any, **kwargs: Any) -> bool:
        taken = wait_for_token(*args, **kwargs)
        if taken:
            note("woken")
        return taken

    def noted_fetch(self: Any) -> Any:
        message = fetch(self)
        if message is not None and message.actor_name == "run_job" and message.args:
            note("fetched", str(message.args[0]))
        return message

    module.wait_for_token, module.WakingConsumer.__next__ = noted_wait, noted_fetch


def _probe_runner(module: ModuleType) -> None:
    run, stream = module.JobRunner.run, module.JobRunner._stream

    def noted_run(self: Any, job_id: str, *args: Any, **kwargs: Any) -> Any:
        note("run", job_id)
        return run(self, job_id, *args, **kwargs)

    def noted_stream(self: Any, job_id: str, *args: Any, **kwargs: Any) -> Any:
        answer = stream(self, job_id, *args, **kwargs)
        note("answered", job_id)
        return answer

    module.JobRunner.run, module.JobRunner._stream = noted_run, noted_stream


def _around(method: Callable[..., Any], before: str, after: str) -> Callable[..., Any]:
    """``method`` (of the job store, job id first) with an event noted before it runs and one after it returned."""

    def noted(self: Any, job_id: str, *args: Any, **kwargs: Any) -> Any:
        note(before, job_id)
        returned = method(self, job_id, *args, **kwargs)
        note(after, job_id)
        return returned

    return noted


def _probe_store(module: ModuleType) -> None:
    store = module.JobStore
    store.start_attempt = _around(store.start_attempt, "start_call", "started")
    store.finish_keeping_callback = _around(store.finish_keeping_callback, "finish_call", "finished")


def _probe_delivery(module: ModuleType) -> None:
    post = module.post_to_destination

    def noted(transport: Any, destination: Any, body: bytes, headers: Any, timeout: float) -> Any:
        note("post", str(headers.get("webhook-id", "")))
        return post(transport, destination, body, headers, timeout)

    module.post_to_destination = noted


PROBES: dict[str, Callable[[ModuleType], None]] = {
    "difyq.producers.submit": _probe_submit, "difyq.worker.wakeup": _probe_wakeup,
    "difyq.worker.runner": _probe_runner, "difyq.worker.jobs.store": _probe_store,
    "difyq.worker.callbacks.delivery": _probe_delivery}


class ProbingFinder(importlib.abc.MetaPathFinder):
    """Finds the probed modules as the other finders do, and wraps their functions once they have run."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        probe = PROBES.get(name)
        if probe is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_then_probe(module: ModuleType) -> None:
            execute(module)
            probe(module)

        spec.loader.exec_module = exec_then_probe  # type: ignore[method-assign]
        return spec


if PROBE_DIR:
    sys.meta_path.insert(0, ProbingFinder())
