-- success: a call went through, so the next 429 starts the cooldown from the base again.
--
-- KEYS  1 cool
-- Returns 1 when a streak was reset, 0 when there was nothing to reset (and nothing was written).
-- A cooldown already running is left to finish.

if redis.call('HEXISTS', KEYS[1], 'streak') == 1 then
  redis.call('HDEL', KEYS[1], 'streak')
  return 1
end
return 0
