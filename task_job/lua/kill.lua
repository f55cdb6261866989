-- kill: find where a task to be killed is, or mark it so that it never starts.
-- KEYS[1]  {Q}:task:<id>           KEYS[2]  {Q}:scheduled   KEYS[3]  {Q}:scheduled_ids
-- ARGV[1]  now, unix seconds      ARGV[2]  TTL of a cancel mark, seconds   ARGV[3]  task id
-- Returns {where, detail}:
--   'running', executor   the task runs there: route the kill to that executor
--   'marked', ''          not started (queued, requeued, or not pushed yet): it will be
--                         cancelled when claimed; the mark expires after ARGV[2]
--   'finished', status    nothing to do
--   'parked', message     it was waiting for its time: removed (the caller writes its done record)
--   'waiting', ''         it waited for its dependencies: marked to be cancelled now (a mover
--                         writes its done record)
-- KEYS[4]  {Q}:waiting   KEYS[5]  {Q}:waiting_until   KEYS[6]  {Q}:waiting_why (optional)
-- ARGV[4]  why, for a waiting task's done record
--!include lib_parked.lua
if KEYS[2] then
  local member = redis.call('HGET', KEYS[3], ARGV[3])
  if member and redis.call('ZREM', KEYS[2], member) == 1 then
    redis.call('HDEL', KEYS[3], ARGV[3])
    local _, _, message = parked(member)
    return {'parked', message}
  end
end
if KEYS[4] and redis.call('HEXISTS', KEYS[4], ARGV[3]) == 1 then
  redis.call('ZADD', KEYS[5], 0, ARGV[3])
  redis.call('HSET', KEYS[6], ARGV[3], ARGV[4])
  return {'waiting', ''}
end
local st = redis.call('HMGET', KEYS[1], 'status', 'executor')
if not st[1] or st[1] == 'requeued' then
  redis.call('HSET', KEYS[1], 'status', 'cancel_requested', 'kill_requested_at', ARGV[1])
  redis.call('HSETNX', KEYS[1], 'seq', -1)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'marked', ''}
end
if st[1] == 'running' then return {'running', st[2]} end
return {'finished', st[1]}
