-- begin: mark a claimed task as running here, unless its id was seen before.
-- KEYS[1]  {Q}:task:<id>   state hash (created here; the only place a task id is registered)
-- KEYS[2]  {Q}:events      pub/sub channel of task state changes
-- ARGV[4]  task id       ARGV[5]  who submitted it ('' = not said)
-- ARGV[6]  the command and its arguments, a JSON array ('' = not said): kept in the state
-- For a task of a limited group (task.group with groups.<g>.parallel), also:
-- KEYS[3]  {Q}:group:<g>:running (the group's leases: task ids)   KEYS[4]  {Q}:group:<g>:waiting
-- KEYS[5]  {Q}:processing:<exec>   ARGV[7]  parallel   ARGV[8]  the claimed message
-- verdict 'waiting': the group is full; the message left the processing list for the group's
-- waiting list (in order), holding no slot, until a lease is given back.
-- ARGV[1]  executor id
-- ARGV[2]  now, unix seconds
-- ARGV[3]  claim token, unique per claim: a begin repeated after a lost reply answers the
--          same, instead of calling its own task a duplicate
-- Returns {verdict, last_seq, attempt}; verdict is 'run', 'cancelled' (a kill came first)
-- or 'duplicate' (the id is known: it ran, runs or was rejected, and must not run again).
-- A task between attempts (requeued, or retrying after back-off) begins its next attempt.
local st = redis.call('HMGET', KEYS[1], 'status', 'claim', 'seq', 'attempt')
local status = st[1]
if status == 'running' and st[2] == ARGV[3] then
  return {'run', tonumber(st[3]), tonumber(st[4])}
end
if status == 'cancel_requested' then
  return {'cancelled', tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1'), 0}
end
if status and status ~= 'requeued' and status ~= 'retrying' then
  return {'duplicate', 0, 0}
end
if KEYS[3] and redis.call('SISMEMBER', KEYS[3], ARGV[4]) == 0 then
  if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[7]) then
    redis.call('LREM', KEYS[5], 1, ARGV[8])
    redis.call('RPUSH', KEYS[4], ARGV[8])
    return {'waiting', 0, 0}
  end
  redis.call('SADD', KEYS[3], ARGV[4])
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'executor', ARGV[1], 'claimed_at', ARGV[2],
  'claim', ARGV[3])
redis.call('HSETNX', KEYS[1], 'seq', -1)
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'submitted_by', ARGV[5]) end
if ARGV[6] and ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'command', ARGV[6]) end
redis.call('PERSIST', KEYS[1])
redis.call('PUBLISH', KEYS[2], cjson.encode({event = 'task', id = ARGV[4], status = 'running',
  executor = ARGV[1], at = tonumber(ARGV[2])}))
return {'run', tonumber(redis.call('HGET', KEYS[1], 'seq')), attempt}
