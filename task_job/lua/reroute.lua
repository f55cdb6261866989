-- reroute: the tasks waiting in an executor's own queue go back to the head of the dispatcher
-- queue when that executor is draining or no longer beating (a dead one's are also moved by
-- its takeover; this covers a fleet with no live executor to take over).
-- KEYS[1]  {Q}:executors   KEYS[2]  {Q}:executor:<id>   KEYS[3]  {Q}:inbox:<id>
-- KEYS[4]  the dispatcher queue   KEYS[5]  {Q}:dispatch_stats
-- ARGV[1]  executor id   ARGV[2]  default dead_after, ms (when its entry is gone)
-- Returns the number of tasks moved.
if redis.call('LLEN', KEYS[3]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local info = redis.call('HMGET', KEYS[2], 'status', 'dead_after')
local dead_after = info[2] and tonumber(info[2]) * 1000 or tonumber(ARGV[2])
local live = score and now - tonumber(score) < dead_after
if live and info[1] == 'up' then return 0 end
local moved = 0
while redis.call('LMOVE', KEYS[3], KEYS[4], 'RIGHT', 'LEFT') do moved = moved + 1 end
redis.call('HINCRBY', KEYS[5], 'rerouted', moved)
return moved
