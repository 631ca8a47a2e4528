-- Records or refreshes presence entries of one channel and keeps the key's expiry
-- beyond theirs, atomically: the key never lives without an expiry, nor with a shorter
-- one than an entry it holds.
-- KEYS[1] = the channel's presence hash, fanout:{C}:presence
-- ARGV[1] = the entries' expiry, ms since the Unix epoch
-- ARGV[2] = the key's TTL in ms (longer than the entries live); only ever lengthened,
--           since another node's entries may need a longer one
-- ARGV[3], ARGV[4], ... = client id, client info JSON, pairs
-- Returns the number of entries written.
local key = KEYS[1]
local prefix = ARGV[1] .. '|'
local n = 0
local fields = {}
for i = 3, #ARGV - 1, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = prefix .. ARGV[i + 1]
  n = n + 1
  -- HSET in slices, well within Lua's limit on unpacked arguments.
  if #fields >= 1000 then
    redis.call('HSET', key, unpack(fields))
    fields = {}
  end
end
if #fields > 0 then
  redis.call('HSET', key, unpack(fields))
end
local ttl = tonumber(ARGV[2])
if n > 0 and redis.call('PTTL', key) < ttl then
  redis.call('PEXPIRE', key, ttl)
end
return n
