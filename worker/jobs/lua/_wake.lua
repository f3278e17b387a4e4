-- Wake one idle consumer of a ready queue (worker/wakeup.py): a token on the queue's wake list, which each idle
-- consumer waits on with BLPOP, so one enqueue wakes one consumer, not all of them. At most 64 tokens wait: a
-- token left over after its message was fetched by a busy consumer costs an idle one a single empty fetch.
local function wake(queue_key)
  if string.sub(queue_key, -3) == '.DQ' then
    return  -- a delayed message: Dramatiq's delay-queue consumer moves it to the ready queue when it is due
  end
  local tokens = queue_key .. '.wake'
  if redis.call('LLEN', tokens) < 64 then
    redis.call('RPUSH', tokens, '1')
  end
end
