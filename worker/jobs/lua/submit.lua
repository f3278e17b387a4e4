-- Claim the idempotency key (if any), write the job record, index it and enqueue its message: one atomic step.
-- KEYS: 1 idempotency key, 2 job hash, 3 index, 4 app index, 5 queue list, 6 queue bodies
-- ARGV: 1 idempotency value ("" = no key), 2 idempotency ttl ms, 3 created ms, 4 prune index before ms,
--       5 redis message id, 6 message body, 7.. job hash field/value pairs
if ARGV[1] ~= '' then
  local existing = redis.call('GET', KEYS[1])
  if existing then
    return {'existing', existing}
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
local id = redis.call('HGET', KEYS[2], 'id')
redis.call('ZADD', KEYS[3], ARGV[3], id)
redis.call('ZADD', KEYS[4], ARGV[3], id)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[4])
redis.call('HSET', KEYS[6], ARGV[5], ARGV[6])
redis.call('RPUSH', KEYS[5], ARGV[5])
redis.call('PUBLISH', KEYS[5], '1')
return {'created', id}
