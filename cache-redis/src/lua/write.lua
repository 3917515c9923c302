
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
local links = {}
if CLUSTER then
  -- The value under this key stays until this write's value lands on its own
  -- slot, which may never happen (refused, failed): its links stay with the new
  -- ones, so that an invalidation of either still reaches it.
  local old = redis.call('HGET', LINKS, v)
  if old then
    local new = {}
    for i = 8, 7 + n do new[ARGV[i]] = true end
    for node in string.gmatch(old, '[^%z]+') do
      if not new[node] then links[#links + 1] = node end
    end
  end
else
  unlink(v)
end
if SETV then redis.call('SET', v, ARGV[4], 'PX', ARGV[5]) end
for i = 8, 7 + n do
  links[#links + 1] = ARGV[i]
  redis.call('SADD', G .. 'rev:' .. ARGV[i], v)
  if string.sub(ARGV[i], 1, 2) == 'e:' then
    redis.call('SADD', PARENTS, P .. string.sub(ARGV[i], 3))
  end
end
if #links > 0 then
  redis.call('HSET', LINKS, v, table.concat(links, '\0'))
end
-- on a cluster: when the links were recorded, for the collector, which leaves them
-- alone until the value's step is past (the caller gives it a deadline from this)
local now = 1
if CLUSTER then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if #links > 0 then redis.call('HSET', G .. 'linked', v, now) end
end
local i = 8 + n
while i <= #ARGV do
  local d, c = ARGV[i], tonumber(ARGV[i + 1])
  for j = i + 2, i + 1 + c do
    redis.call('SADD', G .. 'cascade:' .. d, ARGV[j])
  end
  i = i + 2 + c
end
return now
