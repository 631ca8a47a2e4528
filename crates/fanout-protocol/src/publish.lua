-- fanout atomic publish (see crates/fanout-protocol/src/layout.rs and docs/protocol.md).
-- KEYS[1] = fanout:{C}:meta   KEYS[2] = fanout:{C}:history
-- KEYS[3] = fanout:{C}:dedup (only needed with an idempotency key, ARGV[8])
-- ARGV[1] = C   ARGV[2] = body starting with '{'   ARGV[3] = history size
-- ARGV[4] = TTL seconds   ARGV[5] = epoch if none   ARGV[6] = '1' for SPUBLISH
-- ARGV[7] = TTL seconds instead of ARGV[4] (a finished job's history), or 0 / absent
-- ARGV[8] = idempotency key (one per logical publish, the same on every resend), or
--           '' / absent: no deduplication
-- ARGV[9] = seconds a key is remembered (default 300)
-- ARGV[10] = most keys remembered per channel (default 10000)
-- Returns {offset, epoch}. With a key: {offset, epoch, 0} when published, or
-- {offset, epoch, 1} when that key was already applied within the window: then nothing
-- is published and offset/epoch are those the first publish got.
--
-- Dedup record: hash KEYS[3], field 'k:'..key = '<offset> <epoch> <ms> <ring slot>';
-- fields 'r:0'..'r:<max-1>' are a ring of the keys in arrival order ('#' counts them),
-- so the oldest key is forgotten when the ring wraps: O(1) per publish, at most
-- ARGV[10] keys, and the hash expires ARGV[9] s after its last keyed publish.
local id = ARGV[8]
local dedup = KEYS[3]
local now = 0
local window = 0
if id and id ~= '' then
  if not dedup then
    return redis.error_reply('ERR fanout publish: an idempotency key (ARGV[8]) needs KEYS[3]')
  end
  window = math.max(1, tonumber(ARGV[9] or '300')) * 1000
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local rec = redis.call('HGET', dedup, 'k:' .. id)
  if rec then
    local off, ep, at = string.match(rec, '^(%d+) (.*) (%d+) %d+$')
    if off and now - tonumber(at) < window then
      return {tonumber(off), ep, 1}
    end
  end
else
  id = nil
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('DEL', KEYS[2])
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local envelope = '{"offset":' .. offset .. ',"epoch":"' .. epoch .. '",' .. string.sub(ARGV[2], 2)
local size = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
if tonumber(ARGV[7] or '0') > 0 then
  ttl = tonumber(ARGV[7])
end
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'e', envelope)
  redis.call('EXPIRE', KEYS[2], ttl)
end
redis.call('EXPIRE', KEYS[1], ttl)
if ARGV[6] == '1' then
  redis.call('SPUBLISH', ARGV[1], envelope)
else
  redis.call('PUBLISH', ARGV[1], envelope)
end
if not id then
  return {offset, epoch}
end
local max = math.max(1, tonumber(ARGV[10] or '10000'))
local slot = redis.call('HINCRBY', dedup, '#', 1) % max
local ring = 'r:' .. slot
local evicted = redis.call('HGET', dedup, ring)
if evicted then
  -- Forget the key this ring slot held, unless it was recorded again since (elsewhere).
  local old = redis.call('HGET', dedup, 'k:' .. evicted)
  if old and string.match(old, ' (%d+)$') == tostring(slot) then
    redis.call('HDEL', dedup, 'k:' .. evicted)
  end
end
redis.call('HSET', dedup, ring, id, 'k:' .. id, offset .. ' ' .. epoch .. ' ' .. now .. ' ' .. slot)
redis.call('PEXPIRE', dedup, window)
return {offset, epoch, 0}
