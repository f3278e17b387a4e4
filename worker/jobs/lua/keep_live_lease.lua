-- The reaper found an expired lease: the job stays with its worker process while that process's heartbeat lives
-- (a live process whose renewals fell behind, starved of CPU, still runs the job): the lease is renewed for it.
-- Only a process whose heartbeat lapsed too (two leases without a round: dead, or stopped that long) loses its
-- jobs. The owner is checked again here, next to its heartbeat, so a job that changed hands is never kept.
-- KEYS: 1 job hash, 2 leases zset, 3 the owner's heartbeat
-- ARGV: 1 owner (the worker id the reaper read), 2 new lease expiry ms, 3 job id
-- Returns 1 (kept: the lease is renewed) or 0 (the reaper takes the job back).
if redis.call('HGET', KEYS[1], FIELD.worker) ~= ARGV[1] or redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[3])
return 1
