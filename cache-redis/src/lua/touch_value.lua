local v = redis.call('GET', KEYS[1])
if v and string.byte(v, 1) ~= 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return v
