-- cooldown: the admission of a call on a key without limits, which only the upstream cooldown (a Dify 429) holds
-- back; acquire.lua admits on a key with limits (and checks the cooldown there too).
--
-- KEYS  1 cool (HASH until, streak)
-- ARGV  1 fake now ('' = TIME)
-- Returns as acquire.lua: {admitted 1|0, wait_us, 'upstream' or '', '', 1 when the key has a 429 streak to reset on
-- success (admitted only)}.

local cool = KEYS[1]
local now = clock(ARGV[1])
local cooldown = redis.call('HMGET', cool, 'until', 'streak')
local cool_until = tonumber(cooldown[1] or 0)
if cool_until > now then
  return {0, math.ceil(cool_until - now), 'upstream', ''}
end
return {1, 0, '', '', cooldown[2] and 1 or 0}
