-- lib_group: shared by the scripts that give a group's lease back (finish, retry, requeue).
-- release(lease, waiting, queue, id): the task's lease goes back, and the first task waiting
-- for one goes to the head of its queue.
local function release(lease, waiting, queue, id)
  if redis.call('SREM', lease, id) == 1 and redis.call('LLEN', waiting) > 0 then
    redis.call('LMOVE', waiting, queue, 'LEFT', 'LEFT')
  end
end
