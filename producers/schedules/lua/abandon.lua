-- Give up a claim this replica holds (its submit failed), so the fire can be claimed again.
-- KEYS: 1 the fire's guard; ARGV: 1 holder
if redis.call('GET', KEYS[1]) == 'pending:' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
