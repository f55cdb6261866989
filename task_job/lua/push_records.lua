-- push_records: append a run of one task's stdout/stderr records, each exactly once.
-- KEYS[1]  logs list (logs_channel)
-- KEYS[2]  {Q}:log:<id>    per-task stream (capped, expiring)
-- KEYS[3]  {Q}:task:<id>   state hash; its 'seq' is the last record delivered
-- ARGV[1]  executor id: records are taken only while this executor owns the running task
-- ARGV[2]  seq of the first record in ARGV[5..]
-- ARGV[3]  stream MAXLEN (approximate)
-- ARGV[4]  stream TTL while the task runs, seconds
-- ARGV[5]  logs_max_len: KEYS[1] is trimmed to its newest ARGV[5] entries (0 = no cap)
-- ARGV[6..] records (JSON), seqs ARGV[2], ARGV[2]+1, ...
-- Records at or below the delivered seq are skipped, so a retried batch adds nothing twice.
-- Returns the number of records added, or -1 when the task is not this executor's.
local st = redis.call('HMGET', KEYS[3], 'status', 'executor', 'seq')
if not st[1] then
  -- Redis lost its data while the task ran here (a running task's state never expires):
  -- the task is this executor's again, its records are kept.
  redis.call('HSET', KEYS[3], 'status', 'running', 'executor', ARGV[1], 'seq', -1, 'attempt', 1)
  st = {'running', ARGV[1], '-1'}
end
if st[1] ~= 'running' or st[2] ~= ARGV[1] then
  return -1
end
local last = tonumber(st[3] or '-1')
local first = tonumber(ARGV[2])
local n = #ARGV - 5
local skip = last - first + 1
if skip < 0 then skip = 0 end
if skip >= n then return 0 end
local batch = {}
for i = 6 + skip, #ARGV do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'r', ARGV[i])
  batch[#batch + 1] = ARGV[i]
  if #batch == 1000 then
    redis.call('RPUSH', KEYS[1], unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('RPUSH', KEYS[1], unpack(batch)) end
local cap = tonumber(ARGV[5])
if cap > 0 and redis.call('LLEN', KEYS[1]) > cap then redis.call('LTRIM', KEYS[1], -cap, -1) end
redis.call('HSET', KEYS[3], 'seq', first + n - 1)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return n - skip
