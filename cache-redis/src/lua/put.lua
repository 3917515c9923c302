local head = redis.call('GETRANGE', KEYS[1], 0, 20)
if string.byte(head, 1) == 0 and tonumber(string.sub(head, 2)) > tonumber(ARGV[3]) then
  return 0
end
-- past its deadline, the collector may have judged the entry's links to be without
-- a value and removed them
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[4]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
