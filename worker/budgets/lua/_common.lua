-- Helpers shared by every budget script; worker/budgets/ledger.py prepends this file to each script.
-- Amounts are integers: tokens, or units of 1e-7 of a currency (Dify's price step). Times are Unix milliseconds.
-- A reservation is a member '{rid}|{amount}|{period}|{subject}' of a budget's reservations ZSET (score: its
-- deadline); the budget's reserved HASH sums the live ones by '{period}|{subject}'.

-- Take `amount` off a reserved figure, dropping the field at zero.
local function unreserve(reserved, field, amount)
  if amount <= 0 then
    return
  end
  local left = redis.call('HINCRBY', reserved, field, -amount)
  if left <= 0 then
    redis.call('HDEL', reserved, field)
  end
end

-- Give back the reservations whose deadline passed: their worker died, or lost Redis for a whole hold.
local function reclaim(reserved, reservations, now)
  local lapsed = redis.call('ZRANGEBYSCORE', reservations, '-inf', now, 'LIMIT', 0, 1000)
  for _, member in ipairs(lapsed) do
    local amount, field = string.match(member, '^[^|]*|(%d+)|(.*)$')
    if amount then
      unreserve(reserved, field, tonumber(amount))
    end
    redis.call('ZREM', reservations, member)
  end
end
