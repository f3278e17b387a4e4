-- Cancel: a queued or paused job ends canceled now (and its callback is enqueued); a running one is flagged so the worker
-- ends it canceled after Dify's stop; a final one is left as it is.
-- KEYS: 1 job hash, 2 callback queue, 3 callback bodies
-- ARGV: 1 now (unix seconds), 2 retention ms, 3 callback redis message id, 4 callback body, 5 pending callback
--       block json (both used when the job has a callback URL)
local status = redis.call('HGET', KEYS[1], FIELD.status)
if not status then
  return {'missing'}
end
if status == STATUS.queued or status == STATUS.paused then
  redis.call('HSET', KEYS[1], FIELD.status, STATUS.canceled, FIELD.finished_at, ARGV[1], FIELD.cancel_requested, '1')
  if redis.call('HEXISTS', KEYS[1], FIELD.callback_url) == 1 then
    redis.call('HSET', KEYS[1], FIELD.callback, ARGV[5])
    redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
    redis.call('RPUSH', KEYS[2], ARGV[3])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'canceled'}
end
if status == STATUS.running then
  redis.call('HSET', KEYS[1], FIELD.cancel_requested, '1')
  return {'running', redis.call('HGET', KEYS[1], FIELD.task_id) or ''}
end
return {status}
