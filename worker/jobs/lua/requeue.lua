-- Put a job back in the queue (a retryable error, a limit's deferral, or a lease that expired) with its next
-- message.
-- A paused job requeued (its form answered) leaves the paused jobs.
-- KEYS: 1 job hash, 2 leases zset, 3 queue list, 4 queue bodies, 5 paused zset, 6 the queue's wake token (its
--       consumer takes the message at once, or a delay queue's holds it until its time: worker/wakeup.py)
-- ARGV: 1 a JSON object: expected (the status the job must have), now and next_attempt_at (unix seconds), message_id and
--       message_body (the next message), front (true: the head of the queue), and when given: error (JSON text,
--       the attempt's error), count (a counter field to increment), waiting_since (kept if the job has none),
--       deferred_by (the limit that deferred the job: kept in its deferral history),
--       forget_run (true: drop the recorded workflow run id, a retry runs anew; else a lost worker's run is followed),
--       message_was (the job's message as the caller read it: nothing is done when another one was written since),
--       count_limit (with count: past it the job gets no message, and the caller ends it)
-- Returns 'queued:<count>', 'exhausted:<count>' (the count went past count_limit: the job is queued without its
-- message, so no worker can start it before the caller ends it; should the caller never get to, the orphan sweep
-- finds it), 'cancel' (a cancel was asked meanwhile), 'changed' (message_was no longer holds), or the status the job
-- has instead.
local requeue = cjson.decode(ARGV[1])
local status = redis.call('HGET', KEYS[1], FIELD.status)
if status ~= requeue.expected then
  return status or 'missing'
end
if requeue.message_was and redis.call('HGET', KEYS[1], FIELD.message) ~= requeue.message_was then
  return 'changed'
end
if redis.call('HGET', KEYS[1], FIELD.cancel_requested) == '1' then
  return 'cancel'
end
redis.call('HSET', KEYS[1], FIELD.status, STATUS.queued, FIELD.next_attempt_at, requeue.next_attempt_at,
  FIELD.message, requeue.message_id)
if requeue.forget_run then
  redis.call('HDEL', KEYS[1], FIELD.dify_run_id)
end
if requeue.error then
  redis.call('HSET', KEYS[1], FIELD.error, requeue.error)
  remember_error(KEYS[1], requeue.error, status == STATUS.running, requeue.now)
end
if requeue.waiting_since then
  redis.call('HSETNX', KEYS[1], FIELD.waiting_since, requeue.waiting_since)
end
if requeue.deferred_by then
  redis.call('HSET', KEYS[1], FIELD.deferred_by, requeue.deferred_by)
  local runs = cjson.decode(redis.call('HGET', KEYS[1], FIELD.deferral_history) or '[]')
  local last = runs[#runs]
  if last and last.limit == requeue.deferred_by then
    last.last_at = requeue.now
    last.count = last.count + 1
  else
    table.insert(runs, {limit = requeue.deferred_by, first_at = requeue.now, last_at = requeue.now, count = 1})
  end
  while #runs > MAX_DEFERRAL_RUNS do
    table.remove(runs, 1)
  end
  redis.call('HSET', KEYS[1], FIELD.deferral_history, cjson.encode(runs))
end
local count = 0
if requeue.count then
  count = redis.call('HINCRBY', KEYS[1], requeue.count, 1)
end
local id = redis.call('HGET', KEYS[1], FIELD.id)
redis.call('ZREM', KEYS[2], id)
if status == STATUS.paused then
  redis.call('ZREM', KEYS[5], id)
end
if requeue.count_limit and count > requeue.count_limit then
  return 'exhausted:' .. count
end
redis.call('HSET', KEYS[4], requeue.message_id, requeue.message_body)
redis.call(requeue.front and 'LPUSH' or 'RPUSH', KEYS[3], requeue.message_id)
wake(KEYS[6])
return 'queued:' .. count
