-- Judge jobs of the callbacks' due index for the orphan sweep: a job's callback is orphaned when it is still pending
-- and announced (the job is final, or paused for its job.paused), its latest message (``FIELD.callback_message``)
-- was due before the bound, and that message is neither on the callbacks queue (waiting, or fetched by a worker: its
-- body stays in the queue's bodies until it is acknowledged) nor a delayed message due after the bound (one whose
-- time passed long before was fetched by a consumer that dropped it). A job that is gone, or whose callback is done
-- with or no longer announced, leaves the index.
-- KEYS: 1 the callbacks' due index, 2 callbacks queue bodies, 3 callbacks delay queue bodies, 4.. job hashes
-- ARGV: 1 the bound (unix ms), 2.. the job ids of KEYS 4..
-- Returns {job id, message id, app, ...} of the orphans.
local bound = tonumber(ARGV[1])
local orphans = {}
for index = 4, #KEYS do
  local id = ARGV[index - 2]
  local fields = redis.call('HMGET', KEYS[index], FIELD.status, FIELD.callback, FIELD.callback_message,
    FIELD.app)
  local status, callback, message = fields[1], fields[2], fields[3]
  if not (message and callback_waits(status, callback)) then
    redis.call('ZREM', KEYS[1], id)
  else
    if not message_live(KEYS[2], KEYS[3], message, bound) then
      orphans[#orphans + 1] = id
      orphans[#orphans + 1] = message
      orphans[#orphans + 1] = fields[4]
    end
  end
end
return orphans
