-- Releases a key's lock if this holder still has it (its token, then a `+` for each
-- read that found it held) and, if someone waited, tells the instances.
-- KEYS[1] the lock; ARGV[1] the token, ARGV[2] the channel, ARGV[3] the message.
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if #v > #ARGV[1] then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 2
end
return 1
