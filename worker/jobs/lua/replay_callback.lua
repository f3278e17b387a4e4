-- Send a finished job's callback again from the first step of the schedule, and take it off the dead letters.
-- KEYS: 1 job hash, 2 callbacks dead-letter zset, 3 callback queue, 4 callback bodies, 5 the callbacks' due index
-- ARGV: 1 redis message id, 2 message body, 3 pending callback block json, 4 message due (unix ms)
local status = redis.call('HGET', KEYS[1], FIELD.status)
if not is_final(status) then
  return 0
end
if not redis.call('HGET', KEYS[1], FIELD.callback_url) then
  return 0
end
redis.call('HSET', KEYS[1], FIELD.callback, ARGV[3])
local id = redis.call('HGET', KEYS[1], FIELD.id)
redis.call('ZREM', KEYS[2], id)
enqueue_callback(KEYS[1], id, KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[4])
return 1
