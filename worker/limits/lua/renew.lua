-- renew: extend the lease of a slot still held by a long call (the key's, and its tenant's when it holds one).
--
-- KEYS  1 lease (the key's)  2 lease (the tenant's; optional)
-- ARGV  1 reservation  2 lease_us  3 fake now ('' = TIME)
-- Returns 1 when the key's slot was renewed, 0 when it was released or its lease had already lapsed (it is not
-- re-taken: a renewal racing a release must not resurrect the slot).

local reservation, lease_us = ARGV[1], tonumber(ARGV[2])
local now = clock(ARGV[3])

local function renew(lease)
  local expiry = tonumber(redis.call('ZSCORE', lease, reservation))
  if expiry == nil then
    return 0
  end
  if expiry <= now then
    redis.call('ZREM', lease, reservation)
    return 0
  end
  redis.call('ZADD', lease, now + lease_us, reservation)
  keep(lease, lease_us)
  return 1
end

local renewed = renew(KEYS[1])
if KEYS[2] then
  renew(KEYS[2])
end
return renewed
