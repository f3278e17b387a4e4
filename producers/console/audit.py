"""Operator actions: logged with the operator's name and kept beside the job, for its timeline.

``{ns}:console:actions:{job id}`` is a list of JSON entries (``at``, ``operator``, ``action``, ``outcome``) that
expires with the job's retention.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import structlog

from difyq.worker.json_codec import dumps, loads
from difyq.worker.redis_keys import RedisKeys

log = structlog.get_logger("difyq.console")
_KEPT = 100


class ActionLog:
    def __init__(self, client: redis.Redis, namespace: str, retention_s: float):
        self.redis = client
        self.namespace = namespace
        self.retention_s = retention_s

    def _key(self, job_id: str) -> str:
        return RedisKeys(self.namespace).console_actions(job_id)

    def record(self, operator: str, action: str, outcome: str, job_id: str | None = None, **details: Any) -> None:
        """Log an action; one about a job is also kept for that job's timeline."""
        if job_id is None:
            log.info("console_action", operator=operator, action=action, outcome=outcome, **details)
            return
        log.info("console_action", operator=operator, action=action, outcome=outcome, job_id=job_id, **details)
        entry = dumps({"at": time.time(), "operator": operator, "action": action, "outcome": outcome})
        key = self._key(job_id)
        pipe = self.redis.pipeline()
        pipe.rpush(key, entry)
        pipe.ltrim(key, -_KEPT, -1)
        pipe.expire(key, int(self.retention_s))
        pipe.execute()

    def of(self, job_id: str) -> list[dict[str, Any]]:
        return [loads(entry) for entry in self.redis.lrange(self._key(job_id), 0, -1)]
