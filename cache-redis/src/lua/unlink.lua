
-- ARGV[1] is the graph's prefix, followed on a cluster by a zero byte and the
-- graph's identity as the caller knows it (see `crate::graph::GraphKeys::call`)
local G, P, GEN = ARGV[1], ARGV[2], ''
do
  local cut = string.find(G, '\0', 1, true)
  if cut then G, GEN = string.sub(G, 1, cut - 1), string.sub(G, cut + 1) end
end
local LINKS, PARENTS = G .. 'links', G .. 'parents'
local function forget(node, v)
  local rev = G .. 'rev:' .. node
  redis.call('SREM', rev, v)
  if redis.call('EXISTS', rev) == 0 then
    if string.sub(node, 1, 2) == 'd:' then
      redis.call('DEL', G .. 'cascade:' .. string.sub(node, 3))
    else
      redis.call('SREM', PARENTS, P .. string.sub(node, 3))
    end
  end
end
local function unlink(v)
  local links = redis.call('HGET', LINKS, v)
  if links then
    for node in string.gmatch(links, '[^%z]+') do forget(node, v) end
    redis.call('HDEL', LINKS, v)
    if CLUSTER then redis.call('HDEL', G .. 'linked', v) end
  end
end
