"""A job submitted as ``multipart/form-data``: the submission as JSON in the part ``job``, and the files themselves
as parts: each ``files`` part joins the job's ``files``, an ``inputs.<name>`` part becomes the file-typed input
``<name>``. The API uploads every file part to the app's Dify at submit (``POST /files/upload`` as the job's
``user``) and the job keeps only their ``upload_file_id``s: nothing large is stored in Redis. Dify unreachable (or
failing) answers 503 with ``Retry-After``; a file Dify refuses answers 413 or 415 naming the part."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from python_multipart.exceptions import FormParserError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Message

from difyq.producers.api.body import parse_json_object
from difyq.producers.api.errors import WHOLE_BODY, ApiError
from difyq.producers.file_upload import upload_to_dify, uploader
from difyq.producers.submission import DifyFile, JobSubmission
from difyq.worker.dify.errors import DifyError
from difyq.worker.runtime import Runtime

MULTIPART = "multipart/form-data"
JOB_PART = "job"
FILES_PART = "files"
INPUT_PART_PREFIX = "inputs."
MAX_FILE_PARTS = 20
RETRY_AFTER_S = "5"
# Dify's refusals of an upload, as the submit's answer.
_REFUSALS = {"file_too_large": (413, "file_too_large"), "unsupported_file_type": (415, "file_type_unsupported")}


@dataclass(frozen=True)
class FilePart:
    """One file part: its part name (``files``, ``inputs.contract``), file name and content."""

    part: str
    name: str
    content: bytes

    @property
    def input_name(self) -> str | None:
        return self.part.removeprefix(INPUT_PART_PREFIX) if self.part.startswith(INPUT_PART_PREFIX) else None


def multipart_body_schema(job_schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI ``multipart/form-data`` request body of a job submit: the job (``job_schema``) as JSON in the part
    ``job``, file parts ``files`` and ``inputs.<name>``."""
    binary = {"type": "string", "format": "binary"}
    return {
        "schema": {"type": "object", "required": [JOB_PART],
                   "description": f"The job as JSON in '{JOB_PART}' and up to {MAX_FILE_PARTS} file parts, each with "
                                  "a file name; the API uploads them to the app's Dify at submit.",
                   "properties": {JOB_PART: job_schema,
                                  FILES_PART: {"type": "array", "items": binary, "maxItems": MAX_FILE_PARTS,
                                               "description": "each joins the job's files"}},
                   "patternProperties": {"^" + INPUT_PART_PREFIX.replace(".", "\\.") + ".+$": {
                       **binary, "description": "the file-typed input named after the dot"}},
                   "additionalProperties": False},
        "encoding": {JOB_PART: {"contentType": "application/json"}},
    }


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith(MULTIPART)


async def read_multipart(request: Request, raw: bytes) -> tuple[dict[str, Any], list[FilePart]]:
    """The ``job`` part as a JSON object and the file parts of a body already read (``raw``); 422 naming the part
    for anything else."""

    async def replay() -> Message:
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=MAX_FILE_PARTS, max_fields=MAX_FILE_PARTS + 1)
    except HTTPException as exc:
        raise ApiError(422, "invalid_multipart", f"the multipart body cannot be read: {exc.detail}",
                       WHOLE_BODY) from None
    except FormParserError as exc:  # raised through by Starlette releases before it wrapped the parser's errors
        raise ApiError(422, "invalid_multipart", f"the multipart body cannot be read: {exc}", WHOLE_BODY) from None
    job: dict[str, Any] | None = None
    parts: list[FilePart] = []
    try:
        for part, value in form.multi_items():
            if part == JOB_PART:
                text = await value.read() if isinstance(value, UploadFile) else value.encode()
                job = parse_json_object(text)
            elif isinstance(value, UploadFile) and (part == FILES_PART or part.startswith(INPUT_PART_PREFIX)):
                parts.append(FilePart(part, value.filename or "file", await value.read()))
            else:
                raise ApiError(422, "invalid_multipart", f"unexpected part {part!r}: send the job as JSON in "
                               f"{JOB_PART!r} and files as {FILES_PART!r} or 'inputs.<name>' file parts",
                               part or WHOLE_BODY)
    finally:
        await form.close()
    if job is None:
        raise ApiError(422, "invalid_multipart", f"the {JOB_PART!r} part (the job as JSON) is missing", JOB_PART)
    return job, parts


def with_uploads(runtime: Runtime, submission: JobSubmission, parts: list[FilePart]) -> JobSubmission:
    """``submission`` with each file part uploaded to the app's Dify and named by its ``upload_file_id``."""
    files = [file.model_dump(exclude_none=True) for file in submission.files or []]
    inputs = dict(submission.inputs)
    user = uploader(runtime, submission.app, submission.user, submission.thread)
    for part in parts:
        try:
            file = upload_to_dify(runtime, submission.app, user, part.name, part.content)
        except DifyError as exc:
            refusal = _REFUSALS.get(exc.code)
            if refusal is not None:
                raise ApiError(*refusal, f"Dify refused the file {part.name!r}: {exc.message}", part.part) from None
            if exc.retryable or exc.status is None:
                raise ApiError(503, "dify_unavailable", f"the file {part.name!r} could not be uploaded to Dify: "
                               f"{exc.code}", part.part, headers={"Retry-After": RETRY_AFTER_S}) from None
            raise ApiError(422, "file_rejected", f"Dify refused the file {part.name!r}: {exc}", part.part) from None
        if part.input_name is None:
            files.append(file)
        else:
            inputs[part.input_name] = file
    return submission.model_copy(update={"files": [DifyFile.model_validate(file) for file in files] or None,
                                         "inputs": inputs})
