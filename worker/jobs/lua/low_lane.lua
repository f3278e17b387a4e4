-- Move the messages of jobs below normal priority from a queue's low lane onto the queue (worker/wakeup.py), in
-- one step, so a worker dying between the two lists loses none.
-- KEYS: 1 the low lane, 2 the queue, 3 the queue's express tail, 4 the queue's wake token
-- ARGV: 1 'fill': when the queue is empty, up to ARGV[2] messages go onto it (a worker found it empty and has that
--       many free threads); when the lane still holds messages the wake token is left, for another idle worker
--       (woken consumers are the ones that look at the lane).
--       'share': one message goes right after the express tail's (or at the head), ahead of every normal job.
-- Returns how many messages moved; -1 for a 'fill' that found messages on the queue (its consumer was full when it
-- fetched and an acknowledgement has made room since, or a message arrived since): the worker fetches again at once.
if ARGV[1] == 'share' then
  local message_id = redis.call('LPOP', KEYS[1])
  if not message_id then
    return 0
  end
  queue_after_express(KEYS[2], KEYS[3], message_id)
  return 1
end
if redis.call('LLEN', KEYS[2]) > 0 then
  -- The worker fetches at once, so it takes the token as its wait would have; while the lane holds messages a token
  -- stays, so that a worker looks at the lane once it has fetched these.
  if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[4])
  else
    wake(KEYS[4])
  end
  return -1
end
local wanted = tonumber(ARGV[2])
local moved = 0
while moved < wanted and redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do
  moved = moved + 1
end
if moved > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  wake(KEYS[4])
end
return moved
