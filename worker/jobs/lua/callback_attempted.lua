-- Record one callback attempt: the callback block, and with it the next attempt (a delayed message) or the dead
-- letter; free the callback lock and, after an attempt made by the job's own worker, the job's lease.
-- KEYS: 1 job hash, 2 leases zset, 3 callback lock, 4 callbacks dead-letter zset, 5 callback (delay) queue,
--       6 its bodies
-- ARGV: 1 callback state json, 2 next: "retry", "dead" or "done", 3 redis message id, 4 message body, 5 now,
--       6 "1" to drop the job's lease
local id = redis.call('HGET', KEYS[1], FIELD.id)
redis.call('DEL', KEYS[3])
if not id then
  return 0
end
redis.call('HSET', KEYS[1], FIELD.callback, ARGV[1])
if ARGV[2] == 'retry' then
  redis.call('HSET', KEYS[6], ARGV[3], ARGV[4])
  redis.call('RPUSH', KEYS[5], ARGV[3])
elseif ARGV[2] == 'dead' then
  redis.call('ZADD', KEYS[4], ARGV[5], id)
end
if ARGV[6] == '1' then
  redis.call('ZREM', KEYS[2], id)
end
return 1
