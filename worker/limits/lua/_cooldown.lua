-- Redis time and a Dify key's upstream cooldown (a Dify 429), defined once for the scripts that read it: every
-- limiter script (worker/limits/scripts.py prepends this file, then _common.lua) and the job start (start.lua
-- checks the cooldown of a key without limits in the start's own round trip: such a key has no admission script).

if redis.replicate_commands then
  pcall(redis.replicate_commands)  -- effects replication (default from Redis 5; a no-op in 7)
end

-- Redis TIME in microseconds, or the test-only fake clock when one is passed.
local function clock(override)
  if override and override ~= '' then
    return tonumber(override)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The upstream cooldown of the key whose cooldown hash (HASH until, streak) is cool, at now: the microseconds it
-- still cools down (0: it does not), and 1 when the key has a run of 429s that a success should end (else 0).
local function cooldown(cool, now)
  local state = redis.call('HMGET', cool, 'until', 'streak')
  return math.max(0, math.ceil(tonumber(state[1] or 0) - now)), state[2] and 1 or 0
end
