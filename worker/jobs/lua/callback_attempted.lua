-- Record one callback attempt: the attempt in the job's last MAX_CALLBACK_ATTEMPTS, the callback block, and with it
-- the next attempt (a delayed message) or the dead letter; free the callback lock while the attempt still holds it
-- (it may have outlived the lock, which another attempt then took) and, after an attempt made by the job's own
-- worker under the job's lease, end that run (end_run) unless the job was run again since (rerun: another status, or
-- another run's start), whose lease and run state are the new run's. An attempt made for a status the job no longer
-- has (a job.paused callback whose job resumed meanwhile, a rerun job's) is kept among the attempts but changes
-- nothing else: the block is the next event's.
-- A retry's message goes in the callbacks' due index; a callback done with (delivered or given up) leaves it.
-- KEYS: 1 job hash, 2 leases zset, 3 callback lock, 4 callbacks dead-letter zset, 5 callback (delay) queue,
--       6 its bodies, 7 the callbacks' due index
-- ARGV: 1 a JSON object: callback (the block, JSON), attempt (the attempt, JSON), next ("retry", "dead" or "done"),
--       now (unix seconds), retention_ms (jobs.result_ttl: how long the dead letters key outlives its newest entry),
--       lease_of_run (absent: the attempt held no lease; else the attempt_started_at of the run whose lease it held,
--       '' for a job that never started), lock_holder (absent: the attempt held no callback lock; else its value
--       as the attempt took it), status (the job's status the attempt announced), and for a
--       retry message_id, message_body and message_due_ms, id (the job's)
local attempted = cjson.decode(ARGV[1])
local current = redis.call('HMGET', KEYS[1], FIELD.status, FIELD.callback_attempts, FIELD.attempt_started_at)
local status = current[1]
if attempted.lock_holder and redis.call('GET', KEYS[3]) == attempted.lock_holder then
  redis.call('DEL', KEYS[3])
end
if not status then
  return 0
end
local attempts = cjson.decode(current[2] or '[]')
table.insert(attempts, cjson.decode(attempted.attempt))
while #attempts > MAX_CALLBACK_ATTEMPTS do
  table.remove(attempts, 1)
end
if status ~= attempted.status then
  redis.call('HSET', KEYS[1], FIELD.callback_attempts, cjson.encode(attempts))
  return 0
end
if attempted.lease_of_run and (current[3] or '') == attempted.lease_of_run then
  end_run(KEYS[1], KEYS[2], attempted.id)
end
redis.call('HSET', KEYS[1], FIELD.callback_attempts, cjson.encode(attempts), FIELD.callback, attempted.callback)
if attempted.next == 'retry' then
  enqueue_callback(KEYS[1], attempted.id, KEYS[5], KEYS[6], KEYS[7], attempted.message_id, attempted.message_body,
    attempted.message_due_ms)
else
  redis.call('ZREM', KEYS[7], attempted.id)
  if attempted.next == 'dead' then
    redis.call('ZADD', KEYS[4], attempted.now, attempted.id)
    redis.call('PEXPIRE', KEYS[4], attempted.retention_ms)
  end
end
return 1
