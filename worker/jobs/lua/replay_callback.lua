-- Send a finished job's callback again from the first step of the schedule, and take it off the dead letters.
-- KEYS: 1 job hash, 2 callbacks dead-letter zset, 3 callback queue, 4 callback bodies
-- ARGV: 1 redis message id, 2 message body, 3 pending callback block json
local status = redis.call('HGET', KEYS[1], FIELD.status)
if not is_final(status) then
  return 0
end
if not redis.call('HGET', KEYS[1], FIELD.callback_url) then
  return 0
end
redis.call('HSET', KEYS[1], FIELD.callback, ARGV[3])
redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], FIELD.id))
redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[3], ARGV[1])
return 1
