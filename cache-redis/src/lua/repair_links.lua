#!lua flags=allow-oom
local lonely, broken = 0, 0
for i = 3, #ARGV do
  local v = ARGV[i]
  local links = redis.call('HGET', LINKS, v)
  if links then
    if redis.call('EXISTS', v) == 0 then
      unlink(v)
      lonely = lonely + 1
    else
      for node in string.gmatch(links, '[^%z]+') do
        if redis.call('SISMEMBER', G .. 'rev:' .. node, v) == 0 then
          redis.call('DEL', v)
          unlink(v)
          broken = broken + 1
          break
        end
      end
    end
  end
end
return {lonely, broken}
