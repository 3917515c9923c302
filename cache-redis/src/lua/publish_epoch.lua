-- a graph other than the one the caller knows (it was lost: its master restarted
-- or failed over without it; or it was cleared): values may be in Redis that it no
-- longer links, so nothing is changed until the caller has caught up
if GEN ~= '' and redis.call('GET', G .. 'gen') ~= GEN then
  return redis.error_reply('GRAPHGEN the dependency graph is not the one this instance knows (it was lost or cleared)')
end
local function publish_epoch()
  local first = redis.call('ZRANGE', G .. 'inflight', 0, 0)
  local p
  if first[1] then
    p = tonumber(first[1]) - 1
  else
    p = tonumber(redis.call('GET', G .. 'count') or 0)
  end
  local cur = tonumber(redis.call('GET', G .. 'epoch') or 0)
  if p > cur then
    redis.call('SET', G .. 'epoch', p)
    return p
  end
  return cur
end
