-- release: free the slot of a reservation and reconcile its reserved tokens with the real usage, on the key's
-- limits and, when the admission was also a tenant's (tenant_limits), on the tenant's. An admission whose call was
-- never made (a budget refused the job, or its start found it ended or running elsewhere) is withdrawn whole: its
-- request and its reserved tokens leave the window, as if it had never been admitted.
--
-- KEYS  1 tok  2 amt  3 state  4 lease  5 req (as in acquire.lua); optionally 6-10 the same of the tenant
-- ARGV  1 reservation ("rid.admitted_us.reserved_tokens")  2 actual tokens (-1 = unknown, keep the estimate)
--       3 window_us  4 fake now ('' = TIME)  5 '1': the call was never made (withdraw the admission)
-- Returns 1 when the key's slot was still held, 0 when it was already released or had lapsed.

local reservation = ARGV[1]
local actual, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = clock(ARGV[4])
local withdrawn = ARGV[5] == '1'
local rid, admitted, reserved = string.match(reservation, '^([^.]+)%.(%d+)%.(%d+)$')
if not rid then
  return redis.error_reply('malformed reservation')
end
admitted, reserved = tonumber(admitted), tonumber(reserved)

-- Take back an admission whose call was never made: its request, its step of the pacing, and its tokens while
-- they are in the window.
local function withdraw(tok, amt, state, req)
  if redis.call('ZREM', req, rid) == 1 then
    local pacing = redis.call('HMGET', state, 'tat', 'pace')
    if pacing[1] and pacing[2] then
      redis.call('HSET', state, 'tat', tonumber(pacing[1]) - tonumber(pacing[2]))
    end
  end
  local current = tonumber(redis.call('HGET', amt, rid))
  if current ~= nil then
    redis.call('HDEL', amt, rid)
    redis.call('ZREM', tok, rid)
    local total = tonumber(redis.call('HGET', state, 'tok') or 0) - current
    redis.call('HSET', state, 'tok', math.max(0, total))
  end
end

local function settle(tok, amt, state, lease, req)
  local held = redis.call('ZREM', lease, reservation)
  if withdrawn then
    withdraw(tok, amt, state, req)
    return held
  end
  -- The slot: feed the mean hold time used to estimate when slots free up.
  local known = redis.call('HMGET', state, 'hold', 'kept')
  if held == 1 then
    local took = math.max(0, now - admitted)
    local mean = tonumber(known[1] or 0)
    if mean > 0 then mean = mean + 0.2 * (took - mean) else mean = took end
    redis.call('HSET', state, 'hold', math.max(1, math.floor(mean)))
  end

  -- The tokens: while the reservation is in the window, its amount becomes the real one (down or up);
  -- once it has left the window, only tokens beyond the estimate are still owed, and are charged now.
  if actual >= 0 then
    local cutoff = now - window
    trim_tokens(tok, amt, state, cutoff)
    local current = tonumber(redis.call('HGET', amt, rid))
    local entered = false  -- a new entry in the log, which the admission's TTLs may not cover
    if current == nil and admitted > cutoff then
      current = 0  -- reserved nothing (or the entry was dropped): account at the admission time
      redis.call('ZADD', tok, admitted, rid)
      redis.call('HSET', amt, rid, 0)
      entered = true
    end
    if current ~= nil then
      if actual ~= current then
        redis.call('HSET', amt, rid, actual)
        redis.call('HINCRBY', state, 'tok', actual - current)
      end
    elseif actual > reserved then
      local extra = rid .. '+'
      if redis.call('HEXISTS', amt, extra) == 0 then
        redis.call('ZADD', tok, now, extra)
        redis.call('HSET', amt, extra, actual - reserved)
        redis.call('HINCRBY', state, 'tok', actual - reserved)
        entered = true
      end
    end
    if entered then
      for _, key in ipairs({tok, amt, state}) do keep(key, window) end
    end
  end
  -- The admission left these keys alive past its entries' window (keep_window); a state without the field it
  -- writes there (gone meanwhile, or written only by a waiting line) is given its TTL here.
  if not known[2] then
    keep(state, window)
  end
  return held
end

local held = settle(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
if #KEYS >= 10 then
  settle(KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10])
end
return held
