-- heartbeat: record that an executor is alive, scored by the Redis server's clock (so clock
-- skew between hosts cannot make a live executor look dead).
-- KEYS[1]  {Q}:executors           zset: executor id -> last heartbeat, ms
-- KEYS[2]  {Q}:executor:<exec>     hash: registry entry
-- KEYS[3]  {Q}:taken_over:<exec>   the mark a takeover leaves (takeover.lua)
-- ARGV[1]  executor id    ARGV[2]  running count
-- ARGV[3]  'register' (always add) or 'beat' (only if still registered)
-- Returns {server time ms, present}; present is 0 when a 'beat' found the entry gone and the
-- takeover mark there: another executor declared this one dead and took its tasks over while
-- it was away. It is 2 when the entry is gone without a mark: Redis lost its data (a restart
-- without persistence, a FLUSHALL); the executor is registered again and its tasks run on.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local present = 1
if ARGV[3] == 'beat' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('DEL', KEYS[3]) == 1 then return {now, 0} end
  present = 2
end
if ARGV[3] == 'register' then redis.call('DEL', KEYS[3]) end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'running', ARGV[2], 'heartbeat_ms', now)
return {now, present}
