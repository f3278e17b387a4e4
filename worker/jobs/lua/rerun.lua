-- Run a failed or canceled job again: back to queued with a fresh message; its callback will be sent again.
-- It joins its app's and its client's pending jobs again (an operator's rerun is not held to max_pending).
-- A thread job joins the end of its thread's line, and holds its message while an earlier job there is unfinished.
-- The message leaves the queue's wake token, as a submit's does, so an idle worker takes the job at once.
-- KEYS: 1 job hash, 2 queue list, 3 queue bodies, 4 the app's pending jobs, 5 the client's pending jobs ('' when
--       no API client submitted it), 6 the thread's line ('' for a job of no thread), 7 the queue's wake token
-- ARGV: 1 redis message id, 2 message body, 3 pending callback block json (stored when the job has a callback URL),
--       4 now (ms)
local status = redis.call('HGET', KEYS[1], FIELD.status)
if status ~= STATUS.failed and status ~= STATUS.canceled then
  return status or 'missing'
end
redis.call('HSET', KEYS[1], FIELD.status, STATUS.queued, FIELD.message, ARGV[1])
redis.call('HDEL', KEYS[1], FIELD.finished_at, FIELD.cancel_requested, FIELD.worker_losses, FIELD.pause, FIELD.dify_run_id)
redis.call('PERSIST', KEYS[1])
if redis.call('HEXISTS', KEYS[1], FIELD.callback_url) == 1 then
  redis.call('HSET', KEYS[1], FIELD.callback, ARGV[3])
end
redis.call('ZADD', KEYS[4], ARGV[4], redis.call('HGET', KEYS[1], FIELD.id))
if KEYS[5] ~= '' then
  redis.call('ZADD', KEYS[5], ARGV[4], redis.call('HGET', KEYS[1], FIELD.id))
end
if KEYS[6] ~= '' and redis.call('RPUSH', KEYS[6], redis.call('HGET', KEYS[1], FIELD.id)) > 1 then
  redis.call('HSET', KEYS[1], FIELD.held_message, cjson.encode({id = ARGV[1], body = ARGV[2]}))
  return 'queued'
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
wake(KEYS[7])
return 'queued'
