-- reserve: check every budget a job falls under and reserve its estimated cost in all of them, or in none.
--
-- KEYS  1 estimates (HASH '{app}|{unit}' -> mean cost per job), then 3 per budget: spent (HASH subject -> spent in
--       this period), reserved (HASH '{period}|{subject}' -> reserved), reservations (ZSET member -> deadline)
-- ARGV  1 JSON {now, deadline, keep (ms the reservation keys outlive the deadline), rid, force (reserve even
--               without room: the job's Dify run is already under way),
--               budgets: [{subject, period, limit, estimate_field, estimate (used while the field has no mean)}]}
-- Returns {1, amount reserved per budget...}, or {0, then index (1-based), spent, reserved, estimate of every
-- budget without room}. A budget has no room once spent + reserved reaches its limit, or when the estimate would
-- take it over while anything is spent or reserved (so a budget smaller than one job still lets one through).

local args = cjson.decode(ARGV[1])
local estimates = KEYS[1]
local refused, amounts = {0}, {1}
for index, budget in ipairs(args.budgets) do
  local spent_key, reserved_key, reservations = KEYS[3 * index - 1], KEYS[3 * index], KEYS[3 * index + 1]
  reclaim(reserved_key, reservations, args.now)
  local mean = tonumber(redis.call('HGET', estimates, budget.estimate_field) or '')
  local estimate = math.ceil(mean or budget.estimate)
  local spent = tonumber(redis.call('HGET', spent_key, budget.subject) or 0)
  local reserved = tonumber(redis.call('HGET', reserved_key, budget.period .. '|' .. budget.subject) or 0)
  local counted = spent + reserved
  local full = counted >= budget.limit or (counted > 0 and counted + estimate > budget.limit)
  if full and not args.force then
    for _, value in ipairs({index, spent, reserved, estimate}) do
      refused[#refused + 1] = value
    end
  end
  amounts[#amounts + 1] = estimate
end
if #refused > 1 then
  return refused
end
for index, budget in ipairs(args.budgets) do
  local reserved, reservations = KEYS[3 * index], KEYS[3 * index + 1]
  local field = budget.period .. '|' .. budget.subject
  redis.call('ZADD', reservations, args.deadline, args.rid .. '|' .. amounts[index + 1] .. '|' .. field)
  if amounts[index + 1] > 0 then
    redis.call('HINCRBY', reserved, field, amounts[index + 1])
  end
  for _, key in ipairs({reserved, reservations}) do
    redis.call('PEXPIRE', key, args.deadline - args.now + args.keep)
  end
end
return amounts
