-- status: each budget's spent and reserved figures in its current period, per subject (reclaiming lapsed
-- reservations first, so a dead worker's no longer count).
--
-- KEYS  3 per budget: spent (HASH of the current period), reserved, reservations
-- ARGV  1 JSON {now, budgets: [{period, subject ('' for every subject with a figure in the period)}]}
-- Returns one list per budget: {subject, spent, reserved, subject, spent, reserved, ...}.

local args = cjson.decode(ARGV[1])
local reply = {}
for index, budget in ipairs(args.budgets) do
  local spent, reserved, reservations = KEYS[3 * index - 2], KEYS[3 * index - 1], KEYS[3 * index]
  reclaim(reserved, reservations, args.now)
  local figures, order = {}, {}
  local function figure(subject)
    if figures[subject] == nil then
      figures[subject] = {0, 0}
      order[#order + 1] = subject
    end
    return figures[subject]
  end
  local prefix = budget.period .. '|'
  if budget.subject ~= '' then
    local one = figure(budget.subject)
    one[1] = tonumber(redis.call('HGET', spent, budget.subject) or 0)
    one[2] = tonumber(redis.call('HGET', reserved, prefix .. budget.subject) or 0)
  else
    local pairs_ = redis.call('HGETALL', spent)
    for i = 1, #pairs_, 2 do
      figure(pairs_[i])[1] = tonumber(pairs_[i + 1])
    end
    pairs_ = redis.call('HGETALL', reserved)
    for i = 1, #pairs_, 2 do
      if string.sub(pairs_[i], 1, #prefix) == prefix then
        figure(string.sub(pairs_[i], #prefix + 1))[2] = tonumber(pairs_[i + 1])
      end
    end
  end
  local flat = {}
  for _, subject in ipairs(order) do
    flat[#flat + 1] = subject
    flat[#flat + 1] = figures[subject][1]
    flat[#flat + 1] = figures[subject][2]
  end
  reply[#reply + 1] = flat
end
return reply
