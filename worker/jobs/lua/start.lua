-- Begin an attempt: queued becomes running with a fresh lease. A running job is busy while it holds a lease, even
-- an expired one: the reaper requeues it and counts the worker loss (the poison-message bound), so a stale
-- redelivery of a dead worker's message must not start it first. Running without any lease (a Redis that lost
-- writes) is taken over.
-- An app without rate limits is admitted by this script too (one round trip instead of two): KEYS[3] names the
-- limiter's upstream-cooldown hash of the app's Dify key (fields until, streak: microseconds of Redis TIME, see
-- limits/lua/upstream.lua), and while it cools down the attempt does not start: {'cooling', microseconds left}.
-- KEYS: 1 job hash, 2 leases zset, 3 cooldown hash ('' = admitted already)
-- ARGV: 1 now (unix seconds), 2 lease expiry ms, 3 worker id, 4 "record": a started attempt also returns the record
-- Returns {'started', attempts, first start 1|0, the key had a 429 streak 1|0, record field, value, ...}, or
-- {'missing'}, {'final', status}, {'busy'}, {'cooling', microseconds left}.
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
  if lease then
    return {'busy'}
  end
end
local streak = 0
if KEYS[3] ~= '' then
  local time = redis.call('TIME')
  local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
  local cool_until = tonumber(redis.call('HGET', KEYS[3], 'until') or 0)
  if cool_until > now_us then
    return {'cooling', tostring(cool_until - now_us)}
  end
  streak = redis.call('HEXISTS', KEYS[3], 'streak')
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local first = redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], id)
local reply = {'started', tostring(attempts), tostring(first), tostring(streak)}
if ARGV[4] == 'record' then
  for _, item in ipairs(redis.call('HGETALL', KEYS[1])) do
    reply[#reply + 1] = item
  end
end
return reply
