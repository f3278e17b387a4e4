-- Store a final outcome once, drop the lease, start the retention clock and enqueue the callback with it.
-- A cancel requested while the call ran turns a success into canceled (the partial result is kept).
-- KEYS: 1 job hash, 2 leases zset, 3 callback queue, 4 callback bodies
-- ARGV: 1 status, 2 finished_at, 3 result json ("" = none), 4 error json ("" = none), 5 retention ms,
--       6 callback redis message id ("" = no callback), 7 callback body, 8 callback state json
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return 'missing'
end
if status == 'succeeded' or status == 'failed' or status == 'canceled' then
  return 'already:' .. status
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
redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'callback', ARGV[8])
  redis.call('HSET', KEYS[4], ARGV[6], ARGV[7])
  redis.call('RPUSH', KEYS[3], ARGV[6])
  redis.call('PUBLISH', KEYS[3], '1')
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return final
