-- Record the Dify task id of a running job's call, where a cancel finds it to stop the task, and its workflow run
-- id, which a later attempt follows instead of running the workflow again (a worker lost mid-run). Returns 1 when
-- the job's cancel was asked before (that cancel found no task id: the caller stops the task), else 0. A job that
-- is no longer running is left as it is.
-- KEYS: 1 job hash
-- ARGV: 1 task id, 2 workflow run id ('' = none)
if redis.call('HGET', KEYS[1], FIELD.status) ~= STATUS.running then
  return 0
end
redis.call('HSET', KEYS[1], FIELD.task_id, ARGV[1])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], FIELD.dify_run_id, ARGV[2])
end
if redis.call('HGET', KEYS[1], FIELD.cancel_requested) == '1' then
  return 1
end
return 0
