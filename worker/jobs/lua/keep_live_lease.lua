-- The reaper found an expired lease: the job stays with its worker process while that process's heartbeat lives
-- and its last lease round renewed this lease (a live process whose renewals fell behind, starved of CPU, still
-- runs the job): the lease is renewed for it. Every round sets the heartbeat to the round's time and, in the same
-- transaction, the process's leases to that time plus a lease; a lease ending before then is of a job the
-- process no longer runs (Redis lost the write that ended it), and is the reaper's. A process whose heartbeat
-- lapsed too (two leases without a round: dead, or stopped that long) loses its jobs. The owner is checked again
-- here, next to its heartbeat, so a job that changed hands is never kept.
-- KEYS: 1 job hash, 2 leases zset, 3 the owner's heartbeat (the time of its last round, ms)
-- ARGV: 1 owner (the worker id the reaper read), 2 new lease expiry ms, 3 job id, 4 the lease ms
-- Returns 1 (kept: the lease is renewed) or 0 (the reaper takes the job back).
if redis.call('HGET', KEYS[1], FIELD.worker) ~= ARGV[1] then
  return 0
end
local round = redis.call('GET', KEYS[3])
local expiry = redis.call('ZSCORE', KEYS[2], ARGV[3])
if not round or not expiry or tonumber(expiry) < tonumber(round) + tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[3])
return 1
