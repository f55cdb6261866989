-- retry: end an attempt that will be retried: its retry record, and the task parked until
-- the next attempt is due — one step, so the attempt is never both retried and lost.
-- KEYS[1]  logs list   KEYS[2]  {Q}:log:<id>   KEYS[3]  {Q}:task:<id>
-- KEYS[4]  {Q}:processing:<exec>   KEYS[5]  {Q}:scheduled   KEYS[6]  {Q}:scheduled_ids
-- ARGV[1]  executor id   ARGV[2]  seq of the retry record   ARGV[3]  the retry record (JSON)
-- ARGV[4]  the claimed message (or 'sha1:<hex>:<len>')   ARGV[5]  member to park
-- ARGV[6]  next attempt due, unix seconds   ARGV[7]  task id   ARGV[8]  status of the attempt
-- ARGV[9]  exit code ('' = null)   ARGV[10] stream TTL   ARGV[11] stream MAXLEN
-- ARGV[12] logs_max_len (0 = no cap)
-- KEYS[7..9] for a task of a limited group: its lease set, waiting list, queue (the lease
--          goes back while it waits for its next attempt)
-- Returns 1, or 0 when the task is no longer this executor's (taken over, settled).
--!include lib_unclaim.lua
--!include lib_group.lua

local st = redis.call('HMGET', KEYS[3], 'status', 'executor', 'seq')
if st[1] and (st[1] ~= 'running' or st[2] ~= ARGV[1]) then return 0 end
if tonumber(st[3] or '-1') >= tonumber(ARGV[2]) then return 0 end
unclaim(KEYS[4], ARGV[4])
redis.call('RPUSH', KEYS[1], ARGV[3])
local cap = tonumber(ARGV[12])
if cap > 0 and redis.call('LLEN', KEYS[1]) > cap then redis.call('LTRIM', KEYS[1], -cap, -1) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[11], '*', 'r', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[10])
redis.call('HSET', KEYS[3], 'status', 'retrying', 'seq', ARGV[2], 'last_status', ARGV[8],
  'exit_code', ARGV[9], 'next_at', ARGV[6])
redis.call('PERSIST', KEYS[3])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
redis.call('HSET', KEYS[6], ARGV[7], ARGV[5])
if KEYS[7] then release(KEYS[7], KEYS[8], KEYS[9], ARGV[7]) end
return 1
