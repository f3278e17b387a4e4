-- The fire's job is enqueued: the guard says so for as long as idempotency keys are kept.
-- KEYS: 1 the fire's guard; ARGV: 1 holder, 2 ttl ms
local mark = redis.call('GET', KEYS[1])
if not mark or mark == 'pending:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'fired:' .. ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
