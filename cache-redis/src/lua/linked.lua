-- On a cluster, the collector's first step for value keys: for each, '' if it has
-- no links, else when they were recorded ('0' if unknown), then the time now.
local out = {}
for i = 3, #ARGV do
  local at = redis.call('HGET', G .. 'linked', ARGV[i])
  if not at then
    at = redis.call('HEXISTS', LINKS, ARGV[i]) == 1 and '0' or ''
  end
  out[#out + 1] = at
end
local t = redis.call('TIME')
out[#out + 1] = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return out
