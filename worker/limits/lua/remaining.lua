-- remaining: what is in use of each limit right now (read-only, for the gauge).
--
-- KEYS  1 req  2 tok  3 amt  4 state  5 lease  6 cool
-- ARGV  1 window_us  2 fake now ('' = TIME)
-- Returns {requests in window, tokens in window, live leases, cooldown left in microseconds}.

local req, tok, amt, state, lease, cool = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local window = tonumber(ARGV[1])
local now = clock(ARGV[2])
local cutoff = now - window
local requests = redis.call('ZCOUNT', req, '(' .. fmt(cutoff), '+inf')
local tokens = token_total(tok, state)
local stale = redis.call('ZRANGEBYSCORE', tok, '-inf', cutoff)
for i = 1, #stale, 1000 do
  local amounts = redis.call('HMGET', amt, unpack(stale, i, math.min(i + 999, #stale)))
  for _, amount in ipairs(amounts) do
    tokens = tokens - (tonumber(amount) or 0)
  end
end
local in_use = redis.call('ZCOUNT', lease, '(' .. fmt(now), '+inf')
return {requests, math.max(0, tokens), in_use, (cooldown(cool, now))}
