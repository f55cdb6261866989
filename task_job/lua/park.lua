-- park: a claimed task that is not due yet leaves the processing list for {Q}:scheduled.
-- KEYS[1]  {Q}:processing:<me>   KEYS[2]  {Q}:scheduled   KEYS[3]  {Q}:scheduled_ids
-- ARGV[1]  the claimed message (as it sits in KEYS[1])
-- ARGV[2]  the member to park (queue \0 id \0 message: the message with its due time fixed)
-- ARGV[3]  due, unix seconds   ARGV[4]  task id
-- Returns 1 if parked, 0 if the claim was no longer there.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[2])
return 1
