-- acquire: check cooldown, requests, tokens and concurrency of one Dify key with limits (and of the job's tenant,
-- when the app sets tenant_limits) and admit all or nothing. A key without any has no admission: the job's start
-- checks its cooldown (start.lua).
--
-- KEYS  1 req (ZSET rid -> admit time)        2 tok (ZSET rid -> time; token log)
--       3 amt (HASH rid -> tokens)             4 state (HASH tok = tokens in window, hold = mean slot hold,
--                                                 tat = pacing, pace = its step, vt = the fair line's
--                                                 round now being admitted,
--                                                 kept = until when keys 1-4 surely live: keep_window)
--       5 lease (ZSET reservation -> expiry)   6 line (ZSET ticket -> place: waiting since - priority offset, or
--                                                 with fairness the job's round - priority offset)
--       7 due (ZSET ticket -> told to return at)  8 need (HASH ticket -> estimated tokens)
--       9 cool (HASH until, streak)            10 rounds (ZSET tenant -> the round of its last job in the fair line)
--       11 low (ZSET ticket -> place: the waiters of a priority below normal, with a minimum share)
--       12-19 the tenant's req, tok, amt, state, lease, line, due, need (its own limits and waiting line)
-- ARGV  1 ticket  2 rid  3 rpm  4 tpm  5 max concurrency (0 = none)  6 estimated tokens
--       7 lease_us  8 window_us  9 waiting_since_us (-1 = none)  10 grace_us  11 poll_us
--       12 burst (requests admitted at once before pacing; 0 or rpm = no pacing)  13 fake now ('' = TIME)
--       14 priority offset_us (the job's priority level x jobs.priority_step: how far ahead of its waiting time
--          it joins the line; negative for a low priority)
--       15 fairness (1 = round-robin across tenants)  16 tenant
--       17 tenant rpm  18 tenant tpm  19 tenant max concurrency (0 = none each)
--       20 the minimum share of the key's admissions that goes to jobs below normal priority while they wait
--          (jobs.low_priority_min_share; 0 = none)
-- Returns {admitted 1|0, wait_us, limit or '', reservation or '', 1 when the key has a 429 streak to reset on success
-- (admitted only)}.

local K = {req = KEYS[1], tok = KEYS[2], amt = KEYS[3], state = KEYS[4], lease = KEYS[5], line = KEYS[6],
           due = KEYS[7], need = KEYS[8], low = KEYS[11]}
local cool, rounds = KEYS[9], KEYS[10]
local T = {req = KEYS[12], tok = KEYS[13], amt = KEYS[14], state = KEYS[15], lease = KEYS[16], line = KEYS[17],
           due = KEYS[18], need = KEYS[19]}
local ticket, rid = ARGV[1], ARGV[2]
local rpm, tpm, conc = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local est = tonumber(ARGV[6])
local lease_us, window = tonumber(ARGV[7]), tonumber(ARGV[8])
local since = tonumber(ARGV[9])
local grace, poll = tonumber(ARGV[10]), tonumber(ARGV[11])
local burst = tonumber(ARGV[12])
local now = clock(ARGV[13])
local priority_offset = tonumber(ARGV[14])
local fair, tenant = ARGV[15] == '1', ARGV[16]
local trpm, ttpm, tconc = tonumber(ARGV[17]), tonumber(ARGV[18]), tonumber(ARGV[19])
local tenant_limited = trpm > 0 or ttpm > 0 or tconc > 0
local low_share = tonumber(ARGV[20])
local is_low = priority_offset < 0 and low_share > 0
local ROUND = 1000000  -- one round of the fair line, in the units of a place (so a priority offset is in rounds)

-- The job's place when it joins a line by its wait: the first deferral time (or now) moved by its priority.
local function waited_place()
  local place = now
  if since >= 0 and since < now then
    place = since
  end
  return place - priority_offset
end

-- Forget what has left the window of one set of limits, reclaim lapsed leases, drop waiters that never came back.
local function tidy(L)
  local cutoff = now - window
  redis.call('ZREMRANGEBYSCORE', L.req, '-inf', cutoff)
  trim_tokens(L.tok, L.amt, L.state, cutoff)
  redis.call('ZREMRANGEBYSCORE', L.lease, '-inf', now)
  local gone = redis.call('ZRANGEBYSCORE', L.due, '-inf', now - grace)
  if #gone > 0 then
    chunked('ZREM', L.line, gone)
    chunked('ZREM', L.due, gone)
    chunked('HDEL', L.need, gone)
    if L.low then chunked('ZREM', L.low, gone) end
  end
end

-- When one set of limits (a key's or a tenant's, each with its own waiting line) could admit the job, from its
-- place `mine` in that line (`queued`: the line holds it). Returns the earliest moment every limit of the set
-- admits it and the limit that binds (nil: it may go now), the pacing state to write on admission, and which of
-- the set's req, tok and lease keys are empty now (an admission brings them back without a TTL).
-- `favored`: the low-priority waiter owed its minimum share ({ticket, score}), which goes before everyone.
-- `low_turn`: for a low-priority job, how many admissions its share lets pass before its turn comes.
local function assess(L, rpm, tpm, conc, burst, mine, queued, prefix, favored, low_turn)
  local blocked_at, blocked_by = now, nil
  local function block(at, name)
    at = math.max(at, now + 1)
    if blocked_by == nil or at > blocked_at then
      blocked_at, blocked_by = at, prefix .. name
    end
  end


  -- Waiters ahead of us: in line order (place, then ticket) if we are queued; a job joining the line goes behind
  -- everyone with the same or an earlier place.
  local older
  if queued then
    older = redis.call('ZRANK', L.line, ticket)
  else
    older = redis.call('ZCOUNT', L.line, '-inf', fmt(mine))
  end
  local function ahead_of_us(score, waiter)
    if score < mine then return true end
    if score > mine then return false end
    return not queued or waiter < ticket
  end
  if favored then
    if favored.ticket == ticket then
      older = 0
    elseif not ahead_of_us(favored.score, favored.ticket) then
      older = older + 1
    end
  end
  if low_turn and low_turn < older then
    older = low_turn
  end

  -- Holds: the first waiter always holds one unit of every limit (so it cannot starve), and every waiter ahead
  -- of us that is due back now holds one too (so the capacity computed for it is not taken by a newcomer).
  local hold_n, hold_tok = 0, 0
  if older > 0 then
    local head = redis.call('ZRANGE', L.line, 0, 0)[1]
    if head ~= ticket then
      hold_n = 1
      hold_tok = tonumber(redis.call('HGET', L.need, head) or 0)
    end
    local returning = redis.call('ZRANGEBYSCORE', L.due, '-inf', now, 'LIMIT', 0, 256)
    for _, waiter in ipairs(returning) do
      if waiter ~= head and waiter ~= ticket then
        local score = tonumber(redis.call('ZSCORE', L.line, waiter))
        if score and (ahead_of_us(score, waiter) or (favored and favored.ticket == waiter)) then
          hold_n = hold_n + 1
          hold_tok = hold_tok + tonumber(redis.call('HGET', L.need, waiter) or 0)
        end
      end
    end
  end

  -- Requests: an exact sliding log. Admit when fewer than rpm requests (plus holds) are in the window.
  local count = redis.call('ZCARD', L.req)
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
      at = tonumber(redis.call('ZRANGE', L.req, j - 1, j - 1, 'WITHSCORES')[2])
    end
    for _ = 1, steps do
      if at then at = math.max(now, at + window) else at = now end
    end
    block(at, 'requests')
  end
  -- Pacing (GCRA): after a burst, requests are spaced window/rpm apart, so a saturated key does not replay its
  -- first burst every window (the log alone would) and providers that enforce per-second shares see a steady
  -- rate. A burst of the full limit never binds before the log does (GCRA would allow burst + rpm per window).
  local interval, tat = 0, now
  if rpm > 0 and burst > 0 and burst < rpm then
    interval = window / rpm
    tat = math.max(now, tonumber(redis.call('HGET', L.state, 'tat') or 0))
    local tolerance = (burst - 1) * interval
    if tat + hold_n * interval - tolerance > now then
      block(tat + older * interval - tolerance, 'requests')
    end
  end

  -- Tokens: reserved estimates (reconciled on release) in the same sliding window.
  local total, entries = token_total(L.tok, L.state)
  if tpm > 0 and total + hold_tok + est > tpm and not (total == 0 and hold_n == 0) then
    -- Tokens every older waiter will reserve first (exact for the first 512, extrapolated beyond).
    local ahead = 0
    if older > 0 then
      local sample = redis.call('ZRANGE', L.line, 0, math.min(older, 512) - 1)
      local amounts = redis.call('HMGET', L.need, unpack(sample))
      for _, amount in ipairs(amounts) do
        ahead = ahead + (tonumber(amount) or est)
      end
      ahead = ahead * older / #sample
    end
    local wanted = ahead + est
    local at = nil
    if wanted > tpm then
      -- Cannot share a window with today's log: wait for the log to empty, then whole windows for those ahead.
      local last = redis.call('ZRANGE', L.tok, -1, -1, 'WITHSCORES')
      at = now
      if #last > 0 then at = math.max(now, tonumber(last[2]) + window) end
      at = at + window * math.floor(ahead / tpm)
    else
      -- Walk the log oldest first until enough tokens have left the window.
      local excess, freed, start, latest = total + wanted - tpm, 0, 0, now - window
      while at == nil do
        local chunk = redis.call('ZRANGE', L.tok, start, start + 127, 'WITHSCORES')
        if #chunk == 0 then
          at = latest + window  -- the whole log has left by then (and an empty log counts as zero)
          break
        end
        latest = tonumber(chunk[#chunk])
        local members = {}
        for i = 1, #chunk, 2 do members[#members + 1] = chunk[i] end
        local amounts = redis.call('HMGET', L.amt, unpack(members))
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

  -- Concurrency: live leases (expired ones were reclaimed above).
  local in_use = redis.call('ZCARD', L.lease)
  if conc > 0 and in_use + hold_n + 1 > conc then
    -- Slots that must free before our turn; each holder is expected to finish after the mean hold time seen on
    -- these limits, and surely by its lease expiry. A holder past its expected end is looked at again a tenth of
    -- a hold later (at least poll_us / 100). While no hold has been seen, every waiter looks again once the
    -- holders are polled (poll_us): by then the first of them have ended and their holds are known.
    local wanted = in_use + older + 1 - conc
    local mean = tonumber(redis.call('HGET', L.state, 'hold') or 0)
    local soonest = now + math.max(poll / 100, mean / 10)
    local ends = {}
    local holders = redis.call('ZRANGE', L.lease, 0, -1, 'WITHSCORES')
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
    elseif mean > 0 then
      at = (ends[#ends] or now) + mean * math.ceil((wanted - #ends) / conc)
    else
      at = ends[#ends] or now + poll
    end
    block(at, 'concurrency')
  end
  return blocked_at, blocked_by, interval, tat, {req = count == 0, tok = entries == 0, lease = in_use == 0}
end

-- Record an admission against one set of limits and take the job out of its line (`queued`: it was in it).
-- `empty`: the keys that were empty before it (from assess).
local function charge(L, reservation, interval, tat, queued, empty)
  redis.call('ZADD', L.req, now, rid)
  if interval > 0 then
    redis.call('HSET', L.state, 'tat', tat + interval, 'pace', interval)  -- pace: what a withdrawal gives back
  end
  if est > 0 then
    redis.call('ZADD', L.tok, now, rid)
    redis.call('HSET', L.amt, rid, est)
    redis.call('HINCRBY', L.state, 'tok', est)
  end
  redis.call('ZADD', L.lease, now + lease_us, reservation)
  if queued then
    redis.call('ZREM', L.line, ticket)
    redis.call('ZREM', L.due, ticket)
    redis.call('HDEL', L.need, ticket)
    if L.low and is_low then redis.call('ZREM', L.low, ticket) end
  end
  local born = {}
  if empty.req then born[#born + 1] = L.req end
  if empty.tok and est > 0 then born[#born + 1], born[#born + 2] = L.tok, L.amt end
  keep_window(L, window, now, born)
  if empty.lease then
    redis.call('PEXPIRE', L.lease, math.ceil((lease_us + SLACK) / 1000))
  else
    keep(L.lease, lease_us)  -- never shortens: a renewal may have asked for more
  end
end

-- Wait (or keep waiting) in one line, told to come back at `at`.
local function wait_in(L, place, at)
  redis.call('ZADD', L.line, 'NX', place, ticket)
  redis.call('ZADD', L.due, at, ticket)
  redis.call('HSET', L.need, ticket, est)
  for _, key in ipairs({L.line, L.due, L.need}) do keep(key, at - now + grace) end
end

-- The fair line's clock when none is kept: the place of its first waiter (now for an empty line).
local function head_round()
  local head = redis.call('ZRANGE', K.line, 0, 0, 'WITHSCORES')
  return #head > 0 and tonumber(head[2]) or now
end

-- 1. Upstream cooldown (a Dify 429): binds like a limit (a key without limits has it checked by the job's start).
local cool_wait, cool_streak = cooldown(cool, now)

-- 2. The tenant's own limits, in its own line (first wait, moved by priority): a job its tenant's limits hold
-- back does not wait in the key's line, so it holds none of the key's capacity from other tenants.
local t_at, t_by, t_place, t_queued, t_empty = now, nil, nil, false, nil
if tenant_limited then
  tidy(T)
  t_place = tonumber(redis.call('ZSCORE', T.line, ticket))
  t_queued = t_place ~= nil
  if not t_queued then t_place = waited_place() end
  local _pace, _tat
  t_at, t_by, _pace, _tat, t_empty = assess(T, trpm, ttpm, tconc, 0, t_place, t_queued, 'tenant_')
end

-- 3. Our place in the key's line. By wait: the first deferral time moved ahead by the job's priority, kept by the
-- line or brought back by the caller; a higher priority goes before every lower one that has waited less than the
-- offset between them (jobs.priority_step per level). With fairness, by round (start-time fair queueing): a
-- tenant's next job joins one round after its previous one, and never before the round now being admitted, so a
-- tenant arriving with one job goes ahead of every later round of a tenant with a backlog; priority moves a job
-- a round per second of its offset.
tidy(K)
local mine = tonumber(redis.call('ZSCORE', K.line, ticket))
local queued = mine ~= nil
local round = nil
if fair then
  if queued then
    round = mine + priority_offset
  else
    local vt = tonumber(redis.call('HGET', K.state, 'vt') or head_round())
    round = math.max(vt, tonumber(redis.call('ZSCORE', rounds, tenant) or vt - ROUND) + ROUND)
    mine = round - priority_offset
  end
elseif not queued then
  mine = waited_place()
end

-- The minimum share of jobs below normal priority: `owed` (state lowdebt) grows by the share at each admission
-- while such jobs wait and drops by one at each of theirs; while it is positive the first of them (in line order)
-- goes before everyone. A low job is told its turn by that share: its rank among them times one over the share.
local favored, low_turn, owed, lows_waiting = nil, nil, 0, false
if low_share > 0 then
  local first = redis.call('ZRANGE', K.low, 0, 0, 'WITHSCORES')
  lows_waiting = #first > 0
  if lows_waiting or is_low then
    owed = tonumber(redis.call('HGET', K.state, 'lowdebt') or 0)
  end
  if owed > 0 and lows_waiting then
    favored = {ticket = first[1], score = tonumber(first[2])}
  elseif owed > 0 and is_low then
    favored = {ticket = ticket, score = mine}
  end
  if is_low then
    local rank = redis.call('ZRANK', K.low, ticket) or redis.call('ZCOUNT', K.low, '-inf', fmt(mine))
    local wait_for_share = owed > 0 and 0 or math.floor(-owed / low_share) + 1
    low_turn = wait_for_share + rank * math.ceil(1 / low_share)
  end
end

local blocked_at, blocked_by = now, nil
if cool_wait > 0 then
  blocked_at, blocked_by = now + cool_wait, 'upstream'
end
local k_at, k_by, interval, tat, k_empty = assess(K, rpm, tpm, conc, burst, mine, queued, '', favored, low_turn)
if k_by and (blocked_by == nil or k_at > blocked_at) then blocked_at, blocked_by = k_at, k_by end
if t_by and (blocked_by == nil or t_at > blocked_at) then blocked_at, blocked_by = t_at, t_by end

-- 4. Admit all at once, or nothing.
if blocked_by == nil then
  local reservation = rid .. '.' .. fmt(now) .. '.' .. fmt(est)
  if fair and (queued or redis.call('ZCARD', K.line) > 0) then
    -- The round this job was served in: the fair line's clock, and the tenant's last round (rounds behind the
    -- clock are forgotten: a tenant without a later round joins at the clock anyway).
    local vt = math.max(round, tonumber(redis.call('HGET', K.state, 'vt') or round))
    redis.call('HSET', K.state, 'vt', vt)
    if not queued then redis.call('ZADD', rounds, round, tenant) end
    redis.call('ZREMRANGEBYSCORE', rounds, '-inf', '(' .. fmt(vt - ROUND))
  end
  if is_low or lows_waiting then
    owed = math.max(-1, math.min(1, owed + low_share - (is_low and 1 or 0)))
    redis.call('HSET', K.state, 'lowdebt', owed)
  end
  charge(K, reservation, interval, tat, queued, k_empty)
  if tenant_limited then charge(T, reservation, 0, now, t_queued, t_empty) end
  return {1, 0, '', reservation, cool_streak}
end

if tenant_limited then
  wait_in(T, t_place, blocked_at)
end
if t_by then
  if queued then
    redis.call('ZREM', K.line, ticket)
    redis.call('ZREM', K.due, ticket)
    redis.call('HDEL', K.need, ticket)
    if is_low then redis.call('ZREM', K.low, ticket) end
  end
else
  if fair and not queued then
    redis.call('ZADD', rounds, round, tenant)
    keep(rounds, blocked_at - now + grace)
    keep(K.state, blocked_at - now + grace)  -- the line's clock lives as long as its waiters
  end
  wait_in(K, mine, blocked_at)
  if is_low then
    redis.call('ZADD', K.low, 'NX', mine, ticket)
    keep(K.low, blocked_at - now + grace)
  end
end
return {0, math.ceil(blocked_at - now), blocked_by, ''}  -- rounded up: never back a microsecond early
