-- requeue_dead: put a dead-lettered message back on the queue after a fix, once.
-- KEYS[1]  Q_dead   KEYS[2]  Q
-- ARGV[1]  the dead-letter entry, exactly (found by its stable id: the SHA-1 of the entry)
-- ARGV[2]  the message to push (the entry's raw message)
-- Returns 1 when the entry was still there (and is now gone, its message queued), else 0:
-- two operators requeueing the same entry queue it once.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
