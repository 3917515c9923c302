#!lua flags=allow-oom
local node = ARGV[3]
local n = 0
for i = 4, #ARGV do
  local v = ARGV[i]
  local links = redis.call('HGET', LINKS, v)
  -- (on a cluster the values are on other slots: entries without a value are the
  -- forward links' repair's, which removes them from here too)
  if (not CLUSTER and redis.call('EXISTS', v) == 0) or not links
    or not string.find('\0' .. links .. '\0', '\0' .. node .. '\0', 1, true) then
    n = n + 1
    forget(node, v)
  end
end
if string.sub(node, 1, 2) == 'e:' and redis.call('EXISTS', G .. 'rev:' .. node) == 1 then
  redis.call('SADD', PARENTS, P .. string.sub(node, 3))
end
return n
