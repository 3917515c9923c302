
local G, P = ARGV[1], ARGV[2]
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
