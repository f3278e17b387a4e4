"""Dead letters: callbacks that ended ``failed`` and run_job messages Dramatiq dead-lettered; listing and replay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dramatiq.message import Message

from difyq.worker.jobs.messages import JOBS_QUEUE
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

    def _dead_job_messages(self) -> dict[str, str]:
        """job id → redis message id of every dead-lettered run_job message."""
        found: dict[str, str] = {}
        message_ids = self.redis.zrange(self.jobs_key, 0, -1)
        if not message_ids:
            return found
        bodies = self.redis.hmget(f"{self.jobs_key}.msgs", message_ids)
        for message_id, body in zip(message_ids, bodies, strict=True):
            if body:
                message = Message.decode(body)
                if message.args:
                    found[str(message.args[0])] = message_id.decode()
        return found

    def list(self) -> dict[str, list[dict[str, Any]]]:
        callbacks = []
        for job_id in self.redis.zrange(self.callbacks_key, 0, -1):
            job = self.store.get(job_id.decode())
            if job:
                callbacks.append({"job_id": job["id"], "app": job["app"], "status": job["status"],
                                  "callback": job["callback"]})
        jobs = []
        for job_id in self._dead_job_messages():
            job = self.store.get(job_id)
            jobs.append({"job_id": job_id, "app": job["app"] if job else None,
                         "status": job["status"] if job else "expired", "error": job["error"] if job else None})
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
