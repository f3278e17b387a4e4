-- Store a final outcome once and start the retention clock; a job with a callback URL either gets its callback
-- message in the same step or, when the caller sends the first attempt itself ("inline"), keeps its lease (the
-- reaper enqueues the callback if that worker dies before recording the attempt) and the callback lock, and gets
-- the stored record back to build the callback body from.
-- A cancel requested while the call ran turns a success into canceled (the partial result is kept).
-- KEYS: 1 job hash, 2 leases zset, 3 callback queue, 4 callback bodies, 5 callback lock
-- ARGV: 1 status, 2 finished_at, 3 result json ("" = none), 4 error json ("" = none), 5 retention ms,
--       6 callback redis message id ("" = no callback message), 7 callback body, 8 callback state json
--       ("" = no callback), 9 inline: lease expiry ms ("" = enqueue the message), 10 inline: lock ttl ms
-- Returns {final status} or {'already:<status>'} or {'missing'}; inline, {final status, field, value, ...}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {'missing'}
end
if status == 'succeeded' or status == 'failed' or status == 'canceled' then
  return {'already:' .. status}
end
local final = ARGV[1]
if final == 'succeeded' and redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  final = 'canceled'
end
redis.call('HSET', KEYS[1], 'status', final, 'finished_at', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'result', ARGV[3])
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local id = redis.call('HGET', KEYS[1], 'id')
if ARGV[8] ~= '' and ARGV[9] ~= '' then
  redis.call('HSET', KEYS[1], 'callback', ARGV[8])
  redis.call('ZADD', KEYS[2], ARGV[9], id)
  redis.call('SET', KEYS[5], '1', 'PX', ARGV[10])
  local reply = redis.call('HGETALL', KEYS[1])
  table.insert(reply, 1, final)
  return reply
end
redis.call('ZREM', KEYS[2], id)
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'callback', ARGV[8])
  redis.call('HSET', KEYS[4], ARGV[6], ARGV[7])
  redis.call('RPUSH', KEYS[3], ARGV[6])
  wake(KEYS[3])
end
return {final}
