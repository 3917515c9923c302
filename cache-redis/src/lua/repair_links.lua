#!lua flags=allow-oom
local lonely, broken = 0, 0
-- on a cluster, triples: value key, when its links were recorded (see `linked`),
-- '1' if its value was there after that; entries written again since are left
local step, buried = CLUSTER and 3 or 1, {}
for i = 3, #ARGV, step do
  local v = ARGV[i]
  local links = redis.call('HGET', LINKS, v)
  local live
  if CLUSTER then
    live = ARGV[i + 2] == '1'
    if (redis.call('HGET', G .. 'linked', v) or '0') ~= ARGV[i + 1] then links = nil end
  else
    live = links and redis.call('EXISTS', v) == 1
  end
  if links then
    if not live then
      unlink(v)
      lonely = lonely + 1
    else
      for node in string.gmatch(links, '[^%z]+') do
        if redis.call('SISMEMBER', G .. 'rev:' .. node, v) == 0 then
          -- on a cluster, the caller leaves a tombstone in place of the value
          if CLUSTER then buried[#buried + 1] = v else redis.call('DEL', v) end
          unlink(v)
          broken = broken + 1
          break
        end
      end
    end
  end
end
if CLUSTER then
  return {lonely, broken, tonumber(redis.call('GET', G .. 'count') or 0) + 1, buried}
end
return {lonely, broken}
