-- Begin an attempt: queued becomes running with a fresh lease. A running job is busy while it holds a lease, even
-- an expired one: the reaper requeues it and counts the worker loss (the poison-message bound), so a stale
-- redelivery of a dead worker's message must not start it first. Running without any lease (a Redis that lost
-- writes) is taken over.
-- A paused job started (its forms' expiry came) leaves the paused jobs.
-- The record is read once (HGETALL) and written once: the reply is that record with this attempt's changes.
-- A started job's worker process has its heartbeat (what keeps the reaper off its leases) from the start on: a
-- process without one gets it now; an existing one keeps the time of its last lease round (keep_live_lease.lua).
-- A job of an app without limits has no admission script: its Dify key's upstream cooldown (a Dify 429) is checked
-- here, and a job on a cooling key is not started (nothing written); the worker defers it as an admission refused by
-- the cooldown would be.
-- KEYS: 1 job hash, 2 leases zset, 3 paused zset, 4 the worker process's heartbeat, [5 the key's cooldown hash]
-- ARGV: 1 now (unix seconds), 2 lease expiry ms, 3 worker id, 4 job id, 5 heartbeat ttl ms, 6 now ms,
--       [7 the limiter's clock ('' = Redis TIME)]
-- Returns {'started', attempts, first start 1|0, 1 when the key has a 429 streak to end on success (else 0), record
-- field, value, ...}, or {'missing'}, {'final', status}, {'busy'}, {'cooling', microseconds left}.
local record = redis.call('HGETALL', KEYS[1])
local at = {}
for i = 1, #record, 2 do
  at[record[i]] = i + 1
end
local status = at[FIELD.status] and record[at[FIELD.status]]
if not status then
  return {'missing'}
end
if is_final(status) then
  return {'final', status}
end
local id = ARGV[4]
if status == STATUS.running and redis.call('ZSCORE', KEYS[2], id) then
  return {'busy'}
end
local streak = 0
if KEYS[5] then
  local wait
  wait, streak = cooldown(KEYS[5], clock(ARGV[7]))
  if wait > 0 then
    return {'cooling', wait}
  end
end
if status == STATUS.paused then
  redis.call('ZREM', KEYS[3], id)
end
local changes = {FIELD.attempts, tostring(tonumber(at[FIELD.attempts] and record[at[FIELD.attempts]] or '0') + 1),
                 FIELD.status, STATUS.running, FIELD.worker, ARGV[3], FIELD.attempt_started_at, ARGV[1]}
local first = at[FIELD.started_at] == nil
if first then
  changes[#changes + 1] = FIELD.started_at
  changes[#changes + 1] = ARGV[1]
end
redis.call('HSET', KEYS[1], unpack(changes))
redis.call('ZADD', KEYS[2], ARGV[2], id)
redis.call('SET', KEYS[4], ARGV[6], 'PX', ARGV[5], 'NX')
for i = 1, #changes, 2 do
  local index = at[changes[i]]
  if index then
    record[index] = changes[i + 1]
  else
    record[#record + 1] = changes[i]
    record[#record + 1] = changes[i + 1]
  end
end
return {'started', changes[2], first and '1' or '0', streak, unpack(record)}
