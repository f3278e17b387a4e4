-- Note on a running thread job that its thread's Dify conversation was gone (deleted or expired), so the job began a
-- new one. A job that is no longer running is left as it is. Returns 1 when recorded, else 0.
-- KEYS: 1 job hash
-- ARGV: 1 the restart (JSON: the conversation that was gone, why it was taken for gone, when)
if redis.call('HGET', KEYS[1], FIELD.status) ~= STATUS.running then
  return 0
end
redis.call('HSET', KEYS[1], FIELD.conversation_restarted, ARGV[1])
return 1
