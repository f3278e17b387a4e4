-- Judge jobs for the orphan sweep: a job is an orphan when it is queued (or paused: its message is the check at
-- its forms' expiry), was due before the bound, and its message (``FIELD.message``) is neither on the queue
-- (waiting, in the queue's low lane, or fetched by a worker: its body stays in the queue's bodies until it is
-- acknowledged) nor a delayed message due after the bound (one whose time passed long before was fetched by a
-- consumer that dropped it). A job without a recorded message is not judged, nor a thread's job whose message is
-- held in its record until the job before it ends.
-- KEYS: 1 queue bodies, 2 delay queue bodies, 3.. job hashes
-- ARGV: 1 the bound (unix ms)
-- Returns {job id, message id, status, ...} of the orphans.
local bound = tonumber(ARGV[1])
local orphans = {}
for index = 3, #KEYS do
  local job = KEYS[index]
  local fields = redis.call('HMGET', job, FIELD.status, FIELD.next_attempt_at, FIELD.created_at, FIELD.message,
    FIELD.id, FIELD.held_message)
  local status, due, message = fields[1], tonumber(fields[2] or fields[3] or ''), fields[4]
  local waiting = status == STATUS.queued or status == STATUS.paused
  if waiting and due and due * 1000 < bound and message and not fields[6] then
    if not message_live(KEYS[1], KEYS[2], message, bound) then
      orphans[#orphans + 1] = fields[5]
      orphans[#orphans + 1] = message
      orphans[#orphans + 1] = status
    end
  end
end
return orphans
