-- A new deliver_callback message for a job whose callback is still pending and announced (the job is final, or
-- paused for its job.paused): the sender's, when another attempt holds the callback lock, or the orphan sweep's, in
-- place of a message that was lost (``message_was``: the message it judged lost; nothing is done when another was
-- written since). A job whose callback is done with, or whose status no longer announces it, leaves the callbacks'
-- due index instead.
-- KEYS: 1 job hash, 2 callback queue (or its delay queue), 3 its bodies, 4 the callbacks' due index
-- ARGV: 1 job id, 2 redis message id, 3 message body, 4 message due (unix ms), 5 message_was ('' = any)
-- Returns 1 when the message was written, else 0.
local fields = redis.call('HMGET', KEYS[1], FIELD.status, FIELD.callback, FIELD.callback_message)
local status, callback, latest = fields[1], fields[2], fields[3]
if ARGV[5] ~= '' and latest ~= ARGV[5] then
  return 0
end
if not callback_waits(status, callback) then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 0
end
enqueue_callback(KEYS[1], ARGV[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], ARGV[3], ARGV[4])
return 1
