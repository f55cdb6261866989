-- dispatcher_beat: a dispatcher's heartbeat; the lists of dispatchers that stopped beating go
-- back to the head of the dispatcher queue (nothing a dead dispatcher took is lost).
-- KEYS[1]  {Q}:dispatchers (ms)   KEYS[2]  the dispatcher queue   KEYS[3]  {Q}:dispatch_stats
-- ARGV[1]  this dispatcher's id   ARGV[2]  dead_after, ms   ARGV[3]  the key prefix '{Q}:'
-- ('' = only beat)  Returns the number of tasks given back.
-- The dead dispatchers' lists are named from the prefix: they share the hash tag {Q}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
local back = 0
if ARGV[3] ~= '' then
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))) do
    local list = ARGV[3] .. 'dispatching:' .. dead
    while redis.call('LMOVE', list, KEYS[2], 'RIGHT', 'LEFT') do back = back + 1 end
    redis.call('ZREM', KEYS[1], dead)
  end
end
if back > 0 then redis.call('HINCRBY', KEYS[3], 'rerouted', back) end
return back
