-- upstream: Dify (or its model provider) answered 429; cool the key down for every worker.
--
-- KEYS  1 cool (HASH until, streak)
-- ARGV  1 base_us  2 cap_us  3 memory_us (how long the streak outlives its cooldown)  4 fake now ('' = TIME)
-- Returns the cooldown left in microseconds. A 429 that arrives while the key is already cooling came from a
-- call started before the cooldown, so it does not double it again: one streak step per cooldown.

local cool = KEYS[1]
local base, cap, memory = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = clock(ARGV[4])
local left = cooldown(cool, now)
if left > 0 then
  return left
end
local streak = redis.call('HINCRBY', cool, 'streak', 1)
local span = math.min(cap, base * math.pow(2, math.min(streak - 1, 60)))
redis.call('HSET', cool, 'until', now + span)
redis.call('PEXPIRE', cool, math.ceil((span + memory) / 1000))
return span
