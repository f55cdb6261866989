-- takeover: move a dead executor's claimed messages to this executor, atomically.
-- KEYS[1]  {Q}:executors                zset of heartbeats (ms, server clock)
-- KEYS[2]  {Q}:processing:<dead>        the dead executor's claims
-- KEYS[3]  {Q}:processing:<me>          where they go
-- KEYS[4]  {Q}:executor:<dead>          its registry hash (deleted)
-- KEYS[5]  {Q}:taken_over:<dead>      the mark the dead executor's heartbeat will find
-- KEYS[6]  {Q}:inbox:<dead>             the tasks waiting for it alone ...
-- KEYS[7]  where they go back: the dispatcher queue when a dispatcher serves the fleet, else
--          the shared queue (at the head, in order: they have waited already)
-- KEYS[8..] {Q}:task:<id> of each message of KEYS[2], in the order ARGV[5..] lists them
-- ARGV[1]  dead executor id    ARGV[2]  my executor id    ARGV[3]  dead_after, ms
-- ARGV[4]  TTL of the mark, seconds
-- ARGV[5..] the messages of KEYS[2] as the caller read them
-- If the executor is still stale and its list is as read, every message moves to KEYS[3],
-- every task it was running becomes mine (so it can no longer write records or a done
-- record if it wakes up), and it leaves the registry. The caller then settles each message.
-- Returns the number of messages moved, or 'alive' / 'changed' (nothing done).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and now - tonumber(score) < tonumber(ARGV[3]) then return 'alive' end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
if #items ~= #ARGV - 4 then return 'changed' end
for i, item in ipairs(items) do
  if item ~= ARGV[i + 4] then return 'changed' end
end
for i, item in ipairs(items) do
  local st = redis.call('HMGET', KEYS[7 + i], 'status', 'executor')
  if st[1] == 'running' and st[2] == ARGV[1] then
    redis.call('HSET', KEYS[7 + i], 'executor', ARGV[2], 'taken_over_from', ARGV[1])
  end
  redis.call('RPUSH', KEYS[3], item)
end
while redis.call('LMOVE', KEYS[6], KEYS[7], 'RIGHT', 'LEFT') do end
redis.call('DEL', KEYS[2], KEYS[4])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SET', KEYS[5], ARGV[2], 'EX', ARGV[4])
return #items
