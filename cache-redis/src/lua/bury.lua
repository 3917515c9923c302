#!lua flags=allow-oom,allow-cross-slot-keys
-- KEYS[1], then ARGV[3..]: value keys of one node (keys of other slots than the
-- declared one are named as arguments: a cluster runs them on this node with this
-- flag, and refuses a key of another node)
local n = 0
local function bury(k)
  local head = redis.call('GETRANGE', k, 0, 20)
  if not (string.byte(head, 1) == 0 and tonumber(string.sub(head, 2)) >= tonumber(ARGV[1])) then
    redis.call('SET', k, '\0' .. ARGV[1], 'PX', ARGV[2])
    n = n + 1
  end
end
bury(KEYS[1])
for i = 3, #ARGV do bury(ARGV[i]) end
return n
