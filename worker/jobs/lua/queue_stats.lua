-- Everything the scrape-time queue gauges need from the queues, in one round trip.
-- KEYS: 1 leases zset, 2 callback dead letters zset, 3 paused zset, then per queue: its list, its bodies, its delay
--       queue's bodies, its dead letters, its low lane
-- ARGV: the queue names, in the order of their keys
-- Returns {queue, waiting, delayed, dead, since ms or -1, ...} per queue (waiting counts the low lane too; since =
-- when the earliest of the first waiting message on the queue and the first in the low lane became due: its enqueue
-- time, or its eta for a retried or deferred one), then the callback dead letters, then the ids of the jobs holding
-- a lease (at most 5000), then the ids of the paused jobs (at most 5000).
local function due_ms(list, bodies)
  local first = redis.call('LINDEX', list, 0)
  local body = first and redis.call('HGET', bodies, first)
  if not body then
    return -1
  end
  local message = cjson.decode(body)
  local due = message['message_timestamp'] or -1
  local eta = message['options'] and message['options']['eta']
  if eta and eta > due then
    due = eta
  end
  return due
end

local out = {}
for i = 1, #ARGV do
  local base = 3 + (i - 1) * 5
  local oldest = due_ms(KEYS[base + 1], KEYS[base + 2])
  local low = due_ms(KEYS[base + 5], KEYS[base + 2])
  if low >= 0 and (oldest < 0 or low < oldest) then
    oldest = low
  end
  table.insert(out, ARGV[i])
  table.insert(out, redis.call('LLEN', KEYS[base + 1]) + redis.call('LLEN', KEYS[base + 5]))
  table.insert(out, redis.call('HLEN', KEYS[base + 3]))
  table.insert(out, redis.call('ZCARD', KEYS[base + 4]))
  table.insert(out, tostring(oldest))
end
return {out, redis.call('ZCARD', KEYS[2]), redis.call('ZRANGE', KEYS[1], 0, 4999),
        redis.call('ZRANGE', KEYS[3], 0, 4999)}
