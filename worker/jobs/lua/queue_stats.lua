-- Everything the scrape-time queue gauges need from the queues, in one round trip.
-- KEYS: 1 leases zset, 2 callback dead letters zset, 3 paused zset, then per queue: its list, its bodies, its delay
--       queue's bodies, its dead letters
-- ARGV: the queue names, in the order of their keys
-- Returns {queue, waiting, delayed, dead, since ms or -1, ...} per queue (since = when the first waiting message
-- became due: its enqueue time, or its eta for a retried or deferred one), then the callback dead letters, then
-- the ids of the jobs holding a lease (at most 5000), then the ids of the paused jobs (at most 5000).
local out = {}
for i = 1, #ARGV do
  local base = 3 + (i - 1) * 4
  local oldest = -1
  local first = redis.call('LINDEX', KEYS[base + 1], 0)
  if first then
    local body = redis.call('HGET', KEYS[base + 2], first)
    if body then
      local message = cjson.decode(body)
      oldest = message['message_timestamp'] or -1
      local eta = message['options'] and message['options']['eta']
      if eta and eta > oldest then
        oldest = eta
      end
    end
  end
  table.insert(out, ARGV[i])
  table.insert(out, redis.call('LLEN', KEYS[base + 1]))
  table.insert(out, redis.call('HLEN', KEYS[base + 3]))
  table.insert(out, redis.call('ZCARD', KEYS[base + 4]))
  table.insert(out, tostring(oldest))
end
return {out, redis.call('ZCARD', KEYS[2]), redis.call('ZRANGE', KEYS[1], 0, 4999),
        redis.call('ZRANGE', KEYS[3], 0, 4999)}
