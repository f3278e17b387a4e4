-- The reaper found the lease of a finished job: the worker that was sending its first callback attempt died
-- before recording it. Enqueue the callback (if it is still pending) and drop the lease.
-- KEYS: 1 job hash, 2 leases zset, 3 callback queue, 4 callback bodies, 5 the callbacks' due index
-- ARGV: 1 job id, 2 redis message id, 3 message body, 4 message due (unix ms)
redis.call('ZREM', KEYS[2], ARGV[1])
local status = redis.call('HGET', KEYS[1], FIELD.status)
if not is_final(status) then
  return 0
end
local callback = redis.call('HGET', KEYS[1], FIELD.callback)
if not callback or cjson.decode(callback)['status'] ~= CALLBACK.pending then
  return 0
end
enqueue_callback(KEYS[1], ARGV[1], KEYS[3], KEYS[4], KEYS[5], ARGV[2], ARGV[3], ARGV[4])
return 1
