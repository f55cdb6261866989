-- move_due: put parked tasks whose time has come on their queues (each moved once, however
-- many movers run: the move and the removal are one step). Due is judged by Redis' clock.
-- KEYS[1]  {Q}:scheduled (score: due, unix seconds; member: queue \0 id \0 message)
-- KEYS[2]  {Q}:scheduled_ids (id -> member: how a kill finds a parked task)
-- KEYS[3]  {Q}:schedule_due (optional): the schedules' next ticks
-- KEYS[4]  {Q}:waiting_until (optional): waiting tasks to cancel (timed out, or marked)
-- ARGV[1]  most tasks to move in this call
-- Returns {moved, seconds until the next due task (-1: none), seconds until the next
-- schedule tick (0: one is due now; -1: none, or KEYS[3] not given), waiting tasks to cancel
-- now}.
-- The queues named in the members are the fleet's own lists (Q, Q_dispatch, {Q}:inbox:*).
--!include lib_parked.lua
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
-- In batches: the due members are the lowest-ranked, so they leave with one range removal,
-- and each queue gets its messages (in due order) by RPUSHes of up to 1,000 values.
local by_queue, order, ids = {}, {}, {}
for _, member in ipairs(due) do
  local queue, id, message = parked(member)
  if not by_queue[queue] then by_queue[queue] = {}; order[#order + 1] = queue end
  local list = by_queue[queue]
  list[#list + 1] = message
  ids[#ids + 1] = id
end
local function chunks(values, fn)
  for i = 1, #values, 1000 do fn(unpack(values, i, math.min(i + 999, #values))) end
end
for _, queue in ipairs(order) do
  chunks(by_queue[queue], function(...) redis.call('RPUSH', queue, ...) end)
end
chunks(ids, function(...) redis.call('HDEL', KEYS[2], ...) end)
if #due > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, #due - 1) end
local tick = '-1'
if KEYS[3] then
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if first[2] then tick = tostring(math.max(tonumber(first[2]) - now, 0)) end
end
local ending = 0
if KEYS[4] then ending = redis.call('ZCOUNT', KEYS[4], '-inf', now) end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if next_due[2] then return {#due, tostring(tonumber(next_due[2]) - now), tick, ending} end
return {#due, '-1', tick, ending}
