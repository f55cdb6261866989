-- lib_unclaim: shared by the scripts that settle a claim (included where a script says
-- `--!include lib_unclaim.lua`; Redis scripts cannot call each other).
-- unclaim(key, ref): LREM one claimed message from the list `key`, named either by itself or,
-- for a big one, by 'sha1:<hex>:<length>' (found by length, then digest). Returns 1 or 0.
local function unclaim(key, ref)
  if string.sub(ref, 1, 5) ~= 'sha1:' then return redis.call('LREM', key, 1, ref) end
  local want = string.sub(ref, 6, 45)
  local len = tonumber(string.sub(ref, 47))
  for _, v in ipairs(redis.call('LRANGE', key, 0, -1)) do
    if #v == len and redis.sha1hex(v) == want then return redis.call('LREM', key, 1, v) end
  end
  return 0
end
