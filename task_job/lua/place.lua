-- place: put one task on the queue of the least-loaded live executor whose labels match.
-- KEYS[1]  where the task is now: a dispatcher's processing list, or {Q}:unroutable
-- KEYS[2]  {Q}:executors (heartbeats, ms)     KEYS[3]  {Q}:unroutable
-- KEYS[4]  {Q}:dispatch_stats
-- KEYS[5..] per candidate executor, three keys: {Q}:executor:<id>, {Q}:processing:<id>,
--          {Q}:inbox:<id> (the candidates listed in ARGV[6..], in that order)
-- ARGV[1]  the message   ARGV[2]  task.labels as JSON ('' = none)
-- ARGV[3]  task.executor ('' = any)   ARGV[4]  'list' or 'zset': the kind of KEYS[1]
-- ARGV[5]  a random number in [0, 1), to spread ties   ARGV[6..] candidate executor ids
-- Load is read live: free slots = slots - LLEN(processing) (kept by claims and finishes),
-- minus the depth of its own queue. Returns the executor id it was placed on; '' when no
-- live, non-draining executor matches (moved to KEYS[3] from a list; left there from the
-- zset); 'gone' when the message is no longer in KEYS[1] (placed by another dispatcher).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = {}
if ARGV[2] ~= '' then want = cjson.decode(ARGV[2]) end
local function matches(labels)
  for k, w in pairs(want) do
    local have = labels[k]
    if type(w) == 'table' then
      local ok = false
      for _, v in ipairs(w) do if have == v then ok = true end end
      if not ok then return false end
    elseif string.sub(w, 1, 2) == '!=' then
      if have == string.sub(w, 3) then return false end
    elseif have ~= w then
      return false
    end
  end
  return true
end
local best, ties = nil, {}
for i = 6, #ARGV do
  local id = ARGV[i]
  local k = 5 + (i - 6) * 3
  if ARGV[3] == '' or ARGV[3] == id then
    local score = redis.call('ZSCORE', KEYS[2], id)
    local info = redis.call('HMGET', KEYS[k], 'status', 'slots', 'labels', 'dead_after')
    local dead_after = tonumber(info[4] or '30') * 1000
    if score and now - tonumber(score) < dead_after and info[1] == 'up' then
      local labels = {}
      local ok, decoded = pcall(cjson.decode, info[3] or '{}')
      if ok and type(decoded) == 'table' then
        for key, v in pairs(decoded) do
          if type(key) == 'number' then labels[v] = 'true' else labels[key] = v end
        end
      end
      if matches(labels) then
        local room = tonumber(info[2] or '1') - redis.call('LLEN', KEYS[k + 1])
          - redis.call('LLEN', KEYS[k + 2])
        if best == nil or room > best then
          best, ties = room, {i}
        elseif room == best then
          ties[#ties + 1] = i
        end
      end
    end
  end
end
local removed
if ARGV[4] == 'list' then
  removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
else
  removed = redis.call('ZSCORE', KEYS[1], ARGV[1]) and 1 or 0
end
if removed == 0 then return 'gone' end
if best == nil then
  if ARGV[4] == 'list' then
    redis.call('ZADD', KEYS[3], 'NX', t[1], ARGV[1])
    redis.call('HINCRBY', KEYS[4], 'unroutable', 1)
  end
  return ''
end
if ARGV[4] == 'zset' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local chosen = ties[math.floor(tonumber(ARGV[5]) * #ties) + 1]
redis.call('RPUSH', KEYS[5 + (chosen - 6) * 3 + 2], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'routed', 1)
return ARGV[chosen]
