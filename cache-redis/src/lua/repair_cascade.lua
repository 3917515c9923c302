#!lua flags=allow-oom
if redis.call('EXISTS', G .. 'rev:d:' .. ARGV[3]) == 0 then
  return redis.call('DEL', G .. 'cascade:' .. ARGV[3])
end
return 0
