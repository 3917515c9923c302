#!lua flags=allow-oom
local head = redis.call('GETRANGE', KEYS[1], 0, 20)
if string.byte(head, 1) == 0 and tonumber(string.sub(head, 2)) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], '\0' .. ARGV[1], 'PX', ARGV[2])
return 1
