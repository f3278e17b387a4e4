-- Everything the scrape-time queue gauges need, in one round trip.
-- KEYS: 1 leases zset, 2 callback dead letters zset; ARGV: namespace, then queue names
-- Returns {queue, waiting, delayed, dead, since ms or -1, ...} per queue (since = when the first waiting message
-- became due: its enqueue time, or its eta for a retried or deferred one), then {app, running, ...} (a finished job
-- keeps its lease while its worker sends the first callback attempt; it does not count as running).
local ns = ARGV[1]
local out = {}
for i = 2, #ARGV do
  local q = ns .. ':' .. ARGV[i]
  local oldest = -1
  local first = redis.call('LINDEX', q, 0)
  if first then
    local body = redis.call('HGET', q .. '.msgs', first)
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
  table.insert(out, redis.call('LLEN', q))
  table.insert(out, redis.call('HLEN', q .. '.DQ.msgs'))
  table.insert(out, redis.call('ZCARD', q .. '.XQ'))
  table.insert(out, tostring(oldest))
end
local running = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, 4999)) do
  local job = redis.call('HMGET', ns .. ':job:' .. id, 'app', 'status')
  local app = job[1]
  if app and job[2] == 'running' then
    running[app] = (running[app] or 0) + 1
  end
end
local apps = {}
for app, count in pairs(running) do
  table.insert(apps, app)
  table.insert(apps, count)
end
return {out, apps, redis.call('ZCARD', KEYS[2])}
