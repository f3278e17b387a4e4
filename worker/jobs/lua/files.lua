-- Record the files a running job's attempt uploaded to Dify, so a later attempt references them instead of
-- uploading again. A job that is no longer running is left as it is. Returns 1 when recorded, else 0.
-- KEYS: 1 job hash
-- ARGV: 1 the files (JSON list)
if redis.call('HGET', KEYS[1], FIELD.status) ~= STATUS.running then
  return 0
end
redis.call('HSET', KEYS[1], FIELD.files, ARGV[1])
return 1
