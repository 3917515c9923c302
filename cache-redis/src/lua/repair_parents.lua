#!lua flags=allow-oom
local n = 0
for i = 3, #ARGV do
  local key = string.sub(ARGV[i], #P + 1)
  if string.sub(ARGV[i], 1, #P) ~= P or redis.call('EXISTS', G .. 'rev:e:' .. key) == 0 then
    n = n + redis.call('SREM', PARENTS, ARGV[i])
  end
end
return n
