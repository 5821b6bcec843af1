-- Release a lock only if this instance still holds it.
-- KEYS[1] the lock (string)
-- ARGV[1] the owner that took it
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
