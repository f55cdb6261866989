-- finish: write a task's done record and settle it, atomically, exactly once.
-- KEYS[1]  logs list (logs_channel)
-- KEYS[2]  {Q}:log:<id>             per-task stream
-- KEYS[3]  {Q}:task:<id>            state hash
-- KEYS[4]  {Q}:processing:<exec>    the claim to remove
-- KEYS[5]  Q_dead                   dead-letter list
-- ARGV[1]  mode: 'own'    the task runs here (state running, executor = ARGV[2])
--                'new'    a rejected message: only if the id has no state yet
--                'cancel' a kill came before the start (state cancel_requested)
--                'parked' a kill found it waiting for its time (no state, or retrying)
--                'waiting' it waited for its dependencies and is cancelled (KEYS[10..12]:
--                         {Q}:waiting, {Q}:waiting_until, {Q}:waiting_why)
-- ARGV[2]  executor id       ARGV[3]  seq of the done record    ARGV[4]  done record (JSON)
-- ARGV[5]  raw message to remove from KEYS[4] ('' = none), or 'sha1:<hex>:<length>' naming
--          a big one by its digest (it is not sent back whole)
-- ARGV[6]  dead-letter entry ('' = none), pushed only if the raw message was still claimed
-- ARGV[7]  status            ARGV[8]  exit code ('' = null)     ARGV[9]  finished_at
-- ARGV[10] state TTL         ARGV[11] stream TTL                ARGV[12] stream MAXLEN
-- ARGV[13] dead_max_len      ARGV[14] logs_max_len (caps of KEYS[5], KEYS[1]; 0 = none)
-- KEYS[6]  {Q}:recent   KEYS[7] {Q}:recent:<status>   KEYS[8] {Q}:recent_by:<exec>
--          the finished-task indexes (score finished_at; entries older than the state TTL
--          trimmed here), read by the task listing instead of a keyspace scan
-- KEYS[9]  {Q}:events   pub/sub channel of task state changes
-- ARGV[15] pid, ARGV[16] started_at: for a task whose start note was never sent ('' = none)
-- ARGV[17] task id, for the indexes and the event
-- KEYS[10..12] for a task of a limited group: {Q}:group:<g>:running, {Q}:group:<g>:waiting,
--          and the queue a waiting task goes to when the lease is given back
-- A done record spooled by an older version (5 KEYS, 14 or 16 ARGV) is still written whole:
-- it only misses the indexes and the event.
-- Returns 1 if the done record was written, 0 if the task was settled elsewhere already
-- (a retried batch, a duplicate id, or a takeover while this executor was cut off).
--!include lib_unclaim.lua
--!include lib_group.lua
--!include lib_parked.lua
--!include lib_deps.lua

local function cap(key, n)
  n = tonumber(n)
  if n > 0 and redis.call('LLEN', key) > n then redis.call('LTRIM', key, -n, -1) end
end
local removed = 1
if ARGV[5] ~= '' then removed = unclaim(KEYS[4], ARGV[5]) end
if ARGV[6] ~= '' and removed > 0 then
  redis.call('RPUSH', KEYS[5], ARGV[6])
  cap(KEYS[5], ARGV[13])
end
local st = redis.call('HMGET', KEYS[3], 'status', 'executor', 'seq')
local mode = ARGV[1]
if mode == 'own' then
  -- No state at all: Redis lost its data (a restart without persistence, a FLUSHALL) while
  -- the task ran here; a running task's state never expires. Its done record is written.
  if st[1] and (st[1] ~= 'running' or st[2] ~= ARGV[2]) then return 0 end
  if tonumber(st[3] or '-1') >= tonumber(ARGV[3]) then return 0 end
elseif mode == 'new' then
  if st[1] then return 0 end
elseif mode == 'parked' then
  if st[1] and st[1] ~= 'retrying' then return 0 end
elseif mode == 'cancel' then
  if st[1] ~= 'cancel_requested' then return 0 end
elseif mode == 'waiting' then
  if st[1] ~= 'waiting' or redis.call('HDEL', KEYS[10], ARGV[17]) == 0 then return 0 end
  redis.call('ZREM', KEYS[11], ARGV[17])
  redis.call('HDEL', KEYS[12], ARGV[17])
  redis.call('DEL', string.sub(KEYS[3], 1, #KEYS[3] - #ARGV[17] - 5) .. 'waiting_on:' .. ARGV[17])
else
  return redis.error_reply('finish: unknown mode ' .. mode)
end
redis.call('RPUSH', KEYS[1], ARGV[4])
cap(KEYS[1], ARGV[14])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[12], '*', 'r', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[11])
redis.call('HSET', KEYS[3], 'status', ARGV[7], 'executor', ARGV[2], 'seq', ARGV[3],
  'exit_code', ARGV[8], 'finished_at', ARGV[9])
if ARGV[15] and ARGV[15] ~= '' then
  redis.call('HSET', KEYS[3], 'pid', ARGV[15], 'started_at', ARGV[16])
end
redis.call('EXPIRE', KEYS[3], ARGV[10])
if not (KEYS[9] and ARGV[17]) then return 1 end
if KEYS[10] and mode ~= 'waiting' then release(KEYS[10], KEYS[11], KEYS[12], ARGV[17]) end
local horizon = '(' .. (tonumber(ARGV[9]) - tonumber(ARGV[10]))
for i = 6, 8 do
  redis.call('ZADD', KEYS[i], ARGV[9], ARGV[17])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', horizon)
end
redis.call('PUBLISH', KEYS[9], cjson.encode({event = 'task', id = ARGV[17], status = ARGV[7],
  executor = ARGV[2], exit_code = tonumber(ARGV[8]), at = tonumber(ARGV[9])}))
-- The tasks waiting for this one: released when it succeeded and they wait for nothing else,
-- else marked to be cancelled naming it.
settle_dependents(string.sub(KEYS[3], 1, #KEYS[3] - #ARGV[17] - 5), ARGV[17], ARGV[7])
return 1
