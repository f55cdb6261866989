-- lib_parked: shared by the scripts that read {Q}:scheduled (move_due, kill).
-- parked(member) -> queue, id, message: a member is `queue \0 id \0 message`.
local function parked(member)
  local a = string.find(member, '\0', 1, true)
  local b = string.find(member, '\0', a + 1, true)
  return string.sub(member, 1, a - 1), string.sub(member, a + 1, b - 1), string.sub(member, b + 1)
end
