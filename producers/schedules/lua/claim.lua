-- Claim one fire for this replica, if it holds the leader lease: 1 claimed, 0 already fired, 2 another replica
-- is submitting it, -1 not the leader.
-- KEYS: 1 leader lease, 2 the fire's guard; ARGV: 1 holder, 2 claim ttl ms
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local mark = redis.call('GET', KEYS[2])
if not mark or mark == 'pending:' .. ARGV[1] then
  redis.call('SET', KEYS[2], 'pending:' .. ARGV[1], 'PX', ARGV[2])
  return 1
end
if string.sub(mark, 1, 8) == 'pending:' then return 2 end
return 0
