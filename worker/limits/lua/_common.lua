-- Helpers shared by every limiter script; worker/limits/scripts.py prepends this file to each script (after
-- _cooldown.lua, which has the clock).
-- Times are integer microseconds from Redis TIME, so every host agrees on "now".
-- Lua's own number-to-string conversion keeps only 14 digits, so numbers that are concatenated into
-- strings go through fmt(); numbers passed to redis.call are converted by Redis with full precision.

local SLACK = 60000000  -- 60 s added to every TTL

local function fmt(n)
  return string.format('%.0f', n)
end

-- Make a key live at least ttl_us more (plus slack); never shortens a TTL, ignores a missing key, and skips
-- the write while more than half the slack is still left.
local function keep(key, ttl_us)
  local want = math.ceil((ttl_us + SLACK) / 1000)
  local current = redis.call('PTTL', key)
  if current == -1 or (current >= 0 and current < want - SLACK / 2000) then
    redis.call('PEXPIRE', key, want)
  end
end

-- Keep the window keys of one set of limits (L.req, L.tok, L.amt and L.state) alive the window plus slack more.
-- Asking each key its TTL would cost a call per key per admission, so state's field `kept` holds the time (clock
-- microseconds) until which all four surely live: they are refreshed together once less than half the slack is
-- left, or when state expired and took the field with it. `born` lists the keys this admission brought back from
-- empty (so without a TTL), which get theirs at once.
local function keep_window(L, window, now, born)
  local want = math.ceil((window + SLACK) / 1000)
  local kept = tonumber(redis.call('HGET', L.state, 'kept') or 0)
  if kept < now + window + SLACK / 2 then
    for _, key in ipairs({L.req, L.tok, L.amt}) do redis.call('PEXPIRE', key, want) end
    redis.call('HSET', L.state, 'kept', fmt(now + window + SLACK))
    if redis.call('PTTL', L.state) < want then  -- state may live longer already (a waiting line's clock)
      redis.call('PEXPIRE', L.state, want)
    end
    return
  end
  for _, key in ipairs(born) do redis.call('PEXPIRE', key, want) end
end

-- Run a variadic command over a list in chunks (Lua's unpack has a stack limit).
local function chunked(command, key, items)
  for i = 1, #items, 1000 do
    redis.call(command, key, unpack(items, i, math.min(i + 999, #items)))
  end
end

-- Tokens currently counted in the window (self-healing: an empty log means zero), and the log's entry count.
local function token_total(tok, state)
  local entries = redis.call('ZCARD', tok)
  if entries == 0 then
    return 0, 0
  end
  return math.max(0, tonumber(redis.call('HGET', state, 'tok') or 0)), entries
end

-- Drop token-log entries at or before cutoff and subtract their amounts from the running total.
local function trim_tokens(tok, amt, state, cutoff)
  local gone = redis.call('ZRANGEBYSCORE', tok, '-inf', cutoff)
  if #gone == 0 then
    return
  end
  local freed = 0
  for i = 1, #gone, 1000 do
    local last = math.min(i + 999, #gone)
    local amounts = redis.call('HMGET', amt, unpack(gone, i, last))
    for _, amount in ipairs(amounts) do
      freed = freed + (tonumber(amount) or 0)
    end
    redis.call('HDEL', amt, unpack(gone, i, last))
  end
  redis.call('ZREMRANGEBYSCORE', tok, '-inf', cutoff)
  local total = tonumber(redis.call('HGET', state, 'tok') or 0) - freed
  if total < 0 or redis.call('ZCARD', tok) == 0 then
    total = 0
  end
  redis.call('HSET', state, 'tok', total)
end
