#!lua flags=allow-oom
if CLUSTER then
  -- pairs of a value key found without a value and when its links were recorded
  -- before (see `linked`): the links go unless written again since
  local n = 0
  for i = 3, #ARGV, 2 do
    local v, at = ARGV[i], ARGV[i + 1]
    local now = redis.call('HGET', G .. 'linked', v)
    if not now then
      now = redis.call('HEXISTS', LINKS, v) == 1 and '0' or ''
    end
    if now ~= '' and now == at then
      unlink(v)
      n = n + 1
    end
  end
  return n
end
local v = ARGV[3]
if redis.call('EXISTS', v) == 1 then return 0 end
if redis.call('HEXISTS', LINKS, v) == 0 then return 0 end
unlink(v)
return 1
