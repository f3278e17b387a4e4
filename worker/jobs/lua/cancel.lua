-- Cancel: a queued or paused job ends canceled now (and its callback is enqueued); a running one is flagged so the worker
-- ends it canceled after Dify's stop; a final one is left as it is. A paused job's reply carries the task id of its
-- paused run (the caller stops the run at Dify), a running job's the task id of its call (or, following a resumed run,
-- of that run's first call).
-- A job canceled now leaves its app's and its client's pending jobs, the paused jobs and its thread's line (the
-- thread's next job gets its message when this one was first; a waiting one drops the message it held).
-- KEYS: 1 job hash, 2 callback queue, 3 callback bodies, 4 the app's pending jobs, 5 the client's pending jobs
--       ('' when no API client submitted it), 6 paused zset, 7 the thread's line ('' for a job of no thread),
--       8 jobs queue, 9 jobs queue bodies, 10 the jobs queue's wake token, 11 the callbacks' due index
-- ARGV: 1 a JSON object: now (unix seconds), retention_ms, and for a job with a callback URL its pending block
--       (callback, JSON) and message (message_id, message_body, message_due_ms), job_prefix (the key of a job is it
--       and its id)
local cancel = cjson.decode(ARGV[1])

-- The task id of the job's paused run ('' when the job never paused).
local function paused_task_id()
  local pause = cjson.decode(redis.call('HGET', KEYS[1], FIELD.pause) or '{}')
  return type(pause.task_id) == 'string' and pause.task_id or ''
end
local status = redis.call('HGET', KEYS[1], FIELD.status)
if not status then
  return {'missing'}
end
if status == STATUS.queued or status == STATUS.paused then
  redis.call('HSET', KEYS[1], FIELD.status, STATUS.canceled, FIELD.finished_at, cancel.now, FIELD.cancel_requested, '1')
  local id = redis.call('HGET', KEYS[1], FIELD.id)
  if redis.call('HEXISTS', KEYS[1], FIELD.callback_url) == 1 then
    redis.call('HSET', KEYS[1], FIELD.callback, cancel.callback)
    enqueue_callback(KEYS[1], id, KEYS[2], KEYS[3], KEYS[11], cancel.message_id, cancel.message_body,
      cancel.message_due_ms)
  end
  redis.call('PEXPIRE', KEYS[1], cancel.retention_ms)
  leave_pending(id, KEYS[4], KEYS[5])
  redis.call('HDEL', KEYS[1], FIELD.held_message)
  leave_thread(id, KEYS[7], cancel.job_prefix, KEYS[8], KEYS[9], KEYS[10])
  if status == STATUS.paused then
    redis.call('ZREM', KEYS[6], id)
    return {'canceled', paused_task_id()}
  end
  return {'canceled'}
end
if status == STATUS.running then
  redis.call('HSET', KEYS[1], FIELD.cancel_requested, '1')
  return {'running', redis.call('HGET', KEYS[1], FIELD.task_id) or paused_task_id()}
end
return {status}
