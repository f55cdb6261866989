-- hold: tasks with task.depends_on start to wait (state 'waiting') until every dependency has
-- a done record 'succeeded'; a task whose dependencies all succeeded already goes on.
-- Used by submitters (one task, or a whole DAG all-or-nothing) and by an executor that
-- claimed a raw message carrying depends_on.
-- KEYS[1]  {Q}:scheduled   KEYS[2]  {Q}:scheduled_ids   KEYS[3]  the claimer's processing list
-- ARGV[1]  key prefix '{Q}:'   ARGV[2]  now, unix seconds
-- ARGV[3]  the claimed message ('' = a submission: nothing claimed)
-- ARGV[4]  DAG id ('' = not a DAG)   ARGV[5]  TTL of the DAG id's state   ARGV[6]  JSON of the ids
-- then per task six values: id, queue, due ('' = now), cancel-by (depends_timeout deadline),
-- message, JSON array of its dependencies
-- Returns {'ok', ''} (a claimed message leaves KEYS[3]); {'ready', ''} for a claimed task
-- that may run now (left in KEYS[3]); or, nothing written: {'known', id} (an id that runs at
-- most once is taken already: a claimed task goes on to begin, which tells a duplicate),
-- {'unknown', id} (a DAG names an id neither in it nor known).
--!include lib_parked.lua
--!include lib_deps.lua
local prefix = ARGV[1]
local n = (#ARGV - 6) / 6
local function status_of(id) return redis.call('HGET', prefix .. 'task:' .. id, 'status') end
local function known(id)
  local st = redis.call('HMGET', prefix .. 'task:' .. id, 'status', 'schedule')
  if (st[1] and st[1] ~= 'cancel_requested') or st[2] then return true end
  return redis.call('HEXISTS', prefix .. 'waiting', id) == 1 or redis.call('HEXISTS', KEYS[2], id) == 1
end
local claimed = ARGV[3] ~= ''
do
  local ids = {}
  for i = 0, n - 1 do ids[ARGV[7 + i * 6]] = true end
  if ARGV[4] ~= '' and known(ARGV[4]) then return {'known', ARGV[4]} end
  for i = 0, n - 1 do
    local id = ARGV[7 + i * 6]
    if known(id) then return {'known', id} end
    if ARGV[4] ~= '' then
      for _, dep in ipairs(cjson.decode(ARGV[12 + i * 6])) do
        if not ids[dep] and not known(dep) then return {'unknown', dep} end
      end
    end
  end
end
for i = 0, n - 1 do
  local b = 7 + i * 6
  local id, queue, due, deadline, message = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local member = queue .. '\0' .. id .. '\0' .. message
  local pending, failed = {}, nil
  local cancel = status_of(id) == 'cancel_requested'  -- a kill came first: the claim cancels it
  if not cancel then
    for _, dep in ipairs(cjson.decode(ARGV[b + 5])) do
      local s = status_of(dep)
      if s ~= 'succeeded' then
        if s and TERMINAL[s] then
          failed = failed or ('dependency ' .. dep .. ' ended ' .. s)
        else
          pending[#pending + 1] = dep
        end
      end
    end
  end
  if cancel or (#pending == 0 and not failed) then
    if claimed and ARGV[4] == '' then return {'ready', ''} end
    if due ~= '' and not cancel then
      redis.call('ZADD', KEYS[1], due, member)
      redis.call('HSET', KEYS[2], id, member)
    else
      redis.call('RPUSH', queue, message)
    end
  else
    for _, dep in ipairs(pending) do
      redis.call('SADD', prefix .. 'dependents:' .. dep, id)
      redis.call('SADD', prefix .. 'waiting_on:' .. id, dep)
    end
    redis.call('HSET', prefix .. 'waiting', id, member)
    redis.call('ZADD', prefix .. 'waiting_until', failed and 0 or deadline, id)
    if failed then redis.call('HSET', prefix .. 'waiting_why', id, failed) end
    redis.call('HSET', prefix .. 'task:' .. id, 'status', 'waiting', 'waiting_since', ARGV[2])
    redis.call('PERSIST', prefix .. 'task:' .. id)
  end
end
if ARGV[4] ~= '' then
  local key = prefix .. 'task:' .. ARGV[4]
  redis.call('HSET', key, 'status', 'dag', 'tasks', ARGV[6], 'submitted_at', ARGV[2])
  redis.call('EXPIRE', key, ARGV[5])
end
if claimed then redis.call('LREM', KEYS[3], 1, ARGV[3]) end
return {'ok', ''}
