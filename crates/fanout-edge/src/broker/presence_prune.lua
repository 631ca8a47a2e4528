-- Deletes presence entries that have expired, checking each one's stored expiry now,
-- at deletion time: an entry refreshed since the caller read it (and saw it expired)
-- stays.
-- KEYS[1] = the channel's presence hash, fanout:{C}:presence
-- ARGV[1] = now, ms since the Unix epoch (the caller's clock, as it compared expiries)
-- ARGV[2], ARGV[3], ... = client ids the caller saw expired
-- Returns the number of entries deleted.
local key = KEYS[1]
local now = tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  local value = redis.call('HGET', key, ARGV[i])
  if value then
    -- `<expiry ms>|<info>`; a value without a readable expiry is as good as expired.
    local expiry = tonumber(string.match(value, '^(%d+)|'))
    if expiry == nil or expiry <= now then
      n = n + redis.call('HDEL', key, ARGV[i])
    end
  end
end
return n
