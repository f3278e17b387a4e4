-- Claim the idempotency key (if any), write the job record, index it and enqueue its message: one atomic step.
-- KEYS: 1 idempotency key, 2 job hash, 3 index, 4 app index, 5 queue list, 6 queue bodies
-- ARGV: 1 idempotency value ("" = no key), 2 idempotency ttl ms, 3 created ms, 4 prune index before ms,
--       5 redis message id, 6 message body, 7.. job hash field/value pairs
-- The job id is new per call, so a job hash under it means this very call ran before (a retry after a lost
-- reply): answer like that run, without writing or enqueueing twice.
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'created', redis.call('HGET', KEYS[2], 'id')}
end
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
-- Drop index entries older than the results are kept: on one submit in 8 (by its created ms), at most 100 per
-- index. That is still over 12 removals per added entry, so the index stays bounded, and a backlog (a burst long
-- ago, then quiet) drains over later submits instead of blocking Redis in one call.
if tonumber(ARGV[3]) % 8 == 0 then
  for index = 3, 4 do
    local old = redis.call('ZRANGEBYSCORE', KEYS[index], '-inf', ARGV[4], 'LIMIT', 0, 100)
    if #old > 0 then
      redis.call('ZREM', KEYS[index], unpack(old))
    end
  end
end
redis.call('HSET', KEYS[6], ARGV[5], ARGV[6])
redis.call('RPUSH', KEYS[5], ARGV[5])
return {'created', id}
