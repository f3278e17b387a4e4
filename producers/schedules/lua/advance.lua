-- Move a schedule's cursor forward (and its last fire), if this replica holds the leader lease; -1 if not.
-- KEYS: 1 leader lease, 2 schedule state hash; ARGV: 1 holder, 2 cursor ms, 3 spec, 4 state ttl ms,
--       5 last fire ms ('' = unchanged)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local spec = redis.call('HGET', KEYS[2], 'spec')
local cursor = tonumber(redis.call('HGET', KEYS[2], 'cursor'))
if spec ~= ARGV[3] or not cursor or tonumber(ARGV[2]) > cursor then
  redis.call('HSET', KEYS[2], 'cursor', ARGV[2], 'spec', ARGV[3])
end
if ARGV[5] ~= '' then
  local last = tonumber(redis.call('HGET', KEYS[2], 'last_fire'))
  if not last or tonumber(ARGV[5]) > last then redis.call('HSET', KEYS[2], 'last_fire', ARGV[5]) end
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
