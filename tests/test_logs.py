"""Log output: JSON lines on the current stderr, secrets redacted, and a line that cannot be written is dropped
instead of failing the job or request that logs it."""

from __future__ import annotations

import io
import json
import sys

import pytest
import structlog

from difyq.worker.logs import configure_logging


def test_lines_go_to_the_current_stderr_redacted_and_a_closed_stream_raises_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("test")
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    structlog.get_logger("difyq.test").info("job_finished", job_id="j1", api_key="app-abcdefghijkl",
                                            note="Bearer sk-123456")
    line = json.loads(first.getvalue())
    assert line["event"] == "job_finished" and line["job_id"] == "j1" and line["process"] == "test"
    assert line["api_key"] == "[redacted]" and "sk-123456" not in first.getvalue()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    structlog.get_logger("difyq.test").info("next")
    assert json.loads(second.getvalue())["event"] == "next", "a replaced stderr gets the following lines"
    second.close()
    structlog.get_logger("difyq.test").info("dropped")


def test_an_exception_line_carries_its_traceback_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("test")
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        raise RuntimeError("could not use app-abcdefghijkl")
    except RuntimeError:
        structlog.get_logger("difyq.test").exception("request_failed", path="/v1/jobs")
    line = json.loads(stream.getvalue())
    assert line["level"] == "error" and "exc_info" not in line
    assert "Traceback" in line["exception"] and "RuntimeError: could not use [redacted]" in line["exception"]
