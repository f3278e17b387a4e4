"""Conversation threads: a job naming a ``thread`` continues the Dify conversation of its app's thread, kept in
Redis with the user it belongs to. The thread's unfinished jobs wait in its line and run one at a time in submit
order (submit.lua, finish.lua, cancel.lua and rerun.lua keep the line; ``leave_thread`` hands it on). This module
reads a thread, opens it for an attempt and forgets it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from difyq.worker.config import ThreadsConfig
from difyq.worker.jobs.model import iso_time
from difyq.worker.jobs.schema import JobField, ThreadField
from difyq.worker.redis_keys import RedisKeys

DEFAULT_THREAD_TTL_S = ThreadsConfig().ttl
MAX_THREAD_NAME = 256


@dataclass(frozen=True)
class ThreadKeys:
    """A thread's keys: its state, its line of unfinished jobs, its jobs by creation time ('' for no thread)."""

    state: str
    line: str
    jobs: str


NO_THREAD = ThreadKeys("", "", "")


@dataclass(frozen=True)
class ThreadConversation:
    """What an attempt of a thread job did with the thread's conversation: ``started_from`` is the one the thread
    had when the attempt began ('' for none), ``conversation_id`` the one the job's answer belongs to. finish.lua
    records it only while the thread still has ``started_from``."""

    started_from: str
    conversation_id: str | None


@dataclass(frozen=True)
class OpenThread:
    """A thread as an attempt finds it: the user its conversation belongs to, and the conversation (None before
    the first answer)."""

    user: str
    conversation_id: str | None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Threads:
    """Threads of every app under the ``{namespace}:`` prefix."""

    def __init__(self, client: redis.Redis, namespace: str, ttl: float = DEFAULT_THREAD_TTL_S):
        self.redis = client
        self.keys = RedisKeys(namespace)
        self.ttl = ttl

    def open(self, app: str, thread: str, user: str) -> OpenThread:
        """The thread for an attempt of one of its jobs: made again with ``user`` when it was forgotten (deleted,
        or expired) while the job waited."""
        key = self.keys.thread(app, thread)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, ThreadField.NAME, thread)
            pipe.hsetnx(key, ThreadField.APP, app)
            pipe.hsetnx(key, ThreadField.USER, user)
            pipe.hsetnx(key, ThreadField.CREATED_AT, repr(time.time()))
            pipe.pexpire(key, int(self.ttl * 1000))
            pipe.hmget(key, ThreadField.USER, ThreadField.CONVERSATION_ID)
            *_, (stored_user, conversation_id) = pipe.execute()
        return OpenThread(_text(stored_user) if stored_user else user,
                          _text(conversation_id) if conversation_id else None)

    def user(self, app: str, thread: str) -> str | None:
        """The Dify user the thread's conversation belongs to; None for a thread difyq does not know."""
        user = self.redis.hget(self.keys.thread(app, thread), ThreadField.USER)
        return _text(user) if user else None

    def get(self, app: str, thread: str, *, limit: int = 100) -> dict[str, Any] | None:
        """The thread resource (docs/http-api.md): its conversation, its user, its line of unfinished jobs and its
        newest ``limit`` jobs; None when difyq knows no such thread."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.thread(app, thread))
            pipe.lrange(self.keys.thread_line(app, thread), 0, -1)
            pipe.zrevrange(self.keys.thread_jobs(app, thread), 0, limit - 1)
            pipe.pttl(self.keys.thread(app, thread))
            raw, line, job_ids, ttl_ms = pipe.execute()
        if not raw and not line:
            return None
        state = {_text(key): _text(value) for key, value in raw.items()}
        ids = [_text(job_id) for job_id in job_ids]
        waiting = [_text(job_id) for job_id in line]
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self.keys.job(job_id), JobField.STATUS, JobField.CREATED_AT,
                           JobField.CONVERSATION_RESTARTED)
            summaries = pipe.execute()
        jobs = [{"id": job_id, "status": _text(status), "created_at": iso_time(_text(created)),
                 "conversation_restarted": restarted is not None}
                for job_id, (status, created, restarted) in zip(ids, summaries, strict=True) if status is not None]
        return {
            "thread": thread,
            "app": app,
            "conversation_id": state.get(ThreadField.CONVERSATION_ID),
            "user": state.get(ThreadField.USER),
            "created_at": iso_time(state.get(ThreadField.CREATED_AT)),
            "last_job_at": iso_time(state.get(ThreadField.LAST_JOB_AT)),
            "expires_at": iso_time(time.time() + ttl_ms / 1000) if ttl_ms and ttl_ms > 0 else None,
            "line": waiting,
            "jobs": jobs,
        }

    def job_ids(self, apps: Iterable[str], thread: str, limit: int) -> list[str]:
        """The newest ``limit`` jobs of the threads named ``thread`` in any of ``apps`` (one round trip), newest
        first."""
        apps = list(apps)
        with self.redis.pipeline(transaction=False) as pipe:
            for app in apps:
                pipe.zrevrange(self.keys.thread_jobs(app, thread), 0, limit - 1, withscores=True)
            found = [entry for entries in pipe.execute() for entry in entries]
        return [_text(job_id) for job_id, _ in sorted(found, key=lambda entry: -entry[1])[:limit]]

    def forget(self, app: str, thread: str) -> None:
        """Forget the thread's conversation and job list; its unfinished jobs still run in order (the next one
        begins a new conversation)."""
        self.redis.delete(self.keys.thread(app, thread), self.keys.thread_jobs(app, thread))
