-- Record a message that Dramatiq enqueued itself (the retry of a delivery that raised, a delayed message moved to
-- the queue when due) as the job's latest of its kind, which the orphan sweep looks for: its run_job message
-- (FIELD.message) or its deliver_callback message (FIELD.callback_message); a job that no longer exists is left
-- alone.
-- KEYS: 1 job hash
-- ARGV: 1 redis message id, 2 the field that names it
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[1])
end
return 0
