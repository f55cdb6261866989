-- lib_deps: tasks waiting for others (task.depends_on). Shared by hold (a task starts to
-- wait), finish (a done record settles the tasks waiting for it).
-- Keys, all under the queue's prefix P = '{Q}:':
--   P..'waiting'          hash: id -> member (queue \0 id \0 message), the waiting task
--   P..'waiting_until'    zset: id -> when it is cancelled (its depends_timeout; 0: now,
--                         a dependency ended otherwise or a kill came; movers write its record)
--   P..'waiting_why'      hash: id -> why it is cancelled (when known)
--   P..'waiting_on:'..id  set: the dependencies it still waits for
--   P..'dependents:'..id  set: the tasks waiting for id
-- needs lib_parked.lua
local TERMINAL = {succeeded = true, failed = true, timeout = true, killed = true, lost = true,
                  cancelled = true, rejected = true}

local function release_waiting(prefix, id, member)
  redis.call('HDEL', prefix .. 'waiting', id)
  redis.call('ZREM', prefix .. 'waiting_until', id)
  redis.call('DEL', prefix .. 'waiting_on:' .. id)
  redis.call('HDEL', prefix .. 'task:' .. id, 'status')
  local queue, _, message = parked(member)
  redis.call('RPUSH', queue, message)
end

local function settle_dependents(prefix, id, status)
  local key = prefix .. 'dependents:' .. id
  local ids = redis.call('SMEMBERS', key)
  if #ids == 0 then return end
  for _, d in ipairs(ids) do
    local member = redis.call('HGET', prefix .. 'waiting', d)
    local score = redis.call('ZSCORE', prefix .. 'waiting_until', d)
    if member and score and tonumber(score) > 0 then
      if status == 'succeeded' then
        local on = prefix .. 'waiting_on:' .. d
        redis.call('SREM', on, id)
        if redis.call('SCARD', on) == 0 then release_waiting(prefix, d, member) end
      else
        redis.call('ZADD', prefix .. 'waiting_until', 0, d)
        redis.call('HSET', prefix .. 'waiting_why', d, 'dependency ' .. id .. ' ended ' .. status)
      end
    end
  end
  redis.call('DEL', key)
end
