-- Pause a running job whose Dify run waits for human input: paused with its pause block (the run and its forms),
-- no lease (no worker holds it, so no sweep reads it as lost), and a delayed message for when its forms expire,
-- so that the job then ends as Dify ended the run (a submitted form requeues it at once, see requeue.lua). A job with
-- a callback URL gets its job.paused callback: a pending callback block and a callbacks message, in the same step.
-- The job joins the paused jobs (start, requeue and cancel take it out).
-- KEYS: 1 job hash, 2 leases zset, 3 queue list, 4 queue bodies, 5 callback queue, 6 callback bodies, 7 paused zset,
--       8 the callbacks' due index
-- ARGV: 1 pause block json, 2 redis message id, 3 message body, 4 check at (unix seconds), 5 the pending callback
--       block (json), 6 callback redis message id, 7 callback message body, 8 now (unix ms)
local status = redis.call('HGET', KEYS[1], FIELD.status)
if status ~= STATUS.running then
  return status or 'missing'
end
if redis.call('HGET', KEYS[1], FIELD.cancel_requested) == '1' then
  return 'cancel'
end
redis.call('HSET', KEYS[1], FIELD.status, STATUS.paused, FIELD.pause, ARGV[1], FIELD.next_attempt_at, ARGV[4],
  FIELD.message, ARGV[2])
local id = redis.call('HGET', KEYS[1], FIELD.id)
redis.call('ZREM', KEYS[2], id)
redis.call('ZADD', KEYS[7], ARGV[8], id)
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
redis.call('RPUSH', KEYS[3], ARGV[2])
if redis.call('HEXISTS', KEYS[1], FIELD.callback_url) == 1 then
  redis.call('HSET', KEYS[1], FIELD.callback, ARGV[5])
  enqueue_callback(KEYS[1], id, KEYS[5], KEYS[6], KEYS[8], ARGV[6], ARGV[7], ARGV[8])
end
return STATUS.paused
