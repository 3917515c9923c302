#!lua flags=allow-oom
for i = 3, #ARGV do
  local c = ARGV[i]
  redis.call('ZREM', G .. 'inflight', c)
  redis.call('HDEL', G .. 'deadline', c)
  redis.call('DEL', G .. 'burying:' .. c)
end
return publish_epoch()
