"""Files a job names by URL reach Dify as uploads: the worker fetches each through the SSRF guard (redirects
checked, size and type checked), uploads it with ``POST /files/upload`` as the job's user and runs the workflow
with ``local_file`` references, which the emulator checks; a retry reuses the upload; a file that cannot be had
fails the job with its code and Dify runs nothing. Real Redis, the emulator and a file server on loopback, the API
over HTTP and an in-process worker."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY

import difyq.worker.runtime as worker_runtime
from difyq.producers.cli import main as difyq
from difyq.worker.dify.emulator import EmulatedApp, RunningEmulator, start_emulator
from difyq.worker.dify.emulator.sample_document import sample_pdf
from difyq.worker.runtime import Runtime
from tests.support.stack import auth, make_runtime, running_worker, serving_api, wait_for_final

MAX_BYTES = 64 * 1024
APPS = [EmulatedApp(name="summarize-document", key="app-summarize", mode="workflow", required_inputs=["document"],
                    file_inputs=["document"]),
        EmulatedApp(name="support", key="app-support", mode="chat")]


class FileServer(ThreadingHTTPServer):
    """Serves the test's files on 127.0.0.1; ``/flaky.pdf`` answers 503 once, then the PDF."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FileHandler)
        self.flaky_left = 1
        self.requests: list[str] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FileHandler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        port = self.server.server_address[1]
        if self.path == "/contract.pdf" or (self.path == "/flaky.pdf" and self.server.flaky_left <= 0):
            self._send(200, sample_pdf(), "application/pdf")
        elif self.path == "/flaky.pdf":
            self.server.flaky_left -= 1
            self._send(503, b"busy", "text/plain")
        elif self.path == "/huge.pdf":
            self._send(200, b"%PDF-1.4\n" + b"0" * MAX_BYTES, "application/pdf")
        elif self.path == "/archive.zip":
            self._send(200, b"PK\x03\x04", "application/zip")
        elif self.path == "/inside.pdf":  # a redirect to another loopback address, which is not allowed
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{port}/contract.pdf")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"not here", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with start_emulator(APPS) as running:
        yield running


@pytest.fixture
def stack(redis_url: str, namespace: str, emulator: RunningEmulator) -> Iterator[tuple[Runtime, str]]:
    files = {"allow_hosts": ["127.0.0.1"], "max_bytes": MAX_BYTES}
    apps = {app.name: {"api_key": app.key, "mode": app.mode, "base_url": emulator.base_url, "files": files}
            for app in APPS}
    apps["offline"] = {"api_key": "app-offline", "mode": "chat", "base_url": "http://127.0.0.1:9/v1"}
    apps["by-url"] = {**apps["support"], "files": {**files, "transfer": "remote_url"}}
    runtime = make_runtime(redis_url, namespace, apps,
                           jobs={"retry_min_backoff": "0.05s", "retry_max_backoff": "0.1s", "max_attempts": 3})
    emulator.reset_calls()
    with running_worker(runtime, threads=4), serving_api(runtime) as base:
        yield runtime, base


def _submit(base: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{base}/v1/jobs", json=body, headers=auth(), timeout=10)


def _transferred(app: str, transfer: str, outcome: str = "ok") -> float:
    """``difyq_files_transferred_total`` of this process (the worker and the API run in it)."""
    return REGISTRY.get_sample_value("difyq_files_transferred_total",
                                     {"app": app, "transfer": transfer, "outcome": outcome}) or 0.0


def _bytes(app: str, transfer: str) -> float:
    return REGISTRY.get_sample_value("difyq_file_bytes_total", {"app": app, "transfer": transfer}) or 0.0


def _calls(emulator: RunningEmulator, path: str) -> list[dict[str, Any]]:
    return [call for call in emulator.calls() if call["path"] == f"/v1{path}"]


def test_a_pdf_is_fetched_uploaded_and_passed_to_the_workflow(stack, files: FileServer,
                                                              emulator: RunningEmulator) -> None:
    runtime, base = stack
    uploaded, sent = _transferred("summarize-document", "upload"), _bytes("summarize-document", "upload")
    answer = _submit(base, {"app": "summarize-document", "user": "alice",
                            "inputs": {"document": {"url": f"{files.base}/contract.pdf"}}})
    assert answer.status_code == 202, answer.text
    job = wait_for_final(runtime, answer.json()["id"])
    assert job["status"] == "succeeded", job
    assert _transferred("summarize-document", "upload") == uploaded + 1
    assert _bytes("summarize-document", "upload") == sent + len(sample_pdf())
    [upload] = _calls(emulator, "/files/upload")
    assert upload["status"] == 201 and upload["body"]["user"] == "alice"
    assert upload["body"]["files"] == [{"name": "contract.pdf", "content_type": "application/pdf",
                                        "size": len(sample_pdf())}]
    [entry] = job["files"]
    assert entry["source"] == "inputs.document" and entry["type"] == "document"
    assert (entry["name"], entry["size"], entry["mime_type"]) == ("contract.pdf", len(sample_pdf()),
                                                                  "application/pdf")
    [run] = _calls(emulator, "/workflows/run")
    assert run["body"]["inputs"]["document"] == {"type": "document", "transfer_method": "local_file",
                                                 "upload_file_id": entry["upload_file_id"]}
    assert job["result"]["outputs"]["document"] == {"transfer_method": "local_file", "name": "contract.pdf",
                                                    "size": len(sample_pdf()), "mime_type": "application/pdf"}
    assert "content" not in str(job["files"])


def test_a_fetch_that_fails_for_now_is_retried_and_a_retry_does_not_upload_again(
        stack, files: FileServer, emulator: RunningEmulator) -> None:
    runtime, base = stack
    files.flaky_left = 1
    flaky = _submit(base, {"app": "support", "query": "read it", "user": "bob",
                           "files": [{"url": f"{files.base}/flaky.pdf", "type": "document"}]})
    job = wait_for_final(runtime, flaky.json()["id"])
    assert job["status"] == "succeeded", job
    assert [error["code"] for error in job["attempt_errors"]] == ["file_fetch_failed"]
    emulator.reset_calls()
    failing = _submit(base, {"app": "summarize-document", "user": "bob",
                             "inputs": {"document": {"url": f"{files.base}/contract.pdf"}, "note": "FAIL500"}})
    job = wait_for_final(runtime, failing.json()["id"])
    assert job["status"] == "failed" and job["attempts"] == 3, job
    assert len(_calls(emulator, "/workflows/run")) == 3
    assert len(_calls(emulator, "/files/upload")) == 1


@pytest.mark.parametrize(("path", "code"), [("/missing.pdf", "file_fetch_failed"), ("/huge.pdf", "file_too_large"),
                                            ("/archive.zip", "file_type_unsupported"),
                                            ("/inside.pdf", "file_fetch_failed")])
def test_a_file_that_cannot_be_had_fails_the_job_and_dify_runs_nothing(
        stack, files: FileServer, emulator: RunningEmulator, path: str, code: str) -> None:
    runtime, base = stack
    failed = _transferred("summarize-document", "upload", code)
    answer = _submit(base, {"app": "summarize-document", "inputs": {"document": {"url": f"{files.base}{path}"}}})
    assert answer.status_code == 202, answer.text
    job = wait_for_final(runtime, answer.json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == code and job["attempts"] == 1, job
    assert _transferred("summarize-document", "upload", code) == failed + 1
    assert job["error"]["message"].startswith("inputs.document: ")
    assert emulator.calls() == [call for call in emulator.calls() if call["path"] == "/v1/parameters"]
    if path == "/inside.pdf":
        assert "'127.0.0.2' is a loopback address" in job["error"]["message"]
        assert "/contract.pdf" not in files.requests[-1]


def test_a_remote_url_app_hands_the_url_to_dify_and_counts_it(stack, files: FileServer,
                                                               emulator: RunningEmulator) -> None:
    runtime, base = stack
    handed = _transferred("by-url", "remote_url")
    url = f"{files.base}/contract.pdf"
    job = wait_for_final(runtime, _submit(base, {"app": "by-url", "query": "read it",
                                                 "files": [{"url": url, "type": "document"}]}).json()["id"])
    assert job["status"] == "succeeded", job
    assert _transferred("by-url", "remote_url") == handed + 1
    [call] = _calls(emulator, "/chat-messages")
    assert call["body"]["files"] == [{"type": "document", "transfer_method": "remote_url", "url": url}]
    assert _calls(emulator, "/files/upload") == []


def test_a_private_file_url_is_refused_at_submit(stack) -> None:
    _, base = stack
    for body, field in ((
            {"app": "support", "query": "q", "files": [{"url": "http://10.1.2.3/a.pdf", "type": "document"}]},
            "files[0].url"), ({"app": "summarize-document", "inputs": {"document": {"url": "http://127.0.0.2/a.pdf"}}},
                              "inputs.document.url")):
        answer = _submit(base, body)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "file_url_blocked"
        assert answer.json()["error"]["field"] == field
        assert "apps." in answer.json()["error"]["message"] and "files.allow_hosts" in answer.json()["error"]["message"]


def test_an_upload_of_another_user_is_refused_by_dify(stack, emulator: RunningEmulator) -> None:
    runtime, base = stack
    client_upload = requests.post(f"{emulator.base_url}/files/upload",
                                  headers={"Authorization": "Bearer app-summarize"},
                                  files={"file": ("a.pdf", sample_pdf(), "application/pdf")}, data={"user": "carol"},
                                  timeout=10)
    assert client_upload.status_code == 201, client_upload.text
    file = {"transfer_method": "local_file", "upload_file_id": client_upload.json()["id"], "type": "document"}
    mine = wait_for_final(runtime, _submit(base, {"app": "summarize-document", "user": "carol",
                                                  "inputs": {"document": file}}).json()["id"])
    theirs = wait_for_final(runtime, _submit(base, {"app": "summarize-document", "user": "dave",
                                                    "inputs": {"document": file}}).json()["id"])
    assert mine["status"] == "succeeded", mine
    assert theirs["status"] == "failed" and theirs["error"]["message"] == "Invalid upload file", theirs


def test_difyq_enqueue_uploads_a_local_file_before_the_job(stack, emulator: RunningEmulator, tmp_path: Path,
                                                           capsys, monkeypatch) -> None:
    runtime, _ = stack
    monkeypatch.setattr(worker_runtime, "_current", runtime)
    notes = tmp_path / "notes.txt"
    notes.write_text("call Acme back on Monday")
    assert difyq(["enqueue", "--app", "support", "--query", "read it", "--user", "frank", "--file", str(notes)]) == 0
    submitted = json.loads(capsys.readouterr().out)
    [upload] = _calls(emulator, "/files/upload")
    assert upload["body"]["user"] == "frank" and upload["body"]["files"][0]["name"] == "notes.txt"
    [file] = submitted["request"]["files"]
    assert file["transfer_method"] == "local_file" and file["type"] == "document"
    job = wait_for_final(runtime, submitted["id"])
    assert job["status"] == "succeeded", job
    assert difyq(["enqueue", "--app", "support", "--query", "q", "--file", str(tmp_path / "absent.pdf")]) == 2
    assert "neither an http(s) URL nor a file" in capsys.readouterr().err


def test_a_multipart_submit_uploads_its_files_at_submit(stack, emulator: RunningEmulator, redis_client) -> None:
    runtime, base = stack
    job = {"app": "summarize-document", "user": "gina"}
    at_submit = _transferred("summarize-document", "submit")
    answer = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10, data={"job": json.dumps(job)},
                           files={"inputs.document": ("contract.pdf", sample_pdf(), "application/pdf")})
    assert answer.status_code == 202, answer.text
    assert _transferred("summarize-document", "submit") == at_submit + 1
    [upload] = _calls(emulator, "/files/upload")
    assert upload["body"]["user"] == "gina" and upload["body"]["files"][0]["size"] == len(sample_pdf())
    document = answer.json()["request"]["inputs"]["document"]
    assert document["transfer_method"] == "local_file" and document["upload_file_id"]
    assert sample_pdf()[:200] not in b"".join(redis_client.hvals(runtime.store.job_key(answer.json()["id"])))
    finished = wait_for_final(runtime, answer.json()["id"])
    assert finished["status"] == "succeeded" and finished["result"]["outputs"]["document"]["name"] == "contract.pdf"
    offline = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=30, data={"job": json.dumps(
        {"app": "offline", "query": "q"})}, files={"files": ("a.pdf", sample_pdf(), "application/pdf")})
    assert offline.status_code == 503 and offline.headers["Retry-After"] == "5", offline.text
    assert offline.json()["error"]["code"] == "dify_unavailable" and offline.json()["error"]["field"] == "files"
    assert _transferred("offline", "submit", "connection_error") >= 1
    stray = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10, data={"job": json.dumps(job)},
                          files={"attachment": ("a.pdf", b"%PDF", "application/pdf")})
    assert stray.status_code == 422 and stray.json()["error"]["field"] == "attachment", stray.text


@pytest.mark.parametrize("body", [b"--b0undary\n", b"--b0undary\r\nContent-Disposition: form-data\r\n\r\n", b"junk"])
def test_a_malformed_multipart_body_is_a_422_naming_the_body(stack, body: bytes) -> None:
    runtime, base = stack
    before = runtime.raw_redis.zcard(runtime.store.index_key())
    response = requests.post(f"{base}/v1/jobs", data=body, timeout=10,
                             headers={**auth(), "Content-Type": "multipart/form-data; boundary=b0undary"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_multipart", response.text
    assert runtime.raw_redis.zcard(runtime.store.index_key()) == before
