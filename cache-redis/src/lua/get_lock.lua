-- The read of a miss with distributed single flight: the value and, if it is missing
-- or past its deadline (a fail-safe fallback), the key's lock, in one round trip.
-- KEYS[1] the value, KEYS[2] its lock (same slot), KEYS[3] (optional) the graph's
-- invalidation count.
-- ARGV[1] the lock's token, ARGV[2] its lifetime (ms), ARGV[3] now (unix ms),
-- ARGV[4] a sliding entry's lifetime (ms; 0 for none).
-- Returns {value or nil, 0 (fresh: no lock) | 1 (locked) | 2 (held elsewhere), count}.
local v = redis.call('GET', KEYS[1])
local count = false
if KEYS[3] then count = redis.call('GET', KEYS[3]) end
local live = v and string.byte(v, 1) ~= TOMBSTONE
if live and ARGV[4] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
if live then
  -- the deadline: unix ms, little endian, after the header (0: it moves with reads)
  local d = 0
  for i = HEADER + 8, HEADER + 1, -1 do d = d * 256 + (string.byte(v, i) or 0) end
  if d == 0 or d > tonumber(ARGV[3]) then return {v, 0, count} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {v, 1, count} end
-- someone waits: the holder's release tells the instances
redis.call('APPEND', KEYS[2], '+')
return {v, 2, count}
