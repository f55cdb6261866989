-- unclaim: give back a claimed message that never started (its executor stopped between
-- the claim and the start), at the head of the queue so it keeps its place.
-- KEYS[1]  {Q}:processing:<exec>
-- KEYS[2]  Q
-- ARGV[1]  raw message
if redis.call('LREM', KEYS[1], 1, ARGV[1]) > 0 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
