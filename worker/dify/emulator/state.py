"""The emulator's memory: its apps, the conversations of each user, the runs that can be stopped, a record of
every call and per-app concurrency counts.

Requests run on the server's event loop; `RunningEmulator` reads records and changes apps from the test's thread.
A lock guards what both touch. Runs are stopped through `RunControl`, which only the loop uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from difyq.worker.dify.emulator.apps import VERSIONS, EmulatedApp

MAX_RECORDS = 100_000
MAX_CONVERSATIONS = 100_000
MAX_CONVERSATION_MESSAGES = 1000  # a conversation keeps its newest turns


@dataclass
class CallRecord:
    """One call served. `concurrency_at_start` counts the app's open generation calls when this one began,
    itself included when it was admitted. `outcome`: ok, stopped, failed (the run reported a failure), error
    (an error answer or error event), cut (ended with no terminal event), hung, disconnected (the client left
    first) or shutdown."""

    id: int
    started_at: float
    method: str
    path: str
    key: str | None = None
    app: str | None = None
    body: Any = None
    fault: str | None = None
    task_id: str | None = None
    concurrency_at_start: int | None = None
    ended_at: float | None = None
    status: int | None = None
    outcome: str | None = None
    code: str | None = None
    traceparent: str | None = None
    trace_id: str | None = None


@dataclass(frozen=True)
class UploadedFile:
    """A file uploaded with `POST /files/upload`; only requests of its `user` may reference it."""

    id: str
    app: str
    user: str
    name: str
    size: int
    extension: str
    mime_type: str
    created_at: int


@dataclass
class Message:
    """A chat message an app answered: feedback may rate it (only its user's)."""

    app: str
    user: str
    feedback: dict[str, Any] | None = None


@dataclass
class ConversationMessage:
    """One turn of a conversation, as `GET /messages` lists it."""

    id: str
    query: str
    answer: str
    inputs: dict[str, Any]
    created_at: int


@dataclass
class Conversation:
    user: str
    dialogue_count: int = 0
    messages: list[ConversationMessage] = field(default_factory=list)

    def remember(self, message: ConversationMessage) -> None:
        self.messages.append(message)
        del self.messages[:-MAX_CONVERSATION_MESSAGES]

    @property
    def previous_query(self) -> str | None:
        return self.messages[-1].query if self.messages else None

    def page(self, first_id: str | None, limit: int) -> tuple[list[ConversationMessage], bool] | None:
        """The newest `limit` messages older than `first_id` (all, without it), oldest first, and whether older
        ones remain; None when `first_id` is not a message of this conversation."""
        end = len(self.messages)
        if first_id is not None:
            end = next((index for index, message in enumerate(self.messages) if message.id == first_id), -1)
            if end < 0:
                return None
        start = max(end - limit, 0)
        return self.messages[start:end], start > 0


class RunControl:
    """Stops one run: by the stop API (only for the user and app that started it) or by server shutdown."""

    def __init__(self, app_name: str, user: str) -> None:
        self.app_name = app_name
        self.user = user
        self.stopped = asyncio.Event()
        self.reason: str | None = None

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.stopped.set()

    async def pause(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when the run was stopped meanwhile."""
        if seconds <= 0:
            await asyncio.sleep(0)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), seconds)
        return self.stopped.is_set()


@dataclass
class _AppCounters:
    calls: int = 0
    open: int = 0
    max_concurrent: int = 0


class EmulatorState:
    """`version` is the Dify whose shapes the emulator speaks: "0.15" or "1.x" (see `apps.VERSIONS`)."""

    def __init__(self, apps: list[EmulatedApp], version: str = "0.15") -> None:
        if version not in VERSIONS:
            raise ValueError(f"the Dify version must be one of {', '.join(VERSIONS)}, not {version!r}")
        self.version = version
        names = [app.name for app in apps]
        keys = [app.key for app in apps]
        if len(set(names)) != len(names) or len(set(keys)) != len(keys):
            raise ValueError("emulated app names and keys must be unique")
        self._lock = threading.Lock()
        self._apps = {app.name: app.with_changes({}) for app in apps}
        self._counters = {app.name: _AppCounters() for app in apps}
        self._records: deque[CallRecord] = deque(maxlen=MAX_RECORDS)
        self._ids = itertools.count(1)
        self._conversations: OrderedDict[tuple[str, str], Conversation] = OrderedDict()
        self._deleted_once_checked: set[tuple[str, str]] = set()
        self._runs: dict[str, RunControl] = {}
        self._workflow_runs = {app.name: itertools.count(1) for app in apps}
        self._uploads: OrderedDict[str, UploadedFile] = OrderedDict()
        self._messages: OrderedDict[str, Message] = OrderedDict()
        self.shutting_down = False

    # apps

    def app_for_key(self, key: str) -> EmulatedApp | None:
        with self._lock:
            return next((app for app in self._apps.values() if app.key == key), None)

    def apps(self) -> list[EmulatedApp]:
        with self._lock:
            return list(self._apps.values())

    def app(self, name: str) -> EmulatedApp | None:
        with self._lock:
            return self._apps.get(name)

    def update_app(self, name: str, changes: dict[str, Any]) -> EmulatedApp:
        """Apply `changes` (see `EmulatedApp.with_changes`); KeyError for an unknown app, ValueError or
        TypeError for bad settings."""
        with self._lock:
            updated = self._apps[name].with_changes(changes)
            if any(other.key == updated.key for other in self._apps.values() if other.name != name):
                raise ValueError(f"key {updated.key} belongs to another app")
            self._apps[name] = updated
            return updated

    # concurrency

    def open_count(self, app_name: str) -> int:
        with self._lock:
            return self._counters[app_name].open

    def admit(self, app: EmulatedApp) -> bool:
        """Take a slot for a generation call, unless the app's cap is reached."""
        with self._lock:
            counters = self._counters[app.name]
            if app.max_concurrency is not None and counters.open >= app.max_concurrency:
                return False
            counters.open += 1
            counters.max_concurrent = max(counters.max_concurrent, counters.open)
            return True

    def release(self, app_name: str) -> None:
        with self._lock:
            self._counters[app_name].open -= 1

    # conversations

    def start_conversation(self, app_name: str, user: str) -> str:
        conversation_id = str(uuid.uuid4())
        self._conversations[(app_name, conversation_id)] = Conversation(user)
        while len(self._conversations) > MAX_CONVERSATIONS:
            self._conversations.popitem(last=False)
        return conversation_id

    def conversation(self, app_name: str, conversation_id: str, user: str) -> Conversation | None:
        """The user's conversation; None when it does not exist or belongs to someone else (Dify says 404)."""
        conversation = self._conversations.get((app_name, conversation_id))
        return conversation if conversation is not None and conversation.user == user else None

    def delete_conversation(self, app_name: str, conversation_id: str, user: str) -> bool:
        """Delete the user's conversation; False when there is none of that id for this user."""
        if self.conversation(app_name, conversation_id, user) is None:
            return False
        del self._conversations[(app_name, conversation_id)]
        return True

    def delete_once_checked(self, app_name: str, conversation_id: str) -> bool:
        """Test control: the conversation's next ``GET /messages`` succeeds and then deletes it (a conversation
        deleted between a client's check and its next call). False when there is no such conversation."""
        if (app_name, conversation_id) not in self._conversations:
            return False
        self._deleted_once_checked.add((app_name, conversation_id))
        return True

    def checked(self, app_name: str, conversation_id: str) -> None:
        """A ``GET /messages`` of the conversation was answered: delete it if the test control asked for that."""
        if (app_name, conversation_id) in self._deleted_once_checked:
            self._deleted_once_checked.discard((app_name, conversation_id))
            self._conversations.pop((app_name, conversation_id), None)

    # files and messages

    def remember_upload(self, upload: UploadedFile) -> None:
        self._uploads[upload.id] = upload
        while len(self._uploads) > MAX_CONVERSATIONS:
            self._uploads.popitem(last=False)

    def upload(self, upload_file_id: str, user: str) -> UploadedFile | None:
        """The user's uploaded file; None when there is none of that id for this user."""
        upload = self._uploads.get(upload_file_id)
        return upload if upload is not None and upload.user == user else None

    def remember_message(self, message_id: str, app_name: str, user: str) -> None:
        self._messages[message_id] = Message(app_name, user)
        while len(self._messages) > MAX_CONVERSATIONS:
            self._messages.popitem(last=False)

    def message(self, message_id: str, app_name: str, user: str) -> Message | None:
        """The app's message answered to `user`; None otherwise (Dify says 404 "Message Not Exists.")."""
        message = self._messages.get(message_id)
        return message if message is not None and message.app == app_name and message.user == user else None

    def next_workflow_run_number(self, app_name: str) -> int:
        """The app's next `sequence_number` (Dify numbers each app's workflow runs from 1)."""
        return next(self._workflow_runs[app_name])

    # runs

    def register_run(self, task_id: str, control: RunControl) -> None:
        self._runs[task_id] = control
        if self.shutting_down:
            control.stop("shutdown")

    def unregister_run(self, task_id: str) -> None:
        self._runs.pop(task_id, None)

    def stop_run(self, task_id: str, app_name: str, user: str) -> None:
        control = self._runs.get(task_id)
        if control is not None and control.app_name == app_name and control.user == user:
            control.stop("user")

    def shutdown(self) -> None:
        """End every open run and hung call (on the event loop)."""
        self.shutting_down = True
        for control in list(self._runs.values()):
            control.stop("shutdown")

    # records

    def begin_call(self, method: str, path: str) -> CallRecord:
        with self._lock:
            record = CallRecord(id=next(self._ids), started_at=time.time(), method=method, path=path)
            self._records.append(record)
            return record

    def attach_app(self, record: CallRecord, app: EmulatedApp) -> None:
        with self._lock:
            record.app = app.name
            self._counters[app.name].calls += 1

    def end_call(self, record: CallRecord, status: int | None, outcome: str, code: str | None = None) -> None:
        with self._lock:
            record.ended_at = time.time()
            record.status = status
            record.outcome = outcome
            record.code = code

    def calls(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(record) for record in self._records]

    def reset_calls(self) -> list[dict[str, Any]]:
        """Forget the records and restart the per-app call counts and peaks (open calls stay counted); the records
        forgotten, oldest first (taken in the same step, so a call that ends meanwhile is in one list or the next)."""
        with self._lock:
            forgotten = [asdict(record) for record in self._records]
            self._records.clear()
            for counters in self._counters.values():
                counters.calls = 0
                counters.max_concurrent = counters.open
        return forgotten

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {name: asdict(counters) for name, counters in self._counters.items()}
