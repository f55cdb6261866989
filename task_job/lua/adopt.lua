-- adopt: after Redis lost its data (a restart without persistence, a FLUSHALL), make the
-- tasks still running on this executor its own again, so that their records, their done
-- record and a later takeover (if this executor dies) all find them.
-- KEYS[1]  {Q}:processing:<me>
-- KEYS[2..] {Q}:task:<id> of each running task
-- ARGV[1]  executor id    ARGV[2]  now, unix seconds
-- ARGV[3..] the claimed message of each task, in KEYS order
-- A task whose state exists and is someone else's is left alone.
-- Returns the number of tasks adopted.
local adopted = 0
for i = 2, #KEYS do
  local st = redis.call('HMGET', KEYS[i], 'status', 'executor')
  if not st[1] then
    redis.call('HSET', KEYS[i], 'status', 'running', 'executor', ARGV[1], 'seq', -1,
      'attempt', 1, 'claimed_at', ARGV[2])
    st = {'running', ARGV[1]}
  end
  if st[1] == 'running' and st[2] == ARGV[1] then
    local raw = ARGV[i + 1]
    if not redis.call('LPOS', KEYS[1], raw) then redis.call('RPUSH', KEYS[1], raw) end
    adopted = adopted + 1
  end
end
return adopted
