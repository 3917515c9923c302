#!lua flags=allow-oom
local ttl, want = tonumber(ARGV[3]), ARGV[5] == '1'
local keep = ARGV[4] ~= '' and P .. ARGV[4]
local epoch = redis.call('INCR', G .. (CLUSTER and 'count' or 'epoch'))
local MARKS, MARKED = G .. 'marks', G .. 'marked'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function mark(node)
  redis.call('HSET', MARKS, node, epoch)
  redis.call('ZADD', MARKED, now, node)
end
-- markers past their lifetime go, a bounded number per call
local old = redis.call('ZRANGEBYSCORE', MARKED, '-inf', now - ttl, 'LIMIT', 0, 200)
if #old > 0 then
  redis.call('HDEL', MARKS, unpack(old))
  redis.call('ZREM', MARKED, unpack(old))
end
local RD, RE, skip = G .. 'rev:d:', G .. 'rev:e:', #P + 1
-- without nested entries (nothing in the parents set), no entry is looked up further
local nested = redis.call('SCARD', PARENTS) > 0
local seen_d, removed, dead, left, deps, entries = {}, {}, {}, {}, {}, {}
-- The entries walked, as a set, built only once something may be walked twice: the
-- entries of one level are one set's members (distinct), and the first level meets
-- no earlier one (1,000 dependents: about 0.1 ms less).
local seen_e, kept, distinct = nil, false, false
local function walked_e()
  if not seen_e then
    seen_e = {}
    for _, v in ipairs(removed) do seen_e[v] = true end
    if kept then seen_e[keep] = true end
  end
  return seen_e
end
local function chunks(list, f)
  for i = 1, #list, 1000 do
    f(unpack(list, i, math.min(i + 999, #list)))
  end
end
for i = 8, #ARGV do
  mark(ARGV[i])
  if string.sub(ARGV[i], 1, 2) == 'd:' then
    deps[#deps + 1] = string.sub(ARGV[i], 3)
  else
    entries[#entries + 1] = P .. string.sub(ARGV[i], 3)
  end
end
while #deps > 0 or #entries > 0 do
  local revs, next_d, next_e, fresh = {}, {}, {}, {}
  for _, d in ipairs(deps) do
    if not seen_d['d:' .. d] then
      seen_d['d:' .. d] = true
      -- a cascade's dependency is marked too (start nodes were above)
      mark('d:' .. d)
      local cascade = G .. 'cascade:' .. d
      for _, c in ipairs(redis.call('SMEMBERS', cascade)) do
        next_d[#next_d + 1] = c
      end
      dead[#dead + 1] = cascade
      revs[#revs + 1] = RD .. d
    end
  end
  if distinct and not seen_e and #removed == 0 and not kept then
    for _, v in ipairs(entries) do
      if nested then fresh[#fresh + 1] = v end
      if v ~= keep then removed[#removed + 1] = v else kept = true end
    end
  elseif #entries > 0 then
    local seen = walked_e()
    for _, v in ipairs(entries) do
      if not seen[v] then
        seen[v] = true
        if nested then fresh[#fresh + 1] = v end
        if v ~= keep then removed[#removed + 1] = v else kept = true end
      end
    end
  end
  if nested then
    chunks(fresh, function(...)
      local names = {...}
      for i, has in ipairs(redis.call('SMISMEMBER', PARENTS, ...)) do
        if has == 1 then
          revs[#revs + 1] = RE .. string.sub(names[i], skip)
          left[#left + 1] = names[i]
        end
      end
    end)
  end
  -- (one set, the usual case, is read as it is: SUNION would build a copy first,
  -- about 0.2 ms for 1,000 members)
  distinct = #revs <= 1000
  if #revs == 1 then
    next_e = redis.call('SMEMBERS', revs[1])
  else
    chunks(revs, function(...)
      for _, v in ipairs(redis.call('SUNION', ...)) do
        next_e[#next_e + 1] = v
      end
    end)
  end
  for _, rev in ipairs(revs) do dead[#dead + 1] = rev end
  deps, entries = next_d, next_e
end
chunks(left, function(...) redis.call('SREM', PARENTS, ...) end)
-- the removed entries' links to nodes not walked: they leave those reverse sets
local others = {}
local function other(node, v)
  local walked
  if string.byte(node, 1) == 100 then walked = seen_d[node]
  else walked = walked_e()[P .. string.sub(node, 3)] end
  if not walked then
    local vs = others[node]
    if not vs then vs = {}; others[node] = vs end
    vs[#vs + 1] = v
  end
end
chunks(removed, function(...)
  local links = redis.call('HMGET', LINKS, ...)
  for i = 1, #links do
    local l = links[i]
    -- most entries link to one dependency, which was walked
    if l and not seen_d[l] then
      if string.find(l, '\0', 1, true) then
        local v = select(i, ...)
        for node in string.gmatch(l, '[^%z]+') do other(node, v) end
      else
        other(l, (select(i, ...)))
      end
    end
  end
  redis.call('HDEL', LINKS, ...)
  if CLUSTER then redis.call('HDEL', G .. 'linked', ...) end
end)
for node, vs in pairs(others) do
  for _, v in ipairs(vs) do forget(node, v) end
end
-- on a cluster, values are on other slots: the caller leaves tombstones
if not CLUSTER then chunks(removed, function(...) redis.call('UNLINK', ...) end) end
chunks(dead, function(...) redis.call('UNLINK', ...) end)
if CLUSTER then
  -- This count is reserved until the caller has left its tombstones (`release`):
  -- the count read by instances stays below it meanwhile, so that a value read
  -- before the tombstone lands never passes for newer. (On a cluster, ARGV[6] is
  -- this walk's id and ARGV[7] the ids of the caller's walks whose replies it lost.)
  local INFLIGHT, DEADLINE = G .. 'inflight', G .. 'deadline'
  local counts = {}
  if #removed > 0 then
    redis.call('ZADD', INFLIGHT, epoch, epoch)
    redis.call('HSET', DEADLINE, epoch, now + RESERVE)
    chunks(removed, function(...) redis.call('RPUSH', G .. 'burying:' .. epoch, ...) end)
    counts[1] = epoch
  end
  -- Reservations are taken over (their keys buried with this walk's, then
  -- released with it) when past their deadline (their instance stopped), or when
  -- the caller lost the reply of the walk that holds them. They stay reserved
  -- meanwhile, under a new deadline: the count read does not pass them before
  -- their keys are buried.
  local adopted, taken = {}, {}
  local function adopt(c)
    if taken[c] or not redis.call('ZSCORE', INFLIGHT, c) then return end
    taken[c] = true
    adopted[#adopted + 1] = tonumber(c)
    counts[#counts + 1] = c
    for _, v in ipairs(redis.call('LRANGE', G .. 'burying:' .. c, 0, -1)) do
      removed[#removed + 1] = v
    end
    redis.call('HSET', DEADLINE, c, now + RESERVE)
  end
  for _, c in ipairs(redis.call('ZRANGE', INFLIGHT, 0, 9)) do
    if tonumber(redis.call('HGET', DEADLINE, c) or 0) < now then adopt(c) end
  end
  for id in string.gmatch(ARGV[7], '%S+') do
    for c in string.gmatch(redis.call('GET', G .. 'walk:' .. id) or '', '%S+') do
      adopt(c)
    end
  end
  -- Keys other walks unlinked and have not buried yet: this walk buries them too, so
  -- that its caller, once done, reads none of them (its own walk finds their links
  -- gone, and would leave them to a walk in flight, or to a stopped instance's
  -- deadline).
  -- (Returned apart: they stay with their own reservations.)
  local others = {}
  for _, c in ipairs(redis.call('ZRANGE', INFLIGHT, 0, -1)) do
    if not taken[c] and tonumber(c) ~= epoch then
      for _, v in ipairs(redis.call('LRANGE', G .. 'burying:' .. c, 0, -1)) do
        others[#others + 1] = v
      end
    end
  end
  -- which counts this walk holds, for a later walk of its caller if the reply is lost
  if #counts > 0 then
    redis.call('SET', G .. 'walk:' .. ARGV[6], table.concat(counts, ' '), 'PX', 2 * RESERVE)
  end
  publish_epoch()
  return {epoch, removed, adopted, others}
end
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[7]) end
if want then return removed end
return {}
