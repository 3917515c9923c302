#!lua flags=allow-oom
local v = ARGV[3]
if redis.call('EXISTS', v) == 1 then return 0 end
if redis.call('HEXISTS', LINKS, v) == 0 then return 0 end
unlink(v)
return 1
