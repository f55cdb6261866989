-- dead_letter: move a claimed message that cannot become a task to the dead-letter list.
-- KEYS[1]  {Q}:processing:<exec>
-- KEYS[2]  Q_dead
-- ARGV[1]  the claimed message, or 'sha1:<hex>:<length>' naming a big one by its digest (so
--          it is not sent back whole), or '' for a message that was never claimed (control)
-- ARGV[2]  dead-letter entry (JSON with the reason)
-- ARGV[3]  dead_max_len: the list is trimmed to its newest ARGV[3] entries (0 = no cap)
-- Idempotent: the entry is pushed only if the message was still claimed.
--!include lib_unclaim.lua
if ARGV[1] == '' or unclaim(KEYS[1], ARGV[1]) > 0 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  local cap = tonumber(ARGV[3])
  if cap > 0 and redis.call('LLEN', KEYS[2]) > cap then redis.call('LTRIM', KEYS[2], -cap, -1) end
  return 1
end
return 0
