-- fanout history read (see crates/fanout-protocol/src/layout.rs and docs/protocol.md).
-- KEYS[1] = fanout:{C}:meta   KEYS[2] = fanout:{C}:history
-- ARGV[1] = 'after' (entries with offset > ARGV[2]) or 'last' (the ARGV[2] newest)
-- ARGV[3] = most entries to return
-- ARGV[4] = an epoch to start the channel with if it has none ('' or absent: leave it),
-- ARGV[5] = TTL seconds of a position started so. A subscriber of a channel nothing was
-- published to yet gets a real position (offset 0 of that epoch), from which it can
-- recover the channel's first messages; the publish script continues the epoch.
-- Returns {epoch or '', top offset, {envelope, ...}} with envelopes oldest first for
-- 'after' and newest first for 'last'. Epoch, top and entries are read atomically.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  if (ARGV[4] or '') == '' then
    return {'', 0, {}}
  end
  redis.call('HSET', KEYS[1], 'epoch', ARGV[4], 'offset', 0)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  -- A stream left from an epoch that expired must not be read as this one's.
  redis.call('DEL', KEYS[2])
  return {ARGV[4], 0, {}}
end
local top = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
local entries = {}
if ARGV[1] == 'after' then
  -- ARGV[2] is used as text: Lua numbers would print large offsets as 1e+14.
  -- An exclusive start ('(') needs Redis 6.2 or later.
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[2] .. '-0', '+', 'COUNT', ARGV[3])
else
  local n = tonumber(ARGV[2])
  if n > 0 then
    entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', math.min(n, tonumber(ARGV[3])))
  end
end
local out = {}
for i, entry in ipairs(entries) do
  out[i] = entry[2][2]
end
return {epoch, top, out}
