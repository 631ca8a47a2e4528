-- fanout history read (see crates/fanout-protocol/src/layout.rs and docs/protocol.md).
-- KEYS[1] = fanout:{C}:meta   KEYS[2] = fanout:{C}:history
-- ARGV[1] = 'after' (entries with offset > ARGV[2]) or 'last' (the ARGV[2] newest)
-- ARGV[3] = most entries to return
-- Returns {epoch or '', top offset, {envelope, ...}} with envelopes oldest first for
-- 'after' and newest first for 'last'. Epoch, top and entries are read atomically.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {'', 0, {}}
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
