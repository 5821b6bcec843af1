-- Create an account with a zero balance; refuse (return 0) if the id is taken.
-- KEYS[1] account hash
-- ARGV[1] id, ARGV[2] name, ARGV[3] now (ms)
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1],
  'id', ARGV[1], 'name', ARGV[2], 'balance', 0, 'held', 0,
  'topped_up', 0, 'spent', 0, 'state', 'active', 'period', '',
  'arrears_since', '', 'created_at', ARGV[3])
return 1
