"""Dead letters: callbacks that ended ``failed`` and run_job messages Dramatiq dead-lettered; listing and replay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dramatiq.message import Message

from difyq.worker.jobs.messages import JOBS_QUEUE
from difyq.worker.jobs.model import job_resource
from difyq.worker.jobs.schema import JobStatus
from difyq.worker.redis_keys import RedisKeys
from difyq.worker.runtime import Runtime


class DeadLetters:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.store = runtime.store
        self.redis = runtime.raw_redis
        keys = RedisKeys(runtime.namespace)
        self.callbacks_key = keys.callback_dead_letters
        self.jobs_key = keys.dead_letters(JOBS_QUEUE)

    def counts(self) -> dict[str, int]:
        """How many dead letters there are of each kind (callback, job)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.callbacks_key)
        pipe.zcard(self.jobs_key)
        callbacks, jobs = pipe.execute()
        return {"callback": callbacks, "job": jobs}

    def _dead_job_messages(self, limit: int = 0) -> dict[str, str]:
        """job id → redis message id of every dead-lettered run_job message (the newest ``limit`` when given)."""
        found: dict[str, str] = {}
        message_ids = self.redis.zrevrange(self.jobs_key, 0, limit - 1)
        if not message_ids:
            return found
        bodies = self.redis.hmget(f"{self.jobs_key}.msgs", message_ids)
        for message_id, body in zip(message_ids, bodies, strict=True):
            if body:
                message = Message.decode(body)
                if message.args:
                    found[str(message.args[0])] = message_id.decode()
        return found

    def _jobs(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        """The job resource of each id (None for an expired job), read in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.store.job_key(job_id))
        return [job_resource({k.decode(): v.decode() for k, v in raw.items()}) if raw else None
                for raw in pipe.execute()]

    def list(self, limit: int = 0) -> dict[str, list[dict[str, Any]]]:
        """Every dead letter of each kind, newest first (the newest ``limit`` of each when given)."""
        callback_ids = [member.decode() for member in self.redis.zrevrange(self.callbacks_key, 0, limit - 1)]
        callbacks = [{"job_id": job["id"], "app": job["app"], "status": job["status"], "callback": job["callback"]}
                     for job in self._jobs(callback_ids) if job]
        job_ids = list(self._dead_job_messages(limit))
        jobs = [{"job_id": job_id, "app": job["app"] if job else None, "status": job["status"] if job else "expired",
                 "error": job["error"] if job else None} for job_id, job in zip(job_ids, self._jobs(job_ids),
                                                                              strict=True)]
        return {"callbacks": callbacks, "jobs": jobs}

    def replay(self, job_id: str | None) -> list[str]:
        """Replay one job's dead letter (callback or job), or every one when ``job_id`` is None."""
        return self.replay_matching(lambda _kind, candidate: job_id in (None, candidate))

    def replay_matching(self, wanted: Callable[[str, str], bool]) -> list[str]:
        """Replay every dead letter for which ``wanted(kind, job id)`` is true (kind: ``callback`` or ``job``)."""
        replayed: list[str] = []
        callback_ids = [member.decode() for member in self.redis.zrange(self.callbacks_key, 0, -1)]
        for candidate in callback_ids:
            if wanted("callback", candidate) and self.store.replay_callback(candidate):
                replayed.append(candidate)
        for candidate, message_id in self._dead_job_messages().items():
            if wanted("job", candidate) and self.store.rerun(candidate) == JobStatus.QUEUED:
                pipe = self.redis.pipeline()
                pipe.zrem(self.jobs_key, message_id)
                pipe.hdel(f"{self.jobs_key}.msgs", message_id)
                pipe.execute()
                replayed.append(candidate)
        return replayed
