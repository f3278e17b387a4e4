-- Put a job back in the queue (a retryable error, or a lease that expired) with its next message.
-- KEYS: 1 job hash, 2 leases zset, 3 queue list, 4 queue bodies
-- ARGV: 1 expected status ("running"), 2 error json ("" = keep), 3 redis message id, 4 message body,
--       5 next attempt at (unix seconds), 6 counter field to increment ("" = none), 7 "front" or "end" of the queue
local status = redis.call('HGET', KEYS[1], FIELD.status)
if status ~= ARGV[1] then
  return status or 'missing'
end
if redis.call('HGET', KEYS[1], FIELD.cancel_requested) == '1' then
  return 'cancel'
end
redis.call('HSET', KEYS[1], FIELD.status, STATUS.queued, FIELD.next_attempt_at, ARGV[5])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], FIELD.error, ARGV[2])
  remember_error(KEYS[1], ARGV[2])
end
local count = 0
if ARGV[6] ~= '' then
  count = redis.call('HINCRBY', KEYS[1], ARGV[6], 1)
end
redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], FIELD.id))
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
redis.call(ARGV[7] == 'front' and 'LPUSH' or 'RPUSH', KEYS[3], ARGV[3])
return 'queued:' .. count
