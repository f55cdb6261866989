-- dead_letter: move a claimed message that cannot become a task to the dead-letter list.
-- KEYS[1]  {Q}:processing:<exec>
-- KEYS[2]  Q_dead
-- ARGV[1]  raw message    ARGV[2]  dead-letter entry (JSON with the reason)
-- Idempotent: the entry is pushed only if the message was still claimed.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) > 0 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
