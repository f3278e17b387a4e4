-- Store a final outcome once and start the retention clock; a job with a callback URL either gets its callback
-- message in the same step or, when the caller sends the first attempt itself ("inline"), keeps its lease (the
-- reaper enqueues the callback if that worker dies before recording the attempt) and the callback lock, and gets
-- the stored record back to build the callback body from.
-- A cancel requested while the call ran turns a success into canceled (the partial result is kept). A succeeded
-- job has no error; the error of a failed last attempt joins the attempt errors.
-- The job leaves its app's and its client's pending jobs, and a thread job its thread's line, in the same step as
-- the thread's next job gets its message (leave_thread) and the thread records the conversation the job had (when
-- the thread still has the conversation the job started from: a thread forgotten meanwhile is left forgotten).
-- The result's Dify ids come to name the job (a search by Dify id), entries older than the retention dropped.
-- KEYS: 1 job hash, 2 leases zset, 3 callback queue, 4 callback bodies, 5 callback lock, 6 the app's pending jobs,
--       7 the client's pending jobs ('' when no API client submitted it), 8 the thread's state, 9 its line ('' for
--       a job of no thread), 10 jobs queue, 11 jobs queue bodies, 12 the jobs queue's wake token, 13 the callbacks'
--       due index, 14.. the index of each of the result's Dify ids
-- ARGV: 1 a JSON object: id (the job's), status, finished_at, retention_ms, result and error (JSON texts, absent =
--       none), callback (the pending callback block, JSON), message_id, message_body and message_due_ms (the
--       callback message),
--       inline (absent = enqueue the message): {lease_expiry_ms, lock_ms, lock_holder (the callback lock's value)},
--       indexed_ms (now, for the Dify id indexes), thread (a thread job's): {job_prefix, now, ttl_ms,
--       conversation_id (absent = none to record), started_from (the conversation the attempt continued, '' for none)}
-- Returns {final status} or {'already:<status>'} or {'missing'}; inline, {final status, field, value, ...}.
local outcome = cjson.decode(ARGV[1])
local current = redis.call('HMGET', KEYS[1], FIELD.status, FIELD.cancel_requested, FIELD.callback_url, FIELD.error)
local status = current[1]
if not status then
  return {'missing'}
end
if is_final(status) then
  return {'already:' .. status}
end
local final = outcome.status
if final == STATUS.succeeded and current[2] == '1' then
  final = STATUS.canceled
end
local changes = {FIELD.status, final, FIELD.finished_at, outcome.finished_at}
if outcome.result then
  changes[#changes + 1] = FIELD.result
  changes[#changes + 1] = outcome.result
end
local has_callback = current[3] ~= false
if has_callback then
  changes[#changes + 1] = FIELD.callback
  changes[#changes + 1] = outcome.callback
end
if outcome.status ~= STATUS.succeeded and outcome.error then
  changes[#changes + 1] = FIELD.error
  changes[#changes + 1] = outcome.error
end
redis.call('HSET', KEYS[1], unpack(changes))
if outcome.status == STATUS.succeeded then
  if current[4] then
    redis.call('HDEL', KEYS[1], FIELD.error)
  end
elseif outcome.error then
  remember_error(KEYS[1], outcome.error, status == STATUS.running, outcome.finished_at)
end
redis.call('PEXPIRE', KEYS[1], outcome.retention_ms)
local id = outcome.id
leave_pending(id, KEYS[6], KEYS[7])
if KEYS[9] ~= '' then
  local thread = outcome.thread
  if redis.call('EXISTS', KEYS[8]) == 1 then
    local recorded = redis.call('HGET', KEYS[8], THREAD.conversation_id) or ''
    if thread.conversation_id and recorded == thread.started_from then
      redis.call('HSET', KEYS[8], THREAD.conversation_id, thread.conversation_id)
    end
    redis.call('HSET', KEYS[8], THREAD.last_job_at, thread.now)
    redis.call('PEXPIRE', KEYS[8], thread.ttl_ms)
  end
  leave_thread(id, KEYS[9], thread.job_prefix, KEYS[10], KEYS[11], KEYS[12])
end
for index = 14, #KEYS do
  redis.call('ZADD', KEYS[index], outcome.indexed_ms, id)
  redis.call('ZREMRANGEBYSCORE', KEYS[index], '-inf', outcome.indexed_ms - outcome.retention_ms)
  redis.call('PEXPIRE', KEYS[index], outcome.retention_ms)
end
if has_callback and outcome.inline then
  redis.call('ZADD', KEYS[2], outcome.inline.lease_expiry_ms, id)
  redis.call('SET', KEYS[5], outcome.inline.lock_holder, 'PX', outcome.inline.lock_ms)
  local reply = redis.call('HGETALL', KEYS[1])
  table.insert(reply, 1, final)
  return reply
end
end_run(KEYS[1], KEYS[2], id)
if has_callback then
  enqueue_callback(KEYS[1], id, KEYS[3], KEYS[4], KEYS[13], outcome.message_id, outcome.message_body,
    outcome.message_due_ms)
end
return {final}
