-- Begin an attempt: queued becomes running with a fresh lease. A running job is busy while it holds a lease, even
-- an expired one: the reaper requeues it and counts the worker loss (the poison-message bound), so a stale
-- redelivery of a dead worker's message must not start it first. Running without any lease (a Redis that lost
-- writes) is taken over.
-- A paused job started (its forms' expiry came) leaves the paused jobs.
-- KEYS: 1 job hash, 2 leases zset, 3 paused zset
-- ARGV: 1 now (unix seconds), 2 lease expiry ms, 3 worker id
-- Returns {'started', attempts, first start 1|0, record field, value, ...}, or {'missing'}, {'final', status},
-- {'busy'}.
local status = redis.call('HGET', KEYS[1], FIELD.status)
if not status then
  return {'missing'}
end
if is_final(status) then
  return {'final', status}
end
local id = redis.call('HGET', KEYS[1], FIELD.id)
if status == STATUS.running then
  local lease = redis.call('ZSCORE', KEYS[2], id)
  if lease then
    return {'busy'}
  end
end
if status == STATUS.paused then
  redis.call('ZREM', KEYS[3], id)
end
local attempts = redis.call('HINCRBY', KEYS[1], FIELD.attempts, 1)
local first = redis.call('HSETNX', KEYS[1], FIELD.started_at, ARGV[1])
redis.call('HSET', KEYS[1], FIELD.status, STATUS.running, FIELD.worker, ARGV[3], FIELD.attempt_started_at, ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], id)
local reply = {'started', tostring(attempts), tostring(first)}
for _, item in ipairs(redis.call('HGETALL', KEYS[1])) do
  reply[#reply + 1] = item
end
return reply
