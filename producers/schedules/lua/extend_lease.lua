-- Renew the leader lease if this replica holds it.
-- KEYS: 1 leader lease; ARGV: 1 holder, 2 ttl ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
