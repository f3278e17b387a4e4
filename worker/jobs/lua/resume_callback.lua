-- The reaper found the lease of a finished job: the worker that was sending its first callback attempt died
-- before recording it. Enqueue the callback (if it is still pending) and drop the lease.
-- KEYS: 1 job hash, 2 leases zset, 3 callback queue, 4 callback bodies
-- ARGV: 1 job id, 2 redis message id, 3 message body
redis.call('ZREM', KEYS[2], ARGV[1])
local status = redis.call('HGET', KEYS[1], FIELD.status)
if not is_final(status) then
  return 0
end
local callback = redis.call('HGET', KEYS[1], FIELD.callback)
if not callback or cjson.decode(callback)['status'] ~= CALLBACK.pending then
  return 0
end
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
redis.call('RPUSH', KEYS[3], ARGV[2])
return 1
