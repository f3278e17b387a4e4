-- settle: a job's call ended; release its reservations and charge what Dify reported.
--
-- KEYS  1 estimates, then 3 per budget: spent (HASH of the reservation's period), reserved, reservations
-- ARGV  1 JSON {now, budgets: [{member, subject, charge (-1: nothing reported), spent_expire_at}],
--               samples: [{field, value}] (the job's real cost per '{app}|{unit}'), weight (of a new sample in the
--               mean)}
-- Returns how many reservations were still held. Only a held reservation is charged, so settling twice (a retry
-- after a lost reply) charges once; the samples are taken only then too.

local args = cjson.decode(ARGV[1])
local held = 0
for index, budget in ipairs(args.budgets) do
  local spent, reserved, reservations = KEYS[3 * index - 1], KEYS[3 * index], KEYS[3 * index + 1]
  if redis.call('ZREM', reservations, budget.member) == 1 then
    held = held + 1
    local amount, field = string.match(budget.member, '^[^|]*|(%d+)|(.*)$')
    unreserve(reserved, field, tonumber(amount))
    if budget.charge > 0 then
      redis.call('HINCRBY', spent, budget.subject, budget.charge)
      redis.call('PEXPIREAT', spent, budget.spent_expire_at)
    end
  end
  reclaim(reserved, reservations, args.now)
end
if held > 0 then
  for _, sample in ipairs(args.samples) do
    local mean = tonumber(redis.call('HGET', KEYS[1], sample.field) or '')
    if mean then
      mean = mean + args.weight * (sample.value - mean)
    else
      mean = sample.value
    end
    redis.call('HSET', KEYS[1], sample.field, string.format('%.3f', mean))
  end
end
return held
