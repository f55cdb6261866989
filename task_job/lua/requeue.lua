-- requeue: put a task whose run was lost back on the queue (it opted in: on_lost requeue).
-- KEYS[1]  {Q}:processing:<exec>
-- KEYS[2]  Q
-- KEYS[3]  {Q}:task:<id>
-- ARGV[1]  raw message    ARGV[2]  executor id that owned the run
-- KEYS[4..5] for a task of a limited group: its lease set and waiting list; ARGV[3] task id
--          (the lease goes back: the requeued run takes one again when claimed)
-- Only while that executor still owns the running task; the attempt count stays, and
-- begin raises it when the task is claimed again.
--!include lib_group.lua
local st = redis.call('HMGET', KEYS[3], 'status', 'executor')
if st[1] ~= 'running' or st[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[3], 'status', 'requeued')
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[1])
if KEYS[4] then release(KEYS[4], KEYS[5], KEYS[2], ARGV[3]) end
return 1
