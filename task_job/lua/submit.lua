-- submit: push a task message unless its id is known (one round trip for the check and push).
-- KEYS[1]  {Q}:task:<id>   state hash     KEYS[2]  Q   the queue (or the one it is meant for)
-- KEYS[3]  {Q}:scheduled   KEYS[4]  {Q}:scheduled_ids
-- ARGV[1]  the message   ARGV[2]  due, unix seconds ('' = now: pushed)   ARGV[3]  task id
-- KEYS[5..7] for a task of a group (optional): {Q}:groups, and the group's lease set and
-- waiting list; ARGV[4] the group: while the group is full (or others wait already) the task
-- joins the group's waiting list instead of the queue, so that an executor that does not know
-- groups cannot run it past the limit.
-- Returns '' when pushed (or parked until due), or the known id's status (it runs at most
-- once: nothing pushed). A kill waiting for the id (cancel_requested) does not count.
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'cancel_requested' then return status end
if KEYS[3] and redis.call('HEXISTS', KEYS[4], ARGV[3]) == 1 then return 'scheduled' end
if KEYS[3] and ARGV[2] ~= '' then
  local member = KEYS[2] .. '\0' .. ARGV[3] .. '\0' .. ARGV[1]
  redis.call('ZADD', KEYS[3], ARGV[2], member)
  redis.call('HSET', KEYS[4], ARGV[3], member)
  return ''
end
if KEYS[5] then
  local parallel = tonumber(redis.call('HGET', KEYS[5], ARGV[4]) or '0')
  if parallel > 0 and (redis.call('SCARD', KEYS[6]) >= parallel or redis.call('LLEN', KEYS[7]) > 0) then
    redis.call('RPUSH', KEYS[7], ARGV[1])
    return ''
  end
end
redis.call('RPUSH', KEYS[2], ARGV[1])
return ''
