-- acquire: check cooldown, requests, tokens and concurrency of one Dify key and admit all or nothing.
--
-- KEYS  1 req (ZSET rid -> admit time)        2 tok (ZSET rid -> time; token log)
--       3 amt (HASH rid -> tokens)             4 state (HASH tok = tokens in window, hold = mean slot hold)
--       5 lease (ZSET reservation -> expiry)   6 line (ZSET ticket -> place: waiting since - priority offset)
--       7 due (ZSET ticket -> told to return at)  8 need (HASH ticket -> estimated tokens)
--       9 cool (HASH until, streak)
-- ARGV  1 ticket  2 rid  3 limited (1|0)  4 rpm  5 tpm  6 max concurrency (0 = none)  7 estimated tokens
--       8 lease_us  9 window_us  10 waiting_since_us (-1 = none)  11 grace_us  12 poll_us
--       13 burst (requests admitted at once before pacing; 0 or rpm = no pacing)  14 fake now ('' = TIME)
--       15 priority offset_us (the job's priority level x jobs.priority_step: how far ahead of its waiting time
--          it joins the line; negative for a low priority)
-- Returns {admitted 1|0, wait_us, limit or '', reservation or '', 1 when the key has a 429 streak to reset on success
-- (admitted only)}.

local req, tok, amt, state, lease = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local line, due, need, cool = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local ticket, rid = ARGV[1], ARGV[2]
local limited = ARGV[3] == '1'
local rpm, tpm, conc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local est = tonumber(ARGV[7])
local lease_us, window = tonumber(ARGV[8]), tonumber(ARGV[9])
local since = tonumber(ARGV[10])
local grace, poll = tonumber(ARGV[11]), tonumber(ARGV[12])
local burst = tonumber(ARGV[13])
local now = clock(ARGV[14])
local priority_offset = tonumber(ARGV[15])

-- The binding limit: the one whose earliest admission time is latest.
local blocked_at, blocked_by = now, nil
local function block(at, name)
  at = math.max(at, now + 1)
  if blocked_by == nil or at > blocked_at then
    blocked_at, blocked_by = at, name
  end
end

-- 1. Upstream cooldown (a Dify 429): applies whether or not the app has limits.
local cool_until = tonumber(redis.call('HGET', cool, 'until') or 0)
if cool_until > now then
  block(cool_until, 'upstream')
end
if not limited then
  if blocked_by then
    return {0, math.ceil(blocked_at - now), blocked_by, ''}
  end
  return {1, 0, '', '', redis.call('HEXISTS', cool, 'streak')}
end

-- 2. Forget what has left the window, reclaim lapsed leases, drop waiters that never came back.
local cutoff = now - window
redis.call('ZREMRANGEBYSCORE', req, '-inf', cutoff)
trim_tokens(tok, amt, state, cutoff)
redis.call('ZREMRANGEBYSCORE', lease, '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', due, '-inf', now - grace)
if #gone > 0 then
  chunked('ZREM', line, gone)
  chunked('ZREM', due, gone)
  chunked('HDEL', need, gone)
end

-- 3. Our place in the waiting line: the first deferral time moved ahead by the job's priority, kept by the line
-- or brought back by the caller. A higher priority goes before every lower one that has waited less than the
-- offset between them (jobs.priority_step per level): that bounds how long a low priority can be passed over.
local mine = tonumber(redis.call('ZSCORE', line, ticket))
local queued = mine ~= nil
if not queued then
  mine = now
  if since >= 0 and since < now then
    mine = since
  end
  mine = mine - priority_offset
end
-- Waiters ahead of us: in line order (first deferral, then ticket) if we are queued; a job joining the line
-- goes behind everyone with the same or an earlier time.
local older
if queued then
  older = redis.call('ZRANK', line, ticket)
else
  older = redis.call('ZCOUNT', line, '-inf', fmt(mine))
end
local function ahead_of_us(score, waiter)
  if score < mine then return true end
  if score > mine then return false end
  return not queued or waiter < ticket
end

-- Holds: the oldest waiter always holds one unit of every limit (so it cannot starve), and every older
-- waiter that is due back now holds one too (so the capacity computed for it is not taken by a newcomer).
local hold_n, hold_tok = 0, 0
if older > 0 then
  local head = redis.call('ZRANGE', line, 0, 0)[1]
  hold_n = 1
  hold_tok = tonumber(redis.call('HGET', need, head) or 0)
  local returning = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, 256)
  for _, waiter in ipairs(returning) do
    if waiter ~= head and waiter ~= ticket then
      local score = tonumber(redis.call('ZSCORE', line, waiter))
      if score and ahead_of_us(score, waiter) then
        hold_n = hold_n + 1
        hold_tok = hold_tok + tonumber(redis.call('HGET', need, waiter) or 0)
      end
    end
  end
end

-- 4. Requests: an exact sliding log. Admit when fewer than rpm requests (plus holds) are in the window.
local count = redis.call('ZCARD', req)
if rpm > 0 and count + hold_n + 1 > rpm then
  -- Earliest time for position `older` in line: replay the log with every older waiter admitted as early as
  -- possible; request j may start once request j - rpm is a full window old.
  local j, steps = count + older + 1, 0
  while j > count do
    j = j - rpm
    steps = steps + 1
  end
  local at = nil
  if j >= 1 then
    at = tonumber(redis.call('ZRANGE', req, j - 1, j - 1, 'WITHSCORES')[2])
  end
  for _ = 1, steps do
    if at then at = math.max(now, at + window) else at = now end
  end
  block(at, 'requests')
end
-- Pacing (GCRA): after a burst, requests are spaced window/rpm apart, so a saturated key does not replay its
-- first burst every window (the log alone would) and providers that enforce per-second shares see a steady rate.
-- A burst of the full limit never binds before the log does (GCRA would allow burst + rpm per window): skipped.
local interval, tat = 0, now
if rpm > 0 and burst > 0 and burst < rpm then
  interval = window / rpm
  tat = math.max(now, tonumber(redis.call('HGET', state, 'tat') or 0))
  local tolerance = (burst - 1) * interval
  if tat + hold_n * interval - tolerance > now then
    block(tat + older * interval - tolerance, 'requests')
  end
end

-- 5. Tokens: reserved estimates (reconciled on release) in the same sliding window.
local total = token_total(tok, state)
if tpm > 0 and total + hold_tok + est > tpm and not (total == 0 and hold_n == 0) then
  -- Tokens every older waiter will reserve first (exact for the first 512, extrapolated beyond).
  local ahead = 0
  if older > 0 then
    local sample = redis.call('ZRANGE', line, 0, math.min(older, 512) - 1)
    local amounts = redis.call('HMGET', need, unpack(sample))
    for _, amount in ipairs(amounts) do
      ahead = ahead + (tonumber(amount) or est)
    end
    ahead = ahead * older / #sample
  end
  local wanted = ahead + est
  local at = nil
  if wanted > tpm then
    -- Cannot share a window with today's log: wait for the log to empty, then whole windows for those ahead.
    local last = redis.call('ZRANGE', tok, -1, -1, 'WITHSCORES')
    at = now
    if #last > 0 then at = math.max(now, tonumber(last[2]) + window) end
    at = at + window * math.floor(ahead / tpm)
  else
    -- Walk the log oldest first until enough tokens have left the window.
    local excess, freed, start, latest = total + wanted - tpm, 0, 0, now - window
    while at == nil do
      local chunk = redis.call('ZRANGE', tok, start, start + 127, 'WITHSCORES')
      if #chunk == 0 then
        at = latest + window  -- the whole log has left by then (and an empty log counts as zero)
        break
      end
      latest = tonumber(chunk[#chunk])
      local members = {}
      for i = 1, #chunk, 2 do members[#members + 1] = chunk[i] end
      local amounts = redis.call('HMGET', amt, unpack(members))
      for i, amount in ipairs(amounts) do
        freed = freed + (tonumber(amount) or 0)
        if freed >= excess then
          at = tonumber(chunk[2 * i]) + window
          break
        end
      end
      start = start + 128
    end
  end
  block(at, 'tokens')
end

-- 6. Concurrency: live leases (expired ones were reclaimed above).
local in_use = redis.call('ZCARD', lease)
if conc > 0 and in_use + hold_n + 1 > conc then
  -- Slots that must free before our turn; each holder is expected to finish after the mean hold time seen on
  -- this key (or to be polled every poll_us while nothing is known), and surely by its lease expiry.
  local wanted = in_use + older + 1 - conc
  local mean = tonumber(redis.call('HGET', state, 'hold') or 0)
  local typical = mean > 0 and mean or poll
  local soonest = now + math.max(poll / 10, mean / 4)
  local ends = {}
  local holders = redis.call('ZRANGE', lease, 0, -1, 'WITHSCORES')
  for i = 1, #holders, 2 do
    local expiry = tonumber(holders[i + 1])
    local started = tonumber(string.match(holders[i], '^[^.]*%.(%d+)%.')) or now
    local expected = now + poll
    if mean > 0 then expected = math.max(started + mean, soonest) end
    ends[#ends + 1] = math.min(expiry, expected)
  end
  table.sort(ends)
  local at
  if wanted <= #ends then
    at = ends[wanted]
  else
    at = (ends[#ends] or now) + typical * math.ceil((wanted - #ends) / conc)
  end
  block(at, 'concurrency')
end

-- 7. Admit all at once, or nothing.
if blocked_by == nil then
  local reservation = rid .. '.' .. fmt(now) .. '.' .. fmt(est)
  redis.call('ZADD', req, now, rid)
  if interval > 0 then
    redis.call('HSET', state, 'tat', tat + interval)
  end
  if est > 0 then
    redis.call('ZADD', tok, now, rid)
    redis.call('HSET', amt, rid, est)
    redis.call('HINCRBY', state, 'tok', est)
  end
  redis.call('ZADD', lease, now + lease_us, reservation)
  if queued then
    redis.call('ZREM', line, ticket)
    redis.call('ZREM', due, ticket)
    redis.call('HDEL', need, ticket)
  end
  for _, key in ipairs({req, tok, amt, state}) do keep(key, window) end
  keep(lease, lease_us)
  return {1, 0, '', reservation, redis.call('HEXISTS', cool, 'streak')}
end

redis.call('ZADD', line, 'NX', mine, ticket)
redis.call('ZADD', due, blocked_at, ticket)
redis.call('HSET', need, ticket, est)
for _, key in ipairs({line, due, need}) do keep(key, blocked_at - now + grace) end
return {0, math.ceil(blocked_at - now), blocked_by, ''}  -- rounded up: never back a microsecond early
