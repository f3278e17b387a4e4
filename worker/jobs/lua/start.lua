-- Begin an attempt: queued (or running with an expired lease) becomes running with a fresh lease.
-- KEYS: 1 job hash, 2 leases zset
-- ARGV: 1 now (unix seconds), 2 now ms, 3 lease expiry ms, 4 worker id
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {'missing'}
end
if status == 'succeeded' or status == 'failed' or status == 'canceled' then
  return {'final', status}
end
local id = redis.call('HGET', KEYS[1], 'id')
if status == 'running' then
  local lease = redis.call('ZSCORE', KEYS[2], id)
  if lease and tonumber(lease) > tonumber(ARGV[2]) then
    return {'busy'}
  end
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local first = redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], id)
return {'started', tostring(attempts), tostring(first)}
