-- fire: fire a schedule's ticks once across the fleet. The schedule's score in
-- {Q}:schedule_due must still be the tick the caller read (compare-and-set): of several
-- loops that read the same due schedule, the first fires, the others find it moved on.
-- KEYS[1]  {Q}:schedule_due   KEYS[2]  {Q}:schedule:<name> (state: active, last_id, last_run,
--          paused, fired, skipped)   KEYS[3]  {Q}:scheduled   KEYS[4]  {Q}:scheduled_ids
-- ARGV[1]  name   ARGV[2]  the score read ('' = run now: no check, score left alone)
-- ARGV[3]  the next tick to wait for ('' = leave the score)   ARGV[4]  overlap: allow, skip, replace
-- ARGV[5]  prefix of task state keys ({Q}:task:)   ARGV[6]  TTL of an instance's state mark
-- ARGV[7]  now, unix seconds
-- then per instance, five values: id, tick, queue, due ('' = queued now, else parked until
-- then), message
-- Returns {verdict, previous}: 'fired' (previous: the instance still running then, for a
-- replace to kill, or ''), 'skipped' (overlap skip: previous still runs), 'raced' (another
-- loop fired it), 'paused'.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then
  if not score or tonumber(score) ~= tonumber(ARGV[2]) then return {'raced', ''} end
  if redis.call('HGET', KEYS[2], 'paused') == '1' then
    redis.call('ZREM', KEYS[1], ARGV[1])
    return {'paused', ''}
  end
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
-- Is the last instance still unfinished (queued, parked, running, between attempts)?
local previous = ''
local active = redis.call('HGET', KEYS[2], 'active')
if active then
  local st = redis.call('HMGET', ARGV[5] .. active, 'status', 'schedule')
  local s = st[1]
  if (not s and st[2]) or s == 'running' or s == 'requeued' or s == 'retrying'
      or s == 'cancel_requested' or s == 'waiting' then
    previous = active
  end
end
local n = (#ARGV - 7) / 5
if previous ~= '' and ARGV[4] == 'skip' and n > 0 then
  redis.call('HINCRBY', KEYS[2], 'skipped', n)
  return {'skipped', previous}
end
for i = 0, n - 1 do
  local b = 8 + i * 5
  local id, tick, queue, due, message = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local key = ARGV[5] .. id
  if redis.call('EXISTS', key) == 0 then
    -- The mark: the instance is known (a second fire of this tick is refused), not begun.
    redis.call('HSET', key, 'schedule', ARGV[1], 'fired_at', ARGV[7])
    redis.call('EXPIRE', key, ARGV[6])
    if due ~= '' then
      local member = queue .. '\0' .. id .. '\0' .. message
      redis.call('ZADD', KEYS[3], due, member)
      redis.call('HSET', KEYS[4], id, member)
    else
      redis.call('RPUSH', queue, message)
    end
    redis.call('HSET', KEYS[2], 'active', id, 'last_id', id, 'last_run', tick)
    redis.call('HINCRBY', KEYS[2], 'fired', 1)
  end
end
return {'fired', previous}
