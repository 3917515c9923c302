
local e, epoch, n = ARGV[3], tonumber(ARGV[6]), tonumber(ARGV[7])
local v = P .. e
-- a count above the server's: it restarted since the read, its markers are gone
if epoch > tonumber(redis.call('GET', G .. 'epoch') or 0) then return 0 end
local function newer(node)
  local m = redis.call('HGET', G .. 'marks', node)
  return m and tonumber(m) > epoch
end
if newer('e:' .. e) then return 0 end
for i = 8, 7 + n do
  if newer(ARGV[i]) then return 0 end
end
unlink(v)
if SETV then redis.call('SET', v, ARGV[4], 'PX', ARGV[5]) end
if n > 0 then
  local links = {}
  for i = 8, 7 + n do
    links[#links + 1] = ARGV[i]
    redis.call('SADD', G .. 'rev:' .. ARGV[i], v)
    if string.sub(ARGV[i], 1, 2) == 'e:' then
      redis.call('SADD', PARENTS, P .. string.sub(ARGV[i], 3))
    end
  end
  redis.call('HSET', LINKS, v, table.concat(links, '\0'))
end
local i = 8 + n
while i <= #ARGV do
  local d, c = ARGV[i], tonumber(ARGV[i + 1])
  for j = i + 2, i + 1 + c do
    redis.call('SADD', G .. 'cascade:' .. d, ARGV[j])
  end
  i = i + 2 + c
end
return 1
