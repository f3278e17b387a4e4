-- Claim the idempotency key (if any), write the job record, index it and enqueue its message: one atomic step.
-- A job over a max_pending cap (its app's unfinished jobs, or its client's) is refused before anything is written.
-- KEYS: 1 idempotency key, 2 job hash, 3 index, 4 app index, 5 queue list, 6 queue bodies, 7 the app's pending
--       jobs, 8 the client's pending jobs ('' for a job no API client submitted), 9 the queue's wake token (one at
--       most: it wakes an idle consumer, worker/wakeup.py), 10 the thread's state, 11 its line, 12 its jobs (all
--       three '' for a job of no thread), 13 the queue's express tail ('' for a job of normal or low priority),
--       14 the queue's low lane ('' for a job of normal or high priority)
-- ARGV: 1 a JSON object: id (the job's), created_ms, prune_before_ms (index entries older than this go), message_id and
--       message_body (the run_job message), with an idempotency key its claim (the value to store) and
--       claim_ttl_ms, and the caps that apply: max_pending_app, max_pending_client; a thread job's thread:
--       {name, app, user, now, ttl_ms, job_prefix}; 2.. the job record's field/value pairs
-- A thread job joins the end of its thread's line; when an earlier job of the thread is unfinished it keeps its
-- message in its record (held_message) instead of enqueueing it: the earlier job's end hands it on (leave_thread).
-- Returns {'created', id}, {'existing', claim} (the key's job), or {'full', 'app' | 'client', cap}.
-- The job id is new per call, so a job hash under it means this very call ran before (a retry after a lost
-- reply): answer like that run, without writing or enqueueing twice.
local submit = cjson.decode(ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'created', submit.id}
end
if submit.claim then
  local existing = redis.call('GET', KEYS[1])
  if existing then
    return {'existing', existing}
  end
end
if submit.max_pending_app and redis.call('ZCARD', KEYS[7]) >= submit.max_pending_app then
  return {'full', 'app', submit.max_pending_app}
end
if submit.max_pending_client and redis.call('ZCARD', KEYS[8]) >= submit.max_pending_client then
  return {'full', 'client', submit.max_pending_client}
end
if submit.claim then
  redis.call('SET', KEYS[1], submit.claim, 'PX', submit.claim_ttl_ms)
end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
local id = submit.id
redis.call('ZADD', KEYS[7], submit.created_ms, id)
if KEYS[8] ~= '' then
  redis.call('ZADD', KEYS[8], submit.created_ms, id)
end
redis.call('ZADD', KEYS[3], submit.created_ms, id)
redis.call('ZADD', KEYS[4], submit.created_ms, id)
-- Drop index entries older than the results are kept: on one submit in 8 (by its created ms), at most 100 per
-- index. That is still over 12 removals per added entry, so the index stays bounded, and a backlog (a burst long
-- ago, then quiet) drains over later submits instead of blocking Redis in one call.
if submit.created_ms % 8 == 0 then
  for index = 3, 4 do
    local old = redis.call('ZRANGEBYSCORE', KEYS[index], '-inf', submit.prune_before_ms, 'LIMIT', 0, 100)
    if #old > 0 then
      redis.call('ZREM', KEYS[index], unpack(old))
    end
  end
end
if KEYS[11] ~= '' then
  local thread = submit.thread
  redis.call('HSETNX', KEYS[10], THREAD.name, thread.name)
  redis.call('HSETNX', KEYS[10], THREAD.app, thread.app)
  redis.call('HSETNX', KEYS[10], THREAD.user, thread.user)
  redis.call('HSETNX', KEYS[10], THREAD.created_at, thread.now)
  redis.call('HSET', KEYS[10], THREAD.last_job_at, thread.now)
  redis.call('PEXPIRE', KEYS[10], thread.ttl_ms)
  redis.call('ZADD', KEYS[12], submit.created_ms, id)
  redis.call('ZREMRANGEBYSCORE', KEYS[12], '-inf', submit.prune_before_ms)
  redis.call('PEXPIRE', KEYS[12], thread.ttl_ms)
  -- A line whose first job ended without handing it on (which no script does) is handed on first: it never stalls.
  hand_on_thread(KEYS[11], thread.job_prefix, KEYS[5], KEYS[6], KEYS[9])
  if redis.call('RPUSH', KEYS[11], id) > 1 then
    redis.call('HSET', KEYS[2], FIELD.held_message, cjson.encode({id = submit.message_id, body = submit.message_body}))
    return {'created', id}
  end
end
redis.call('HSET', KEYS[6], submit.message_id, submit.message_body)
-- A job above normal priority goes right after the last such job still waiting for a worker thread (Dramatiq
-- takes from the head), else at the head: ahead of every normal or low one, in submit order among themselves. A job
-- below normal priority waits in the low lane, which workers move onto the queue when they find it empty, and a
-- minimum share of the time before that (worker/wakeup.py): normal jobs pass it at the worker threads.
if KEYS[13] ~= '' then
  local EXPRESS_TAIL_TTL_MS = 86400000  -- the tail only matters while its message waits; a day forgets a stale one
  queue_after_express(KEYS[5], KEYS[13], submit.message_id)
  redis.call('SET', KEYS[13], submit.message_id, 'PX', EXPRESS_TAIL_TTL_MS)
elseif KEYS[14] ~= '' then
  redis.call('RPUSH', KEYS[14], submit.message_id)
else
  redis.call('RPUSH', KEYS[5], submit.message_id)
end
wake(KEYS[9])
return {'created', id}
