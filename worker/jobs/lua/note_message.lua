-- Record a run_job message that Dramatiq enqueued itself (the retry of a delivery that raised, a delayed message
-- moved to the queue when due) as the job's message, which the orphan sweep looks for; a job that no longer exists
-- is left alone.
-- KEYS: 1 job hash
-- ARGV: 1 redis message id
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], FIELD.message, ARGV[1])
end
return 0
