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
