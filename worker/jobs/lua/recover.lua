-- Hand back what dead Dramatiq consumers held. A worker process that stopped heartbeating (SIGKILL, OOM kill, a
-- lost node) leaves every message it had fetched (running or only prefetched, delayed ones included) in its ack
-- sets; Dramatiq recovers them only when a live consumer's 0.1 % maintenance roll hits that very queue. Here each
-- dead consumer's messages go back to the front of their queue at once and the consumer is forgotten. A message
-- whose job is already running or final elsewhere is harmless: the job record decides (start.lua).
-- KEYS: 1 heartbeats zset
-- ARGV: 1 namespace, 2 dead if the last heartbeat is older than this (ms), 3.. queue names (.DQ ones included)
local recovered = 0
for _, broker in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])) do
  for i = 3, #ARGV do
    local queue = ARGV[1] .. ':' .. ARGV[i]
    local acks = ARGV[1] .. ':__acks__.' .. broker .. '.' .. ARGV[i]
    for _, id in ipairs(redis.call('SMEMBERS', acks)) do
      if redis.call('HEXISTS', queue .. '.msgs', id) == 1 then
        redis.call('LPUSH', queue, id)
        wake(queue)
        recovered = recovered + 1
      end
    end
    redis.call('DEL', acks)
  end
  redis.call('ZREM', KEYS[1], broker)
end
return recovered
