-- submit: push a task message unless its id is known (one round trip for the check and push).
-- KEYS[1]  {Q}:task:<id>   state hash     KEYS[2]  Q   the queue
-- ARGV[1]  the message
-- Returns '' when pushed, or the known id's status (it runs at most once: nothing pushed).
-- A kill waiting for the id (cancel_requested) does not count: the task is pushed.
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'cancel_requested' then return status end
redis.call('RPUSH', KEYS[2], ARGV[1])
return ''
