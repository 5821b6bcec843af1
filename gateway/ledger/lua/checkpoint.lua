-- Record a live call's progress and renew its hold's lease, so that if its gateway dies the
-- sweeper bills the call from this checkpoint instead of losing it.
-- KEYS[1] holds hash, KEYS[2] hold leases zset, KEYS[3] checkpoints hash
-- ARGV[1] request id, ARGV[2] completion tokens so far, ARGV[3] new lease end (ms)
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[1])
return 1
